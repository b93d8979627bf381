"""In-place metadata updates for one appended token per sequence, in Triton (twins: ``reference.*_append``).

Called after ``KVCache.append``: the newest token of sequence b sits at ``seq_lens[b] - 1``. Quest folds its
key into its block's min/max (or starts the block); InfLLM-v2 writes the compressed key whose window the
token completes, if any. One tiny launch each, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..backend import pdl_launch
from ..pdl import pdl_prologue


@triton.jit
def _quest_append_kernel(k_ptr, pt_ptr, len_ptr, kmin_ptr, kmax_ptr, HKV, CAP, NPAGES,
                         s_kp, s_kh, s_ks, s_ptb, s_mb, s_mh, s_mn,
                         D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr, H_PAD: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_b = tl.program_id(0)
    i_h = tl.arange(0, H_PAD)
    i_d = tl.arange(0, D)
    pos = tl.load(len_ptr + i_b) - 1
    # a length outside [1, CAP] (no host check on CUDA) touches nothing rather than memory outside the tensors
    m_h = (i_h < HKV) & (i_h * 0 + pos >= 0) & (i_h * 0 + pos < CAP)
    pos = tl.minimum(tl.maximum(pos, 0), CAP - 1)
    phys = tl.load(pt_ptr + i_b * s_ptb + pos // PAGE)
    phys = tl.minimum(tl.maximum(phys, 0), NPAGES - 1).to(tl.int64)
    p_k = k_ptr + phys * s_kp + i_h[:, None] * s_kh + (pos % PAGE) * s_ks + i_d[None, :]
    k = tl.load(p_k, mask=m_h[:, None], other=0.0)
    off = i_b * s_mb + i_h[:, None] * s_mh + (pos // BS).to(tl.int64) * s_mn + i_d[None, :]
    if pos % BS == 0:  # the token opens a new block
        tl.store(kmin_ptr + off, k, mask=m_h[:, None])
        tl.store(kmax_ptr + off, k, mask=m_h[:, None])
    else:
        lo = tl.load(kmin_ptr + off, mask=m_h[:, None], other=0.0)
        hi = tl.load(kmax_ptr + off, mask=m_h[:, None], other=0.0)
        tl.store(kmin_ptr + off, tl.minimum(lo, k), mask=m_h[:, None])
        tl.store(kmax_ptr + off, tl.maximum(hi, k), mask=m_h[:, None])


@triton.jit
def _infllm_append_kernel(k_ptr, pt_ptr, len_ptr, ck_ptr, HKV, CMAX, CAP, NPAGES,
                          s_kp, s_kh, s_ks, s_ptb, s_cb, s_ch, s_cn,
                          D: tl.constexpr, PAGE: tl.constexpr, WINDOW: tl.constexpr, STRIDE: tl.constexpr,
                          PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    start = tl.load(len_ptr + i_b) - WINDOW
    if (start >= 0) & (start % STRIDE == 0) & (start + WINDOW <= CAP):  # lengths past CAP touch nothing
        i_t = start + tl.arange(0, WINDOW)
        i_d = tl.arange(0, D)
        phys = tl.load(pt_ptr + i_b * s_ptb + i_t // PAGE)
        phys = tl.minimum(tl.maximum(phys, 0), NPAGES - 1).to(tl.int64)
        w = tl.load(k_ptr + phys[:, None] * s_kp + i_h * s_kh + (i_t % PAGE)[:, None] * s_ks + i_d[None, :])
        c = tl.sum(w.to(tl.float32), axis=0) / WINDOW
        i_c = (start // STRIDE).to(tl.int64)
        tl.store(ck_ptr + i_b * s_cb + i_h * s_ch + i_c * s_cn + i_d, c, mask=(i_d * 0 + i_c) < CMAX)


def quest_metadata_append(kmin, kmax, cache: KVCache, block_size: int) -> None:
    """Triton twin of :func:`prr.ops.metadata.reference.quest_metadata_append`."""
    if kmin.stride() != kmax.stride() or kmax.stride(-1) != 1:
        raise ValueError("kmin and kmax must share strides with a unit last stride")
    _quest_append_kernel[(cache.batch,)](
        cache.k, cache.page_table, cache.seq_lens, kmin, kmax, cache.num_kv_heads,
        min(cache.page_table.shape[1] * cache.page_size, kmax.shape[2] * block_size), cache.k.shape[0],
        *cache.k.stride()[:3], cache.page_table.stride(0), kmax.stride(0), kmax.stride(1), kmax.stride(2),
        D=cache.head_dim, BS=block_size, PAGE=cache.page_size,
        H_PAD=max(2, triton.next_power_of_2(cache.num_kv_heads)), num_warps=1, **pdl_launch(cache.k),
    )


def infllm_metadata_append(ckeys, cache: KVCache, window: int = 32, stride: int = 16) -> None:
    """Triton twin of :func:`prr.ops.metadata.reference.infllm_metadata_append`.

    The window mean sums in a different order from the reference, so results agree to float32 rounding
    (bit-equality with the bulk build holds for the reference path only).
    """
    if ckeys.stride(-1) != 1 or ckeys.dtype != torch.float32:
        raise ValueError("ckeys must be float32 with a unit last stride")
    _infllm_append_kernel[(cache.batch, cache.num_kv_heads)](
        cache.k, cache.page_table, cache.seq_lens, ckeys, cache.num_kv_heads, ckeys.shape[2],
        cache.page_table.shape[1] * cache.page_size, cache.k.shape[0], *cache.k.stride()[:3],
        cache.page_table.stride(0), ckeys.stride(0), ckeys.stride(1), ckeys.stride(2),
        D=cache.head_dim, PAGE=cache.page_size, WINDOW=window, STRIDE=stride, num_warps=1, **pdl_launch(cache.k),
    )
