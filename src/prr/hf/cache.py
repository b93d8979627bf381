"""A transformers ``Cache`` whose layers are prr's paged KV caches (with DSA block metadata and PRR state).

transformers calls ``cache.update(k, v, layer_idx, ...)`` in every attention layer right before its attention
function; :class:`PrrLayer` stores the keys and values there and marks itself as the layer whose attention runs
next (:func:`active_layer`), so the registered attention function (:mod:`prr.hf.attention`) finds the layer's
state without any change to the model's code. The prompt (one call with many tokens) is stored in bulk and
attended by transformers' SDPA; each later call must bring one token per sequence and is attended by prr.

Limits: one prompt per cache (no chunked prefill, no second ``generate`` on the same cache); a fixed capacity
(``max_cache_len``); unpadded batches of equal-length prompts; no beam search or cropping.
"""

from __future__ import annotations

import contextvars

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import BlockMetadata
from ..algo.step import speculative_top_k
from ..cache import KVCache
from ..model.config import hf_sliding_window
from ..runtime.layer import LayerStep, StepStreams
from .settings import PrrSettings

# GLM-4 (glm, glm4) rotates half of each head: transformers applies that RoPE, prr only attends.
FAMILIES = ("llama", "qwen2", "mistral", "glm", "glm4")
_ACTIVE: contextvars.ContextVar[PrrLayer | None] = contextvars.ContextVar("prr_hf_active_layer", default=None)


def active_layer(layer_idx: int) -> PrrLayer | None:
    """The :class:`PrrLayer` that was just updated for `layer_idx` (consumed: a second call returns None)."""
    layer = _ACTIVE.get()
    _ACTIVE.set(None)
    return layer if layer is not None and layer.index == layer_idx else None


