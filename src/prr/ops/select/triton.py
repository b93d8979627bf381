"""Top-K block selection in Triton (twin: ``reference.select_blocks``), no host sync, no sort.

One program per (sequence, KV head) holds the whole row of block scores in registers. The K-th largest
dynamic score is found exactly by a binary search over an order-preserving int32 key (32 passes of
compare-and-count), ties at the threshold go to the lowest block ids, and a prefix sum over the selection
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
    key = tl.where(cand, _order_key(s), -2147483648)
    # Largest threshold T with #(key >= T) >= TOPK: a binary search over the int32 range (32 passes of
    # compare-and-count over the row held in registers; int64 scalars so the bounds cannot overflow).
    lo = tl.full([], -2147483647, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in tl.static_range(32):
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        lo = tl.where(c >= TOPK, mid, lo)
        hi = tl.where(c >= TOPK, hi, mid - 1)
    thr = lo.to(tl.int32)
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
