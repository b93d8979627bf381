"""Reuse + repair + merge in Triton (twin: ``reference.repair_combine``).

One program per (sequence, KV head, split); a split owns a range of S's slots (``PER``, loaded at once; see
:func:`slots_per_program`) and finds which are hits by comparing them with P's row, held in registers. Exact
mode folds each hit's stored per-slot state of P in (reuse: never recomputed); the misses of the range are
ranked by a prefix sum and attended alone, CHUNK blocks per tile (repair: no work for the hits, not even
masked compute). A [FCH, G, D] tile fold measured 4-8x slower than one [G, D] state per slot, and so did
[HF, G_PAD, D] tiles of HF hits' states with lse and o loaded together (H200, Llama b1 128K / 2048: 17.9-25.1
against 10.0 us; docs/experiments/diag_prr_foldtile_h200.json). Union mode
skips the hits (already inside P's merged state). One launch of the merge kernel combines the split states
(and, in union mode, P's merged state).
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
)
from ..backend import pdl_launch
from ..merge.triton import merge_partials
from ..pdl import pdl_prologue


@triton.jit
def _repair_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr,
    p_idx_ptr, p_cnt_ptr, s_idx_ptr, s_cnt_ptr,
    bo_ptr, blse_ptr,  # P's per-slot states [B, Hq, KP, D], [B, Hq, KP] (exact mode)
    so_ptr, slse_ptr,  # split states out [B, Hq, NSPLIT, D], [B, Hq, NSPLIT]
    scale, HKV, KP, KS, PER, NSPLIT, CAP, NPAGES,
    s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb,
    s_pib, s_pih, s_pcb, s_pch, s_sib, s_sih, s_scb, s_sch,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    CHUNK: tl.constexpr, KP_PAD: tl.constexpr, PER_PAD: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    i_split = tl.program_id(1)
    i_b, i_h, hq, m_g, q = _group_queries(q_ptr, s_qb, s_qh, HKV, G, G_PAD, D, PREC)
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    seq_len = tl.load(len_ptr + i_b)
    pt_row = pt_ptr + i_b * s_ptb
    p_cnt = tl.load(p_cnt_ptr + i_b * s_pcb + i_h * s_pch)
    i_p = tl.arange(0, KP_PAD)
    p_blk = tl.load(p_idx_ptr + i_b * s_pib + i_h * s_pih + i_p, mask=(i_p < p_cnt) & (i_p < KP), other=-1)
    s_cnt = tl.load(s_cnt_ptr + i_b * s_scb + i_h * s_sch)
    start = i_split * PER
    end = tl.minimum(tl.minimum(start + PER, s_cnt), KS)  # counts past K_max read no other row
    i_r = tl.arange(0, PER_PAD)
    s_blk = tl.load(s_idx_ptr + i_b * s_sib + i_h * s_sih + start + i_r, mask=start + i_r < end, other=-2)

    # Hits of this range of S (and each hit's slot in P); misses ranked by a prefix sum.
    match = s_blk[:, None] == p_blk[None, :]  # [PER_PAD, KP_PAD]
    hit = tl.max(match.to(tl.int32), axis=1) > 0
    pos = tl.minimum(tl.sum(tl.where(match, i_p[None, :], 0), axis=1), KP - 1)  # duplicates in P stay in bounds
    miss = ((start + i_r < end) & ~hit).to(tl.int32)
    rank = tl.cumsum(miss, axis=0) - 1
    n_miss = tl.sum(miss, axis=0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if EXACT:  # reuse: fold in P's stored state of each hit of the range, one [G_PAD, D] tile per slot
        for f in tl.static_range(PER_PAD):
            hit_f = tl.max(((i_r == f) & hit).to(tl.int32), axis=0) > 0
            pos_f = tl.sum(tl.where(i_r == f, pos, 0), axis=0)
            row = (i_b * HKV * G + hq) * KP + pos_f
            m_row = m_g & ((i_g * 0 + hit_f.to(tl.int32)) > 0)  # vector mask (see attention's _chunk_tokens)
            lse_f = tl.load(blse_ptr + row, mask=m_row, other=float("-inf"))
            o_f = tl.load(bo_ptr + row[:, None] * D + i_d[None, :], mask=m_row[:, None], other=0.0)
            m_new = tl.maximum(m_i, lse_f)
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m_i - m_safe)
            w = tl.exp(lse_f - m_safe)
            acc = acc * alpha[:, None] + tl.where(w[:, None] > 0, w[:, None] * o_f, 0.0)
            l_i = l_i * alpha + w
            m_i = m_new
    # Repair: the misses of the range, CHUNK blocks per tile (the k-th tile takes misses ranked kC..kC+C-1).
    i_c = tl.arange(0, CHUNK)
    for r0 in range(0, n_miss, CHUNK):
        one = (rank[None, :] == (r0 + i_c)[:, None]) & (miss[None, :] > 0)  # [CHUNK, PER_PAD]
        blk = tl.sum(tl.where(one, s_blk[None, :], 0), axis=1)
        _, phys, off, m_t = _block_tokens(blk, r0 + i_c < n_miss, seq_len, pt_row, CAP, NPAGES, CHUNK, BS, PAGE)
        s, b_v = _chunk_scores(q, k_ptr, v_ptr, phys, off, m_t, i_h, scale, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                               D, PREC)
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, b_v, PREC)
    _store_state(so_ptr, slse_ptr, (i_b * HKV * G + hq) * NSPLIT + i_split, m_i, l_i, acc, m_g, D)


def slots_per_program(rows: int, slots: int, chunk: int, device: torch.device, sms: int | None = None) -> int:
    """S's slots per repair program: about one wave of programs over the GPU, each taking 1 to 8 tiles of CHUNK
    slots (at least 4 slots). Measured on the H200 (``scripts/sweep_repair.py``, results/sweep_repair_h200.json):
    batch 1 wants short ranges (one or two tiles: one wave of short dependent-load chains), batch 8 long ones
    (8 tiles for Llama Quest: 40 -> 26 us). On the CPU: one tile (4 slots)."""
    if sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    tiles = 1
    if sms:
        tiles = min(8, max(1, round(rows * -(-max(slots, 1) // chunk) / sms)))
    return max(4, chunk * tiles)


def repair_launch(q, cache: KVCache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, scale, exact,
                  splits=None):
    """Launch the repair kernel; returns the split states ``([B, Hq, NSPLIT, D], [B, Hq, NSPLIT])``."""
    check_layout(cache, q)
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    kp, ks = p_idx.shape[-1], s_idx.shape[-1]
    chunk = chunk_slots(block_size)
    per = slots_per_program(bsz * hkv, ks, chunk, q.device) if not splits else \
        chunk * -(-max(ks, 1) // (chunk * splits))
    nsplit = -(-max(ks, 1) // per)
    so = torch.empty(bsz, hq, nsplit, d, dtype=torch.float32, device=q.device)
    slse = torch.empty(bsz, hq, nsplit, dtype=torch.float32, device=q.device)
    per_pad = triton.next_power_of_2(per)
    _repair_kernel[(bsz * hkv, nsplit)](
        q, cache.k, cache.v, cache.page_table, cache.seq_lens, p_idx, p_cnt, s_idx, s_cnt,
        block_o if exact else so, block_lse if exact else slse, so, slse,
        scale, hkv, kp, ks, per, nsplit, cache.page_table.shape[1] * cache.page_size, cache.k.shape[0],
        q.stride(0), q.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3], cache.page_table.stride(0),
        p_idx.stride(0), p_idx.stride(1), p_cnt.stride(0), p_cnt.stride(1),
        s_idx.stride(0), s_idx.stride(1), s_cnt.stride(0), s_cnt.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, PAGE=cache.page_size,
        CHUNK=chunk, KP_PAD=max(16, triton.next_power_of_2(kp)), PER_PAD=per_pad, PREC=_prec(q.dtype),
        EXACT=exact, num_warps=4, **pdl_launch(q),
    )
    return so, slse


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None, before_merge=None):
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
    so, slse = repair_launch(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, scale, exact)
    if before_merge is not None:
        before_merge()
    if exact:
        return merge_partials(so, slse, out_dtype=q.dtype)
    return merge_partials(so, slse, spec_o[:, :, None], spec_lse[:, :, None].float(), out_dtype=q.dtype)
