"""One layer's decode-attention step on fixed buffers: serialized DSA or PRR, eager or as a CUDA graph.

What the step computes is a :class:`StepSettings`; how it runs is the rest of :class:`LayerStep`'s arguments;
knobs that only benchmarks turn are a :class:`StepProbe`.

The selection finds its top-K by the full search (``topk="full"``: serialized DSA, the paper's baseline) or
by the guessed top-K (``topk="guessed"``, :class:`prr.algo.sparse.GuessedTopK`): the previous step's
selection bounds this step's threshold, so the search covers the few blocks above it. PRR on CUDA forks two
streams: a high-priority one scores every block and selects S, while a side stream runs the speculative
attention over P; the main stream joins both and runs the repair (the misses alone) and the merge that
reuses P's partial states: the output is ready. P comes from the guessed top-K itself (its next predicted set,
written in the same program as S: no predictor state, no extra kernel; the default) or from a Holt
predictor. Then the *tail*, on the side stream: the next P into place (a copy), or for Holt the score update
and the next P's top-K, off the next step's critical path (in a model it runs beside the rest of the layer;
the graph still ends by joining it). Every buffer has a fixed shape and nothing reads device values on the
host, so the whole step is captured once and replayed every token (:meth:`LayerStep.capture`,
:meth:`LayerStep.replay`). Eager (:meth:`LayerStep.run`) runs the same code for debugging; on the CPU it runs
without streams.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .. import _checks as check
from .. import ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import BlockMetadata, GuessedTopK, select
from ..algo.step import STEP_MODES, StepCounts, StepStats, prr_stats, speculative_top_k
from ..cache import KVCache

METHODS = ("dsa", "prr")
TOPKS = ("full", "guessed")
OVERLAPS = ("selection", "topk")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What one layer's step computes.

    ``method``: ``"dsa"`` (select, then attend) or ``"prr"``. ``topk``: how S's top-K is found, ``"full"`` or
    ``"guessed"`` (the same S; default: full for DSA, guessed for PRR). ``ratio``: PRR's speculation ratio
    (``K' = ceil(r K)``); ``mode``: ``"exact"``, ``"union"`` or ``"predicted"`` (the ablation: attention over P
    alone). ``grow``: tokens the cache gains before each step (a model decoding one token per step: 1), so P
    is predicted over the next step's blocks. ``scale``: the softmax scale (default ``1/sqrt(D)``).
    ``overlap``: what PRR's speculation runs beside (on a GPU): ``"selection"``, the scores and the top-K (the
    paper's schedule), or ``"topk"``, the top-K alone: it starts once the scores are written, so the
    bandwidth-bound scorer has the memory to itself and the speculation fills the SMs the latency-bound top-K
    leaves idle."""

    method: str = "prr"
    topk: str | None = None
    ratio: float = 1.0
    mode: str = "exact"
    grow: int = 0
    scale: float | None = None
    overlap: str = "selection"

    def __post_init__(self):
        check.choice("method", self.method, METHODS)
        if self.topk is None:
            object.__setattr__(self, "topk", "full" if self.method == "dsa" else "guessed")
        check.choice("topk", self.topk, TOPKS)
        check.choice("mode", self.mode, STEP_MODES)
        check.choice("overlap", self.overlap, OVERLAPS)
        check.nonneg_int("grow", self.grow)
        speculative_top_k(1, self.ratio)  # validates the ratio


@dataclasses.dataclass(frozen=True)
class StepProbe:
    """Benchmark knobs. ``hold_prediction``: the tail writes its prediction to scratch, so P (and the hit rate)
    stays as set; ``tail=False`` leaves the tail out (the critical path alone); ``update_layer``: the Holt
    slot the tail folds scores into (default: the step's layer); ``spec_programs``: cap the
    speculation's grid (it then leaves SMs to the selection's kernels)."""

    hold_prediction: bool = False  # (also holds the guessed top-K's previous selection as seeded)
    tail: bool = True
    update_layer: int | None = None
    spec_programs: int | None = None


