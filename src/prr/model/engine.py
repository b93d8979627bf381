"""Generation on a real model with dense, serialized-DSA or PRR attention per decode step.

Prefill is dense: it fills each layer's KV cache, builds the block metadata in bulk and, for PRR, calibrates
each layer's predictor on the selections of the last ``calibrate_window`` prompt positions (computed as if
they were decode steps; the block holding a position includes up to BS-1 later prompt tokens in its
metadata, a small leak accepted for calibration). The first ``n_dense_layers`` layers stay dense, as Quest
does. Prompts of different lengths (a ragged batch) are prefilled one at a time, each into its row of the
batch's caches, and decoded together; a finished sequence's cache length is reset to 0 (it then attends one
token per step), so it stops costing attention. ``attention="auto"`` picks dense or sparse attention from the
context at the start of decoding (:mod:`prr.model.auto`). Decoding itself (sampling, stop conditions,
streaming, the CUDA graph of the step) is :mod:`prr.model.generation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch

from .. import _checks as check
from .. import memory, ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import BlockMetadata, SparseConfig
from ..algo.step import StepCounts, dsa_step, speculative_top_k
from ..cache import KVCache
from ..ops import fused
from ..runtime.layer import OVERLAPS, LayerStep, StepSettings, StepStreams
from . import auto
from .generation import CacheFull, Generation, GenerationConfig, GenerationStats, SequenceResult
from .llama import Llama
from .sampling import SamplingConfig
from .tokenizer import Tokenizer

ATTENTIONS = ("dense", "dsa", "prr")

AUTO_CPU_RATIO = 1.5
"""PRR's speculation ratio for ``ratio="auto"`` where the budget profiler has no query to time (a GPU engine
calibrated on no prompt positions, ``calibrate_window=0``)."""
PREDICTORS = ("selection", "holt", "previous")

__all__ = ["ATTENTIONS", "AUTO_CPU_RATIO", "CacheFull", "CapturedStep", "Engine", "GenerationStats"]


def _rank0_decision(tp, dec, device):
    """Tensor parallelism: rank 0's budget decision (K' or off, and the top-K search) on every rank."""
    if tp is None or not tp.active:
        return dec
    mine = [-1 if dec.spec_k is None else dec.spec_k, int(dec.topk == "guessed")]
    spec_k, guessed = tp.rank0_ints(mine, device)
    if [spec_k, guessed] == mine:
        return dec
    return dataclasses.replace(dec, spec_k=None if spec_k < 0 else spec_k, topk="guessed" if guessed else "full",
                               reason=f"rank 0's decision (this rank measured: {dec.reason})")


class CapturedStep:
    """A function of ``tokens [B]`` captured in a CUDA graph: :meth:`run` copies the tokens in and replays.

    Sparse layers whose amortized selectors run on the host schedule (issue #12) get one graph per step kind
    (scan, re-score) in one memory pool; :meth:`run` replays the kind their host clock names (no device read)."""

    def __init__(self, eng: Engine, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.eng = eng
        self.tokens = torch.zeros(eng.caches[0].batch, dtype=torch.long, device=eng.model.device)
        self.selectors = eng._host_scheduled_selectors()
        torch.cuda.synchronize()
        self.kinds: dict = {}
        pool = None
        for kind in ((True, False) if self.selectors else (None,)):
            with contextlib.ExitStack() as forced:
                for sel in self.selectors:
                    forced.enter_context(sel.forced(kind))
                graph = torch.cuda.CUDAGraph()
                eng._step_stats = []
                with torch.cuda.graph(graph, pool=pool):
                    out = fn(self.tokens)
            pool = graph.pool() if pool is None else pool
            # the layers' StepStats, in graph memory: each replay refreshes them
            self.kinds[kind] = (graph, out, eng._step_stats)
        self.graph, self.out, self.stats = next(iter(self.kinds.values()))

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.selectors:
            self.graph, self.out, self.stats = self.kinds[self.selectors[0].next_is_scan()]
        self.graph.replay()
        for sel in self.selectors:
            sel.advance()
        self.eng._step_stats = self.stats
        return self.out


class Engine:
    """Prefill, decode steps and generation on one model with one attention.

    Args:
        attention: ``"dense"``, ``"dsa"``, ``"prr"`` or ``"auto"`` (dense below the crossover context, else
            `auto_sparse`; the crossover is `auto_crossover` if given, else profiled on a GPU and cached, else
            :data:`prr.model.auto.CPU_CROSSOVER` on a CPU).
        ratio: PRR's speculation ratio (K' = ceil(r K)), or ``"auto"``: on a GPU the speculation budget profiler
            (:func:`prr.runtime.profile_budget`, cached per GPU, shapes and context bucket) times one layer at
            the prompt's context after the prefill and picks K', or switches speculation off where it does not
            pay (then PRR decodes as DSA with the guessed top-K, or the full one where that does not pay
            either: the same selection; ``spec_decision`` says why); on a CPU no speculation and the full
            top-K (nothing runs beside the selection there, and the full search is the cheaper one); under
            tensor parallelism every rank profiles its slice and all take rank 0's decision.
        predictor: where PRR's predicted set P comes from: ``"selection"`` (the guessed top-K writes it beside
            S, from the same search: no predictor state or kernel) or ``"holt"`` (Holt's smoothing of the
            scores, calibrated on the prompt, updated by a tail kernel per layer) or ``"previous"`` (the previous
            step's S, its selection found by DSA's own full top-K: K' = K, so ``ratio`` must be 1).
        speculate: False: PRR decodes as DSA on the guessed top-K (the same selection found from the previous
            step's, no speculation or repair).
        overlap: what PRR's speculation runs beside on a GPU: ``"topk"`` (the default: the top-K alone, after
            the scores) or ``"selection"`` (scores and top-K, the paper's schedule); :class:`prr.runtime.StepSettings`.
            Whole-model decode measured "topk" the faster of the two in every pair run (the Results page).
        graphs: on a GPU, generation captures the decode step in a CUDA graph after its first (eager) step.
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None, *, attention: str = "dense",
                 sparse: SparseConfig | None = None, ratio: float | str = 1.5, mode: str = "exact",
                 n_dense_layers: int = 2, calibrate_window: int = 16, graphs: bool = True,
                 auto_sparse: str = "dsa", auto_crossover: int | None = None, predictor: str = "selection",
                 speculate: bool = True, overlap: str = "topk"):
        check.choice("attention", attention, (*ATTENTIONS, "auto"))
        check.choice("predictor", predictor, PREDICTORS)
        if predictor == "previous" and ratio != 1:
            raise ValueError(f"predictor='previous' speculates over the previous selection (K' = K): ratio must be "
                             f"1, got {ratio!r}")
        self.predictor_kind = predictor
        # False: PRR's steps decode as DSA on the guessed top-K (no P, no speculation); ratio="auto" decides
        self.speculate_requested = self.speculate = bool(speculate)
        check.choice("overlap", overlap, OVERLAPS)
        self.overlap = overlap
        check.choice("auto_sparse", auto_sparse, ("dsa", "prr"))
        if auto_crossover is not None:
            check.positive_int("auto_crossover", auto_crossover)
        self.model, self.tok, self.cfg = model, tokenizer, model.cfg
        self.requested = attention
        # "auto" is resolved when the context is known (after a prefill); until then it decodes densely.
        self.attention = "dense" if attention == "auto" else attention
        self.auto_sparse, self.auto_crossover = auto_sparse, auto_crossover
        self.auto_decision: dict | None = None
        self.graphs = graphs
        self.sparse = sparse or SparseConfig.from_budget("quest", 1024)
        self.ratio_requested, self.mode = ratio, mode
        self.ratio = AUTO_CPU_RATIO if ratio == "auto" else ratio
        speculative_top_k(self.sparse.top_k, self.ratio)  # validates the ratio
        self.spec_decision: dict | None = None  # ratio="auto": what the profiler chose, and why
        self.n_dense_layers = check.nonneg_int("n_dense_layers", n_dense_layers)
        self.calibrate_window = calibrate_window
        self.caches: list[KVCache] = []
        self.metas: list[BlockMetadata | None] = []
        self.predictor: HoltPredictor | None = None
        self._calib_q: dict[int, torch.Tensor] = {}
        self._step_stats: list = []
        self._all_blocks = None
        self._counts = self._pages = None  # per decode step: StepCounts, pages per sequence
        self._advanced = False  # this step advanced every layer's length up front (see decode_step)
        self._graph = None
        self._steps: dict[int, LayerStep] = {}
        self.record: dict | None = None  # layer -> [(scores [B, Hkv, N], num_blocks [B])] when set to {}

    # ---- prefill -----------------------------------------------------------------------------------------
    def _sparse_layer(self, i: int) -> bool:
        return self.attention != "dense" and i >= self.n_dense_layers

    @staticmethod
    def _as_rows(prompt) -> list[torch.Tensor]:
        """A prompt ``[T]`` (ids or tensor), a batch ``[B, T]`` or a list of prompts of any lengths -> rows."""
        if isinstance(prompt, torch.Tensor):
            rows = [prompt] if prompt.dim() == 1 else list(prompt)
        elif len(prompt) and isinstance(prompt[0], (list, tuple, torch.Tensor)):
            rows = [torch.as_tensor(p, dtype=torch.long) for p in prompt]
        else:
            rows = [torch.as_tensor(prompt, dtype=torch.long)]
        if not rows:
            raise ValueError("the batch holds no prompt")
        for j, r in enumerate(rows):
            if r.dim() != 1:
                raise ValueError(f"prompt {j} must be a flat list of token ids, got shape {tuple(r.shape)}")
            if r.numel() == 0:
                raise ValueError("the prompt is empty" if len(rows) == 1 else f"prompt {j} of the batch is empty")
        return rows

    def _new_caches(self, batch: int, capacity: int) -> None:
        """One cache per layer; their ``seq_lens`` are rows of one ``[L, B]`` tensor, so that freezing finished
        sequences is one op for every layer."""
        c, dev = self.cfg, self.model.device
        self._require_caches(batch, capacity)
        self.caches = [KVCache.allocate(batch, capacity, c.num_kv_heads, c.head_dim, page_size=16,
                                        dtype=self.model.dtype, device=dev) for _ in range(c.num_layers)]
        self._lens = torch.zeros(c.num_layers, batch, dtype=torch.int32, device=dev)
        for i, cache in enumerate(self.caches):
            cache.seq_lens = self._lens[i]

    def prefill(self, prompt, max_new_tokens: int, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the prompt densely: ``[T]``, ``[B, T]``, or a list of prompts of different lengths (each then
        prefilled alone into its row of the caches). Caches get room for `max_new_tokens` more tokens after
        the longest prompt. Returns the last prompt position's logits ``[B, V]``."""
        c, dev = self.cfg, self.model.device
        check.positive_int("max_new_tokens", max_new_tokens)
        rows = self._as_rows(prompt)
        lens = [int(r.numel()) for r in rows]
        if max(lens) + max_new_tokens > c.max_context:
            raise ValueError(f"prompt ({max(lens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {c.max_context} tokens")
        b = len(rows)
        self._new_caches(b, max(lens) + max_new_tokens)
        w = min(self.calibrate_window, min(lens))
        self._calib_q = {}

        def store(i, q, k, v, row=None):
            cache = self.caches[i]
            if row is not None:  # one prompt of a ragged batch: its row of the cache
                cache = KVCache(cache.k, cache.v, cache.page_table[row:row + 1], cache.seq_lens[row:row + 1])
            cache.write(k.transpose(1, 2), v.transpose(1, 2),
                        torch.full((k.shape[0],), k.shape[1], dtype=torch.int32, device=dev))
            if w:
                cq = self._calib_q.setdefault(i, q.new_empty(w, b, *q.shape[2:]))  # [W, B, Hq, D]
                cq[:, slice(None) if row is None else slice(row, row + 1)] = q[:, -w:].transpose(0, 1)
            if progress:
                progress(i)

        if len(set(lens)) == 1:  # equal lengths: one batched pass
            logits = self.model.prefill(torch.stack(rows).to(dev), store)
        else:
            logits = torch.cat([self.model.prefill(r.to(dev)[None], lambda *a, j=j: store(*a, row=j))
                                for j, r in enumerate(rows)])
        self._prompt_lens = self.caches[0].seq_lens.clone()
        self._last_logits = logits
        self._build_sparse_state()
        return logits

    def adopt_prefill(self, other: Engine) -> None:
        """Start from another engine's prefill (same model): copy its caches, rebuild this engine's metadata
        and calibration. Lets dense, DSA and PRR share one prefill."""
        # The other engine may have decoded since: its tokens past the prompt are ignored (and overwritten).
        self.caches = [KVCache(c.k.clone(), c.v.clone(), c.page_table.clone(), other._prompt_lens.clone())
                       for c in other.caches]
        self._lens = torch.stack([c.seq_lens for c in self.caches])
        for i, cache in enumerate(self.caches):
            cache.seq_lens = self._lens[i]
        self._prompt_lens = other._prompt_lens.clone()
        self._last_logits = other._last_logits
        self._calib_q = dict(other._calib_q)
        self._build_sparse_state()

    def crossover(self, batch: int) -> int:
        """The context (tokens) from which ``attention="auto"`` decodes sparsely: `auto_crossover` if given, the
        fixed CPU default on a CPU, else profiled on this GPU for these shapes (cached)."""
        if self.auto_crossover is not None:
            return self.auto_crossover
        if self.model.device.type != "cuda":
            return auto.CPU_CROSSOVER
        c = self.cfg
        return auto.profile_crossover(c.num_q_heads, c.num_kv_heads, c.head_dim, batch, self.sparse,
                                      dtype=self.model.dtype, device=self.model.device, max_context=c.max_context)

    def _resolve_auto(self) -> None:
        if self.requested != "auto":
            return
        ctx = int(self.caches[0].seq_lens.max())
        cross = self.crossover(self.caches[0].batch)
        self.attention = auto.resolve(ctx, cross, self.auto_sparse)
        self.auto_decision = {"context": ctx, "crossover": cross, "attention": self.attention}

    def _profile_speculation(self, layer: int):
        """The speculation budget profiler's decision (:class:`prr.runtime.BudgetDecision`) for one layer at
        the current context, on its last calibration query; None where it does not run: a CPU or no query.
        Under tensor parallelism every rank times its own slice (the same shapes) and all take rank 0's
        decision, so the ranks' steps stay alike."""
        if self.model.device.type != "cuda" or layer not in self._calib_q:
            return None
        from ..runtime import profile_budget

        qs = self._calib_q[layer]
        dec = profile_budget(self.caches[layer], self.metas[layer], qs[-1], q_prev=qs[-2] if len(qs) > 1 else None,
                             mode=self.mode, overlap=self.overlap)
        return _rank0_decision(getattr(self.model, "tp", None), dec, self.model.device)

    def _resolve_speculation(self) -> None:
        """``ratio="auto"``: K' from the profiler, or speculation off (PRR decodes as serialized DSA)."""
        if self.ratio_requested != "auto" or self.attention != "prr":
            return
        layer = next((i for i in range(self.cfg.num_layers) if self._sparse_layer(i)), None)
        ctx = int(self.caches[0].seq_lens.max())
        dec = self._profile_speculation(layer) if layer is not None else None
        if dec is None and self.model.device.type != "cuda":  # nothing runs beside the selection there
            self.attention = "dsa"
            self.spec_decision = {"context": ctx, "speculation": "off", "ratio": None, "topk": "full",
                                  "reason": "a CPU: no second stream to hide the speculation in, and the full "
                                            "top-K is the cheaper search there (PRR decodes as serialized DSA)"}
            return
        if dec is None:
            self.ratio = AUTO_CPU_RATIO
            self.spec_decision = {"context": ctx, "speculation": "on", "ratio": self.ratio, "topk": "guessed",
                                  "reason": "not profiled (no calibration query): the fixed ratio"}
            return
        top_k = self.sparse.top_k
        if dec.enabled:
            self.ratio = dec.spec_k / top_k  # speculative_top_k gives K' back (its ceil allows for rounding)
        elif dec.topk == "guessed":
            self.speculate = False
        else:
            self.attention = "dsa"
        self.spec_decision = {"context": ctx, "speculation": "on" if dec.enabled else "off",
                              "ratio": self.ratio if dec.enabled else None, "topk": dec.topk,
                              "gain": round(dec.gain, 4), "reason": dec.reason}

    def _build_sparse_state(self) -> None:
        self._graph = None  # a captured step belongs to the caches it was captured on
        if self.requested == "prr":
            self.attention = "prr"  # a new prefill: speculation is decided again at its context
        self.speculate = self.speculate_requested
        self._resolve_auto()
        c, cfg = self.cfg, self.sparse
        self.metas = [BlockMetadata(cfg, self.caches[i]) if self._sparse_layer(i) else None
                      for i in range(c.num_layers)]
        self._resolve_speculation()
        self._step_stats = []
        self._steps = {}
        if self.attention != "prr":
            return
        cache0 = self.caches[0]
        spec_k = speculative_top_k(cfg.top_k, self.ratio)
        holt = self.predictor_kind == "holt" and self.speculate
        self.predictor = None
        if holt:
            nmax = cache0.max_blocks(cfg.block_size)
            self.predictor = HoltPredictor(c.num_layers, cache0.batch, c.num_kv_heads, nmax, device=cache0.device)
        # One runtime step per sparse layer. On a GPU the layers share two streams: the selection's (high
        # priority) and the side stream that runs the speculation and each layer's deferred tail (the next P
        # into place) beside the next layer's projections; the token's step joins it once at the end.
        cuda = cache0.device.type == "cuda"
        streams = StepStreams(torch.cuda.Stream(device=cache0.device) if cuda else None,
                              torch.cuda.Stream(device=cache0.device, priority=-1) if cuda else None,
                              defer_tail=True)
        full = self.predictor_kind == "previous" and self.speculate  # P = the previous S, the full top-K
        settings = StepSettings("prr" if self.speculate else "dsa", topk="full" if full else "guessed",
                                ratio=self.ratio, mode=self.mode, grow=1, overlap=self.overlap)
        for i in range(self.n_dense_layers, c.num_layers):
            seed = self._calibrate_layer(i, spec_k) if i in self._calib_q else None
            self._steps[i] = LayerStep(self.caches[i], self.metas[i], c.num_q_heads, settings,
                                       predictor=self.predictor, layer=i, streams=streams, collect_stats=True)
            if seed is not None:  # the first decode step's guess and P from the last prompt position
                self._steps[i].seed(*seed)

    def _calibrate_layer(self, i: int, spec_k: int):
        """Fit layer i's Holt predictor (if any) to the last W prompt positions, scored as if they were decode
        steps; return the last position's selection and its top-K' over the next step's blocks ``(S, P)``."""
        cfg, cache, qs = self.sparse, self.caches[i], self._calib_q[i]
        w = qs.shape[0]
        first = 0 if self.predictor is not None else w - 1
        scores, nblk = [], []
        for j in range(first, w):  # the last W prompt positions of each sequence as if they were decode steps
            view = KVCache(cache.k, cache.v, cache.page_table, cache.seq_lens - (w - j - 1))
            scores.append(self.metas[i].scores(qs[j], view))
            nblk.append(ops.num_blocks(view.seq_lens, cfg.block_size))
        if self.predictor is not None and w >= 2:
            self.predictor.calibrate(i, torch.stack(scores), torch.stack(nblk), cfg.top_k, cfg.n_sink, cfg.n_local,
                                     spec_k=spec_k)
        s = ops.select_blocks(scores[-1], nblk[-1], cfg.top_k, cfg.n_sink, cfg.n_local)
        p = ops.select_blocks(scores[-1], ops.num_blocks(cache.seq_lens + 1, cfg.block_size), spec_k, cfg.n_sink,
                              cfg.n_local)
        return s, p

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
        if self._pages is None:  # the step's pages per sequence (once per token, shared by the dense layers)
            self._pages = ops.num_blocks(cache.seq_lens, cache.page_size)
            cnt.copy_(self._pages[:, None].expand_as(cnt))
        return ops.sparse_decode(q, cache, idx, cnt, cache.page_size)[0]

    def _attend(self, i: int, q, k, v):
        cache = self.caches[i]
        meta = self.metas[i] if self._sparse_layer(i) else None
        folded = False
        if self.model.fuse:  # one kernel on a GPU (the cache's own append: 9), Quest's metadata folded in
            quest = meta.quest_fold() if meta is not None else None
            fused.append_kv(cache, k, v, quest=quest, advanced=self._advanced)
            folded = quest is not None
        else:  # the unfused baseline
            cache.append(k, v)
        if meta is None:
            return self._dense(q, cache)
        if not folded:
            meta.append(cache)
        if self._counts is None:  # once per token: the caches grow in lockstep
            prr = self.attention == "prr"  # PRR also needs the blocks forced into P and the next step's count
            self._counts = StepCounts.of(cache.seq_lens, self.sparse, cache.num_kv_heads,
                                         speculative_top_k(self.sparse.top_k, self.ratio) if prr else None,
                                         grow=1 if prr else 0)
        if self.attention == "dsa":
            out = dsa_step(q, cache, meta, counts=self._counts)
            o, stats, scores = out.o, out.stats, out.selection.scores
        else:  # the runtime step: on a GPU selection and speculation overlap, the tail is deferred
            step = self._steps[i]
            o, _ = step.run(q, self._counts)
            stats, scores = step.stats, step.last["scores"]
        self._step_stats.append(stats)
        if self.record is not None:  # the locality study keeps every sparse layer's true block scores
            self.record.setdefault(i, []).append((scores.clone(), ops.num_blocks(
                cache.seq_lens, self.sparse.block_size)))
        return o

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One eager decode step, one token per sequence (``tokens [B]``): logits ``[B, V]``. The sparse layers'
        :class:`prr.StepStats` are left in ``_step_stats`` (device tensors; nothing is read on the host)."""
        self._step_stats = []
        self._counts = self._pages = None  # computed by the first layer that needs them, shared by the rest
        pos = self.caches[0].seq_lens.long()
        # The fused step advances every layer's length in one add (the caches' lengths are rows of one tensor)
        # and each layer's append stores at length - 1: one kernel per token instead of one per layer.
        lens = getattr(self, "_lens", None)
        self._advanced = self.model.fuse and lens is not None and len(lens) == len(self.caches) and all(
            c.seq_lens.data_ptr() == lens[j].data_ptr() for j, c in enumerate(self.caches))
        if self._advanced:
            self.caches[0].check_lengths(extra=1)
            self._lens.add_(1)
        logits = self.model.decode(tokens, pos, self._attend)
        if self._steps:  # the last layers' deferred tails (one shared side stream)
            next(iter(self._steps.values())).join()
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence (``tokens [B]``): logits ``[B, V]``. Replays the CUDA graph when
        :meth:`capture_decode` made one."""
        if self._graph is not None:
            return self._graph.run(tokens)
        return self.decode_step(tokens)

    def freeze_finished(self, active: torch.Tensor) -> None:
        """Reset the cache length of finished sequences (``active [B]`` 0) to 0 in every layer, so they attend
        one token per step from now on (one op, no sync)."""
        self._lens.mul_(active)

    def _host_scheduled_selectors(self) -> list:
        """The sparse layers' amortized selectors on the host schedule, their kernels compiled for both step
        kinds (a graph capture compiles nothing) and their clocks checked to agree."""
        pairs = [(m.amortized, c) for m, c in zip(getattr(self, "metas", []) or [], self.caches, strict=False)
                 if m is not None and getattr(m, "amortized", None) is not None and m.amortized.schedule == "host"]
        if len({(s.every, s.host_step % s.every) for s, _ in pairs}) > 1:
            raise RuntimeError("host-scheduled amortized selectors must share m and their step count")
        q = torch.zeros(self.caches[0].batch, self.cfg.num_q_heads, self.cfg.head_dim, dtype=self.caches[0].dtype,
                        device=self.model.device)
        for sel, cache in pairs:
            sel.warm_up(q, cache)
        return [s for s, _ in pairs]

    def capture(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CapturedStep:
        """Capture ``fn(tokens)`` (one decode step and whatever follows it on the device) in a CUDA graph. Run
        one eager step first so that the kernels are compiled (capture itself executes nothing)."""
        if self.model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        return CapturedStep(self, fn)

    def capture_decode(self) -> None:
        """Capture one whole decode step (every layer, its cache append, metadata update, selection,
        speculation and repair) in a CUDA graph; :meth:`step` then replays it."""
        self._graph = None
        self._graph = self.capture(self.decode_step)

    def fill_random(self, batch: int, context: int | Sequence[int], max_new_tokens: int, seed: int = 0) -> None:
        """Latency work: caches of `context` random tokens per sequence (one length for all, or one per
        sequence: a ragged batch), as if prefilled (no prompt, so no predictor calibration: PRR starts from an
        empty predictor). The "prefill logits" are zeros: greedy decoding starts from token 0."""
        c, dev = self.cfg, self.model.device
        lens = [context] * batch if isinstance(context, int) else list(context)
        if len(lens) != batch or min(lens) <= 0:
            raise ValueError(f"context must be a positive length or {batch} of them, got {context!r}")
        cap = max(lens) + max_new_tokens
        if cap > c.max_context:
            raise ValueError(f"context + max_new_tokens ({cap}) exceeds the model's context ({c.max_context})")
        gen = torch.Generator(device=dev).manual_seed(seed)
        self._new_caches(batch, cap)
        for cache in self.caches:
            for t in (cache.k, cache.v):  # in slices: a float32 copy of a long cache would not fit beside it
                for s in range(0, t.shape[0], 4096):
                    t[s:s + 4096].copy_(torch.randn(t[s:s + 4096].shape, generator=gen, device=dev))
        self._lens.copy_(torch.tensor(lens, dtype=torch.int32).expand(c.num_layers, batch))
        self._prompt_lens = self.caches[0].seq_lens.clone()
        self._last_logits = torch.zeros(batch, c.vocab_size, device=dev)
        self._calib_q = {}
        self.calibrate_window = 0
        self._build_sparse_state()

    def calibrate(self, queries: dict[int, torch.Tensor]) -> None:
        """Decide again from decode-time queries ``{layer: [W, B, Hq, D]}`` (the last W of each sparse layer, in
        order, as a prefill keeps its prompt's): what ``ratio="auto"`` profiles and what seeds PRR's first
        selection. For latency work on :meth:`fill_random`'s caches, which have no prompt."""
        if not self.caches:
            raise ValueError("nothing prefilled: calibrate after prefill() or fill_random()")
        c, b = self.cfg, self.caches[0].batch
        calib = {}
        for i, qs in queries.items():
            if not (isinstance(i, int) and self.n_dense_layers <= i < c.num_layers):
                raise ValueError(f"calibration queries are for sparse layers ({self.n_dense_layers}.."
                                 f"{c.num_layers - 1}), got layer {i!r}")
            want = (b, c.num_q_heads, c.head_dim)
            if not isinstance(qs, torch.Tensor) or qs.dim() != 4 or tuple(qs.shape[1:]) != want or qs.shape[0] < 1:
                got = tuple(qs.shape) if isinstance(qs, torch.Tensor) else type(qs).__name__
                raise ValueError(f"layer {i}'s calibration queries must be a [W, {b}, {c.num_q_heads}, {c.head_dim}] "
                                 f"tensor, got {got}")
            calib[i] = qs.to(device=self.model.device, dtype=self.model.dtype)
        self._calib_q = calib
        self._build_sparse_state()

    # ---- generation ----------------------------------------------------------------------------------------
    def stream(self, prompts=None, config: GenerationConfig | None = None, *,
               prefilled_from: Engine | None = None,
               prefill_progress: Callable[[int], None] | None = None) -> Generation:
        """Generate for one prompt or a batch of prompts of any lengths, as an iterator of
        :class:`prr.model.generation.TokenEvent` (the results are on the returned object once it is
        exhausted). ``prompts=None`` decodes from the caches as they are (after :meth:`fill_random` or
        :meth:`prefill`); `prefilled_from` reuses another engine's prefill of the same prompts."""
        cfg = config or GenerationConfig()
        if not isinstance(cfg, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
        if prompts is None:
            if not self.caches:
                raise ValueError("no prompts given and nothing prefilled")
            rows, lens = None, [int(n) for n in self._prompt_lens.tolist()]

            def pre():
                return self._last_logits
        else:
            rows = [r.tolist() for r in self._as_rows(prompts)]
            lens = [len(r) for r in rows]

            def pre():
                if prefilled_from is None:
                    return self.prefill(rows, cfg.max_new_tokens, progress=prefill_progress)
                self.adopt_prefill(prefilled_from)
                return self._last_logits
        return Generation(self, cfg, rows, lens, pre)

    def generate_batch(self, prompts, config: GenerationConfig | None = None, **kw
                       ) -> tuple[list[SequenceResult], GenerationStats]:
        """:meth:`stream` run to the end: one :class:`SequenceResult` per prompt, and the batch's stats."""
        g = self.stream(prompts, config, **kw).run()
        return g.sequences, g.stats

    def generate(self, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool = True,
                 on_token: Callable[[int], None] | None = None,
                 prefill_progress: Callable[[int], None] | None = None, prefilled_from: Engine | None = None,
                 sampling: SamplingConfig | None = None, stop: Sequence[str] = ()
                 ) -> tuple[list[int], GenerationStats]:
        """One prompt (greedy unless `sampling` says otherwise): the new token ids and the stats."""
        cfg = GenerationConfig(max_new_tokens, sampling or SamplingConfig(), tuple(stop), stop_at_eos)
        g = self.stream(prompt, cfg, prefilled_from=prefilled_from, prefill_progress=prefill_progress)
        for ev in g:
            if on_token:
                on_token(ev.token)
        return g.sequences[0].tokens, g.stats
