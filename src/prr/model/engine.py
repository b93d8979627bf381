"""Generation on a real model with dense, serialized-DSA or PRR attention per decode step.

Prefill is dense: it fills each layer's KV cache, builds the block metadata in bulk and, for PRR, calibrates
each layer's predictor on the selections of the last ``calibrate_window`` prompt positions (computed as if
they were decode steps; the block holding a position includes up to BS-1 later prompt tokens in its
metadata, a small leak accepted for calibration). The first ``n_dense_layers`` layers stay dense, as Quest
does. Decoding is greedy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .. import _checks as check
from .. import memory, ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import BlockMetadata, SparseConfig
from ..algo.step import dsa_step, speculative_top_k
from ..cache import KVCache
from ..runtime.layer import LayerStep
from .llama import Llama
from .tokenizer import Tokenizer

ATTENTIONS = ("dense", "dsa", "prr")


class CacheFull(ValueError):
    """The KV cache filled up during :meth:`Engine.generate`; ``tokens`` and ``stats`` hold what was generated
    before the step that did not fit."""

    def __init__(self, message: str, tokens: list[int], stats: GenerationStats):
        super().__init__(message)
        self.tokens, self.stats = tokens, stats


@dataclass
class GenerationStats:
    attention: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    hit_rates: list[float] = field(default_factory=list)  # PRR: per step, mean over sparse layers
    blocks_per_step: list[float] = field(default_factory=list)  # |S| per (sequence, KV head), mean
    misses_per_step: list[float] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.new_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def hit_rate(self) -> float | None:
        return sum(self.hit_rates) / len(self.hit_rates) if self.hit_rates else None

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("hit_rates", "blocks_per_step", "misses_per_step"):
            d.pop(k)
        d.update(ms_per_token=round(self.ms_per_token, 3), tokens_per_s=round(self.tokens_per_s, 2),
                 hit_rate=None if self.hit_rate is None else round(self.hit_rate, 4),
                 blocks_per_step=round(sum(self.blocks_per_step) / len(self.blocks_per_step), 2)
                 if self.blocks_per_step else None)
        return d


class Engine:
    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None, *, attention: str = "dense",
                 sparse: SparseConfig | None = None, ratio: float = 1.5, mode: str = "exact",
                 n_dense_layers: int = 2, calibrate_window: int = 16):
        check.choice("attention", attention, ATTENTIONS)
        self.model, self.tok, self.cfg = model, tokenizer, model.cfg
        self.attention = attention
        self.sparse = sparse or SparseConfig.from_budget("quest", 1024)
        self.ratio, self.mode = ratio, mode
        speculative_top_k(self.sparse.top_k, ratio)  # validates the ratio
        self.n_dense_layers = check.nonneg_int("n_dense_layers", n_dense_layers)
        self.calibrate_window = calibrate_window
        self.caches: list[KVCache] = []
        self.metas: list[BlockMetadata | None] = []
        self.predictor: HoltPredictor | None = None
        self._calib_q: dict[int, torch.Tensor] = {}
        self._step_stats: list = []
        self._all_blocks = None
        self._graph = None
        self._steps: dict[int, LayerStep] = {}
        self.record: dict | None = None  # layer -> [(scores [B, Hkv, N], num_blocks [B])] when set to {}

    # ---- prefill -----------------------------------------------------------------------------------------
    def _sparse_layer(self, i: int) -> bool:
        return self.attention != "dense" and i >= self.n_dense_layers

    def prefill(self, prompt: list[int] | torch.Tensor, max_new_tokens: int,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the prompt ``[T]`` (or ``[B, T]``) densely; caches get room for `max_new_tokens` more.
        Returns the last position's logits ``[B, V]``."""
        c, dev = self.cfg, self.model.device
        ids = torch.as_tensor(prompt, dtype=torch.long, device=dev)
        ids = ids[None] if ids.dim() == 1 else ids
        b, t = ids.shape
        if t == 0:
            raise ValueError("the prompt is empty")
        if t + max_new_tokens > c.max_context:
            raise ValueError(f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"context of {c.max_context} tokens")
        cap = t + max_new_tokens
        self._require_caches(b, cap)
        self.caches = [KVCache.allocate(b, cap, c.num_kv_heads, c.head_dim, page_size=16, dtype=self.model.dtype,
                                        device=dev) for _ in range(c.num_layers)]
        lens = torch.full((b,), t, dtype=torch.int32, device=dev)
        self._prompt_lens = lens.clone()
        w = self.calibrate_window

        def store(i, q, k, v):
            self.caches[i].write(k.transpose(1, 2), v.transpose(1, 2), lens)
            self._calib_q[i] = q[:, -w:].transpose(0, 1).contiguous()  # [W, B, Hq, D]
            if progress:
                progress(i)

        logits = self.model.prefill(ids, store)
        self._last_logits = logits
        self._build_sparse_state()
        return logits

    def adopt_prefill(self, other: Engine) -> None:
        """Start from another engine's prefill (same model): copy its caches, rebuild this engine's metadata
        and calibration. Lets dense, DSA and PRR share one prefill."""
        # The other engine may have decoded since: its tokens past the prompt are ignored (and overwritten).
        self.caches = [KVCache(c.k.clone(), c.v.clone(), c.page_table.clone(), other._prompt_lens.clone())
                       for c in other.caches]
        self._prompt_lens = other._prompt_lens.clone()
        self._last_logits = other._last_logits
        self._calib_q = dict(other._calib_q)
        self._build_sparse_state()

    def _build_sparse_state(self) -> None:
        c, cfg = self.cfg, self.sparse
        self.metas = [BlockMetadata(cfg, self.caches[i]) if self._sparse_layer(i) else None
                      for i in range(c.num_layers)]
        self._step_stats = []
        self._steps = {}
        if self.attention != "prr":
            return
        cache0 = self.caches[0]
        nmax = cache0.max_blocks(cfg.block_size)
        self.predictor = HoltPredictor(c.num_layers, cache0.batch, c.num_kv_heads, nmax, device=cache0.device)
        spec_k = speculative_top_k(cfg.top_k, self.ratio)
        for i in range(self.n_dense_layers, c.num_layers):
            if i not in self._calib_q:
                continue
            cache, qs = self.caches[i], self._calib_q[i]
            t = int(cache.seq_lens.max())
            w = qs.shape[0]
            scores, nblk = [], []
            for j in range(w):  # the last W prompt positions as if they were decode steps
                view = KVCache(cache.k, cache.v, cache.page_table, torch.full_like(cache.seq_lens, t - w + j + 1))
                scores.append(self.metas[i].scores(qs[j], view))
                nblk.append(ops.num_blocks(view.seq_lens, cfg.block_size))
            if w >= 2:
                self.predictor.calibrate(i, torch.stack(scores), torch.stack(nblk), cfg.top_k, cfg.n_sink,
                                         cfg.n_local, spec_k=spec_k)
        # One runtime step per sparse layer (built after calibration: each predicts its first P now). On a GPU
        # the layers share two streams: the selection's (high priority) and the side stream that runs the
        # speculation and each layer's deferred tail (predictor update + next P) beside the next layer's
        # projections; the token's step joins it once at the end.
        cuda = cache0.device.type == "cuda"
        side = torch.cuda.Stream(device=cache0.device) if cuda else None
        sel = torch.cuda.Stream(device=cache0.device, priority=-1) if cuda else None
        for i in range(self.n_dense_layers, c.num_layers):
            self._steps[i] = LayerStep(self.caches[i], self.metas[i], c.num_q_heads, method="prr",
                                       predictor=self.predictor, layer=i, ratio=self.ratio, mode=self.mode,
                                       side_stream=side, sel_stream=sel, defer_tail=True, collect_stats=True,
                                       grow=1)

    def _require_caches(self, batch: int, capacity: int) -> None:
        c = self.cfg
        nbytes = memory.kv_cache_bytes(c.num_layers, batch, capacity, c.num_kv_heads, c.head_dim, self.model.dtype,
                                       block_size=None if self.attention == "dense" else self.sparse.block_size)
        memory.require(nbytes, self.model.device, f"the KV caches ({c.num_layers} layers x {batch} x {capacity} "
                                                  "tokens)")

    # ---- decode ------------------------------------------------------------------------------------------
    def _dense(self, q, cache: KVCache):
        if cache.device.type != "cuda":
            return ops.dense_decode(q, cache)[0]
        # On a GPU dense attention is the paged kernel over every block (no copy of the cache per step).
        if self._all_blocks is None or self._all_blocks[0].shape[-1] != cache.max_pages:
            idx = torch.arange(cache.max_pages, dtype=torch.int32, device=cache.device)
            self._all_blocks = (idx.expand(cache.batch, cache.num_kv_heads, -1).contiguous(),
                                torch.empty(cache.batch, cache.num_kv_heads, dtype=torch.int32, device=cache.device))
        idx, cnt = self._all_blocks
        cnt.copy_(ops.num_blocks(cache.seq_lens, cache.page_size)[:, None].expand_as(cnt))
        return ops.sparse_decode(q, cache, idx, cnt, cache.page_size)[0]

    def _attend(self, i: int, q, k, v):
        cache = self.caches[i]
        cache.append(k, v)
        if not self._sparse_layer(i):
            return self._dense(q, cache)
        meta = self.metas[i]
        meta.append(cache)
        if self.attention == "dsa":
            out = dsa_step(q, cache, meta)
            o, stats, scores = out.o, out.stats, out.selection.scores
        else:  # the runtime step: on a GPU selection and speculation overlap, the tail is deferred
            step = self._steps[i]
            o, _ = step.run(q)
            stats, scores = step.stats, step.last["scores"]
        self._step_stats.append(stats)
        if self.record is not None:  # the locality study keeps every sparse layer's true block scores
            self.record.setdefault(i, []).append((scores.clone(), ops.num_blocks(
                cache.seq_lens, self.sparse.block_size)))
        return o

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence (``tokens [B]``): logits ``[B, V]``. Replays the captured CUDA graph
        when :meth:`capture_decode` made one."""
        if self._graph is not None:
            self._g_tokens.copy_(tokens)
            self._graph.replay()
            self._step_stats = self._g_stats
            return self._g_logits
        pos = self.caches[0].seq_lens.long()
        logits = self.model.decode(tokens, pos, self._attend)
        if self._steps:  # the last layers' deferred tails (one shared side stream)
            next(iter(self._steps.values())).join()
        return logits

    def capture_decode(self) -> None:
        """Capture one whole decode step (every layer, its cache append, metadata update, selection,
        speculation and repair) in a CUDA graph; :meth:`step` then replays it. Run one eager step first so the
        kernels are compiled (capture itself executes nothing)."""
        if self.model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self._graph = None
        b = self.caches[0].batch
        self._g_tokens = torch.zeros(b, dtype=torch.long, device=self.model.device)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        self._step_stats = []
        with torch.cuda.graph(g):
            self._g_logits = self.step(self._g_tokens)
        self._g_stats = self._step_stats
        self._graph = g

    def fill_random(self, batch: int, context: int, max_new_tokens: int, seed: int = 0) -> None:
        """Latency work: caches of `context` random tokens per sequence, as if prefilled (no prompt, so no
        predictor calibration: PRR starts from an empty predictor)."""
        c, dev = self.cfg, self.model.device
        cap = context + max_new_tokens
        if cap > c.max_context:
            raise ValueError(f"context + max_new_tokens ({cap}) exceeds the model's context ({c.max_context})")
        self._require_caches(batch, cap)
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.caches = []
        for _ in range(c.num_layers):
            cache = KVCache.allocate(batch, cap, c.num_kv_heads, c.head_dim, dtype=self.model.dtype, device=dev)
            cache.k.copy_(torch.randn(cache.k.shape, generator=gen, device=dev, dtype=torch.float32))
            cache.v.copy_(torch.randn(cache.v.shape, generator=gen, device=dev, dtype=torch.float32))
            cache.seq_lens.fill_(context)
            self.caches.append(cache)
        self._prompt_lens = self.caches[0].seq_lens.clone()
        self._calib_q = {}
        self.calibrate_window = 0
        self._build_sparse_state()

    def generate(self, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool = True,
                 on_token: Callable[[int], None] | None = None,
                 prefill_progress: Callable[[int], None] | None = None, prefilled_from: Engine | None = None
                 ) -> tuple[list[int], GenerationStats]:
        """Greedy generation for one prompt. Returns the new token ids and the stats."""
        check.positive_int("max_new_tokens", max_new_tokens)
        stats = GenerationStats(self.attention, prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        if prefilled_from is not None:
            self.adopt_prefill(prefilled_from)
            logits = self._last_logits
        else:
            logits = self.prefill(prompt, max_new_tokens, progress=prefill_progress)
        stats.prefill_s = time.perf_counter() - t0
        out: list[int] = []
        eos = set(self.tok.eos_ids) if (self.tok and stop_at_eos) else set()
        t0 = time.perf_counter()
        nxt = int(logits[0].argmax())
        filled, cap = int(self.caches[0].seq_lens.max()), self.caches[0].capacity  # host-side: no sync per step
        for _ in range(max_new_tokens):
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if nxt in eos or len(out) == max_new_tokens:
                break
            if filled >= cap:  # checked on the host: on CUDA an append past the capacity would write out of bounds
                stats.decode_s, stats.new_tokens = time.perf_counter() - t0, len(out)
                raise CacheFull(f"the KV cache is full ({cap} tokens: a {stats.prompt_tokens}-token prompt and "
                                f"{len(out)} generated tokens); the tokens generated so far are returned with this "
                                "error (CacheFull.tokens)", out, stats)
            filled += 1
            self._step_stats = []
            logits = self.step(torch.tensor([nxt], device=self.model.device))
            self._record(stats)
            nxt = int(logits[0].argmax())
        stats.decode_s = time.perf_counter() - t0
        stats.new_tokens = len(out)
        return out, stats

    def _record(self, stats: GenerationStats) -> None:
        if not self._step_stats:
            return
        sel = torch.stack([s.selected.float().mean() for s in self._step_stats]).mean()
        stats.blocks_per_step.append(float(sel))
        if self.attention == "prr":
            stats.hit_rates.append(sum(s.hit_rate() for s in self._step_stats) / len(self._step_stats))
            stats.misses_per_step.append(float(torch.stack([s.misses.float().mean()
                                                            for s in self._step_stats]).mean()))