def check_model(model) -> None:
    """ValueError unless `model` is a transformers causal LM of a family prr.hf supports."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"prr.hf supports transformers models of type {', '.join(FAMILIES)}; got {kind!r}")
    if not getattr(cfg, "is_causal", True):
        raise ValueError("prr.hf needs a causal model (config.is_causal is False)")


class PrrLayer(CacheLayerMixin):
    """One layer's prr state: the paged cache, block metadata and runtime step (sparse layers)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: PrrCache, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.sparse = owner.settings.method != "dense" and index >= owner.settings.dense_layers
        self.length = 0  # tokens stored, known on the host (no device read)
        self.kv: KVCache | None = None
        self.meta: BlockMetadata | None = None
        self.step: LayerStep | None = None
        self._calib_q: torch.Tensor | None = None
        self._all = None

    def lazy_initialization(self, key_states, value_states) -> None:
        b, hkv, _, d = key_states.shape
        self.kv = KVCache.allocate(b, self.owner.capacity, hkv, d, dtype=key_states.dtype,
                                   device=key_states.device)
        self.device, self.batch_size = key_states.device, b
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``k, v [B, Hkv, T, D]``: the prompt (T tokens, once), then one token per call."""
        t = key_states.shape[-2]
        if self.length + t > self.owner.capacity:
            raise ValueError(f"the PrrCache holds max_cache_len={self.owner.capacity} tokens per sequence; "
                             f"this call would make {self.length + t}")
        if self.kv is None:
            self.lazy_initialization(key_states, value_states)
            self.owner.started(self)
            lens = torch.full((key_states.shape[0],), t, dtype=torch.int32, device=key_states.device)
            self.kv.write(key_states, value_states, lens)
            if self.sparse:
                self.meta = BlockMetadata(self.owner.settings.sparse, self.kv)
        elif t == 1:
            if key_states.shape[0] != self.kv.batch:
                raise ValueError(f"the batch changed from {self.kv.batch} to {key_states.shape[0]} sequences")
            self.kv.append(key_states[:, :, 0], value_states[:, :, 0])
            if self.meta is not None:
                self.meta.append(self.kv)
        else:
            raise ValueError(f"after the prompt prr decodes one token per sequence per call, got {t} (a PrrCache "
                             "holds one prompt: make a new one per prompt)")
        self.length += t
        _ACTIVE.set(self)
        return key_states, value_states

    # ---- attention (called by prr.hf.attention) -----------------------------------------------------------
    def after_prefill(self, query: torch.Tensor, scale: float) -> None:
        """Build the decode state once the prompt's attention ran: ``query [B, Hq, T, D]`` (RoPE'd)."""
        if not self.sparse:
            return
        s = self.owner.settings
        if s.method == "dsa":
            self.step = LayerStep(self.kv, self.meta, query.shape[1], method="dsa", scale=scale)
            return
        pred = self.owner.predictor_for(self.kv)
        self._calibrate(pred, query[:, :, -s.calibrate_window:].permute(2, 0, 1, 3).contiguous())
        side, sel = self.owner.streams(self.kv.device)
        self.step = LayerStep(self.kv, self.meta, query.shape[1], method="prr", predictor=pred, layer=self.index,
                              ratio=s.ratio, mode=s.mode, scale=scale, streams=StepStreams(side, sel, defer_tail=True),
                              collect_stats=s.collect_stats, grow=1)

    def _calibrate(self, pred: HoltPredictor, qs: torch.Tensor) -> None:
        """Fit the layer's predictor to the selections of the last W prompt positions (``qs [W, B, Hq, D]``),
        computed as if they were decode steps, as the engine does."""
        cfg, kv = self.owner.settings.sparse, self.kv
        w, t = qs.shape[0], self.length
        if w < 2 or t < w:
            return
        scores, nblk = [], []
        for j in range(w):
            view = KVCache(kv.k, kv.v, kv.page_table, torch.full_like(kv.seq_lens, t - w + j + 1))
            scores.append(self.meta.scores(qs[j], view))
            nblk.append(ops.num_blocks(view.seq_lens, cfg.block_size))
        pred.calibrate(self.index, torch.stack(scores), torch.stack(nblk), cfg.top_k, cfg.n_sink, cfg.n_local,
                       spec_k=speculative_top_k(cfg.top_k, self.owner.settings.ratio))

    def decode(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output ``[B, Hq, D]`` of one token's query ``q [B, Hq, D]`` (its key already stored)."""
        if self.step is not None:
            self.step.join()  # the previous token's deferred PRR tails (a no-op off CUDA)
            o, _ = self.step.run(q)
            if self.owner.settings.collect_stats and self.step.stats is not None:
                self.owner.step_stats.append(self.step.stats)
            return o
        kv = self.kv
        if kv.device.type != "cuda":
            return ops.dense_decode(q, kv, scale)[0]
        # On a GPU: the paged kernel over every page (no copy of the cache per step).
        if self._all is None:
            idx = torch.arange(kv.max_pages, dtype=torch.int32, device=kv.device)
            self._all = (idx.expand(kv.batch, kv.num_kv_heads, -1).contiguous(),
                         torch.empty(kv.batch, kv.num_kv_heads, dtype=torch.int32, device=kv.device))
        idx, cnt = self._all
        cnt.copy_(ops.num_blocks(kv.seq_lens, kv.page_size)[:, None].expand_as(cnt))
        return ops.sparse_decode(q, kv, idx, cnt, kv.page_size, scale)[0]

    # ---- the transformers layer interface -----------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.capacity

    def reset(self) -> None:
        self.__init__(self.owner, self.index)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("prr.hf does not support beam search (reordering the paged cache)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("prr.hf does not crop its cache (assisted / speculative generation)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("prr.hf does not expand a cache (num_return_sequences > 1, beam search)")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("prr.hf does not select sequences out of its cache")

    def offload(self):
        raise NotImplementedError("prr.hf does not offload its cache")


class PrrCache(Cache):
    """A transformers cache for `model` whose decode steps run prr's attention (see :mod:`prr.hf`).

    Args:
        model: a transformers Llama / Qwen2 / Mistral causal LM (its attention set to ``"prr"`` by
            :func:`prr.hf.enable`).
        settings: :class:`PrrSettings`.
        max_cache_len: tokens per sequence the cache holds (prompt + new tokens).
    """

    def __init__(self, model, settings: PrrSettings | None = None, *, max_cache_len: int):
        check_model(model)
        settings = settings or PrrSettings()
        if not isinstance(settings, PrrSettings):
            raise TypeError(f"settings must be a PrrSettings, got {type(settings).__name__}")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        cfg = model.config
        window = hf_sliding_window(cfg.to_dict())
        if window is not None and max_cache_len > window:
            raise ValueError(f"the model's layers use sliding_window={window}, prr attends the whole context: "
                             f"max_cache_len ({max_cache_len}) must be at most {window}")
        self.settings, self.capacity = settings, max_cache_len
        self.num_layers = cfg.num_hidden_layers
        self.predictor: HoltPredictor | None = None
        self.step_stats: list = []
        self._streams = None
        super().__init__(layers=[PrrLayer(self, i) for i in range(self.num_layers)])

    def started(self, layer: PrrLayer) -> None:
        """Every layer stores the same batch (a second prompt would need a fresh cache)."""
        batch = {x.kv.batch for x in self.layers if x.kv is not None}
        if len(batch) > 1:
            raise ValueError(f"all layers must hold the same batch, got {sorted(batch)}")

    def predictor_for(self, kv: KVCache) -> HoltPredictor:
        if self.predictor is None:
            self.predictor = HoltPredictor(self.num_layers, kv.batch, kv.num_kv_heads,
                                           kv.max_blocks(self.settings.sparse.block_size), device=kv.device)
        return self.predictor

    def streams(self, device: torch.device):
        """The (side, selection) CUDA streams every PRR layer shares, as in the engine; None off CUDA."""
        if device.type != "cuda":
            return None, None
        if self._streams is None:
            self._streams = (torch.cuda.Stream(device=device), torch.cuda.Stream(device=device, priority=-1))
        return self._streams

    def hit_rate(self) -> float | None:
        """Mean dynamic hit rate over the collected PRR steps (``collect_stats=True``); None without any."""
        if not self.step_stats:
            return None
        return sum(s.hit_rate() for s in self.step_stats) / len(self.step_stats)
