"""The model runner of continuous batching: fixed batch slots over one shared page pool.

:class:`SlotRunner` decides *how* a batch runs (a scheduler above it decides *what*): ``max_batch`` slots, each
a row of every layer's page table, cache lengths, block metadata, PRR predictor and speculated set P. A
sequence joins a free slot alone (:meth:`SlotRunner.admit`: its pages from the shared pool, a dense prefill
into them, its metadata rows rebuilt, its predictor rows reset and warmed on its last prompt positions, its
first P) and leaves it at once (:meth:`SlotRunner.release`), between decode steps; the rows of the others are
untouched. :meth:`SlotRunner.step` decodes one token for every occupied slot.

Decode steps run on the first ``nb`` rows, ``nb`` the smallest *bucket* (powers of two up to ``max_batch``)
holding the highest occupied slot: each bucket is an :class:`prr.model.engine.Engine` whose caches, metadata,
predictor and P buffers are views of the first ``nb`` rows of the full-size state, so every bucket sees the
same sequences and none copies anything. On a GPU each bucket's step is captured in its own CUDA graph when
the runner opens (on idle slots), so admitting a sequence never re-captures. A free or finished slot points
its whole page-table row at one scratch page and has its cache length reset to 0 after every step: it
attends one junk token and costs nothing else.

Limits: pages are reserved for a sequence's prompt plus its ``max_new_tokens`` when it is admitted (no
preemption is ever needed); block metadata, predictor state and P are per slot at the slot capacity
(``max_seq_len``): Quest's metadata is 1/16 of the KV bytes of a full slot. The predictor's (alpha, beta,
gamma) are fixed per runner (they are baked into the captured steps); what a slot calibrates on its prompt is
its own state, replayed over the last ``calibrate_window`` prompt positions. ``ratio`` is fixed too (the
speculation budget profiler needs one context; a batch holds many): with ``"auto"`` PRR decodes as serialized
DSA.
"""

from __future__ import annotations

import copy

import torch

from .. import _checks as check
from .. import memory, ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import BlockMetadata, SparseConfig
from ..algo.step import speculative_top_k
from ..cache import KVCache
from ..ops.holt import holt_predict, holt_update_
from ..runtime.layer import LayerStep, StepStreams
from .engine import ATTENTIONS, AUTO_CPU_RATIO, Engine
from .llama import Llama
from .row_sampling import RowSampler
from .sampling import SamplingConfig

PAGE_SIZE = 16
DEFAULT_PREDICTOR = (0.5, 0.0, 0.0)
"""Holt's (alpha, beta, gamma) for every layer: the best range measured on SmolLM2 (DESIGN.md section 3)."""


class PagePool:
    """The host's free list of the physical pages every slot shares (ids ``0 .. num_pages - 1``)."""

    def __init__(self, num_pages: int):
        self.num_pages = check.positive_int("num_pages", num_pages)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_pages - len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"the page pool has {len(self._free)} free pages, {n} asked")
        return [self._free.pop() for _ in range(n)]

    def give(self, pages: list[int]) -> None:
        self._free.extend(pages)


def _meta_rows(meta: BlockMetadata, rows: slice) -> BlockMetadata:
    """A view of some rows of a metadata object (its tensors are sliced on the batch dimension: no copy)."""
    v = copy.copy(meta)  # a shallow copy keeps whatever else the object holds
    v.amortized = None
    v.kmin, v.kmax, v.ckeys = (None if t is None else t[rows] for t in (meta.kmin, meta.kmax, meta.ckeys))
    return v


def _predictor_rows(pred: HoltPredictor, nb: int) -> HoltPredictor:
    """A view of the first `nb` sequences of a predictor (``level[layer]`` stays contiguous)."""
    v = copy.copy(pred)  # shares the per-layer parameters
    v.level, v.trend, v.known = pred.level[:, :nb], pred.trend[:, :nb], pred.known[:, :nb]
    return v


