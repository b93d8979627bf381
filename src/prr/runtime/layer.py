"""One layer's decode-attention step on fixed buffers: serialized DSA or PRR, eager or as a CUDA graph.

PRR on CUDA forks two streams: a high-priority one scores every block and selects S, while a side stream runs
the speculative attention over P in the SMs the selection leaves free (the selection is the longer branch:
it must not wait behind the speculation's tiles); the main stream joins both and runs the repair (the misses
alone) and the merge that reuses P's partial states: the output is ready.
Then the *tail*, on the side stream: fold S's scores into the predictor and predict the next step's P (its
top-K'), so that prediction is off the next step's critical path (in a model it runs beside the rest of the
layer; the graph still ends by joining it). Every buffer has a fixed shape (batch, heads, K, K', cache
capacity) and nothing reads device values on the host, so the whole step is captured once and replayed every
token (:meth:`LayerStep.capture`, :meth:`LayerStep.replay`). Eager (:meth:`LayerStep.run`) runs the same code
for debugging; on the CPU it runs without streams.
"""

from __future__ import annotations

import contextlib

import torch

from .. import _checks as check
from .. import ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import BlockMetadata, select
from ..algo.step import STEP_MODES, StepCounts, prr_stats, speculative_top_k
from ..cache import KVCache

METHODS = ("dsa", "prr")