@dataclasses.dataclass(frozen=True)
class StepStreams:
    """Streams shared between the layers of a model (default: the step's own). ``defer_tail``: leave the tail
    running on the side stream (not joined): the caller joins it with :meth:`LayerStep.join` before anything
    on its stream reads P or the predictor (a model joins once per token, so each layer's tail runs beside
    the next layer's projections)."""

    side: torch.cuda.Stream | None = None
    sel: torch.cuda.Stream | None = None
    defer_tail: bool = False


class LayerStep:
    """The decode-attention step of one layer.

    Args:
        cache, meta: the layer's KV cache and block metadata (appended to outside the step).
        num_q_heads: Hq.
        settings: a :class:`StepSettings`, or its fields as keywords (``method="dsa"``, ``ratio=1.5``, ...).
        predictor, layer: PRR's P from a :class:`prr.HoltPredictor` (its ``layer`` slot); None (default):
            from the guessed top-K (its top-K' of this step's scores), or on the full top-K the previous step's
            selection itself (K' = K).
        counts: block counts (:class:`prr.algo.step.StepCounts`) every step uses unless :meth:`run` is given its
            own (a benchmark of one layer as a model runs it; without counts the step counts itself: three
            small kernels, ~5 us at batch 1 on an H200). They are fixed: for a cache that grows between steps
            pass each step's counts to :meth:`run` instead.
        streams: run speculation on a side stream (CUDA only): True, False, or a :class:`StepStreams`.
        collect_stats: keep the step's :class:`prr.StepStats` in ``stats`` (on CUDA computed in the tail, on the
            side stream; without streams or a tail, right after the repair).
        amortized: an :class:`prr.algo.amortized.AmortizedSelector` selects (``method="dsa"``, full top-K: its
            selection has no full scores); call its ``reset()`` after :meth:`capture`. On its host schedule
            :meth:`capture` records one graph per step kind (scan, re-score) in one memory pool and
            :meth:`replay` replays the one the selector's host clock names.
        probe: benchmark knobs (:class:`StepProbe`).
    """

    def __init__(self, cache: KVCache, meta: BlockMetadata, num_q_heads: int, settings: StepSettings | None = None,
                 *, predictor: HoltPredictor | None = None, layer: int = 0, counts: StepCounts | None = None,
                 streams: bool | StepStreams = True, collect_stats: bool = False, amortized=None,
                 probe: StepProbe | None = None, **fields):
        settings = dataclasses.replace(settings, **fields) if settings is not None else StepSettings(**fields)
        self.settings = settings
        probe = probe or StepProbe()
        self.probe = probe
        method = settings.method
        if (amortized is not None or getattr(meta, "amortized", None) is not None) and (
                method != "dsa" or settings.topk != "full"):
            raise ValueError("amortized selection runs with method='dsa' and the full top-K only")
        self.amortized = amortized
        if predictor is not None and not isinstance(predictor, HoltPredictor):
            raise TypeError(f"predictor must be a HoltPredictor or None, got {type(predictor).__name__}")
        if method == "prr" and predictor is None and settings.topk != "guessed" and (
                speculative_top_k(meta.cfg.top_k, settings.ratio) != meta.cfg.top_k):
            raise ValueError("PRR on the full top-K without a Holt predictor takes P from the previous step's "
                             "selection, so K' = K (ratio=1); other K' take it from the guessed top-K "
                             "(topk='guessed')")
        check.gqa(num_q_heads, cache.num_kv_heads)
        self.cache, self.meta, self.cfg = cache, meta, meta.cfg
        self.method, self.mode, self.scale = method, settings.mode, settings.scale
        self.overlap = settings.overlap
        self.predictor, self.layer = predictor, layer
        self.update_layer = layer if probe.update_layer is None else probe.update_layer
        self.spec_k = speculative_top_k(self.cfg.top_k, settings.ratio)
        self.q = torch.zeros(cache.batch, num_q_heads, cache.head_dim, dtype=cache.dtype, device=cache.device)
        cuda = cache.device.type == "cuda"
        st = streams if isinstance(streams, StepStreams) else StepStreams()
        two = cuda and streams is not False and method == "prr"
        self.side = (st.side or torch.cuda.Stream(device=cache.device)) if two else None
        self.sel_stream = (st.sel or torch.cuda.Stream(device=cache.device, priority=-1)) if two else None
        self.tail, self.hold_prediction = probe.tail, probe.hold_prediction
        self.defer_tail, self.collect_stats = st.defer_tail, collect_stats
        self.spec_programs = probe.spec_programs
        self.stats = None
        self.counts: StepCounts | None = counts  # the model step's shared counts (run() sets them per call)
        self.fixed_counts = counts
        self.grow = settings.grow
        self.guessed = None
        if settings.topk == "guessed":
            self.guessed = GuessedTopK(cache.batch, cache.num_kv_heads, self.cfg,
                                       self.spec_k if method == "prr" else None, device=cache.device,
                                       hold=probe.hold_prediction)
        if method == "prr":  # P for the first step
            nblk = ops.num_blocks(cache.seq_lens + self.grow, self.cfg.block_size)
            if predictor is not None:
                self.pred_scores = predictor.predict(layer).clone()
                self.p_idx, self.p_cnt = ops.select_blocks(self.pred_scores, nblk, self.spec_k, self.cfg.n_sink,
                                                           self.cfg.n_local)
            else:  # the forced blocks alone until seeded (every dynamic block a miss)
                none = torch.full((cache.batch, cache.num_kv_heads, cache.max_blocks(self.cfg.block_size)),
                                  float("-inf"), device=cache.device)
                self.p_idx, self.p_cnt = ops.select_blocks(none, nblk, self.spec_k, self.cfg.n_sink,
                                                           self.cfg.n_local)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tail_graph: torch.cuda.CUDAGraph | None = None
        self.kind_graphs: dict | None = None  # host-scheduled amortized selection: {scan: (graph, out, last)}
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        # The step's selections (views into graph memory when replaying). "p_idx"/"p_cnt" are the live P buffers:
        # once a step's tail ran (without hold_prediction) they hold the *next* step's P; clone them before the
        # step to keep the P it used.
        self.last = {}

    def seed(self, s, p=None) -> None:
        """Start from a known selection ``s = (indices, counts)`` (e.g. the last prompt position's): the guessed
        top-K's previous selection, so the first step's guess already holds; and for PRR without a Holt
        predictor, a known P ``p = (indices, counts)`` (default: S's blocks, as far as P's capacity goes)."""
        if self.guessed is not None:
            self.guessed.seed(*s)
        if self.method == "prr" and self.predictor is None:
            idx, cnt = p if p is not None else s
            cap = self.p_idx.shape[-1]
            self.p_idx.fill_(-1)
            self.p_idx[..., :min(cap, idx.shape[-1])].copy_(idx[..., :cap])
            self.p_cnt.copy_(cnt.clamp(max=cap))

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
            sel = self._select(q, nblk)
            self.last = {"s_idx": sel.indices, "s_cnt": sel.counts, "scores": sel.scores}
            o, lse = ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size, self.scale)
            if self.collect_stats:
                self.stats = self._dsa_stats(sel, nblk)
            return o, lse, sel, nblk
        main = torch.cuda.current_stream() if self.side is not None else None
        p_idx, p_cnt = self.p_idx, self.p_cnt
        after_scores = None
        if main is not None:  # fork: the selection first (high priority), then the speculation
            self.sel_stream.wait_stream(main)
            self.side.wait_stream(main)
            if self.overlap == "topk":  # the speculation waits for the scores: it runs beside the top-K alone
                def after_scores():
                    self.side.wait_stream(self.sel_stream)
        with self._sel():
            sel = self._select(q, nblk, after_scores)
        with self._side():  # speculate over P (predicted at the end of the previous step)
            if self.mode == "exact":
                bo, blse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size, self.scale,
                                            max_programs=self.spec_programs)
                spec = {"block_o": bo, "block_lse": blse}
            else:
                so, slse = ops.sparse_decode(q, cache, p_idx, p_cnt, cfg.block_size, self.scale,
                                             max_programs=self.spec_programs)
                spec = {"spec_o": so, "spec_lse": slse}
        # Join. Union mode's repair reads S and P alone (P's merged state only enters the merge after it), so it
        # starts as soon as S is written and the speculation's stream is joined before the merge.
        late = main is not None and self.mode == "union"
        if main is not None:
            main.wait_stream(self.sel_stream)
            if not late:
                main.wait_stream(self.side)
        if self.mode == "predicted":
            o, lse = spec["spec_o"], spec["spec_lse"]
        else:
            o, lse = ops.repair_combine(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts,
                                        mode=self.mode, scale=self.scale,
                                        before_merge=(lambda: main.wait_stream(self.side)) if late else None, **spec)
        self.last = {"s_idx": sel.indices, "s_cnt": sel.counts, "p_idx": p_idx, "p_cnt": p_cnt,
                     "scores": sel.scores}
        if self.collect_stats and not (self.tail and self.side is not None):  # (a stream-less tail runs after)
            self.stats = self._prr_stats(sel, nblk)
        return o, lse, sel, nblk

    def _select(self, q, nblk, after_scores=None):
        """S: the full selection, or the guessed top-K's (which also writes the next P, over the next step's
        blocks). ``after_scores()`` is called between the scores' launch and the top-K's."""
        if self.guessed is None:
            return select(q, self.cache, self.meta, nblk=nblk, amortized=self.amortized, after_scores=after_scores)
        nxt = self._nblk_next(nblk) if self.method == "prr" and self.predictor is None else None
        return self.guessed.select(q, self.cache, self.meta, nblk, nxt, after_scores=after_scores)

    def _nblk_next(self, nblk):
        if not self.grow:
            return nblk
        shared = self.counts.nblk_next if self.counts is not None else None
        return shared if shared is not None else ops.num_blocks(self.cache.seq_lens + self.grow, self.cfg.block_size)

    def _prr_stats(self, sel, nblk):
        # (|P| copied: the tail overwrites P in place)
        st = prr_stats(self.p_idx, self.p_cnt.clone(), sel, nblk, self.cfg, self.spec_k, self._forced())
        st.guess = self.guessed.stats if self.guessed is not None else None
        return st

    def _dsa_stats(self, sel, nblk):
        zero = self.counts.zero if self.counts is not None else torch.zeros_like(sel.counts)
        forced = self.counts.forced if self.counts is not None else StepCounts.from_blocks(
            nblk, self.cfg, self.cache.num_kv_heads).forced
        return StepStats(sel.counts, zero, zero, sel.counts, zero, forced,
                         guess=self.guessed.stats if self.guessed is not None else None)

    def _tail(self, sel, nblk, fork: bool = True):
        """Put the next P in place: the guessed top-K's (a copy), or fold S's scores into the Holt predictor
        and take its top-K' (off this step's critical path)."""
        if self.method != "prr" or not self.tail:
            return
        cfg = self.cfg
        main = torch.cuda.current_stream() if (self.side is not None and fork) else None
        if main is not None:
            self.side.wait_stream(main)
        with self._side() if main is not None else contextlib.nullcontext():
            if self.collect_stats and self.side is not None:
                # The step's counts from the P it used, before the next P overwrites it: off the critical path
                # here (on the main stream after the join, as a dozen PyTorch ops per layer, they cost a PRR
                # step of Llama-3.1-8B ~1 ms per token; now one selection_overlap kernel)
                self.stats = self._prr_stats(sel, nblk)
            if self.predictor is None:  # the guessed top-K wrote the next P beside S; on the full one P is S
                if not self.hold_prediction:
                    g = self.guessed
                    self.p_idx.copy_(g.p_idx if g is not None else sel.indices)
                    self.p_cnt.copy_(g.p_cnt if g is not None else sel.counts)
            else:
                pred = self.pred_scores if not self.hold_prediction else torch.empty_like(self.pred_scores)
                self.predictor.update(self.update_layer, sel.scores, nblk, pred=pred)
                # The next P straight into the live buffers (the stats above already read this step's P)
                ops.select_blocks(pred, self._nblk_next(nblk), self.spec_k, cfg.n_sink, cfg.n_local,
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
        """The buffers a step updates in place (capture's warm-up restores them)."""
        state = self.guessed.buffers() if self.guessed is not None else []
        if self.method == "prr":
            state += [self.p_idx, self.p_cnt]
            if self.predictor is not None:
                p = self.predictor
                state += [p.level, p.trend, p.known, self.pred_scores]
        return state

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
