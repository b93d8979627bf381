"""The guessed top-K in Triton (twin: ``reference.select_blocks_guessed``): one program per (sequence, KV head).

The threshold ``τ`` (``bound``) comes from the scoring kernel, which folds the smallest current key of the
previous selection's blocks into it while it scores. The program then:

1. *Verify*: counts ``C(τ)`` over the scores row and compacts it into a short list in ascending block order
   (a compare and a prefix sum per chunk of the row; no search).
2. *Refine*: if ``K <= |C(τ)| <=`` the list's capacity, the K-th largest (key, lowest id) of the list is found
   by a radix select: 4 bits per pass over keys made relative to the list's smallest, the passes stopping as
   soon as the digit's bucket holds exactly what is still needed (a few dependent passes, where the full
   search runs ~30). S and the next P (its top ``spec_k``) are written with prefix sums.
3. Otherwise (no previous selection, or too few or too many candidates) the full two-stage search of
   :mod:`prr.ops.select.triton` runs in the same program: no host sync, graph-safe.

The program also replaces the previous selection's flag row with this selection's dynamic blocks and resets
``bound`` for the next step's scoring kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..select.triton import GROUP, _candidate_keys, _full_search, _write_selection, group_maxima, topk_warps
from .reference import guess_bound, list_capacity

TOPK_WARPS: int | None = None  # warps of the program (None: by tile size, as the full top-K; for sweeps)
CHUNK_MAX = 4096  # blocks of the row counted per pass of the verify loop


@triton.jit
def _radix_kth(v, valid, kth):
    """A threshold ``T`` with exactly ``kth`` valid lanes ``v >= T`` (``v``: distinct non-negative int64 below
    2**56 on the valid lanes; ``1 <= kth <=`` their count). MSD radix select, 4 bits per pass, from the
    highest bit where the lanes differ; it stops once the chosen digit's bucket holds exactly what is still
    needed."""
    vmax = tl.max(tl.where(valid, v, 0), axis=0)
    vmin = tl.min(tl.where(valid, v, 0x7FFFFFFFFFFFFFFF), axis=0)
    x = vmax ^ vmin
    shift = kth * 0 + 52
    while (shift > 0) & ((x >> shift) == 0):  # the bits above every lane shares are fixed
        shift -= 4
    sixteen = vmax * 0 + 16
    mask = ~((sixteen << shift) - 1)
    prefix = vmax & mask
    need = kth
    d16 = tl.arange(0, 16)
    go = shift >= 0
    while go:
        m = valid & ((v & mask) == prefix)
        dig = ((v >> shift) & 15).to(tl.int32)
        hist = tl.sum(((dig[:, None] == d16[None, :]) & m[:, None]).to(tl.int32), axis=0)
        ge = tl.sum(tl.where(d16[None, :] >= d16[:, None], hist[None, :], 0), axis=1)  # lanes in buckets >= b
        b = tl.max(tl.where(ge >= need, d16, -1), axis=0)
        ge_b = tl.sum(tl.where(d16 == b, ge, 0), axis=0)
        h_b = tl.sum(tl.where(d16 == b, hist, 0), axis=0)
        need = need - (ge_b - h_b)
        prefix = prefix | (b.to(tl.int64) << shift)
        mask = mask | ((sixteen - 1) << shift)
        go = (h_b != need) & (shift > 0)
        shift -= 4
    return prefix


@triton.jit
def _write_p(p_out, pc_at, dyn, j, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P: tl.constexpr):
    """The next step's P: every live block of a short next row, else its sink, ``dyn`` blocks, local."""
    dyn = dyn != 0  # (a scalar flag folded in may widen the mask's type)
    if n_next <= PMAX:
        tl.store(p_out + kp, tl.where(kp < n_next, kp, -1), mask=kp < PMAX)
        tl.store(pc_at, n_next)
    else:
        _write_selection(p_out, pc_at, dyn, j, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P)