class LayerStep:
    """The decode-attention step of one layer.

    Args:
        cache, meta: the layer's KV cache and block metadata (appended to outside the step).
        num_q_heads: Hq.
        method: ``"dsa"`` (select, then attend) or ``"prr"``.
        predictor, layer: PRR's Holt state and the layer slot it reads; ``update_layer`` is the slot the
            step's true scores are folded into (default: the same).
        hold_prediction: the tail writes its prediction to scratch, so P (and the hit rate) stays as set
            (benchmarks); ``tail=False`` leaves the tail out (the step's critical path alone).
        ratio, mode: PRR's speculation ratio (K' = ceil(r K)) and ``"exact"``, ``"union"`` or ``"predicted"``
            (the ablation: attention over P alone; S is still computed, for the predictor and the stats).
        grow: tokens the cache gains before each step (a model decoding one token per step: 1); the tail then
            predicts P over the next step's blocks (its local window included), as :func:`prr.prr_step` does.
        streams: run speculation on a side stream (CUDA only); ``side_stream``/``sel_stream`` share streams
            between the layers of a model (default: the step's own).
        defer_tail: leave the tail running on the side stream (not joined): the caller joins it with
            :meth:`join` before anything on its stream reads P or the predictor (a model joins once per token,
            so each layer's tail runs beside the next layer's projections).
        collect_stats: keep the step's :class:`prr.StepStats` in ``stats`` (on CUDA computed in the tail, on the side
            stream, before the prediction overwrites P; without streams or a tail, right after the repair).
        spec_programs: cap the exact-mode speculation's grid at this many programs (None: the attention's own
            split rule), so it leaves SMs to the selection's kernels, whose CTAs otherwise queue behind its
            tiles at batch 4 and up (the top-K started 26 us late at Llama b4 128K, budget 8192).
        amortized: an :class:`prr.algo.amortized.AmortizedSelector` selects (``method="dsa"`` only: its
            selection has no full scores to feed PRR's predictor); call its ``reset()`` after :meth:`capture`.
            On its host schedule :meth:`capture` records one graph per step kind (scan, re-score) in one memory
            pool and :meth:`replay` replays the one the selector's host clock names.
        counts: block counts (:class:`prr.algo.step.StepCounts`) every step uses unless :meth:`run` is given its
            own: a benchmark of one layer as a model runs it (the model counts once per token for all layers;
            without counts the step counts itself: three small kernels, ~5 us at batch 1 on an H200). They are
            fixed: for a cache that grows between steps pass each step's counts to :meth:`run` instead.
    """

    def __init__(self, cache: KVCache, meta: BlockMetadata, num_q_heads: int, *, method: str = "prr",
                 predictor: HoltPredictor | None = None, layer: int = 0, update_layer: int | None = None,
                 ratio: float = 1.0, mode: str = "exact", streams: bool = True, scale: float | None = None,
                 tail: bool = True, hold_prediction: bool = False, side_stream: torch.cuda.Stream | None = None,
                 sel_stream: torch.cuda.Stream | None = None, defer_tail: bool = False,
                 collect_stats: bool = False, grow: int = 0, spec_programs: int | None = None,
                 amortized=None, counts: StepCounts | None = None):
        check.choice("method", method, METHODS)
        if (amortized is not None or getattr(meta, "amortized", None) is not None) and method != "dsa":
            raise ValueError("amortized selection runs with method='dsa' only (PRR's predictor needs full scores)")
        self.amortized = amortized
        check.choice("mode", mode, STEP_MODES)
        if method == "prr" and not isinstance(predictor, HoltPredictor):
            raise TypeError("method='prr' needs a HoltPredictor")
        check.gqa(num_q_heads, cache.num_kv_heads)
        self.cache, self.meta, self.cfg = cache, meta, meta.cfg
        self.method, self.mode, self.scale = method, mode, scale
        self.predictor, self.layer = predictor, layer
        self.update_layer = layer if update_layer is None else update_layer
        self.spec_k = speculative_top_k(self.cfg.top_k, ratio)
        self.q = torch.zeros(cache.batch, num_q_heads, cache.head_dim, dtype=cache.dtype, device=cache.device)
        cuda = cache.device.type == "cuda"
        two = cuda and streams and method == "prr"
        self.side = (side_stream or torch.cuda.Stream(device=cache.device)) if two else None
        self.sel_stream = (sel_stream or torch.cuda.Stream(device=cache.device, priority=-1)) if two else None
        self.tail, self.hold_prediction = tail, hold_prediction
        self.defer_tail, self.collect_stats = defer_tail, collect_stats
        self.stats = None
        self.counts: StepCounts | None = counts  # the model step's shared counts (run() sets them per call)
        self.fixed_counts = counts
        self.grow = check.nonneg_int("grow", grow)
        self.spec_programs = spec_programs
        if method == "prr":  # P for the first step, from the predictor's current state
            nblk = ops.num_blocks(cache.seq_lens + self.grow, self.cfg.block_size)
            self.pred_scores = predictor.predict(layer).clone()
            self.p_idx, self.p_cnt = ops.select_blocks(self.pred_scores, nblk, self.spec_k, self.cfg.n_sink,
                                                       self.cfg.n_local)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tail_graph: torch.cuda.CUDAGraph | None = None
        self.kind_graphs: dict | None = None  # host-scheduled amortized selection: {scan: (graph, out, last)}
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        # The step's selections (views into graph memory when replaying). "p_idx"/"p_cnt" are the live P buffers:
        # once a step's tail ran (without hold_prediction) they hold the *next* step's P; clone them before the
        # step to keep the P it used.
        self.last = {}

    # ---- the step ----------------------------------------------------------------------------------------
    def _side(self):
        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def _sel(self):
        return torch.cuda.stream(self.sel_stream) if self.sel_stream is not None else contextlib.nullcontext()

    def _path(self, q: torch.Tensor | None = None):
        """The critical path on query `q` (default: the static ``self.q`` graphs read): ``(o, lse, sel, nblk)``."""
        cfg, cache = self.cfg, self.cache
        q = self.q if q is None else q
        nblk = ops.num_blocks(cache.seq_lens, cfg.block_size) if self.counts is None else self.counts.nblk
        if self.method == "dsa":
            sel = select(q, cache, self.meta, nblk=nblk, amortized=self.amortized)
            self.last = {"s_idx": sel.indices, "s_cnt": sel.counts, "scores": sel.scores}
            o, lse = ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size, self.scale)
            return o, lse, sel, nblk
        main = torch.cuda.current_stream() if self.side is not None else None
        p_idx, p_cnt = self.p_idx, self.p_cnt
        if main is not None:  # fork: the selection first (high priority), then the speculation
            self.sel_stream.wait_stream(main)
            self.side.wait_stream(main)
        with self._sel():
            sel = select(q, cache, self.meta, nblk=nblk)
        with self._side():  # speculate over P (predicted at the end of the previous step)
            if self.mode == "exact":
                bo, blse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size, self.scale,
                                            max_programs=self.spec_programs)
                spec = {"block_o": bo, "block_lse": blse}
            else:
                so, slse = ops.sparse_decode(q, cache, p_idx, p_cnt, cfg.block_size, self.scale)
                spec = {"spec_o": so, "spec_lse": slse}
        if main is not None:  # join
            main.wait_stream(self.sel_stream)
            main.wait_stream(self.side)
        if self.mode == "predicted":
            o, lse = spec["spec_o"], spec["spec_lse"]
        else:
            o, lse = ops.repair_combine(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts,
                                        mode=self.mode, scale=self.scale, **spec)
        self.last = {"s_idx": sel.indices, "s_cnt": sel.counts, "p_idx": p_idx, "p_cnt": p_cnt,
                     "scores": sel.scores}
        if self.collect_stats and not (self.tail and self.side is not None):  # (a stream-less tail runs after)
            self.stats = prr_stats(p_idx, p_cnt, sel, nblk, cfg, self.spec_k, self._forced())
        return o, lse, sel, nblk

    def _tail(self, sel, nblk, fork: bool = True):
        """Fold S's scores into the predictor and predict the next P (off this step's critical path)."""
        if self.method != "prr" or not self.tail:
            return
        cfg = self.cfg
        main = torch.cuda.current_stream() if (self.side is not None and fork) else None
        if main is not None:
            self.side.wait_stream(main)
        with self._side() if main is not None else contextlib.nullcontext():
            if self.collect_stats and self.side is not None:
                # The step's counts from the P it used, before the prediction below overwrites it: off the
                # critical path here (on the main stream after the join, as a dozen PyTorch ops per layer, they
                # cost a PRR step of Llama-3.1-8B ~1 ms per token; now one selection_overlap kernel)
                self.stats = prr_stats(self.p_idx, self.p_cnt, sel, nblk, cfg, self.spec_k, self._forced())
            pred = self.pred_scores if not self.hold_prediction else torch.empty_like(self.pred_scores)
            self.predictor.update(self.update_layer, sel.scores, nblk, pred=pred)
            nblk_next = nblk
            if self.grow:
                shared = self.counts.nblk_next if self.counts is not None else None
                nblk_next = shared if shared is not None else ops.num_blocks(self.cache.seq_lens + self.grow,
                                                                             cfg.block_size)
            # The next P straight into the live buffers (the stats above already read this step's P)
            ops.select_blocks(pred, nblk_next, self.spec_k, cfg.n_sink, cfg.n_local,
                              out=None if self.hold_prediction else (self.p_idx, self.p_cnt))
        if main is not None and not self.defer_tail:
            main.wait_stream(self.side)  # a captured graph must end with its streams joined

    def _forced(self):
        return None if self.counts is None else self.counts.forced_prr

    def join(self) -> None:
        """Make the current stream wait for a deferred tail (and anything else on the side stream)."""
        if self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)

    def _step(self, q: torch.Tensor | None = None):
        o, lse, sel, nblk = self._path(q)
        self._tail(sel, nblk)
        # A deferred tail reads these on the side stream after this returns: hold them until the next step, or
        # the allocator hands their memory (nblk was made on the main stream) to the next layer's work.
        self._held = (sel, nblk)
        return o, lse

    # ---- eager and graph ---------------------------------------------------------------------------------
    def run(self, q: torch.Tensor, counts: StepCounts | None = None):
        """Eager step on query ``q [B, Hq, D]``: ``(o, lse)``. The query is read in place (no copy into the
        static buffer: a model capturing its whole decode step already holds q in graph memory). ``counts``:
        the model step's :class:`prr.algo.step.StepCounts` for this cache (default: the step's ``counts``, else
        computed per layer)."""
        self.counts = counts if counts is not None else self.fixed_counts
        try:
            self.out = self._step(q)
        finally:
            self.counts = self.fixed_counts
        return self.out

    def _state(self):
        if self.method != "prr":
            return []
        p = self.predictor
        return [p.level, p.trend, p.known, self.pred_scores, self.p_idx, self.p_cnt]

    def _snapshot(self):
        return [t.clone() for t in self._state()]

    def _restore(self, snap):
        for dst, src in zip(self._state(), snap, strict=True):
            dst.copy_(src)

    def capture(self, split_tail: bool = False) -> None:
        """Compile (warm-up) and capture the step in a CUDA graph; the predictor state is left as it was.

        ``split_tail``: capture the critical path (``graph``) and PRR's tail (``tail_graph``, sharing its memory
        pool) as two graphs, so that the path can be timed alone and the tail replayed where it fits (beside
        the rest of a layer); :meth:`replay` runs both in order."""
        if self.cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the cache on a CUDA device")
        if self.host_scheduled() is not None:
            return self._capture_kinds()
        snap = self._snapshot()
        warm = torch.cuda.Stream(device=self.cache.device)
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for _ in range(2):
                self._step()
            self.join()
        torch.cuda.current_stream().wait_stream(warm)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        self.tail_graph = None
        if split_tail and self.method == "prr" and self.tail:
            with torch.cuda.graph(self.graph):
                o, lse, sel, nblk = self._path()
            self.out, self._held = (o, lse), (sel, nblk)  # the tail graph reads these static buffers
            self.tail_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.tail_graph, pool=self.graph.pool()):
                self._tail(sel, nblk, fork=False)
        else:
            with torch.cuda.graph(self.graph):
                self.out = self._step()
                self.join()  # a deferred tail still ends inside the graph
        torch.cuda.synchronize()
        self._restore(snap)

    def host_scheduled(self):
        """The amortized selector this step uses if it runs on the host schedule, else None."""
        am = self.amortized if self.amortized is not None else getattr(self.meta, "amortized", None)
        return am if am is not None and am.schedule == "host" else None

    def _capture_kinds(self) -> None:
        """One graph per amortized step kind, both in the first one's memory pool (the outputs of each stay
        referenced, so neither graph's outputs are overwritten by the other's work)."""
        am = self.host_scheduled()
        warm = torch.cuda.Stream(device=self.cache.device)
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for scan in (True, False, True, False):  # compile both kinds' kernels before capturing
                with am.forced(scan):
                    self._step()
        torch.cuda.current_stream().wait_stream(warm)
        torch.cuda.synchronize()
        self.kind_graphs, pool = {}, None
        for scan in (True, False):
            g = torch.cuda.CUDAGraph()
            with am.forced(scan), torch.cuda.graph(g, pool=pool):
                out = self._step()
            pool = g.pool() if pool is None else pool
            self.kind_graphs[scan] = (g, out, dict(self.last))
        torch.cuda.synchronize()
        self.graph, self.out, self.last = self.kind_graphs[True]

    def replay(self, q: torch.Tensor | None = None):
        """Replay the captured step (after copying ``q`` into the static query): ``(o, lse)``, views into
        graph memory that the next replay overwrites."""
        if self.graph is None:
            raise RuntimeError("call capture() first")
        if q is not None:
            self.q.copy_(q)
        if self.kind_graphs is not None:  # the host knows the step kind: no device read
            am = self.host_scheduled()
            g, self.out, self.last = self.kind_graphs[am.next_is_scan()]
            g.replay()
            am.advance()
            return self.out
        self.graph.replay()
        if self.tail_graph is not None:
            self.tail_graph.replay()
        return self.out
