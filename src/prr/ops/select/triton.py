"""Top-K block selection in Triton (twin: ``reference.select_blocks``): no host sync, no sort.

Two stages, so the per-row work is small even at 32K blocks (512K tokens of 16-token pages):

1. ``_group_max_kernel`` (many programs): the max dynamic-candidate score of every group of GROUP blocks.
2. ``_topk_kernel`` (one program per (sequence, KV head)): the K best groups by their max are found exactly
   (bisection over an order-preserving int32 key between the smallest and largest live key, stopping at a
   threshold with exactly K keys above it).
   Every block of the top K lies in one of those K groups (a group holding a top-K block has a max at least
   the K-th largest score, which is at least the K-th largest group max; ties go to the lowest ids), so a
   second search over just those K x GROUP scores finds the K-th score, ties at it going to the
   lowest block ids. The candidates are gathered in ascending id order, so a prefix sum writes the chosen
   ids already sorted, between the sink blocks and the local blocks.

Rows of up to ``TOPK_SINGLE_MAX`` blocks take one search over the whole row instead (no group stage, one
dependent search fewer). On the H200 that is slower at 8,192 blocks and up: 19.7 against 15.5 us at 8,192
(Llama-3.1-8B b1 128K), 78-213 against 16 us at 32,768 (docs/experiments/topk_single_stage_h200.log); on short
rows it pays: SmolLM2-135M shapes at 5K tokens (~320 blocks), DSA 1.531 -> 1.346 ms/token in `prr bench e2e`
(docs/experiments/bench_e2e_smollm2_single_ab_h200/).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import pdl_launch
from ..pdl import pdl_prologue

GROUP = 16  # blocks per group in stage 1
TOPK_WARPS: int | None = None  # warps of the top-K program (None: by tile size; module-level for a sweep)
# Rows of up to this many blocks (padded to a power of two) take one search over all their blocks instead of
# the two stages (module-level for a sweep): faster on SmolLM2's ~320-block rows, slower at 8,192 and up
TOPK_SINGLE_MAX = 512
INT_MIN = -2147483648
TRACE: torch.Tensor | None = None  # int64 [B*Hkv, TRACE_SLOTS]: the top-K programs' clock stamps (timelines)
TRACE_SLOTS = 16


def trace_arg(rows: int, placeholder: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The kernels' ``(tr_ptr, TRACE)`` arguments: :data:`TRACE` (checked to hold ``rows`` programs) when set,
    else ``placeholder`` (never written)."""
    if TRACE is None:
        return placeholder, False
    if TRACE.dtype != torch.int64 or TRACE.shape[0] < rows or TRACE.shape[1] != TRACE_SLOTS:
        raise ValueError(f"TRACE must be int64 [>= {rows}, {TRACE_SLOTS}]")
    return TRACE, True


@triton.jit
def _clock(dep):
    """This SM's clock (``%clock64``, int64) read once the scalar ``dep`` is computed."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep.to(tl.int32)], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _stamp(tr_ptr, slot, dep, TRACE: tl.constexpr):
    """Kernel timelines: :func:`_clock` once the scalar ``dep`` is computed, into ``tr_ptr[program, slot]`` (only
    when the constexpr TRACE is set: no cost otherwise)."""
    if TRACE:
        tl.store(tr_ptr + tl.program_id(0) * 16 + slot, _clock(dep))  # 16: TRACE_SLOTS


@triton.jit
def _stamp_max(tr_ptr, slot, x, TRACE: tl.constexpr):
    """:func:`_stamp` once the whole tile ``x`` is available (its max: one reduction more, only when tracing)."""
    if TRACE:
        _stamp(tr_ptr, slot, tl.max(x, axis=0), TRACE)


@triton.jit
def _order_key(x):
    """float32 -> int32 key ordered like the floats (flip the magnitude bits of negatives). Real floats map
    above INT32_MIN + 1; INT32_MIN marks non-candidates (NaN is excluded by the caller)."""
    u = x.to(tl.int32, bitcast=True)
    return tl.where(u >= 0, u, u ^ 0x7FFFFFFF)


@triton.jit
def _kth_key(key, k):
    """The k-th largest of `key` (INT32_MIN entries never count), or any threshold with exactly k keys at or
    above it; INT32_MIN if fewer than k count.

    Bisection for the largest T with #(key >= T) >= k, between the smallest and the largest live key (not the
    whole int32 range), stopping as soon as a threshold has exactly k keys at or above it (that set is the
    top k: ties at a threshold that is no key's value cannot arise). At batch 1 each pass is a dependent
    block-wide reduction, so passes are the top-K's latency: about log2(n) + a few instead of 32. (A 16-ary
    search, 8 passes of a [16, n] compare, measured slower on the H200: 29 vs 22 us at 128K.)
    """
    live = key > -2147483648
    n = tl.sum(live.to(tl.int32), axis=0)
    lo = tl.min(tl.where(live, key, 2147483647), axis=0).to(tl.int64)  # #(key >= lo) = n >= k
    hi = tl.max(key, axis=0).to(tl.int64)  # #(key >= hi + 1) = 0 < k
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        lo_next = tl.where(c >= k, mid, lo)
        hi = tl.where(c == k, mid, tl.where(c > k, hi, mid - 1))
        lo = lo_next
    return tl.where(n >= k, lo, -2147483648).to(tl.int32)


@triton.jit
def _top_k_mask(key, k):
    """The k largest keys (INT32_MIN never counts), ties at the k-th going to the lowest positions."""
    thr = _kth_key(key, k)
    above = key > thr
    tie = (key == thr) & (key > -2147483648)
    rank = tl.cumsum(tie.to(tl.int32), axis=0)
    return above | (tie & (rank <= k - tl.sum(above.to(tl.int32), axis=0)))


@triton.jit
def _dynamic_keys(s, j, n, N_SINK, N_LOCAL):
    """Order keys of the dynamic candidates among blocks `j` scored `s` (INT32_MIN elsewhere): live (`n`
    blocks), not forced (sink or local), finite. Shared with the scoring kernel's group maxima."""
    cand = (j < n) & (j >= N_SINK) & (j < n - N_LOCAL) & (s > float("-inf"))
    return tl.where(cand, _order_key(s), -2147483648)


