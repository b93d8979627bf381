"""Block-sparse paged decode attention in Triton (twin: ``reference.sparse_decode``).

One program per (sequence, KV head, split): the G query heads of the KV head are packed as the rows of one
tile (padded to 16 for ``tl.dot``), so a block's keys and values are read once for the whole group. The
selection's slots are cut into splits so that batch 1 with few KV heads still fills the GPU; each split
writes a partial state and :func:`prr.ops.merge.triton.merge_partials` combines them. Optionally every slot's
own partial state is written too (PRR's speculation keeps them for reuse).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..merge.triton import merge_partials


@triton.jit
def _attend_block(q, k_ptr, v_ptr, pt_row, blk, h, seq_len, scale,
                  s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                  D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr):
    """Scores and values of one block for the packed query rows: ``s [G_PAD, BS]`` (masked), ``v [BS, D]``."""
    i_t = tl.arange(0, BS)
    i_d = tl.arange(0, D)
    o_tok = blk * BS + i_t  # logical token positions
    m_tok = o_tok < seq_len
    phys = tl.load(pt_row + o_tok // PAGE, mask=m_tok, other=0).to(tl.int64)
    o_in = (o_tok % PAGE).to(tl.int64)
    p_k = k_ptr + phys[:, None] * s_kp + h * s_kh + o_in[:, None] * s_ks + i_d[None, :]
    p_v = v_ptr + phys[:, None] * s_vp + h * s_vh + o_in[:, None] * s_vs + i_d[None, :]
    b_k = tl.load(p_k, mask=m_tok[:, None], other=0.0)
    b_v = tl.load(p_v, mask=m_tok[:, None], other=0.0)
    if PREC == "ieee":  # fp32 inputs: exact fp32 products (the CPU interpreter also takes this path)
        s = tl.dot(q, tl.trans(b_k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(b_k))
    s = tl.where(m_tok[None, :], s * scale, float("-inf"))
    return s, b_v


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr, idx_ptr, cnt_ptr,
    so_ptr, slse_ptr,  # split states: [B, Hq, NSPLIT, D] fp32, [B, Hq, NSPLIT] fp32
    bo_ptr, blse_ptr,  # slot states:  [B, Hq, K, D] fp32,      [B, Hq, K] fp32
    scale, HKV, K, SLOTS_PER_SPLIT, NSPLIT,
    s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb, s_ib, s_ih, s_cb, s_ch,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    PREC: tl.constexpr, WRITE_SPLITS: tl.constexpr, WRITE_BLOCKS: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_split = tl.program_id(1)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    m_g = i_g < G
    hq = i_h * G + i_g  # the packed query heads
    q = tl.load(q_ptr + i_b * s_qb + hq[:, None] * s_qh + i_d[None, :], mask=m_g[:, None], other=0.0)
    if PREC == "ieee":
        q = q.to(tl.float32)
    seq_len = tl.load(len_ptr + i_b)
    cnt = tl.load(cnt_ptr + i_b * s_cb + i_h * s_ch)
    pt_row = pt_ptr + i_b * s_ptb
    start = i_split * SLOTS_PER_SPLIT
    end = tl.minimum(start + SLOTS_PER_SPLIT, cnt)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for slot in range(start, end):
        blk = tl.load(idx_ptr + i_b * s_ib + i_h * s_ih + slot)
        s, b_v = _attend_block(q, k_ptr, v_ptr, pt_row, blk, i_h, seq_len, scale,
                               s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, D, BS, PAGE, PREC)
        m_blk = tl.max(s, axis=1)
        if WRITE_BLOCKS:
            m_safe = tl.where(m_blk > float("-inf"), m_blk, 0.0)
            p = tl.exp(s - m_safe[:, None])
            l_blk = tl.sum(p, axis=1)
            if PREC == "ieee":
                o_blk = tl.dot(p, b_v.to(tl.float32), input_precision="ieee")
            else:
                o_blk = tl.dot(p.to(b_v.dtype), b_v)
            o_blk = o_blk / tl.where(l_blk > 0, l_blk, 1.0)[:, None]
            lse_blk = tl.where(l_blk > 0, m_safe + tl.log(l_blk), float("-inf"))
            row = (i_b * HKV * G + hq) * K + slot
            tl.store(bo_ptr + row[:, None] * D + i_d[None, :], o_blk, mask=m_g[:, None])
            tl.store(blse_ptr + row, lse_blk, mask=m_g)
        if WRITE_SPLITS:
            m_new = tl.maximum(m_i, m_blk)
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if PREC == "ieee":
                acc = acc * alpha[:, None] + tl.dot(p, b_v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
            m_i = m_new
    if WRITE_BLOCKS:  # padding slots of this split: the empty state (0, -inf)
        for slot in range(tl.maximum(start, cnt), tl.minimum(start + SLOTS_PER_SPLIT, K)):
            row = (i_b * HKV * G + hq) * K + slot
            tl.store(bo_ptr + row[:, None] * D + i_d[None, :], tl.zeros([G_PAD, D], tl.float32), mask=m_g[:, None])
            tl.store(blse_ptr + row, tl.full([G_PAD], float("-inf"), tl.float32), mask=m_g)
    if WRITE_SPLITS:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        row = (i_b * HKV * G + hq) * NSPLIT + i_split
        tl.store(so_ptr + row[:, None] * D + i_d[None, :], o, mask=m_g[:, None])
        tl.store(slse_ptr + row, lse, mask=m_g)


def num_splits(batch_kv_heads: int, slots: int, device: torch.device, min_slots: int = 4) -> int:
    """Splits per (sequence, KV head): enough programs for ~2 waves of the GPU, each with >= min_slots."""
    if device.type != "cuda":
        return max(1, min(4, slots // min_slots))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * sms) // max(batch_kv_heads, 1))
    return max(1, min(want, slots // min_slots if slots >= min_slots else 1))


def check_layout(cache: KVCache, q: torch.Tensor) -> None:
    """The kernels index the last dimension with unit stride; say so instead of copying silently."""
    for name, t in (("q", q), ("cache.k", cache.k), ("cache.v", cache.v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension (got strides {t.stride()})")
    if cache.page_table.stride(-1) != 1:
        raise ValueError("cache.page_table must have a unit stride in its last dimension")


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "native"


def sparse_decode_launch(q, cache: KVCache, indices, counts, block_size, scale, *, write_splits=True,
                         write_blocks=False, splits: int | None = None):
    """Launch the kernel; returns split states (or None) and slot states (or None), all float32."""
    check_layout(cache, q)
    if q.dtype == torch.float64:
        raise TypeError("the Triton kernels take float32, float16 or bfloat16 (float64 runs the reference)")
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    kmax = indices.shape[-1]
    nsplit = splits or num_splits(bsz * hkv, kmax, q.device)
    per = -(-kmax // nsplit) if kmax else 1
    dev = q.device
    so = slse = bo = blse = None
    if write_splits:
        so = torch.empty(bsz, hq, nsplit, d, dtype=torch.float32, device=dev)
        slse = torch.empty(bsz, hq, nsplit, dtype=torch.float32, device=dev)
    if write_blocks:
        bo = torch.empty(bsz, hq, kmax, d, dtype=torch.float32, device=dev)
        blse = torch.empty(bsz, hq, kmax, dtype=torch.float32, device=dev)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    if indices.stride(-1) != 1 or counts.dim() != 2:
        raise ValueError("indices must have a unit last stride and counts must be [B, Hkv]")
    idx = indices if indices.dtype == torch.int32 else indices.to(torch.int32)
    cnt = counts if counts.dtype == torch.int32 else counts.to(torch.int32)
    lens = cache.seq_lens if cache.seq_lens.dtype == torch.int32 else cache.seq_lens.to(torch.int32)
    pt = cache.page_table if cache.page_table.dtype == torch.int32 else cache.page_table.to(torch.int32)
    _sparse_decode_kernel[(bsz * hkv, nsplit)](
        q, cache.k, cache.v, pt, lens, idx, cnt,
        so if so is not None else dummy, slse if slse is not None else dummy,
        bo if bo is not None else dummy, blse if blse is not None else dummy,
        scale, hkv, kmax, per, nsplit,
        q.stride(0), q.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3], pt.stride(0),
        idx.stride(0), idx.stride(1), cnt.stride(0), cnt.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, PAGE=cache.page_size,
        PREC=_prec(q.dtype), WRITE_SPLITS=write_splits, WRITE_BLOCKS=write_blocks,
        num_warps=4,
    )
    return (so, slse), (bo, blse)


def sparse_decode(q, cache: KVCache, indices, counts, block_size, scale=None, return_block_states=False):
    """Triton twin of :func:`prr.ops.attention.reference.sparse_decode` (same arguments and results)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    (so, slse), (bo, blse) = sparse_decode_launch(q, cache, indices, counts, block_size, scale,
                                                  write_blocks=return_block_states)
    o, lse = merge_partials(so, slse, out_dtype=q.dtype)
    if return_block_states:
        return o, lse, bo, blse
    return o, lse
