"""Holt update in one launch (twin: ``reference.holt_update_``): one program per (sequence, KV head) row.

The row's scores are loaded once; mean and variance over the live finite blocks are two reductions; the
level/trend update and the next prediction are written in the same pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..backend import pdl_launch
from ..pdl import pdl_prologue


@triton.jit
def _holt_kernel(s_ptr, nblk_ptr, lvl_ptr, trd_ptr, known_ptr, pred_ptr, alpha, beta, gamma, HKV, N,
                 s_sb, s_sh, s_lb, s_lh, WRITE_PRED: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    j = tl.arange(0, BLOCK_N)
    m = j < N
    n = tl.load(nblk_ptr + i_b)
    known = tl.load(known_ptr + i_b)
    live = m & (j < n)
    s = tl.load(s_ptr + i_b * s_sb + i_h * s_sh + j, mask=live, other=0.0).to(tl.float32)
    ok = live & (s == s) & (tl.abs(s) < float("inf"))
    s = tl.where(ok, s, 0.0)
    cnt = tl.maximum(tl.sum(ok.to(tl.float32), axis=0), 1.0)
    mean = tl.sum(s, axis=0) / cnt
    dev = tl.where(ok, s - mean, 0.0)
    std = tl.maximum(tl.sqrt(tl.sum(dev * dev, axis=0) / cnt), 1e-6)
    z = (s - mean) / std
    zmin = tl.min(tl.where(ok, z, float("inf")), axis=0)
    zmin = tl.where(zmin < float("inf"), zmin, 0.0)
    z = tl.where(ok, z, zmin)
    row = i_b * s_lb + i_h * s_lh + j
    level = tl.load(lvl_ptr + row, mask=m, other=0.0)
    trend = tl.load(trd_ptr + row, mask=m, other=0.0)
    old = j < known
    new = live & ~old
    lvl = alpha * z + (1 - alpha) * (level + trend)
    trd = beta * (lvl - level) + (1 - beta) * trend
    level = tl.where(old, lvl, tl.where(new, z, level))
    trend = tl.where(old, trd, tl.where(new, 0.0, trend))
    tl.store(lvl_ptr + row, level, mask=m)
    tl.store(trd_ptr + row, trend, mask=m)
    if WRITE_PRED:
        k_new = tl.maximum(known, n)
        tl.store(pred_ptr + row, tl.where(j < k_new, level + gamma * trend, float("-inf")), mask=m)


@triton.jit
def _known_kernel(known_ptr, nblk_ptr, B, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i = tl.arange(0, BLOCK)
    m = i < B
    k = tl.load(known_ptr + i, mask=m, other=0)
    n = tl.load(nblk_ptr + i, mask=m, other=0)
    tl.store(known_ptr + i, tl.maximum(k, n), mask=m)


def holt_update_(level, trend, known, scores, num_blocks, alpha, beta, gamma, pred=None) -> None:
    """Triton twin of :func:`prr.ops.holt.reference.holt_update_` (alpha, beta, gamma: Python floats)."""
    bsz, hkv, n = level.shape
    for name, t in (("level", level), ("trend", trend), ("scores", scores)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride")
    if level.stride() != trend.stride() or (pred is not None and pred.stride() != level.stride()):
        raise ValueError("level, trend (and pred) must share strides")
    block = max(16, triton.next_power_of_2(n))
    _holt_kernel[(bsz * hkv,)](
        scores, num_blocks, level, trend, known, pred if pred is not None else level,
        float(alpha), float(beta), float(gamma), hkv, n, scores.stride(0), scores.stride(1),
        level.stride(0), level.stride(1), WRITE_PRED=pred is not None, BLOCK_N=block,
        num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16), **pdl_launch(scores),
    )
    # `known` is read by every row's program above, so it advances in a second, ordered launch.
    _known_kernel[(1,)](known, num_blocks, bsz, BLOCK=max(16, triton.next_power_of_2(bsz)), **pdl_launch(known))
