"""Reuse + repair + merge in Triton (twin: ``reference.repair_combine``).

The repair kernel, one program per (sequence, KV head, split): it finds the misses ``S \\ P`` (S's row against
P's, a tile of P at a time), ranks them with a prefix sum, and attends only them, CHUNK blocks per tile, the
tiles dealt round-robin to the splits, so its work follows the number of misses, not |S|. In exact mode its
first split also flags which of P's slots are in S. One launch of the merge kernel then combines the misses'
split states with P's per-slot states where flagged (exact mode: the reuse is a masked merge, the hits are
never recomputed) or with P's merged state (union mode).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..attention.triton import (
    _block_tokens,
    _chunk_scores,
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
    keep_ptr,  # [B, HKV, KP] int8 out (exact mode): P's slot j is in S
    so_ptr, slse_ptr,  # the misses' split states out [B, Hq, NSPLIT, D], [B, Hq, NSPLIT]
    scale, HKV, KP, NSPLIT,
    s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb,
    s_pib, s_pih, s_pcb, s_pch, s_sib, s_sih, s_scb, s_sch,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    CHUNK: tl.constexpr, KS_PAD: tl.constexpr, PCH: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
):
    i_split = tl.program_id(1)
    i_b, i_h, hq, m_g, q = _group_queries(q_ptr, s_qb, s_qh, HKV, G, G_PAD, D, PREC)
    seq_len = tl.load(len_ptr + i_b)
    pt_row = pt_ptr + i_b * s_ptb
    p_row = p_idx_ptr + i_b * s_pib + i_h * s_pih
    p_cnt = tl.load(p_cnt_ptr + i_b * s_pcb + i_h * s_pch)
    s_cnt = tl.load(s_cnt_ptr + i_b * s_scb + i_h * s_sch)
    i_s = tl.arange(0, KS_PAD)
    s_blk = tl.load(s_idx_ptr + i_b * s_sib + i_h * s_sih + i_s, mask=i_s < s_cnt, other=-2)

    # The misses: S's slots whose block is in no slot of P (P read PCH slots at a time).
    in_p = tl.zeros([KS_PAD], tl.int32)
    for p0 in range(0, p_cnt, PCH):
        i_p = p0 + tl.arange(0, PCH)
        p_blk = tl.load(p_row + i_p, mask=i_p < p_cnt, other=-1)
        in_p = tl.maximum(in_p, tl.max((s_blk[:, None] == p_blk[None, :]).to(tl.int32), axis=1))
    miss = ((in_p == 0) & (i_s < s_cnt)).to(tl.int32)
    rank = tl.cumsum(miss, axis=0) - 1  # a miss's position among the misses
    n_miss = tl.sum(miss, axis=0)

    # Repair: tiles of CHUNK misses, tile c to split c % NSPLIT.
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for c in range(i_split, tl.cdiv(n_miss, CHUNK), NSPLIT):
        r = c * CHUNK + tl.arange(0, CHUNK)
        pick = (miss[None, :] > 0) & (rank[None, :] == r[:, None])  # [CHUNK, KS_PAD] one-hot rows
        blk = tl.sum(tl.where(pick, s_blk[None, :], 0), axis=1)
        _, phys, off, m_t = _block_tokens(blk, r < n_miss, seq_len, pt_row, CHUNK, BS, PAGE)
        s, b_v = _chunk_scores(q, k_ptr, v_ptr, phys, off, m_t, i_h, scale, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                               D, PREC)
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, b_v, PREC)
    _store_state(so_ptr, slse_ptr, (i_b * HKV * G + hq) * NSPLIT + i_split, m_i, l_i, acc, m_g, D)

    if EXACT:  # reuse flags: P's slot j is in S (padding slots: 0), written once per (sequence, KV head)
        if i_split == 0:
            for p0 in range(0, KP, PCH):
                i_p = p0 + tl.arange(0, PCH)
                p_blk = tl.load(p_row + i_p, mask=i_p < p_cnt, other=-1)
                in_s = tl.max((p_blk[:, None] == s_blk[None, :]).to(tl.int32), axis=1)
                tl.store(keep_ptr + (i_b * HKV + i_h) * KP + i_p, in_s.to(tl.int8), mask=i_p < KP)


def repair_launch(q, cache: KVCache, block_size, p_idx, p_cnt, s_idx, s_cnt, scale, exact, splits=None):
    """Launch the repair kernel: the misses' split states ``([B, Hq, NSPLIT, D], [B, Hq, NSPLIT])`` and, in exact
    mode, the reuse flags ``[B, Hkv, K'_max]`` int8 (else None)."""
    check_layout(cache, q)
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    kp, ks = p_idx.shape[-1], s_idx.shape[-1]
    chunk = chunk_slots(block_size)
    nsplit = splits or num_splits(bsz * hkv, ks, q.device, chunk)
    so = torch.empty(bsz, hq, nsplit, d, dtype=torch.float32, device=q.device)
    slse = torch.empty(bsz, hq, nsplit, dtype=torch.float32, device=q.device)
    keep = torch.empty(bsz, hkv, kp, dtype=torch.int8, device=q.device) if exact else None
    _repair_kernel[(bsz * hkv, nsplit)](
        q, cache.k, cache.v, cache.page_table, cache.seq_lens, p_idx, p_cnt, s_idx, s_cnt,
        keep if exact else slse, so, slse,
        scale, hkv, kp, nsplit,
        q.stride(0), q.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3], cache.page_table.stride(0),
        p_idx.stride(0), p_idx.stride(1), p_cnt.stride(0), p_cnt.stride(1),
        s_idx.stride(0), s_idx.stride(1), s_cnt.stride(0), s_cnt.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, PAGE=cache.page_size,
        CHUNK=chunk, KS_PAD=max(16, triton.next_power_of_2(ks)), PCH=32, PREC=_prec(q.dtype), EXACT=exact,
        num_warps=4,
    )
    return so, slse, keep


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None):
    """Triton twin of :func:`prr.ops.repair.reference.repair_combine`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    exact = mode == "exact"
    bsz, hq, d = q.shape
    if exact:
        want = (bsz, hq, p_idx.shape[-1])
        for name, t, shape in (("block_o", block_o, (*want, d)), ("block_lse", block_lse, want)):
            if t is None or not t.is_contiguous() or t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be a contiguous float32 {list(shape)} tensor of P's per-slot "
                                 "states (ops.block_states)")
    elif spec_o is None or spec_lse is None:
        raise ValueError("union mode needs spec_o and spec_lse (the merged state of P)")
    so, slse, keep = repair_launch(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, scale, exact)
    if exact:
        return merge_partials(so, slse, block_o, block_lse, out_dtype=q.dtype, keep2=keep,
                              group2=hq // cache.num_kv_heads)
    return merge_partials(so, slse, spec_o[:, :, None], spec_lse[:, :, None].float(), out_dtype=q.dtype)
