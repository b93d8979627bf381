"""Merging partial attention states in Triton (twin: ``reference.merge_states``).

One program per row (a query head of a sequence) walks the N partials in chunks (all of them at once up to
128) with a running max, so N may be large. A second set of partials can be merged in the same launch (PRR's
union mode merges the speculation's and the repair's split states without a concatenation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import pdl_launch
from ..pdl import pdl_prologue

MERGE_BLOCK_N = 128  # most parts per pass (module-level for a sweep)


@triton.jit
def _merge_chunked(o_ptr, lse_ptr, row, N, m_run, l_run, acc, s_row_o, s_n_o, s_row_l,
                   D: tl.constexpr, BLOCK_N: tl.constexpr):
    i_d = tl.arange(0, D)
    for n0 in range(0, N, BLOCK_N):
        i_n = n0 + tl.arange(0, BLOCK_N)
        m_n = i_n < N
        lse = tl.load(lse_ptr + row * s_row_l + i_n, mask=m_n, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(lse, axis=0))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        w = tl.exp(lse - m_safe)  # 0 for empty parts
        live = w > 0
        # o is loaded beside lse, not after it (one dependent round trip fewer): an empty part's o may hold
        # garbage (NaN/inf), which the select below drops (its weight is 0), it is never multiplied in
        o = tl.load(o_ptr + row * s_row_o + i_n[:, None] * s_n_o + i_d[None, :], mask=m_n[:, None],
                    other=0.0).to(tl.float32)
        scale_old = tl.exp(m_run - m_safe)
        acc = acc * scale_old + tl.sum(tl.where(live[:, None], w[:, None] * o, 0.0), axis=0)
        l_run = l_run * scale_old + tl.sum(w, axis=0)
        m_run = m_new
    return m_run, l_run, acc


@triton.jit
def _merge_kernel(o1_ptr, lse1_ptr, N1, s1_row_o, s1_n_o, s1_row_l,
                  o2_ptr, lse2_ptr, N2, s2_row_o, s2_n_o, s2_row_l,
                  out_ptr, out_lse_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                  PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    m_run, l_run, acc = _merge_chunked(o1_ptr, lse1_ptr, row, N1, m_run, l_run, acc, s1_row_o, s1_n_o, s1_row_l,
                                       D, BLOCK_N)
    m_run, l_run, acc = _merge_chunked(o2_ptr, lse2_ptr, row, N2, m_run, l_run, acc, s2_row_o, s2_n_o, s2_row_l,
                                       D, BLOCK_N2)
    i_d = tl.arange(0, D)
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + row * D + i_d, out.to(out_ptr.dtype.element_ty))
    tl.store(out_lse_ptr + row, tl.where(l_run > 0, m_run + tl.log(l_run), float("-inf")))


def _rows(o: torch.Tensor, lse: torch.Tensor):
    """View ``o [..., N, D]`` / ``lse [..., N]`` as rows without copying; strides must allow it."""
    n, d = o.shape[-2], o.shape[-1]
    o2 = o.reshape(-1, n, d)
    l2 = lse.reshape(-1, n)
    if o2.stride(-1) != 1 or l2.stride(-1) != 1:
        raise ValueError("merge: o and lse must have a unit stride in their last dimension")
    return o2, l2


def _parts_per_pass(n: int) -> int:
    return max(1, min(MERGE_BLOCK_N, triton.next_power_of_2(max(n, 1))))


def merge_partials(o, lse, o2=None, lse2=None, out_dtype=None):
    """Merge ``o [..., N, D], lse [..., N]`` (and optionally a second ``[..., N2, D]`` set) over N.

    Returns ``(o [..., D] in out_dtype (default o.dtype), lse [...] float32)``.
    """
    lead, d = o.shape[:-2], o.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Triton merge needs a power-of-two head dim, got {d}")
    a_o, a_l = _rows(o, lse)
    if o2 is None:
        b_o, b_l, n2 = a_o, a_l, 0
    else:
        b_o, b_l = _rows(o2, lse2)
        n2 = b_o.shape[1]
    rows = a_o.shape[0]
    # All of a row's parts in one tile (up to MERGE_BLOCK_N, about 64 floats per thread): each pass of the loop
    # is a dependent round trip, and with 16-part passes GLM-4-9B's 128 attention splits at batch 1 took 8
    # passes, 20 us (H200), more than the attention kernel itself
    block_n = _parts_per_pass(a_o.shape[1])
    out = torch.empty(rows, d, dtype=out_dtype or o.dtype, device=o.device)
    out_lse = torch.empty(rows, dtype=torch.float32, device=o.device)
    if rows:
        _merge_kernel[(rows,)](
            a_o, a_l, a_o.shape[1], a_o.stride(0), a_o.stride(1), a_l.stride(0),
            b_o, b_l, n2, b_o.stride(0), b_o.stride(1), b_l.stride(0),
            out, out_lse, D=d, BLOCK_N=block_n, BLOCK_N2=_parts_per_pass(n2),
            num_warps=max(1, min(8, block_n * d // 1024)), **pdl_launch(a_o),
        )
    return out.view(*lead, d), out_lse.view(*lead)


def merge_states(o: torch.Tensor, lse: torch.Tensor):
    """Triton twin of :func:`prr.ops.merge.reference.merge_states`."""
    return merge_partials(o, lse)
