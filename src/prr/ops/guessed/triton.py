"""The guessed top-K in Triton (twin: ``reference.select_blocks_guessed``): one program per (sequence, KV head).

Guess, verify, refine, on the two-stage layout of :mod:`prr.ops.select.triton`:

1. *Verify*: the groups (of GROUP blocks) whose max reaches the guessed threshold ``τ`` hold every candidate
   of ``C(τ)``; they are gathered in ascending order (a compare and a prefix sum over the group maxima the
   scoring kernel wrote, where the full search runs a bisection over them) and ``|C(τ)|`` counted.
2. *Refine*: if ``|C(τ)| >= K`` the K-th key is searched among ``C(τ)`` alone, between its smallest and
   largest key (a range far narrower than the row's), by bisection (or, ``interp=True``, interpolation steps
   safeguarded by bisection: fewer passes, each dearer; slower on an H100).
3. Otherwise (the guess was too high, or so low that more groups qualify than the program gathers) the full
   two-stage search runs in the same program: no host sync, graph-safe.

Rows of up to ``TOPK_SINGLE_MAX`` blocks use the whole row as the tile instead of gathered groups, as the
full top-K does. The same program writes the next step's guess and predicted set (see the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import pdl_launch
from ..pdl import pdl_prologue
from ..select.triton import (
    GROUP,
    _candidate_keys,
    _order_key,
    _stamp,
    _stamp_max,
    _top_k_mask,
    _write_selection,
    group_maxima,
    topk_warps,
    trace_arg,
)
from .reference import compact_capacity, guess_capacity

TOPK_WARPS: int | None = None  # warps of the program (None: by tile size, as the full top-K; for sweeps)


@triton.jit
def _search(key, K_LO, K_HI, P_CAP, INTERP: tl.constexpr):
    """A threshold with ``K_LO <= #(key >= T) <= K_HI`` (INT32_MIN keys never count): for ``K_LO == K_HI == k``
    the k-th key, or a threshold with exactly k keys at or above it; INT32_MIN if fewer than K_LO count. Also
    the visited threshold holding the most keys within ``P_CAP`` with that count, and the smallest candidate
    key with the candidates' count. See ``reference.search``."""
    live = key > -2147483648
    n = tl.sum(live.to(tl.int32), axis=0).to(tl.int64)
    lo = tl.min(tl.where(live, key, 2147483647), axis=0).to(tl.int64)
    lo0 = lo
    hi = tl.max(key, axis=0).to(tl.int64)
    hi = tl.where((n >= K_LO) & (n > K_HI), hi, lo)  # too few candidates, or the window holds already
    c_lo = n
    c_hi = n * 0
    first = (n <= P_CAP) & (n >= K_LO)
    t_p = tl.where(first, lo, 0)
    c_p = tl.where(first, n, 0)
    bis = n * 0
    while lo < hi:
        width = hi - lo
        mid = lo + (width + 1) // 2
        if INTERP:
            num = (2 * c_lo - (K_LO + K_HI - 1)) * (width + 1)
            den = tl.maximum(2 * (c_lo - c_hi), 1)
            step = tl.minimum(tl.maximum(num // den, 1), width)
            mid = tl.where(bis != 0, mid, lo + step)
        c = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0).to(tl.int64)
        upd = (c <= P_CAP) & (c > c_p)
        t_p = tl.where(upd, mid, t_p)
        c_p = tl.where(upd, c, c_p)
        new_lo = tl.where(c >= K_LO, mid, lo)
        new_hi = tl.where(c > K_HI, hi, tl.where(c >= K_LO, mid, mid - 1))
        c_lo = tl.where(c >= K_LO, c, c_lo)
        c_hi = tl.where(c < K_LO, c, c_hi)
        if INTERP:
            bis = tl.where((bis == 0) & ((new_hi - new_lo) * 2 > width), 1, 0).to(tl.int64)
        lo = new_lo
        hi = new_hi
    thr = tl.where(n >= K_LO, lo, -2147483648)
    return thr, t_p, c_p, lo0, n


@triton.jit
def _gather_groups(keep_g, n_keep, i_g, cg_row, s_row, n, NMAX, N_SINK, N_LOCAL, CAP_G: tl.constexpr,
                   GROUP: tl.constexpr):
    """Keys and ids of the blocks of the kept groups (``n_keep`` of them, at most CAP_G), in ascending block
    order."""
    pos = tl.cumsum(keep_g.to(tl.int32), axis=0) - 1
    tl.debug_barrier()  # an earlier gather's reads of the scratch row are done
    tl.store(cg_row + pos, i_g, mask=keep_g)
    tl.debug_barrier()  # the scratch row is read back by other threads of this program
    i_c = tl.arange(0, CAP_G * GROUP)
    slot = i_c // GROUP
    grp = tl.load(cg_row + slot, mask=slot < n_keep, other=0)
    j = grp * GROUP + i_c % GROUP
    key = _candidate_keys(s_row, j, n, NMAX, N_SINK, N_LOCAL)
    return tl.where(slot < n_keep, key, -2147483648), j


@triton.jit
def _key_to_float(t):
    u = t.to(tl.int32)
    return tl.where(u >= 0, u, u ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _guessed_topk_kernel(s_ptr, nblk_ptr, nnext_ptr, guess_ptr, q_ptr, qc_ptr, g_ptr, cg_ptr, ck_ptr, cj_ptr,
                         idx_ptr, cnt_ptr, tr_ptr,
                         next_ptr, p_ptr, pc_ptr, st_ptr, HKV, BH, NMAX, NG, TOPK, N_SINK, N_LOCAL, KMAX, SPEC_K,
                         PMAX, GUESS_K, QMAX, s_sb, s_sh, s_ib, s_ih, s_pb, s_ph, s_qb, s_qh, s_qcb, s_qch,
                         GROUP: tl.constexpr, NG_PAD: tl.constexpr, CAP_G: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                         FROM_PREV: tl.constexpr, SINGLE: tl.constexpr, NMAX_PAD: tl.constexpr,
                         INTERP: tl.constexpr, CAP_C: tl.constexpr, COMPACT: tl.constexpr, TRACE: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    n = tl.minimum(tl.maximum(tl.load(nblk_ptr + i_b), 0), NMAX)  # block counts out of range stay in bounds
    n_next = tl.minimum(tl.maximum(tl.load(nnext_ptr + i_b), 0), NMAX)
    _stamp(tr_ptr, 0, n, TRACE)
    s_row = s_ptr + i_b * s_sb + i_h * s_sh
    out = idx_ptr + i_b * s_ib + i_h * s_ih
    p_out = p_ptr + i_b * s_pb + i_h * s_ph
    k = tl.arange(0, BLOCK_K)
    kp = tl.arange(0, BLOCK_P)
    i_g = tl.arange(0, NG_PAD)
    if not SINGLE:  # issued first: its latency overlaps the threshold's two dependent loads
        gkey = tl.load(g_ptr + i_bh * NG + i_g, mask=i_g < NG, other=-2147483648)
    if FROM_PREV:  # the smallest current key among the previous selection's dynamic blocks
        i_q = tl.arange(0, BLOCK_Q)
        q_cnt = tl.load(qc_ptr + i_b * s_qcb + i_h * s_qch)
        q_id = tl.load(q_ptr + i_b * s_qb + i_h * s_qh + i_q, mask=(i_q < q_cnt) & (i_q < QMAX), other=-1)
        q_key = _candidate_keys(s_row, tl.where(q_id >= 0, q_id, NMAX), n, NMAX, N_SINK, N_LOCAL)
        low = tl.min(tl.where(q_key > -2147483648, q_key, 2147483647), axis=0)
        tk = tl.where(low == 2147483647, -2139095041, low)  # none: the key of -inf
        tl.debug_barrier()  # every read of the previous selection is done (it may be this launch's output)
    else:
        tau = tl.load(guess_ptr + i_bh)
        tk = _order_key(tl.where(tau == tau, tau, float("-inf")))
    _stamp(tr_ptr, 1, tk, TRACE)
    if n <= KMAX:  # a short context: every live block; its dynamic part is the next P
        tl.store(out + k, tl.where(k < n, k, -1), mask=k < KMAX)
        tl.store(cnt_ptr + i_bh, n)
        tl.store(next_ptr + i_bh, float("-inf"))
        tl.store(st_ptr + i_bh, n)
        tl.store(st_ptr + BH + i_bh, 3)  # SHORT
        all_dyn = (kp >= N_SINK) & (kp < n - N_LOCAL) & (SPEC_K >= TOPK)  # (names unshared with the other branch)
        _write_p(p_out, pc_ptr + i_bh, all_dyn, kp, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P)
    else:
        too_low = n < 0  # (scalar False flags)
        narrowed = n < 0
        if SINGLE:  # the whole row is the tile
            j = tl.arange(0, NMAX_PAD)
            key = _candidate_keys(s_row, j, n, NMAX, N_SINK, N_LOCAL)
            c_tau = tl.sum((key >= tk).to(tl.int32), axis=0)
            held = c_tau >= TOPK
        else:
            _stamp_max(tr_ptr, 2, gkey, TRACE)
            cand_g = (gkey >= tk) & (gkey > -2147483648)
            n_keep = tl.sum(cand_g.to(tl.int32), axis=0)
            narrowed = n_keep > CAP_G
            _stamp(tr_ptr, 3, narrowed, TRACE)
            if narrowed:  # a guess too low to gather: raise it over the group maxima (at least K groups stay)
                t_n, _t, _c, _l, _n = _search(tl.where(cand_g, gkey, -2147483648), TOPK, CAP_G, 0, INTERP)
                tk = t_n.to(tl.int32)
                cand_g = (gkey >= tk) & (gkey > -2147483648)
                n_keep = tl.sum(cand_g.to(tl.int32), axis=0)
            too_low = n_keep > CAP_G
            keep_g = cand_g
            if too_low:  # no threshold narrows it (ties): the full search's stage 1
                keep_g = _top_k_mask(gkey, TOPK)
                n_keep = tl.sum(keep_g.to(tl.int32), axis=0)
            cg_row = cg_ptr + i_bh * CAP_G
            key, j = _gather_groups(keep_g, n_keep, i_g, cg_row, s_row, n, NMAX, N_SINK, N_LOCAL, CAP_G, GROUP)
            _stamp_max(tr_ptr, 4, key, TRACE)
            c_tau = tl.sum((key >= tk).to(tl.int32), axis=0)
            _stamp(tr_ptr, 5, c_tau, TRACE)
            held = (c_tau >= TOPK) & (too_low == 0)
            if (c_tau < TOPK) & (too_low == 0):  # the guess was too high: the full search's stage 1
                best_g = _top_k_mask(gkey, TOPK)
                key, j = _gather_groups(best_g, tl.sum(best_g.to(tl.int32), axis=0), i_g, cg_row, s_row, n, NMAX,
                                        N_SINK, N_LOCAL, CAP_G, GROUP)
        tile = tl.where(held & (key < tk), -2147483648, key)
        tl.store(st_ptr + i_bh, tl.where(too_low, -1, c_tau))
        path = tl.where(too_low, 2, tl.where(held, tl.where(narrowed, 4, 0), 1))  # TOO_LOW, NARROWED, HELD, TOO_HIGH
        tl.store(st_ptr + BH + i_bh, path)
        if COMPACT:  # the search over a short list: C(τ), narrowed to CAP_C keys if it holds more
            live = tile > -2147483648
            cnt = c_tau  # held: the tile is C(τ)
            if held == 0:
                cnt = tl.sum(live.to(tl.int32), axis=0)
            if held & (cnt > CAP_C):
                t_w, _t, _c, _l, _n = _search(tile, TOPK, CAP_C, 0, INTERP)
                tile = tl.where(tile >= t_w.to(tl.int32), tile, -2147483648)
                live = tile > -2147483648
                cnt = tl.sum(live.to(tl.int32), axis=0)
            if cnt <= CAP_C:
                ck_row = ck_ptr + i_bh * CAP_C
                cj_row = cj_ptr + i_bh * CAP_C
                pos = tl.cumsum(live.to(tl.int32), axis=0) - 1
                tl.store(ck_row + pos, tile, mask=live)
                tl.store(cj_row + pos, j, mask=live)
                tl.debug_barrier()  # the list is read back by other threads of this program
                i_c = tl.arange(0, CAP_C)
                ckey = tl.load(ck_row + i_c, mask=i_c < cnt, other=-2147483648)
                cj = tl.load(cj_row + i_c, mask=i_c < cnt, other=0)
                _stamp_max(tr_ptr, 6, ckey, TRACE)
                _finish(ckey, cj, n, n_next, out, cnt_ptr + i_bh, next_ptr + i_bh, p_out, pc_ptr + i_bh, k, kp,
                        TOPK, SPEC_K, GUESS_K, N_SINK, N_LOCAL, KMAX, PMAX, BLOCK_K, BLOCK_P, INTERP, tr_ptr, TRACE)
            else:  # the full search's tile (a failed guess): searched where it stands
                _finish(tile, j, n, n_next, out, cnt_ptr + i_bh, next_ptr + i_bh, p_out, pc_ptr + i_bh, k, kp,
                        TOPK, SPEC_K, GUESS_K, N_SINK, N_LOCAL, KMAX, PMAX, BLOCK_K, BLOCK_P, INTERP, tr_ptr, TRACE)
        else:
            _finish(tile, j, n, n_next, out, cnt_ptr + i_bh, next_ptr + i_bh, p_out, pc_ptr + i_bh, k, kp,
                    TOPK, SPEC_K, GUESS_K, N_SINK, N_LOCAL, KMAX, PMAX, BLOCK_K, BLOCK_P, INTERP, tr_ptr, TRACE)


@triton.jit
def _finish(tile, j, n, n_next, out, cnt_at, next_at, p_out, pc_at, k, kp, TOPK, SPEC_K, GUESS_K, N_SINK, N_LOCAL,
            KMAX, PMAX, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, INTERP: tl.constexpr, tr_ptr,
            TRACE: tl.constexpr):
    """The K-th key among the candidate keys ``tile`` (blocks ``j``, ascending), then S, the next guess and the
    next P written."""
    thr, t_p, c_p, lo0, c0 = _search(tile, TOPK, TOPK, SPEC_K, INTERP)
    _stamp(tr_ptr, 7, thr, TRACE)
    above = tile > thr
    tie = (tile == thr) & (tile > -2147483648)
    rank = tl.cumsum(tie.to(tl.int32), axis=0)
    chosen = above | (tie & (rank <= TOPK - tl.sum(above.to(tl.int32), axis=0)))
    _write_selection(out, cnt_at, chosen, j, n, k, N_SINK, N_LOCAL, KMAX, BLOCK_K)
    _stamp(tr_ptr, 8, tl.sum(chosen.to(tl.int32), axis=0), TRACE)
    # the next guess: the line through (lo0, c0) and (thr, K), read at GUESS_K
    searchable = c0 >= TOPK
    spread = tl.maximum(thr - lo0, 0)
    d = c0 - TOPK
    lin = thr - spread * (GUESS_K - TOPK) // tl.maximum(d, 1)
    nxt = tl.where(d > 0, lin, lo0 - spread - 1)
    nxt = tl.minimum(tl.maximum(nxt, -2139095041), 2139095040)  # the keys of -inf and +inf
    tl.store(next_at, tl.where(searchable, _key_to_float(nxt), float("-inf")))
    use_tp = searchable & ((c_p >= TOPK) | ((SPEC_K < TOPK) & (c_p > 0)))
    use_s = (use_tp == 0) & (SPEC_K >= TOPK)
    dyn = (use_tp & (tile >= t_p) & (tile > -2147483648)) | (use_s & chosen)
    _write_p(p_out, pc_at, dyn, j, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P)
    _stamp(tr_ptr, 9, tl.sum(dyn.to(tl.int32), axis=0), TRACE)


@triton.jit
def _write_p(p_out, pc_at, dyn, j, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P: tl.constexpr):
    """The next step's P: every live block of a short next row, else its sink, ``dyn`` blocks, local."""
    dyn = dyn != 0  # (a scalar flag folded in may widen the mask's type)
    if n_next <= PMAX:
        tl.store(p_out + kp, tl.where(kp < n_next, kp, -1), mask=kp < PMAX)
        tl.store(pc_at, n_next)
    else:
        _write_selection(p_out, pc_at, dyn, j, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P)


def _alloc(out, i, shape, dtype, dev):
    t = out[i] if out is not None and out[i] is not None else None
    return torch.empty(shape, dtype=dtype, device=dev) if t is None else t


def select_blocks_guessed(scores, num_blocks, top_k: int, n_sink: int = 1, n_local: int = 2, *, guess=None,
                          prev=None, guess_k: int, spec_k: int, num_blocks_next=None, group_max=None, out=None,
                          interp: bool = False):
    """Triton twin of :func:`prr.ops.guessed.reference.select_blocks_guessed` (float32 scores with a unit last
    stride; ``group_max`` as for :func:`prr.ops.select.triton.select_blocks`; ``out``: buffers for the six
    results, None entries allocated)."""
    bsz, hkv, nmax = scores.shape
    if scores.stride(-1) != 1 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 with a unit last stride (got {scores.dtype}, {scores.stride()})")
    if guess is not None and (guess.dtype != torch.float32 or not guess.is_contiguous()):
        raise ValueError("guess must be a contiguous float32 [B, Hkv] tensor")
    if prev is not None and (prev[0].dtype != torch.int32 or prev[0].stride(-1) != 1):
        raise ValueError("prev indices must be int32 with a unit last stride")
    dev = scores.device
    kmax = n_sink + n_local + top_k
    pmax = n_sink + n_local + spec_k
    idx = _alloc(out, 0, (bsz, hkv, kmax), torch.int32, dev)
    cnt = _alloc(out, 1, (bsz, hkv), torch.int32, dev)
    nxt = _alloc(out, 2, (bsz, hkv), torch.float32, dev)
    p_idx = _alloc(out, 3, (bsz, hkv, pmax), torch.int32, dev)
    p_cnt = _alloc(out, 4, (bsz, hkv), torch.int32, dev)
    stats = _alloc(out, 5, (2, bsz, hkv), torch.int32, dev)
    for name, t in (("indices", idx), ("next P", p_idx)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} buffer needs a unit last stride")
    for name, t in (("counts", cnt), ("next guess", nxt), ("P counts", p_cnt), ("stats", stats)):
        if not t.is_contiguous():
            raise ValueError(f"{name} buffer must be contiguous")
    nb = num_blocks if num_blocks.dtype == torch.int32 else num_blocks.to(torch.int32)
    nn = nb if num_blocks_next is None else num_blocks_next.to(torch.int32)
    ng = triton.cdiv(nmax, GROUP)
    cap_g = guess_capacity(top_k, guess_k, ng)
    nmax_pad = max(16, triton.next_power_of_2(nmax))
    gmax, cg, single = group_maxima(scores, nb, n_sink, n_local, group_max, cap_g)
    ng_pad = max(16, triton.next_power_of_2(ng))
    tile = nmax_pad if single else max(ng_pad, cap_g * GROUP)
    cap_c = compact_capacity(top_k, guess_k)
    compact = (nmax_pad if single else cap_g * GROUP) > cap_c
    clist = torch.empty(2, bsz * hkv, cap_c if compact else 1, dtype=torch.int32, device=dev)
    q_idx, q_cnt = prev if prev is not None else (idx, cnt)  # (placeholders when the guess is given)
    tr, trace = trace_arg(bsz * hkv, cnt)  # clock stamps for kernel timelines (prr.ops.select.triton.TRACE)
    _guessed_topk_kernel[(bsz * hkv,)](
        scores, nb, nn, nxt if guess is None else guess, q_idx, q_cnt, gmax, cg, clist[0], clist[1], idx, cnt, tr,
        nxt,
        p_idx, p_cnt, stats,
        hkv, bsz * hkv, nmax, ng, top_k, n_sink, n_local, kmax, spec_k, pmax, guess_k, q_idx.shape[-1],
        scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1), p_idx.stride(0), p_idx.stride(1),
        q_idx.stride(0), q_idx.stride(1), q_cnt.stride(0), q_cnt.stride(1),
        GROUP=GROUP, NG_PAD=ng_pad, CAP_G=cap_g, BLOCK_K=max(16, triton.next_power_of_2(kmax)),
        BLOCK_P=max(16, triton.next_power_of_2(pmax)), BLOCK_Q=max(16, triton.next_power_of_2(q_idx.shape[-1])),
        FROM_PREV=prev is not None, SINGLE=single, NMAX_PAD=nmax_pad if single else 16,
        INTERP=interp, CAP_C=cap_c, COMPACT=compact, TRACE=trace, num_warps=TOPK_WARPS or topk_warps(tile),
        **pdl_launch(scores),
    )
    return idx, cnt, nxt, p_idx, p_cnt, stats