@triton.jit
def _guessed_topk_kernel(s_ptr, nblk_ptr, nnext_ptr, bound_ptr, f_ptr, g_ptr, cg_ptr, lst_ptr, idx_ptr, cnt_ptr,
                         p_ptr, pc_ptr, st_ptr, HKV, BH, NMAX, NG, TOPK, N_SINK, N_LOCAL, KMAX, SPEC_K, PMAX,
                         s_sb, s_sh, s_ib, s_ih, s_pb, s_ph,
                         GROUP: tl.constexpr, NG_PAD: tl.constexpr, TG_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_P: tl.constexpr, SINGLE: tl.constexpr, NMAX_PAD: tl.constexpr,
                         CHUNK: tl.constexpr, NCHUNK: tl.constexpr, CAP: tl.constexpr, WRITE_P: tl.constexpr,
                         RESET: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    n = tl.minimum(tl.maximum(tl.load(nblk_ptr + i_b), 0), NMAX)  # block counts out of range stay in bounds
    n_next = tl.minimum(tl.maximum(tl.load(nnext_ptr + i_b), 0), NMAX)
    s_row = s_ptr + i_b * s_sb + i_h * s_sh
    out = idx_ptr + i_b * s_ib + i_h * s_ih
    p_out = p_ptr + i_b * s_pb + i_h * s_ph
    f_row = f_ptr + i_bh.to(tl.int64) * NMAX
    bkey = tl.load(bound_ptr + i_bh)
    if RESET:
        tl.store(bound_ptr + i_bh, 2147483647)  # the next step's scoring kernel folds its minimum into it
    k = tl.arange(0, BLOCK_K)
    kp = tl.arange(0, BLOCK_P)
    if n <= KMAX:  # a short context: every live block; its dynamic part is the next P and the flags
        tl.store(out + k, tl.where(k < n, k, -1), mask=k < KMAX)
        tl.store(cnt_ptr + i_bh, n)
        tl.store(st_ptr + i_bh, n)
        tl.store(st_ptr + BH + i_bh, 3)  # SHORT
        if WRITE_P:
            all_dyn = (kp >= N_SINK) & (kp < n - N_LOCAL) & (SPEC_K >= TOPK)
            _write_p(p_out, pc_ptr + i_bh, all_dyn, kp, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P)
        for ch in tl.static_range(NCHUNK):
            jf = ch * CHUNK + tl.arange(0, CHUNK)
            tl.store(f_row + jf, ((jf >= N_SINK) & (jf < n - N_LOCAL)).to(tl.uint8), mask=jf < NMAX)
    else:
        # Verify: count C(τ) chunk by chunk and compact it into the list (ascending ids); clear the flags.
        lst = lst_ptr + i_bh.to(tl.int64) * CAP
        c = n * 0
        for ch in tl.static_range(NCHUNK):
            jc = ch * CHUNK + tl.arange(0, CHUNK)
            kc = _candidate_keys(s_row, jc, n, NMAX, N_SINK, N_LOCAL)
            inc = (kc >= bkey) & (kc > -2147483648)
            pos = c + tl.cumsum(inc.to(tl.int32), axis=0) - 1
            tl.store(lst + pos, (kc.to(tl.int64) << 32) | jc.to(tl.int64), mask=inc & (pos < CAP))
            c += tl.sum(inc.to(tl.int32), axis=0)
            tl.store(f_row + jc, tl.zeros([CHUNK], tl.uint8), mask=jc < NMAX)
        held = (c >= TOPK) & (c <= CAP)
        tl.store(st_ptr + i_bh, c)
        tl.store(st_ptr + BH + i_bh, tl.where(held, 0, tl.where(c < TOPK, 1, 2)))  # HELD, TOO_HIGH, TOO_LOW
        tl.debug_barrier()  # the list and the cleared flags are seen by every thread of this program
        if held:
            # Refine: the K-th (key, lowest id) of the list by a radix select over keys relative to its lowest.
            i_c = tl.arange(0, CAP)
            valid = i_c < c
            e = tl.load(lst + i_c, mask=valid, other=0)
            ekey = e >> 32
            ej = (e & 0xFFFFFFFF).to(tl.int32)
            klo = tl.min(tl.where(valid, ekey, 2147483647), axis=0)
            v = ((ekey - klo) << 24) | (16777215 - ej).to(tl.int64)
            t_s = _radix_kth(v, valid, TOPK)
            chosen_h = valid & (v >= t_s)
            _write_selection(out, cnt_ptr + i_bh, chosen_h, ej, n, k, N_SINK, N_LOCAL, KMAX, BLOCK_K)
            if WRITE_P:
                t_p = _radix_kth(v, valid, tl.minimum(c, SPEC_K))
                _write_p(p_out, pc_ptr + i_bh, valid & (v >= t_p), ej, n_next, kp, N_SINK, N_LOCAL, PMAX, BLOCK_P)
            tl.store(f_row + ej, tl.full([CAP], 1, tl.uint8), mask=chosen_h)
        else:  # the full search
            chosen_f, jf2 = _full_search(s_row, g_ptr + i_bh * NG, cg_ptr + i_bh * TG_PAD, n, NMAX, NG, TOPK,
                                         N_SINK, N_LOCAL, GROUP, NG_PAD, TG_PAD, SINGLE, NMAX_PAD)
            _write_selection(out, cnt_ptr + i_bh, chosen_f, jf2, n, k, N_SINK, N_LOCAL, KMAX, BLOCK_K)
            if WRITE_P:
                _write_p(p_out, pc_ptr + i_bh, chosen_f & (SPEC_K >= TOPK), jf2, n_next, kp, N_SINK, N_LOCAL, PMAX,
                         BLOCK_P)
            tl.store(f_row + jf2, tl.full(jf2.shape, 1, tl.uint8), mask=chosen_f)


def _alloc(out, i, shape, dtype, dev):
    t = out[i] if out is not None and out[i] is not None else None
    return torch.empty(shape, dtype=dtype, device=dev) if t is None else t


def select_blocks_guessed(scores, num_blocks, top_k: int, n_sink: int = 1, n_local: int = 2, *, prev, bound=None,
                          spec_k: int, num_blocks_next=None, group_max=None, out=None, prev_out=None,
                          write_p: bool = True, reset_bound: bool = True):
    """Triton twin of :func:`prr.ops.guessed.reference.select_blocks_guessed` (float32 scores with a unit last
    stride; ``group_max`` as for :func:`prr.ops.select.triton.select_blocks`; ``out``: buffers for the five
    results, None entries allocated; ``write_p=False`` skips P; ``reset_bound=False`` leaves ``bound`` as it
    was, for a benchmark replaying one step)."""
    bsz, hkv, nmax = scores.shape
    if scores.stride(-1) != 1 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 with a unit last stride (got {scores.dtype}, {scores.stride()})")
    dev = scores.device
    flags_out = prev if prev_out is None else prev_out
    if not flags_out.is_contiguous():
        raise ValueError("the flag row buffer must be contiguous")
    if bound is None:  # no scoring kernel folded it: from the scores here
        bound = guess_bound(scores, num_blocks, prev, n_sink, n_local)
    elif not bound.is_contiguous():
        raise ValueError("bound must be a contiguous int32 [B, Hkv] tensor")
    kmax = n_sink + n_local + top_k
    pmax = n_sink + n_local + spec_k
    idx = _alloc(out, 0, (bsz, hkv, kmax), torch.int32, dev)
    cnt = _alloc(out, 1, (bsz, hkv), torch.int32, dev)
    p_idx = _alloc(out, 2, (bsz, hkv, pmax), torch.int32, dev)
    p_cnt = _alloc(out, 3, (bsz, hkv), torch.int32, dev)
    stats = _alloc(out, 4, (2, bsz, hkv), torch.int32, dev)
    for name, t in (("indices", idx), ("next P", p_idx)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} buffer needs a unit last stride")
    for name, t in (("counts", cnt), ("P counts", p_cnt), ("stats", stats)):
        if not t.is_contiguous():
            raise ValueError(f"{name} buffer must be contiguous")
    nb = num_blocks if num_blocks.dtype == torch.int32 else num_blocks.to(torch.int32)
    nn = nb if num_blocks_next is None else num_blocks_next.to(torch.int32)
    ng = triton.cdiv(nmax, GROUP)
    tg_pad = max(16, triton.next_power_of_2(min(top_k, ng)))
    gmax, cg, single = group_maxima(scores, nb, n_sink, n_local, group_max, tg_pad)
    nmax_pad = max(16, triton.next_power_of_2(nmax))
    ng_pad = max(16, triton.next_power_of_2(ng))
    cap = list_capacity(top_k)
    chunk = min(nmax_pad, CHUNK_MAX)
    lst = torch.empty(bsz * hkv, cap, dtype=torch.int64, device=dev)
    tile = max(chunk, cap, nmax_pad if single else max(ng_pad, tg_pad * GROUP))
    _guessed_topk_kernel[(bsz * hkv,)](
        scores, nb, nn, bound, flags_out.view(torch.uint8), gmax, cg, lst, idx, cnt, p_idx, p_cnt, stats,
        hkv, bsz * hkv, nmax, ng, top_k, n_sink, n_local, kmax, spec_k, pmax,
        scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1), p_idx.stride(0), p_idx.stride(1),
        GROUP=GROUP, NG_PAD=ng_pad, TG_PAD=tg_pad, BLOCK_K=max(16, triton.next_power_of_2(kmax)),
        BLOCK_P=max(16, triton.next_power_of_2(pmax)), SINGLE=single, NMAX_PAD=nmax_pad if single else 16,
        CHUNK=chunk, NCHUNK=triton.cdiv(nmax, chunk), CAP=cap, WRITE_P=write_p, RESET=reset_bound,
        num_warps=TOPK_WARPS or topk_warps(tile),
    )
    return idx, cnt, p_idx, p_cnt, stats