@triton.jit
def _candidate_keys(s_row, j, n, NMAX, N_SINK, N_LOCAL):
    """:func:`_dynamic_keys` of blocks `j` read from a score row (`n` <= NMAX: nothing past the row is read)."""
    s = tl.load(s_row + j, mask=(j < n) & (j < NMAX), other=float("-inf")).to(tl.float32)
    return _dynamic_keys(s, j, n, N_SINK, N_LOCAL)


@triton.jit
def _group_max_kernel(s_ptr, nblk_ptr, g_ptr, HKV, NMAX, NG, N_SINK, N_LOCAL, s_sb, s_sh,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.reshape(i_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :], (BLOCK_G * GROUP,))
    n = tl.minimum(tl.maximum(tl.load(nblk_ptr + i_b), 0), NMAX)  # block counts out of range stay in bounds
    key = _candidate_keys(s_ptr + i_b * s_sb + i_h * s_sh, j, n, NMAX, N_SINK, N_LOCAL)
    gmax = tl.max(tl.reshape(key, (BLOCK_G, GROUP)), axis=1)
    tl.store(g_ptr + i_bh * NG + i_g, gmax, mask=i_g < NG)


@triton.jit
def _topk_kernel(s_ptr, nblk_ptr, g_ptr, cg_ptr, idx_ptr, cnt_ptr, tr_ptr, HKV, NMAX, NG, TOPK, N_SINK, N_LOCAL,
                 KMAX, s_sb, s_sh, s_ib, s_ih,
                 GROUP: tl.constexpr, NG_PAD: tl.constexpr, TG_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                 SINGLE: tl.constexpr, NMAX_PAD: tl.constexpr, TRACE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    n = tl.minimum(tl.maximum(tl.load(nblk_ptr + i_b), 0), NMAX)  # block counts out of range stay in bounds
    _stamp(tr_ptr, 0, n, TRACE)
    s_row = s_ptr + i_b * s_sb + i_h * s_sh
    out = idx_ptr + i_b * s_ib + i_h * s_ih
    k = tl.arange(0, BLOCK_K)
    if n <= KMAX:  # a short context: every live block
        tl.store(out + k, tl.where(k < n, k, -1), mask=k < KMAX)
        tl.store(cnt_ptr + i_bh, n)
    elif SINGLE:  # a row short enough for one search over all its blocks (no group stage)
        j = tl.arange(0, NMAX_PAD)
        key = _candidate_keys(s_row, j, n, NMAX, N_SINK, N_LOCAL)
        chosen = _top_k_mask(key, TOPK)
        _write_selection(out, cnt_ptr + i_bh, chosen, j, n, k, N_SINK, N_LOCAL, KMAX, BLOCK_K)
    else:
        # Stage 1: the TOPK best groups by their max (ties: lowest group ids), gathered in ascending order.
        i_g = tl.arange(0, NG_PAD)
        gkey = tl.load(g_ptr + i_bh * NG + i_g, mask=i_g < NG, other=-2147483648)
        _stamp_max(tr_ptr, 1, gkey, TRACE)
        keep_g = _top_k_mask(gkey, TOPK)
        n_groups = tl.sum(keep_g.to(tl.int32), axis=0)
        _stamp(tr_ptr, 2, n_groups, TRACE)
        pos_g = tl.cumsum(keep_g.to(tl.int32), axis=0) - 1
        cg_row = cg_ptr + i_bh * TG_PAD
        tl.store(cg_row + pos_g, i_g, mask=keep_g)
        tl.debug_barrier()  # the scratch row is read back by other threads of this program
        # Stage 2: the K-th score among the candidate groups' blocks (in ascending block order).
        i_c = tl.arange(0, TG_PAD * GROUP)
        slot = i_c // GROUP
        grp = tl.load(cg_row + slot, mask=slot < n_groups, other=0)
        j = grp * GROUP + i_c % GROUP
        key = _candidate_keys(s_row, j, n, NMAX, N_SINK, N_LOCAL)
        key = tl.where(slot < n_groups, key, -2147483648)
        _stamp_max(tr_ptr, 3, key, TRACE)
        chosen = _top_k_mask(key, TOPK)
        _stamp(tr_ptr, 4, tl.sum(chosen.to(tl.int32), axis=0), TRACE)
        _write_selection(out, cnt_ptr + i_bh, chosen, j, n, k, N_SINK, N_LOCAL, KMAX, BLOCK_K)
        _stamp(tr_ptr, 5, n, TRACE)


@triton.jit
def _write_selection(out, cnt_ptr, chosen, j, n, k, N_SINK, N_LOCAL, KMAX, BLOCK_K: tl.constexpr):
    """Output row: sink blocks, the chosen blocks ``j`` (ascending), local blocks; -1 padding; the count."""
    n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
    pos = N_SINK + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out + pos, j, mask=chosen)
    tl.store(out + k, k, mask=k < N_SINK)
    loc = N_SINK + n_chosen + k
    tl.store(out + loc, n - N_LOCAL + k, mask=k < N_LOCAL)
    count = N_SINK + n_chosen + N_LOCAL
    tl.store(out + k, tl.full([BLOCK_K], -1, tl.int32), mask=(k >= count) & (k < KMAX))
    tl.store(cnt_ptr, count)


