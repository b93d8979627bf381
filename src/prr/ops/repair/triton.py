"""Reuse + repair + merge in Triton (twin: ``reference.repair_combine``).

One program per (sequence, KV head, split of S's slots), taking S's slots a chunk at a time. Each block is
looked up in P's row (held in registers): a hit folds in P's stored per-block partial state (exact mode) or
is skipped (union mode: it is already inside P's merged state); the misses of the chunk are attended from
the cache as one masked tile. The split states are then
merged (with P's merged state in union mode) by one launch of the merge kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..attention.triton import (
    _chunk_scores,
    _chunk_tokens,
    _group_queries,
    _online_update,
    _prec,
    _store_state,
    check_layout,
    chunk_slots,
    num_splits,
)
from ..merge.triton import merge_partials


@triton.jit
def _repair_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr,
    p_idx_ptr, p_cnt_ptr, s_idx_ptr, s_cnt_ptr,
    bo_ptr, blse_ptr,  # P's slot states [B, Hq, KP, D], [B, Hq, KP] (exact mode)
    so_ptr, slse_ptr,  # split states out [B, Hq, NSPLIT, D], [B, Hq, NSPLIT]
    scale, HKV, KP, SLOTS_PER_SPLIT, NSPLIT,
    s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb,
    s_pib, s_pih, s_pcb, s_pch, s_sib, s_sih, s_scb, s_sch,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    CHUNK: tl.constexpr, KP_PAD: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
):
    i_split = tl.program_id(1)
    i_b, i_h, hq, m_g, q = _group_queries(q_ptr, s_qb, s_qh, HKV, G, G_PAD, D, PREC)
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    seq_len = tl.load(len_ptr + i_b)
    pt_row = pt_ptr + i_b * s_ptb
    p_cnt = tl.load(p_cnt_ptr + i_b * s_pcb + i_h * s_pch)
    i_p = tl.arange(0, KP_PAD)
    p_row = tl.load(p_idx_ptr + i_b * s_pib + i_h * s_pih + i_p, mask=i_p < p_cnt, other=-1)
    s_row = s_idx_ptr + i_b * s_sib + i_h * s_sih
    s_cnt = tl.load(s_cnt_ptr + i_b * s_scb + i_h * s_sch)
    start = i_split * SLOTS_PER_SPLIT
    end = tl.minimum(start + SLOTS_PER_SPLIT, s_cnt)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for c0 in range(start, end, CHUNK):
        # Reuse: look the chunk's blocks up in P (held in registers): hit flag and P slot per S slot.
        i_c = c0 + tl.arange(0, CHUNK)
        blk = tl.load(s_row + i_c, mask=i_c < end, other=-2)
        match = blk[:, None] == p_row[None, :]  # [CHUNK, KP_PAD]
        hit = tl.max(match.to(tl.int32), axis=1) > 0
        pos = tl.sum(tl.where(match, i_p[None, :], 0), axis=1)
        if EXACT:  # fold in P's stored partial state of each hit
            for c in tl.static_range(CHUNK):
                sel = tl.arange(0, CHUNK) == c
                hit_c = tl.max((sel & hit).to(tl.int32), axis=0) > 0
                pos_c = tl.sum(tl.where(sel, pos, 0), axis=0)
                row = (i_b * HKV * G + hq) * KP + pos_c
                m_row = m_g & ((i_g * 0 + hit_c.to(tl.int32)) > 0)  # vector mask (see _chunk_tokens)
                lse_j = tl.load(blse_ptr + row, mask=m_row, other=float("-inf"))
                o_j = tl.load(bo_ptr + row[:, None] * D + i_d[None, :], mask=m_row[:, None], other=0.0)
                m_new = tl.maximum(m_i, lse_j)
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
                alpha = tl.exp(m_i - m_safe)
                w = tl.exp(lse_j - m_safe)
                acc = acc * alpha[:, None] + tl.where(w[:, None] > 0, w[:, None] * o_j, 0.0)
                l_i = l_i * alpha + w
                m_i = m_new
        # Repair: attend the missed blocks of the chunk from the cache (hits are masked: not even read).
        _, phys, off, m_t = _chunk_tokens(s_row, c0, end, seq_len, pt_row, CHUNK, BS, PAGE)
        hit_t = tl.reshape(tl.broadcast_to(hit[:, None], (CHUNK, BS)), (CHUNK * BS,))
        m_t = m_t & ~hit_t
        s, b_v = _chunk_scores(q, k_ptr, v_ptr, phys, off, m_t, i_h, scale, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                               D, PREC)
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, b_v, PREC)
    _store_state(so_ptr, slse_ptr, (i_b * HKV * G + hq) * NSPLIT + i_split, m_i, l_i, acc, m_g, D)


def repair_launch(q, cache: KVCache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, scale, exact,
                  splits=None):
    """Launch the repair kernel; returns the split states ``([B, Hq, NSPLIT, D], [B, Hq, NSPLIT])``."""
    check_layout(cache, q)
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    kp, ks = p_idx.shape[-1], s_idx.shape[-1]
    chunk = chunk_slots(block_size)
    nsplit = splits or num_splits(bsz * hkv, ks, q.device, chunk)
    per = chunk * -(-max(ks, 1) // (chunk * nsplit))
    so = torch.empty(bsz, hq, nsplit, d, dtype=torch.float32, device=q.device)
    slse = torch.empty(bsz, hq, nsplit, dtype=torch.float32, device=q.device)
    if exact:
        for name, t in (("block_o", block_o), ("block_lse", block_lse)):
            if t is None or not t.is_contiguous() or t.dtype != torch.float32:
                raise ValueError(f"{name} must be a contiguous float32 tensor from sparse_decode's block states")
    bo = block_o if exact else so
    blse = block_lse if exact else slse
    _repair_kernel[(bsz * hkv, nsplit)](
        q, cache.k, cache.v, cache.page_table, cache.seq_lens, p_idx, p_cnt, s_idx, s_cnt, bo, blse, so, slse,
        scale, hkv, kp, per, nsplit,
        q.stride(0), q.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3], cache.page_table.stride(0),
        p_idx.stride(0), p_idx.stride(1), p_cnt.stride(0), p_cnt.stride(1),
        s_idx.stride(0), s_idx.stride(1), s_cnt.stride(0), s_cnt.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, PAGE=cache.page_size,
        CHUNK=chunk, KP_PAD=max(16, triton.next_power_of_2(kp)), PREC=_prec(q.dtype), EXACT=exact, num_warps=4,
    )
    return so, slse


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None):
    """Triton twin of :func:`prr.ops.repair.reference.repair_combine`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    exact = mode == "exact"
    so, slse = repair_launch(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, scale, exact)
    if exact:
        return merge_partials(so, slse, out_dtype=q.dtype)
    if spec_o is None or spec_lse is None:
        raise ValueError("union mode needs spec_o and spec_lse (the merged state of P)")
    return merge_partials(so, slse, spec_o[:, :, None], spec_lse[:, :, None].float(), out_dtype=q.dtype)