AUTO_OFF_REASON = ("ratio='auto' in a batch of many contexts: the speculation budget profiler times one context, "
                   "and PRR at a fixed ratio measured slower than serialized DSA in continuous batching (0.84x, "
                   "H100, results/bench_serve_smoke_h100.json); PRR decodes as serialized DSA (the same "
                   "selection); pass a ratio to speculate")


class SlotRunner:
    """``max_batch`` slots of at most ``max_seq_len`` tokens each (prompt and generated), their pages from a pool
    of ``max_tokens_in_cache`` tokens. ``attention``: ``"dense"``, ``"dsa"`` or ``"prr"``; ``sparse``, ``ratio``
    (PRR with ``"auto"``, the default, decodes as serialized DSA: :data:`AUTO_OFF_REASON`, in ``spec_decision``),
    ``mode``, ``n_dense_layers`` and ``calibrate_window``
    as for :class:`prr.model.engine.Engine`. ``graphs``: on a GPU, capture one decode step per bucket."""

    def __init__(self, model: Llama, tokenizer=None, *, attention: str = "dense", sparse: SparseConfig | None = None,
                 ratio: float | str = "auto", mode: str = "exact", n_dense_layers: int = 2,
                 calibrate_window: int = 16, max_batch: int = 8, max_tokens_in_cache: int = 65536,
                 max_seq_len: int | None = None, graphs: bool = True, predictor_params=DEFAULT_PREDICTOR):
        check.choice("attention", attention, ATTENTIONS)
        self.model, self.tok, self.cfg = model, tokenizer, model.cfg
        c, dev = model.cfg, model.device
        self.requested, self.mode = attention, mode
        self.spec_decision: dict | None = None  # ratio="auto" with PRR: speculation off, and why
        if attention == "prr" and ratio == "auto":
            attention = "dsa"
            self.spec_decision = {"speculation": "off", "ratio": None, "topk": "full", "reason": AUTO_OFF_REASON}
        self.attention = attention
        self.sparse = sparse or SparseConfig.from_budget("quest", 1024)
        self.ratio = AUTO_CPU_RATIO if ratio == "auto" else ratio
        self.spec_k = speculative_top_k(self.sparse.top_k, self.ratio)
        self.n_dense_layers = check.nonneg_int("n_dense_layers", n_dense_layers)
        self.calibrate_window = check.nonneg_int("calibrate_window", calibrate_window)
        self.max_batch = check.positive_int("max_batch", max_batch)
        self.max_seq_len = min(check.positive_int("max_seq_len", max_seq_len or c.max_context), c.max_context)
        check.positive_int("max_tokens_in_cache", max_tokens_in_cache)
        unit = max(PAGE_SIZE, self.sparse.block_size)
        capacity = -(-self.max_seq_len // unit) * unit
        self.max_pages = capacity // PAGE_SIZE
        num_pages = -(-max_tokens_in_cache // PAGE_SIZE)
        self._require(num_pages, capacity)
        self.pool, self.scratch = PagePool(num_pages), num_pages  # the scratch page: free slots write there
        b = self.max_batch
        self.page_table = torch.full((b, self.max_pages), self.scratch, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(c.num_layers, b, dtype=torch.int32, device=dev)
        self.active = torch.zeros(b, dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        shape = (num_pages + 1, c.num_kv_heads, PAGE_SIZE, c.head_dim)
        self.caches = []
        for i in range(c.num_layers):
            k = torch.zeros(shape, dtype=model.dtype, device=dev)
            self.caches.append(KVCache(k, torch.zeros_like(k), self.page_table, self.lens[i]))
        self.metas = [BlockMetadata(self.sparse, cache) if self._sparse_layer(i) else None
                      for i, cache in enumerate(self.caches)]
        self.predictor = None
        self._p: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> full-size (pred_scores, p_idx, p_cnt)
        self._g: dict = {}  # layer -> the full-size guessed top-K state (its previous selection per slot)
        if attention == "prr":
            self.predictor = HoltPredictor(c.num_layers, b, c.num_kv_heads, self.caches[0].max_blocks(
                self.sparse.block_size), device=dev)
            for i in range(c.num_layers):
                self.predictor.set_params(i, *predictor_params)
        cuda = dev.type == "cuda"
        self._streams = (torch.cuda.Stream(device=dev), torch.cuda.Stream(device=dev, priority=-1)) if cuda else None
        self.graphs = graphs and cuda
        self.buckets = sorted({min(1 << j, b) for j in range(b.bit_length() + 1)})
        self.engines = {nb: self._bucket(nb) for nb in reversed(self.buckets)}  # the full size first: it owns P
        self.sampler = RowSampler(b, dev)
        self.slot_pages: dict[int, list[int]] = {}
        self._captured: dict[int, object] = {}
        if self.graphs:
            self._capture_all()

    # ---- construction --------------------------------------------------------------------------------------
    def _sparse_layer(self, i: int) -> bool:
        return self.attention != "dense" and i >= self.n_dense_layers

    def _require(self, num_pages: int, capacity: int) -> None:
        c = self.cfg
        nbytes = memory.kv_cache_bytes(c.num_layers, 1, num_pages * PAGE_SIZE, c.num_kv_heads, c.head_dim,
                                       self.model.dtype)
        if self.attention != "dense":  # metadata and predictor rows of every slot at the slot capacity
            meta = memory.kv_cache_bytes(c.num_layers, self.max_batch, capacity, c.num_kv_heads, c.head_dim,
                                         self.model.dtype, block_size=self.sparse.block_size)
            nbytes += meta - memory.kv_cache_bytes(c.num_layers, self.max_batch, capacity, c.num_kv_heads,
                                                   c.head_dim, self.model.dtype)
        memory.require(nbytes, self.model.device, f"the page pool ({num_pages} pages) and {self.max_batch} slots' "
                                                  "block metadata")

    def _bucket(self, nb: int) -> Engine:
        """An engine over the first `nb` slots (views of the full-size state)."""
        eng = Engine(self.model, self.tok, attention=self.attention, sparse=self.sparse, ratio=self.ratio,
                     mode=self.mode, n_dense_layers=self.n_dense_layers, graphs=self.graphs)
        eng.caches = [KVCache(c.k, c.v, self.page_table[:nb], self.lens[i, :nb]) for i, c in enumerate(self.caches)]
        eng._lens = self.lens[:, :nb]
        eng.metas = [None if m is None else _meta_rows(m, slice(0, nb)) for m in self.metas]
        if self.attention != "prr":
            return eng
        eng.predictor = _predictor_rows(self.predictor, nb)
        side, sel = self._streams or (None, None)
        for i in range(self.n_dense_layers, self.cfg.num_layers):
            step = LayerStep(eng.caches[i], eng.metas[i], self.cfg.num_q_heads, method="prr", predictor=eng.predictor,
                             layer=i, ratio=self.ratio, mode=self.mode, streams=StepStreams(side, sel, defer_tail=True),
                             collect_stats=True, grow=1)
            if nb == self.max_batch:
                self._p[i] = (step.pred_scores, step.p_idx, step.p_cnt)
                self._g[i] = step.guessed
            else:  # every bucket speculates over the same P and guesses from the same previous selection
                step.pred_scores, step.p_idx, step.p_cnt = (t[:nb] for t in self._p[i])
                step.guessed = self._g[i].rows(nb)
            eng._steps[i] = step
        return eng

    def _body(self, nb: int):
        """One decode step of bucket `nb` as a device-only function of ``tokens [nb]``: ``(logits [nb, V],
        PRR block counts [3] (selected, forced, hits) summed over occupied slots, or None)``."""
        eng, active = self.engines[nb], self.active[:nb]

        def fn(tokens):
            logits = eng.decode_step(tokens)
            eng._lens.mul_(active)  # free slots back to length 0
            counts = None
            if self.attention == "prr" and eng._step_stats:
                x = torch.stack([torch.stack([s.selected, s.forced, s.hits]) for s in eng._step_stats])
                counts = (x.sum((0, 3), dtype=torch.int64) * active).sum(1)
            return logits, counts

        return fn

    def _capture_all(self) -> None:
        """One CUDA graph per bucket, on idle slots: an eager step compiles the kernels, then the capture; the
        junk the idle steps wrote (scratch page, idle rows' metadata and predictor) is reset at admission."""
        for nb in self.buckets:
            fn = self._body(nb)
            fn(self.tokens[:nb])
            self._captured[nb] = self.engines[nb].capture(fn)
        torch.cuda.synchronize()
        self.lens.zero_()
        if self.predictor is not None:
            self.predictor.reset()

    # ---- slots -------------------------------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        return -(-tokens // PAGE_SIZE)

    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_batch) if s not in self.slot_pages]

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ValueError if a sequence of this size could never run here (over a slot, or over the whole pool)."""
        need = prompt_tokens + max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) exceeds the "
                             f"server's context of {self.max_seq_len} tokens")
        if self.pages_for(need) > self.pool.num_pages:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) exceeds the "
                             f"KV cache ({self.pool.num_pages * PAGE_SIZE} tokens)")

    def can_admit(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return len(self.slot_pages) < self.max_batch and self.pages_for(
            prompt_tokens + max_new_tokens) <= self.pool.free

    @torch.no_grad()
    def admit(self, prompt: list[int], max_new_tokens: int, sampling, *, fill: str = "prefill") -> tuple[int, int]:
        """Put a sequence into the lowest free slot: ``(slot, first token id)``. ``fill="random"``: random keys
        and values instead of a prefill (random-weight benchmarks; the first token comes from zero logits)."""
        check.choice("fill", fill, ("prefill", "random"))
        t = len(prompt)
        self.check_fits(t, max_new_tokens)
        if not self.can_admit(t, max_new_tokens):
            raise RuntimeError("no free slot or not enough free pages: check can_admit() first")
        slot = self.free_slots()[0]
        pages = self.pool.take(self.pages_for(t + max_new_tokens))
        self.slot_pages[slot] = pages
        dev = self.model.device
        try:
            self.page_table[slot, :len(pages)] = torch.tensor(pages, dtype=torch.int32).to(dev)
            calib, logits = self._fill(slot, prompt, fill)
            for i, meta in enumerate(self.metas):
                if meta is not None:
                    built = BlockMetadata(self.sparse, self._row_cache(i, slot))
                    for name in ("kmin", "kmax", "ckeys"):
                        if getattr(meta, name) is not None:
                            getattr(meta, name)[slot].copy_(getattr(built, name)[0])
            if self.attention == "prr":
                self._warm_predictor(slot, calib)
        except BaseException:
            self.release(slot)
            raise
        self.active[slot] = 1
        self.sampler.set(slot, sampling)
        return slot, int(self.sampler.sample(logits, [slot])[0])

    def _row_cache(self, i: int, slot: int) -> KVCache:
        c = self.caches[i]
        return KVCache(c.k, c.v, self.page_table[slot:slot + 1], self.lens[i, slot:slot + 1])

    def _fill(self, slot: int, prompt: list[int], fill: str):
        """Write the slot's prompt into its pages: ``(calibration queries {layer: [W, Hq, D]}, logits [1, V])``."""
        c, dev = self.cfg, self.model.device
        t = len(prompt)
        n = torch.full((1,), t, dtype=torch.int32, device=dev)
        if fill == "random":
            gen = torch.Generator(device=dev).manual_seed(len(prompt))
            for i in range(c.num_layers):
                k, v = (torch.randn(1, c.num_kv_heads, t, c.head_dim, generator=gen, device=dev).to(self.model.dtype)
                        for _ in range(2))
                self._row_cache(i, slot).write(k, v, n)
            return {}, torch.zeros(1, c.vocab_size, device=dev)
        w = min(self.calibrate_window, t) if self.attention == "prr" else 0
        calib = {}

        def store(i, q, k, v):
            self._row_cache(i, slot).write(k.transpose(1, 2), v.transpose(1, 2), n)
            if w and self._sparse_layer(i):
                calib[i] = q[0, -w:].clone()  # [W, Hq, D]

        logits = self.model.prefill(torch.as_tensor(prompt, dtype=torch.long, device=dev)[None], store)
        return calib, logits

    def _warm_predictor(self, slot: int, calib: dict) -> None:
        """Reset the slot's predictor rows, replay its last prompt positions' scores into them (as if they were
        decode steps) and predict its first P."""
        cfg, p = self.sparse, self.predictor
        for i in range(self.n_dense_layers, self.cfg.num_layers):
            level, trend, known = (x[i, slot:slot + 1] for x in (p.level, p.trend, p.known))
            level.zero_()
            trend.zero_()
            known.zero_()
            a, b, g = p._params[i]
            cache = self._row_cache(i, slot)
            meta = _meta_rows(self.metas[i], slice(slot, slot + 1))
            qs = calib.get(i)
            w = 0 if qs is None else qs.shape[0]
            g_rows = self._g[i]
            g_rows.s_idx[slot].fill_(-1)  # no previous selection: the first guess admits every block (exact)
            g_rows.s_cnt[slot] = 0
            for j in range(w):
                view = KVCache(cache.k, cache.v, cache.page_table, cache.seq_lens - (w - j - 1))
                scores, nblk = meta.scores(qs[j][None], view), ops.num_blocks(view.seq_lens, cfg.block_size)
                holt_update_(level, trend, known, scores, nblk.to(torch.int32), a, b, g)
                if j == w - 1:  # the last prompt position's selection starts the guessed top-K
                    s_idx, s_cnt = ops.select_blocks(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local)
                    g_rows.s_idx[slot].copy_(s_idx[0])
                    g_rows.s_cnt[slot].copy_(s_cnt[0])
            pred = holt_predict(level, trend, known, g)
            idx, cnt = ops.select_blocks(pred, ops.num_blocks(cache.seq_lens + 1, cfg.block_size), self.spec_k,
                                         cfg.n_sink, cfg.n_local)
            for full, row in zip(self._p[i], (pred, idx, cnt), strict=True):
                full[slot].copy_(row[0])

    def release(self, slot: int) -> None:
        """Free a slot at once: its pages go back to the pool, its rows point at the scratch page."""
        pages = self.slot_pages.pop(slot, None)
        if pages is not None:
            self.pool.give(pages)
        self.page_table[slot].fill_(self.scratch)
        self.lens[:, slot] = 0
        self.active[slot] = 0
        self.sampler.set(slot, SamplingConfig())  # an idle row samples greedily (no work for its old settings)

    # ---- decoding ----------------------------------------------------------------------------------------------
    def bucket(self) -> int:
        """The smallest bucket holding every occupied slot (0 when none is)."""
        top = max(self.slot_pages, default=-1) + 1
        return next((nb for nb in self.buckets if nb >= top), 0) if top else 0

    @torch.no_grad()
    def step(self, tokens: dict[int, int]) -> tuple[dict[int, int], list[int] | None]:
        """Decode one token for every occupied slot (``tokens``: slot -> its last token): ``(slot -> next token,
        PRR block counts (selected, forced, hits) summed over this step's sparse layers and slots, or None)``.
        The one host sync of the step reads both."""
        nb = self.bucket()
        if nb == 0:
            return {}, None
        host = [0] * nb
        for s, tok in tokens.items():
            host[s] = tok
        self.tokens[:nb].copy_(torch.tensor(host, dtype=torch.long))
        if nb in self._captured:
            logits, counts = self._captured[nb].run(self.tokens[:nb])
        else:
            logits, counts = self._body(nb)(self.tokens[:nb])
        ids = self.sampler.sample(logits, list(range(nb)))
        out = ids if counts is None else torch.cat([ids, counts.to(ids.device)])
        vals = out.tolist()
        return {s: vals[s] for s in tokens}, (vals[nb:] if counts is not None else None)