@triton.jit
def _overlap_kernel(p_ptr, pc_ptr, s_ptr, sc_ptr, out_ptr, HKV, KP, KS, BH,
                    s_pb, s_ph, s_pcb, s_pch, s_sb, s_sh, s_scb, s_sch,
                    KS_PAD: tl.constexpr, CH: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    p_cnt = tl.load(pc_ptr + i_b * s_pcb + i_h * s_pch)
    s_cnt = tl.load(sc_ptr + i_b * s_scb + i_h * s_sch)
    i_s = tl.arange(0, KS_PAD)
    s_blk = tl.load(s_ptr + i_b * s_sb + i_h * s_sh + i_s, mask=(i_s < s_cnt) & (i_s < KS), other=-2)
    hits = tl.zeros([CH], tl.int32)
    for c0 in range(0, KP, CH):  # P's slots, CH at a time, each against all of S's valid slots
        i_p = c0 + tl.arange(0, CH)
        m_p = (i_p < p_cnt) & (i_p < KP)
        p_blk = tl.load(p_ptr + i_b * s_pb + i_h * s_ph + i_p, mask=m_p, other=-1)
        found = tl.max((p_blk[:, None] == s_blk[None, :]).to(tl.int32), axis=1)
        hits += tl.where(m_p & (p_blk >= 0), found, 0)
    n = tl.sum(hits, axis=0)
    tl.store(out_ptr + i_bh, n)
    tl.store(out_ptr + BH + i_bh, s_cnt - n)
    tl.store(out_ptr + 2 * BH + i_bh, p_cnt - n)


def selection_overlap(p_idx, p_cnt, s_idx, s_cnt):
    """Triton twin of :func:`prr.ops.select.reference.selection_overlap`: one launch (the PyTorch version is a
    dozen small kernels, which at batch 1 cost PRR's step more than its attention)."""
    bsz, hkv, kp = p_idx.shape
    ks = s_idx.shape[-1]
    if p_idx.stride(-1) != 1 or s_idx.stride(-1) != 1:
        raise ValueError("selection_overlap: indices need a unit last stride")
    out = torch.empty(3, bsz, hkv, dtype=torch.int32, device=p_idx.device)
    if bsz * hkv:
        ks_pad = max(16, triton.next_power_of_2(ks))
        _overlap_kernel[(bsz * hkv,)](
            p_idx, p_cnt, s_idx, s_cnt, out, hkv, kp, ks, bsz * hkv,
            p_idx.stride(0), p_idx.stride(1), p_cnt.stride(0), p_cnt.stride(1),
            s_idx.stride(0), s_idx.stride(1), s_cnt.stride(0), s_cnt.stride(1),
            KS_PAD=ks_pad, CH=max(1, min(64, 16384 // ks_pad)), num_warps=4, **pdl_launch(p_idx),
        )
    return out


def topk_warps(keys: int) -> int:
    """Warps of the top-K program by the longest search it runs (keys, padded): measured on the H200
    (docs/experiments/topk_warps_h200/): up to 2,048 keys 4 (12.5 us at Llama b1 512K, K = 128; 16 warps 13.3),
    up to 8,192 keys 8 (the top 1,024 at 128K: 20.1 us, 16 warps 21.7), more 16 (the top 1,024 at 512K, a
    16,384-key second stage: 49.3 -> 35.7 us at b1, 44.6 -> 36.8 at b8; 32 warps 44.0)."""
    return 4 if keys <= 2048 else 8 if keys <= 8192 else 16


def group_maxima(scores, nb, n_sink: int, n_local: int, group_max, scratch_cols: int):
    """Stage 1's input for a top-K program over ``scores [B, Hkv, N_max]``: ``(group maxima [B*Hkv, NG], a
    scratch buffer [B*Hkv, scratch_cols] for the kept groups' ids, single)``. ``single``: rows short enough
    for one search over all their blocks (no group maxima needed: the scratch stands in). ``group_max``: the
    maxima the scoring kernel wrote (checked), else computed here."""
    bsz, hkv, nmax = scores.shape
    ng = triton.cdiv(nmax, GROUP)
    cg = torch.empty(bsz * hkv, scratch_cols, dtype=torch.int32, device=scores.device)
    single = max(16, triton.next_power_of_2(nmax)) <= TOPK_SINGLE_MAX
    if single:  # one search over the whole row: no group maxima needed (given ones are ignored)
        return cg, cg, True
    if group_max is None:
        gmax = torch.empty(bsz * hkv, ng, dtype=torch.int32, device=scores.device)
        block_g = 64
        _group_max_kernel[(bsz * hkv, triton.cdiv(ng, block_g))](
            scores, nb, gmax, hkv, nmax, ng, n_sink, n_local, scores.stride(0), scores.stride(1),
            GROUP=GROUP, BLOCK_G=block_g, num_warps=4, **pdl_launch(scores),
        )
        return gmax, cg, False
    if group_max.shape != (bsz * hkv, ng) or group_max.dtype != torch.int32 or not group_max.is_contiguous():
        raise ValueError(f"group_max must be contiguous int32 [{bsz * hkv}, {ng}], got {group_max.dtype} "
                         f"{tuple(group_max.shape)}")
    return group_max, cg, False


def select_blocks(scores, num_blocks, top_k: int, n_sink: int = 1, n_local: int = 2, out=None, group_max=None):
    """Triton twin of :func:`prr.ops.select.reference.select_blocks`. `out=(indices, counts)` reuses buffers;
    ``group_max``: stage 1's group maxima already written by the scoring kernel (its ``group_max_for``).

    Ties at the K-th score go to the lowest block ids (``torch.topk``'s choice among ties is unspecified, so
    the two agree on the selected *set* whenever the K-th score is not tied).
    """
    bsz, hkv, nmax = scores.shape
    if scores.stride(-1) != 1:
        raise ValueError("scores must have a unit last stride")
    if scores.dtype != torch.float32:
        raise TypeError(f"the Triton top-K takes float32 scores, got {scores.dtype}")
    kmax = n_sink + n_local + top_k
    dev = scores.device
    if out is None:
        idx = torch.empty(bsz, hkv, kmax, dtype=torch.int32, device=dev)
        cnt = torch.empty(bsz, hkv, dtype=torch.int32, device=dev)
    else:
        idx, cnt = out
    nb = num_blocks if num_blocks.dtype == torch.int32 else num_blocks.to(torch.int32)
    ng = triton.cdiv(nmax, GROUP)
    tg_pad = max(16, triton.next_power_of_2(min(top_k, ng)))
    gmax, cg, single = group_maxima(scores, nb, n_sink, n_local, group_max, tg_pad)
    nmax_pad = max(16, triton.next_power_of_2(nmax))
    ng_pad = max(16, triton.next_power_of_2(ng))
    tr, trace = trace_arg(bsz * hkv, cnt)
    _topk_kernel[(bsz * hkv,)](
        scores, nb, gmax, cg, idx, cnt, tr, hkv, nmax, ng, top_k, n_sink, n_local, kmax,
        scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
        GROUP=GROUP, NG_PAD=ng_pad, TG_PAD=tg_pad, BLOCK_K=max(16, triton.next_power_of_2(kmax)),
        SINGLE=single, NMAX_PAD=nmax_pad if single else 16, TRACE=trace,
        num_warps=TOPK_WARPS or topk_warps(max(ng_pad, tg_pad * GROUP, nmax_pad if single else 0)),
        **pdl_launch(scores),
    )
    return idx, cnt
