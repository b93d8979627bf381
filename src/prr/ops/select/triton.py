"""Top-K block selection in Triton (twin: ``reference.select_blocks``), no host sync, no sort.

One program per (sequence, KV head) holds the whole row of block scores in registers. The K-th largest
dynamic score is found exactly by a radix select over an order-preserving int32 key (three histogram
passes of 11, 11 and 10 bits), ties at the threshold go to the lowest block ids, and a prefix sum over the selection
mask writes the block ids already sorted. Forced blocks (sink, local, all of a short context) join the mask
directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import num_blocks as _num_blocks  # noqa: F401  (re-exported for callers of this module)


@triton.jit
def _order_key(x):
    """float32 -> int32 key ordered like the floats (flip the magnitude bits of negatives).

    Every real float maps above INT32_MIN + 1, which marks non-candidates (NaN is excluded by the caller)."""
    u = x.to(tl.int32, bitcast=True)
    return tl.where(u >= 0, u, u ^ 0x7FFFFFFF)


@triton.jit
def _radix_digit(digit, member, need, NBINS: tl.constexpr):
    """Among `member` elements, the digit value b holding the `need`-th largest, and how many of those with
    digit b are still needed (``need`` minus the members with a larger digit)."""
    # Non-members land in bin 0 and are taken back out (no histogram mask: older Triton lacks it).
    h = tl.histogram(tl.where(member, digit, 0), NBINS)
    bins = tl.arange(0, NBINS)
    h = h - tl.where(bins == 0, tl.sum((~member).to(tl.int32), axis=0), 0)
    total = tl.sum(h, axis=0)
    above = total - tl.cumsum(h, axis=0)  # members with a strictly larger digit
    b = tl.max(tl.where(above + h >= need, bins, -1), axis=0)
    b = tl.maximum(b, 0)
    return b, need - tl.sum(tl.where(bins == b, above, 0), axis=0)


@triton.jit
def _topk_kernel(s_ptr, nblk_ptr, idx_ptr, cnt_ptr, HKV, NMAX, TOPK, N_SINK, N_LOCAL, KMAX,
                 s_sb, s_sh, s_ib, s_ih, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    j = tl.arange(0, BLOCK_N)
    n = tl.load(nblk_ptr + i_b)
    live = (j < n) & (j < NMAX)
    # (a vector compare for the short-context case: a scalar one broadcast badly in the CPU interpreter)
    forced = live & ((j < N_SINK) | (j >= n - N_LOCAL) | ((j * 0 + n) <= KMAX))
    s = tl.load(s_ptr + i_b * s_sb + i_h * s_sh + j, mask=live, other=float("-inf")).to(tl.float32)
    cand = live & ~forced & (s > float("-inf"))
    key = _order_key(s)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    # Radix select of the TOPK-th largest key: 11 + 11 + 10 bits, one histogram per digit over the candidates
    # that share the digits found so far (3 histograms instead of 32 compare-and-count passes).
    d1 = (key >> 21) + 1024  # top 11 bits, order-preserving for signed keys: [0, 2048)
    d2 = (key >> 10) & 0x7FF
    d3 = key & 0x3FF
    b1, r1 = _radix_digit(d1, cand, TOPK, 2048)
    in1 = cand & (d1 == b1)
    b2, r2 = _radix_digit(d2, in1, r1, 2048)
    b3, _ = _radix_digit(d3, in1 & (d2 == b2), r2, 1024)
    thr = ((b1 - 1024) << 21) | (b2 << 10) | b3
    # Fewer candidates than TOPK: every candidate is picked.
    thr = tl.where(n_cand >= TOPK, thr, -2147483648)
    above = cand & (key > thr)
    n_above = tl.sum(above.to(tl.int32), axis=0)
    tie = cand & (key == thr)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based, lowest block id first
    chosen = above | (tie & (tie_rank <= TOPK - n_above))
    sel = forced | chosen
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    count = tl.sum(sel.to(tl.int32), axis=0)
    row = idx_ptr + i_b * s_ib + i_h * s_ih
    tl.store(row + pos, j, mask=sel)
    k = tl.arange(0, BLOCK_K)
    tl.store(row + k, tl.full([BLOCK_K], -1, tl.int32), mask=(k >= count) & (k < KMAX))
    tl.store(cnt_ptr + i_b * HKV + i_h, count)


def select_blocks(scores, num_blocks, top_k: int, n_sink: int = 1, n_local: int = 2, out=None):
    """Triton twin of :func:`prr.ops.select.reference.select_blocks`. `out=(indices, counts)` reuses buffers.

    Ties at the K-th score go to the lowest block ids (``torch.topk``'s choice among ties is unspecified, so
    the two agree on the selected *set* whenever the K-th score is not tied).
    """
    bsz, hkv, nmax = scores.shape
    if scores.stride(-1) != 1:
        raise ValueError("scores must have a unit last stride")
    if scores.dtype != torch.float32:
        raise TypeError(f"the Triton top-K takes float32 scores, got {scores.dtype}")
    kmax = n_sink + n_local + top_k
    if out is None:
        idx = torch.empty(bsz, hkv, kmax, dtype=torch.int32, device=scores.device)
        cnt = torch.empty(bsz, hkv, dtype=torch.int32, device=scores.device)
    else:
        idx, cnt = out
    nb = num_blocks if num_blocks.dtype == torch.int32 else num_blocks.to(torch.int32)
    block_n = max(16, triton.next_power_of_2(nmax))
    warps = 4 if block_n <= 2048 else (8 if block_n <= 8192 else (16 if block_n <= 16384 else 32))
    _topk_kernel[(bsz * hkv,)](
        scores, nb, idx, cnt, hkv, nmax, top_k, n_sink, n_local, kmax,
        scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
        BLOCK_N=block_n, BLOCK_K=max(16, triton.next_power_of_2(kmax)), num_warps=warps,
    )
    return idx, cnt
