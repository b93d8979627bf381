"""The decode step's small ops in Triton (twins: ``reference.py``): one launch each where PyTorch launches
5 to 10 elementwise kernels (an 8B step had 67 kernels per layer, most of them these)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..backend import pdl_launch
from ..pdl import pdl_prologue


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, H, eps, s_x, s_r, s_y, s_s,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < H
    x = tl.load(x_ptr + row * s_x + i, mask=m, other=0.0)
    if HAS_RES:  # the residual stream's sum, rounded to its dtype (as x + residual is in PyTorch)
        x = (x.to(tl.float32) + tl.load(r_ptr + row * s_r + i, mask=m, other=0.0).to(tl.float32))
        x = x.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * s_s + i, x, mask=m)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    n = (xf * inv).to(s_ptr.dtype.element_ty).to(tl.float32)  # rounded before the weight, as the reference
    w = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * s_y + i, (n * w).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x, w, eps, residual=None):
    """Triton twin of :func:`prr.ops.fused.reference.rms_norm`."""
    r, h = x.shape
    if x.stride(-1) != 1 or w.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm: rows must have a unit stride")
    y = torch.empty(r, h, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    s = x if residual is None else torch.empty_like(x)
    block = triton.next_power_of_2(h)
    if r:
        res = x if residual is None else residual
        _rms_norm_kernel[(r,)](x, res, w, y, s, h, float(eps), x.stride(0), res.stride(0), y.stride(0), s.stride(0),
                               HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block), **pdl_launch(x))
    return y, s


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, F, s_gu, s_out, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < F
    g = tl.load(gu_ptr + row * s_gu + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_gu + F + i, mask=m, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded as F.silu
    tl.store(out_ptr + row * s_out + i, (act * u).to(out_ptr.dtype.element_ty), mask=m)


def swiglu(gu):
    """Triton twin of :func:`prr.ops.fused.reference.swiglu`."""
    r, f2 = gu.shape
    f = f2 // 2
    if gu.stride(-1) != 1:
        raise ValueError("swiglu: rows must have a unit stride")
    out = torch.empty(r, f, dtype=gu.dtype, device=gu.device)
    block = 1024
    if r:
        _swiglu_kernel[(r, triton.cdiv(f, block))](gu, out, f, gu.stride(0), out.stride(0), BLOCK=block, num_warps=4,
                                                   **pdl_launch(gu))
    return out


@triton.jit
def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, HQ, HKV, s_qkv, s_cs,
                     D: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF)
    src = qkv_ptr + b * s_qkv + h * D
    if h < HQ + HKV:  # q or k: rotate
        if INTERLEAVED:
            ia, ib = 2 * i, 2 * i + 1
        else:
            ia, ib = i, i + HALF
        a = tl.load(src + ia).to(tl.float32)
        bb = tl.load(src + ib).to(tl.float32)
        c = tl.load(cos_ptr + b * s_cs + i)
        s = tl.load(sin_ptr + b * s_cs + i)
        ra = a * c - bb * s
        rb = a * s + bb * c
        if h < HQ:
            dst = q_ptr + (b * HQ + h) * D
        else:
            dst = k_ptr + (b * HKV + (h - HQ)) * D
        tl.store(dst + ia, ra.to(q_ptr.dtype.element_ty))
        tl.store(dst + ib, rb.to(q_ptr.dtype.element_ty))
    else:  # v: copied out (contiguous, as the cache append wants it)
        j = tl.arange(0, D)
        tl.store(v_ptr + (b * HKV + (h - HQ - HKV)) * D + j, tl.load(src + j))


def rope_qkv(qkv, cos, sin, hq, hkv, d, interleaved=False):
    """Triton twin of :func:`prr.ops.fused.reference.rope_qkv`."""
    b = qkv.shape[0]
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        raise ValueError("rope_qkv: unit last strides and one row stride for cos and sin")
    if d & (d - 1):
        raise ValueError(f"the Triton RoPE needs a power-of-two head dim, got {d}")
    q = torch.empty(b, hq, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(b, hkv, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(b, hkv, d, dtype=qkv.dtype, device=qkv.device)
    if b:
        _rope_qkv_kernel[(b, hq + 2 * hkv)](qkv, cos, sin, q, k, v, hq, hkv, qkv.stride(0), cos.stride(0), D=d,
                                             INTERLEAVED=interleaved, num_warps=1, **pdl_launch(qkv))
    return q, k, v


@triton.jit
def _append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pt_ptr, len_ptr, kmin_ptr, kmax_ptr, CAP, NPAGES, QCAP,
                   s_kb, s_kh, s_vb, s_vh, s_cp, s_ch, s_cs, s_vp, s_vch, s_vcs, s_ptb, s_mb, s_mh, s_mn,
                   D: tl.constexpr, PAGE: tl.constexpr, OFFSET: tl.constexpr, QUEST: tl.constexpr,
                   BS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(len_ptr + b) + OFFSET  # OFFSET -1: the lengths already count this token
    ok = (pos >= 0) & (pos < CAP)  # a full cache writes nothing (never outside the pool)
    pos_c = tl.where(ok, pos, 0)
    page = tl.load(pt_ptr + b * s_ptb + pos_c // PAGE).to(tl.int64)
    ok = ok & (page >= 0) & (page < NPAGES)
    page = tl.where(ok, page, 0)
    off = pos_c % PAGE
    j = tl.arange(0, D)
    mj = (j * 0 + ok.to(tl.int32)) > 0  # a vector mask (the interpreter refuses a scalar one here)
    kx = tl.load(k_ptr + b * s_kb + h * s_kh + j)
    vx = tl.load(v_ptr + b * s_vb + h * s_vh + j)
    tl.store(kc_ptr + page * s_cp + h * s_ch + off * s_cs + j, kx, mask=mj)
    tl.store(vc_ptr + page * s_vp + h * s_vch + off * s_vcs + j, vx, mask=mj)
    if QUEST:  # fold the key into its block's min/max (the block opens at its first token), as the cache holds it
        mq = mj & ((j * 0 + pos_c) < QCAP)
        kq = kx.to(kc_ptr.dtype.element_ty).to(kmin_ptr.dtype.element_ty)
        moff = b * s_mb + h * s_mh + (pos_c // BS) * s_mn + j
        if pos_c % BS == 0:
            tl.store(kmin_ptr + moff, kq, mask=mq)
            tl.store(kmax_ptr + moff, kq, mask=mq)
        else:
            lo = tl.load(kmin_ptr + moff, mask=mq, other=0.0)
            hi = tl.load(kmax_ptr + moff, mask=mq, other=0.0)
            tl.store(kmin_ptr + moff, tl.minimum(lo, kq), mask=mq)
            tl.store(kmax_ptr + moff, tl.maximum(hi, kq), mask=mq)


def append_kv(cache: KVCache, k, v, quest=None, advanced=False):
    """Triton twin of :func:`prr.ops.fused.reference.append_kv`: one launch stores k and v (and folds the
    Quest metadata), one add advances ``seq_lens`` (none when ``advanced``)."""
    cache.check_lengths(extra=0 if advanced else 1)
    bsz, hkv, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1 or cache.k.stride(-1) != 1 or cache.v.stride(-1) != 1:
        raise ValueError("append_kv: unit last strides")
    if d & (d - 1):
        raise ValueError(f"the Triton append needs a power-of-two head dim, got {d}")
    cap = cache.page_table.shape[1] * cache.page_size
    if quest is not None:
        kmin, kmax, bs = quest
        if kmin.stride() != kmax.stride() or kmax.stride(-1) != 1:
            raise ValueError("kmin and kmax must share strides with a unit last stride")
        qcap, ms = min(cap, kmax.shape[2] * bs), kmax.stride()[:3]
    else:
        kmin = kmax = cache.k
        bs, qcap, ms = 1, 0, (0, 0, 0)
    if bsz:
        _append_kernel[(bsz, hkv)](
            k, v, cache.k, cache.v, cache.page_table, cache.seq_lens, kmin, kmax, cap, cache.k.shape[0], qcap,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3],
            cache.page_table.stride(0), *ms, D=d, PAGE=cache.page_size, OFFSET=-1 if advanced else 0,
            QUEST=quest is not None, BS=bs, num_warps=1, **pdl_launch(k))
    if not advanced:
        cache.seq_lens.add_(1)
