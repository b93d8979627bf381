"""Amortized DSA selection (issue #12): a full scan every m steps, candidates re-scored in between.

Every ``every`` (m) steps the full selection runs with ``ceil(factor * K)`` (c·K) dynamic blocks and its
result (sink and local blocks included, sorted) becomes the candidate list of that (sequence, KV head). Every
step, the scan's step too, scores only the candidates plus the blocks that appeared since the scan, with the
live query on the live metadata, and keeps the best K; sink and local blocks are forced as always. On a scan
step the list holds the scan's top c·K ⊇ its top K, so the result is the full selection exactly.

Two schedules decide which steps scan, neither reading the device on the host:

- ``schedule="device"``: a step counter tensor decides per sequence whether this step scans, and a
  sequence that does not scan is handed to the full scorer with length 0 (a scorer reads no metadata for dead
  blocks and the top-K finishes at once), so the same kernels run at every step and one captured CUDA graph
  serves every step. A sequence also rescans when more blocks appeared than the list has room for, or when it
  got shorter (a reused cache). The price: a re-score step still launches the gated full scorer, its top-K and
  the commit (7 launches; their idle grids cost 7 µs at b1 and 32 µs at b8 on an H200 at 512K).
- ``schedule="host"`` (default): the host counts steps (a Python int; the step index is known without a device
  read) and every m-th step scans every sequence; the others run only the candidate scorer, with the step's
  bookkeeping fused in, and the candidate top-K (for Quest at up to ``FUSED_RESCORE_MAX_ROWS`` (sequence, KV head)
  rows in the same launch: the last scoring program of a row selects it; otherwise 2 launches). Under CUDA graphs
  a step is captured twice, once per kind, sharing one memory pool, and the caller replays the kind
  :meth:`AmortizedSelector.next_is_scan` names (``LayerStep`` and the model engine's captured step do). Same
  selections as the device schedule while at most ``new_slots`` blocks appear per period and no sequence shrinks
  (decoding ``grow`` tokens per step; a sequence reset to fewer than K_max blocks, as a finished one, selects all
  its blocks either way); otherwise the blocks past the slots are not candidates until the next scan, and a reused
  cache needs :meth:`reset`.

:meth:`AmortizedSelector.reset` makes the next step a scan (call it after a graph capture, whose warm-up steps
advance the counters).

Cost per step, in metadata blocks read: ``N / m + c·K + forced + new`` instead of ``N``. Known limits: the
step's :class:`Selection` carries no full scores (``scores=None``), so the PRR predictor cannot be fed from it
(the runtime refuses PRR with an amortized selector); the oracle method has no candidate scorer.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import _checks as check
from .. import ops
from ..cache import KVCache
from ..ops import candidates as cops
from .sparse import BlockMetadata, Selection

SCHEDULES = ("device", "host")
# The host schedule's Quest re-score runs as one launch (the last scoring program of a row selects it) for up to
# this many (sequence, KV head) rows, else as two (scorer, then top-K). H200, Llama-3.1-8B 512K, re-score step:
# 8 rows (b1) 9.6 / 10.0 us one launch against 11.1 / 11.2 two (c 6 / c 8); 64 rows (b8) 23.9 / 29.4 against
# 19.0 / 22.8 (results/bench_select_h200.json at 1c05119 and 05f882f). Between 8 and 64: not measured.
FUSED_RESCORE_MAX_ROWS = 8


class AmortizedSelector:
    """Per-layer state of amortized selection for one cache.

    Args:
        meta: the layer's block metadata (its config gives the method and budget; Quest or InfLLM-v2).
        cache: the layer's cache (batch, heads, device).
        every: m, steps per full scan (1: a scan every step, the full selection).
        factor: c, candidates kept per scan as a multiple of K (>= 1). Defaults m = 32, c = 6 on the host
            schedule: the setting that met issue #12's targets (README, "Amortized selection"): on SmolLM2 the
            same answers as the full scan on 40 of 42 instances, hit 0.998, perplexity +0.000%; on the H200 at
            512K 5.0x cheaper than the full scan at batch 1 and 11.9x at batch 8.
        new_slots: list slots for blocks that appear after a scan; default ``ceil(m * grow / BS) + 1`` (at most N_max).
        grow: tokens the cache gains per step (1 when decoding a token per step).
        schedule: ``"device"`` (per-sequence flags on the device, one graph) or ``"host"`` (a host step count,
            a graph per step kind); see the module docstring.

    State (device tensors, updated in place): ``cand [B, Hkv, C + new_slots]`` int32 (the first C columns are
    the last scan's selection), ``nblk_scan [B]`` int32, ``step, scans [B]`` int64 (steps and scans so far).
    """

    def __init__(self, meta: BlockMetadata, cache: KVCache, every: int = 32, factor: float = 6.0,
                 new_slots: int | None = None, grow: int = 1, schedule: str = "host"):
        if not isinstance(meta, BlockMetadata):
            raise TypeError(f"meta must be a BlockMetadata, got {type(meta).__name__}")
        cfg = meta.cfg
        if cfg.method not in ("quest", "infllm_v2"):
            raise ValueError(f"amortized selection needs quest or infllm_v2, not {cfg.method!r}")
        self.every = check.positive_int("every", every)
        self.schedule = check.choice("schedule", schedule, SCHEDULES)
        self.host_step = 0  # steps so far, on the host (the "host" schedule's clock)
        self._forced: bool | None = None
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
            raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")
        self.factor = float(factor)
        self.meta, self.cfg = meta, cfg
        self.scan_k = math.ceil(self.factor * cfg.top_k)
        cap = cfg.n_sink + cfg.n_local + self.scan_k
        grow = check.nonneg_int("grow", grow)
        # A list never needs more new-block slots than the cache has blocks.
        self.new_slots = (min(math.ceil(every * grow / cfg.block_size) + 1, cache.max_blocks(cfg.block_size))
                          if new_slots is None else check.positive_int("new_slots", new_slots))
        dev = cache.device
        self.cand = torch.full((cache.batch, cache.num_kv_heads, cap + self.new_slots), -1, dtype=torch.int32,
                               device=dev)
        self.nblk_scan = torch.zeros(cache.batch, dtype=torch.int32, device=dev)
        self.step = torch.zeros(cache.batch, dtype=torch.int64, device=dev)  # per sequence: no race in the plan
        self.scans = torch.zeros(cache.batch, dtype=torch.int64, device=dev)  # scans done (for reports)
        # Arrivals per (sequence, KV head) of the fused Quest re-score's programs (the last one selects the row)
        self.tick = torch.zeros(cache.batch * cache.num_kv_heads, dtype=torch.int32, device=dev)
        self.fused_rescore = cfg.method == "quest" and cache.batch * cache.num_kv_heads <= FUSED_RESCORE_MAX_ROWS

    @property
    def capacity(self) -> int:
        """Candidates kept by a scan (forced blocks included), ``n_sink + n_local + ceil(c K)``."""
        return self.cand.shape[-1] - self.new_slots

    def reset(self) -> None:
        """Forget the candidates: the next step scans."""
        self.host_step = 0
        self.step.zero_()
        self.nblk_scan.zero_()
        self.cand.fill_(-1)
        self.scans.zero_()
        self.tick.zero_()

    def next_is_scan(self) -> bool:
        """Whether the next :meth:`select` scans, on the host schedule (on the device schedule: whether the
        period says so; overflow and shrink rescans are decided on the device)."""
        return self.host_step % self.every == 0

    def advance(self) -> None:
        """Count a step run outside :meth:`select` (a replayed graph of it)."""
        self.host_step += 1

    @contextlib.contextmanager
    def forced(self, scan: bool):
        """Within: every :meth:`select` is a step of the given kind (host schedule) and the host clock stands
        still; for capturing one graph per step kind."""
        if self.schedule != "host":
            raise RuntimeError("forced() is for the host schedule (the device schedule needs one graph)")
        prev, self._forced = self._forced, bool(scan)
        try:
            yield
        finally:
            self._forced = prev

    def warm_up(self, q: torch.Tensor, cache: KVCache) -> None:
        """Run a step of each kind and put the state back (host schedule: compiles both kinds' kernels before
        their graphs are captured; a capture compiles nothing)."""
        state = [self.cand, self.nblk_scan, self.step, self.scans]
        saved, clock = [t.clone() for t in state], self.host_step
        for scan in (True, False):
            with self.forced(scan):
                self.select(q, cache)
        for dst, src in zip(state, saved, strict=True):
            dst.copy_(src)
        self.host_step = clock

    def _scores(self, q, cache, cand, plan=None):
        cfg, meta = self.cfg, self.meta
        if cfg.method == "quest":
            return cops.quest_candidate_scores(q, meta.kmin, meta.kmax, cache, cand, cfg.block_size, cfg.aggregate,
                                               plan=plan)
        return cops.infllm_candidate_scores(q, meta.ckeys, cache, cand, cfg.block_size, cfg.window, cfg.stride,
                                            cfg.aggregate, plan=plan)

    def select(self, q: torch.Tensor, cache: KVCache, nblk: torch.Tensor | None = None) -> Selection:
        """This step's selection (``scores=None``); advances the step counters. No host sync. (``nblk`` is
        accepted for :func:`prr.select`'s signature; the plan computes the block counts itself.)"""
        cfg = self.cfg
        if self.schedule == "device":
            force = -1
        else:
            force = int(self.next_is_scan() if self._forced is None else self._forced)
            if self._forced is None:
                self.host_step += 1
            if force == 0:  # the scorer with the bookkeeping fused in, then the top-K (Quest: in the same launch)
                nblk = torch.empty_like(self.nblk_scan)
                plan = (self.step, self.nblk_scan, self.new_slots, nblk)
                if self.fused_rescore:
                    idx, cnt, _ = cops.quest_candidate_select(q, self.meta.kmin, self.meta.kmax, cache, self.cand,
                                                              cfg.block_size, cfg.aggregate, plan, cfg.top_k,
                                                              cfg.n_sink, cfg.n_local, self.tick)
                    return Selection(idx, cnt, None)
                scores = self._scores(q, cache, self.cand, plan=plan)
                idx, cnt = cops.select_candidates(self.cand, scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local)
                return Selection(idx, cnt, None)
        # One launch decides per sequence whether this step scans, and lists the blocks new since the scan.
        scan, g_lens, g_nblk, nblk = cops.amortized_plan(self.step, cache.seq_lens.to(torch.int32), self.nblk_scan,
                                                         self.cand, self.scans, self.every, self.new_slots,
                                                         cfg.block_size, force)
        if force == -1:
            gated = KVCache(cache.k, cache.v, cache.page_table, g_lens)
            full = self.meta.scores(q, gated)  # all -inf (nothing read) for a sequence that does not scan
            s_idx, _ = ops.select_blocks(full, g_nblk, self.scan_k, cfg.n_sink, cfg.n_local)
            cops.commit_candidates(self.cand, s_idx, scan)  # the scan's sorted selection heads the list
        elif force == 1:  # every sequence scans: nothing to gate
            s_idx, _ = ops.select_blocks(self.meta.scores(q, cache), nblk, self.scan_k, cfg.n_sink, cfg.n_local)
            self.cand[..., :s_idx.shape[-1]] = s_idx
        scores = self._scores(q, cache, self.cand)
        idx, cnt = cops.select_candidates(self.cand, scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local)
        return Selection(idx, cnt, None)

    def blocks_read(self, n: int) -> float:
        """Mean metadata blocks scored per step at N = `n` blocks (the cost model; vs ``n`` for a full scan)."""
        return n / self.every + self.cand.shape[-1]
