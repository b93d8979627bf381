"""The decode step's projections in Triton (twin: ``reference.linear``): a GEMV for one to a few rows.

At batch 1 a projection is a matrix-vector product bound by reading the weight once. Each program of
:func:`linear` owns ``BN`` output columns and walks K in ``BK``-wide tiles, accumulating the products
elementwise in a float32 ``[M, BN, BK]`` tile and reducing it once at the end (no per-tile reduction, no
tensor cores: at one row they would idle). No split over K, so no second kernel: cuBLAS picks split-K GEMVs
with a separate reduce kernel for these shapes. H200, bf16, weights read from HBM, one row
(scripts/gemv_probe.py, docs/experiments/gemv_probe_h200.json): 4096x4096 11.7 us against cuBLAS's 14.5,
28672x4096 60.6 against 63.2, 4096x14336 32.8 against 35.5, 6144x4096 16.2 against 16.9. :func:`linear_dot`
puts 2 to 16 rows (padded to 16) on the tensor cores instead, which wins from two rows up where K is long
(4096x4096 at four rows: 12.9 against cuBLAS's 14.6; results/gemv_probe_h200.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import pdl_launch
from ..pdl import pdl_prologue

TILE = 4096  # M_PAD x BN x BK: the float32 accumulator's size per program
STAGES = 3
WARPS = 4


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym,
                   HAS_BIAS: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   EVEN_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, MP)
    n_ok = rn < N
    m_ok = rm < M
    w_row = w_ptr + rn.to(tl.int64)[:, None] * s_wn
    x_row = x_ptr + rm[:, None] * s_xm
    acc = tl.zeros([MP, BN, BK], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        if EVEN_K:
            w = tl.load(w_row + rk[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(x_row + rk[None, :], mask=m_ok[:, None], other=0.0)
        else:
            k_ok = rk < K
            w = tl.load(w_row + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_row + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _linear_dot_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym,
                       HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                       PDL: tl.constexpr = False):
    """A few rows on the tensor cores: x's rows padded to 16 (the smallest tl.dot), one product per K tile."""
    pdl_prologue(PDL)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, 16)
    n_ok = rn < N
    m_ok = rm < M
    acc = tl.zeros([16, BN], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * s_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def linear_dot(x, w, bias=None, *, bn: int = 32, bk: int = 512, stages: int = 4, warps: int = 4, out=None):
    """:func:`linear` on the tensor cores for 2 to 16 rows (bf16/fp16; float32 inputs would be rounded to
    TF32, so they are refused)."""
    m, k = x.shape
    n = w.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"linear_dot takes bf16/fp16 rows, got {x.dtype}")
    if not 0 < m <= 16 or k == 0 or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("linear_dot: 1 to 16 rows, K > 0, unit last strides")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if n:
        _linear_dot_kernel[(triton.cdiv(n, bn),)](
            x, w, w if bias is None else bias, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BN=bn, BK=bk, STAGES=stages, num_warps=warps, **pdl_launch(x),
        )
    return y


def tiles(m_pad: int, k: int, tile: int = TILE) -> tuple[int, int]:
    """``(BN, BK)`` of :func:`linear`: K tiles of 512 (fewer when K is shorter), and as many output columns as
    the ``tile``-float accumulator holds (8 at one row, 4 at two, 2 at four: the fastest on the H200)."""
    bk = max(16, min(512, triton.next_power_of_2(k)))
    return max(1, tile // (m_pad * bk)), bk


def linear(x, w, bias=None, *, bn: int | None = None, bk: int | None = None, stages: int = STAGES,
           warps: int = WARPS, out=None):
    """Triton twin of :func:`prr.ops.gemv.reference.linear` (``bn``/``bk``/``stages``/``warps``: tiles, for
    sweeps; by :func:`tiles` when None; ``out``: a contiguous ``[M, N]`` buffer to write)."""
    m, k = x.shape
    n = w.shape[0]
    if x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("linear: x and w need a unit last stride")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    mp = triton.next_power_of_2(m)
    bn_t, bk_t = tiles(mp, k)
    bn, bk = bn or bn_t, bk or bk_t
    _linear_kernel[(triton.cdiv(n, bn),)](
        x, w, w if bias is None else bias, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, MP=mp, BN=bn, BK=bk, EVEN_K=k % bk == 0, STAGES=stages, num_warps=warps,
        **pdl_launch(x),
    )
    return y
