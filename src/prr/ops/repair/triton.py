"""Reuse + repair + merge in one Triton launch (twin: ``reference.repair_combine``).

One program per (sequence, KV head, split); a split owns a range of S's slots (``PER``; see
:func:`slots_per_program`). It finds which of them are hits by comparing them with P's row, then:

- **reuse** (exact mode): folds the hits' per-slot states of P (written by the speculation) as one gathered
  ``[R, G*D]`` tile per 8 slots -- the G query heads of a KV head are contiguous rows of P's state, so a
  slot's state is G runs of D floats and the fold is a column-wise log-sum-exp merge, no tensor-core shapes;
- **repair**: ranks the range's misses by a prefix sum and attends them alone, CHUNK blocks per tile (no work
  for the hits, not even masked compute);
- writes its two partial states (reuse, repair) to scratch, and the **last program of the (sequence, KV head)
  to finish** -- counted with an atomic ticket -- merges every split's states (and, in union mode, P's merged
  state) and writes the output. One kernel on the critical path, not a kernel plus a merge: at batch 1 the
  repair is latency-bound, and each launch is a few microseconds of it. The ticket counters are reset by that
  last program, so a captured graph replays with no memset (:class:`Tickets` keeps them between steps).

With no prediction (``p_idx`` None) every slot of S is a miss: the same kernel is plain block-sparse attention
with its merge in the launch (:func:`sparse_decode_fused`), serialized DSA's twin of the repair.
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

FOLD_ROWS = 8  # states folded per gathered tile


@triton.jit
def _fold(o_ptr, lse_ptr, base, st, valid, col, m_col, m_run, l_run, acc, S_G, CG: tl.constexpr,
          D: tl.constexpr):
    """Fold states ``st [R]`` (valid where ``valid``) of one (sequence, KV head) into a running column-wise
    merge over the flattened ``[G, D]`` columns ``col``. State ``s`` of query head ``g`` sits at row
    ``base + g * S_G + s`` of ``lse`` and ``o`` (``o`` rows of D floats). ``CG``: read through L2 (states
    written by other programs of this launch)."""
    g = col // D
    m = valid[:, None] & m_col[None, :]
    row = base + g[None, :] * S_G + st[:, None]  # [R, GD]
    if CG:
        lse = tl.load(lse_ptr + row, mask=m, other=float("-inf"), cache_modifier=".cg")
    else:
        lse = tl.load(lse_ptr + row, mask=m, other=float("-inf"))
    m_new = tl.maximum(m_run, tl.max(lse, axis=0))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    w = tl.exp(lse - m_safe[None, :])
    live = w > 0  # empty states are not even read: garbage cannot leak
    off = row * D + (col % D)[None, :]
    if CG:
        o = tl.load(o_ptr + off, mask=live, other=0.0, cache_modifier=".cg")
    else:
        o = tl.load(o_ptr + off, mask=live, other=0.0)
    alpha = tl.exp(m_run - m_safe)
    acc = acc * alpha + tl.sum(tl.where(live, w * o, 0.0), axis=0)
    return m_new, l_run * alpha + tl.sum(w, axis=0), acc


@triton.jit
def _repair_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr,
    p_idx_ptr, p_cnt_ptr, s_idx_ptr, s_cnt_ptr,
    bo_ptr, blse_ptr,  # exact: P's per-slot states [B, Hq, KP, D], [B, Hq, KP]; union: P's state [B, Hq, D], [B, Hq]
    so_ptr, slse_ptr,  # scratch: two states per split [B, Hq, 2 * NSPLIT, D], [B, Hq, 2 * NSPLIT]
    out_ptr, out_lse_ptr, ticket_ptr,  # [B, Hq, D] (q dtype), [B, Hq] fp32, [B * Hkv] int32 (zero between launches)
    scale, HKV, KP, PER, NSPLIT,
    s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb,
    s_pib, s_pih, s_pcb, s_pch, s_sib, s_sih, s_scb, s_sch,
    G: tl.constexpr, G_PAD: tl.constexpr, GD_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    PAGE: tl.constexpr, CHUNK: tl.constexpr, KP_PAD: tl.constexpr, PER_PAD: tl.constexpr, PREC: tl.constexpr,
    HAS_P: tl.constexpr, EXACT: tl.constexpr, MERGE: tl.constexpr, NS2_PAD: tl.constexpr,
):
    i_split = tl.program_id(1)
    i_b, i_h, hq, m_g, q = _group_queries(q_ptr, s_qb, s_qh, HKV, G, G_PAD, D, PREC)
    i_bh = i_b * HKV + i_h
    hq0 = (i_b * HKV + i_h) * G  # first query-head row of this KV head in [B, Hq, ...]
    NS2 = 2 * NSPLIT
    col = tl.arange(0, GD_PAD)
    m_col = col < G * D
    seq_len = tl.load(len_ptr + i_b)
    pt_row = pt_ptr + i_b * s_ptb
    s_cnt = tl.load(s_cnt_ptr + i_b * s_scb + i_h * s_sch)
    start = i_split * PER
    end = tl.minimum(start + PER, s_cnt)
    i_r = tl.arange(0, PER_PAD)
    s_row = s_idx_ptr + i_b * s_sib + i_h * s_sih
    s_blk = tl.load(s_row + start + i_r, mask=start + i_r < end, other=-2)
    if HAS_P:
        p_cnt = tl.load(p_cnt_ptr + i_b * s_pcb + i_h * s_pch)
        i_p = tl.arange(0, KP_PAD)
        p_blk = tl.load(p_idx_ptr + i_b * s_pib + i_h * s_pih + i_p, mask=i_p < p_cnt, other=-1)
        hit = tl.max((s_blk[:, None] == p_blk[None, :]).to(tl.int32), axis=1) > 0
    else:
        hit = i_r < 0
    miss = ((start + i_r < end) & ~hit).to(tl.int32)
    rank = tl.cumsum(miss, axis=0) - 1
    n_miss = tl.sum(miss, axis=0)

    # Reuse (exact): fold the hits' stored states of P, FOLD_ROWS slots of the range per gathered tile.
    if EXACT and HAS_P:
        f_m = tl.full([GD_PAD], float("-inf"), tl.float32)
        f_l = tl.zeros([GD_PAD], tl.float32)
        f_acc = tl.zeros([GD_PAD], tl.float32)
        for f0 in tl.static_range(0, PER_PAD, 8):
            i_f = f0 + tl.arange(0, 8)
            blk_f = tl.load(s_row + start + i_f, mask=start + i_f < end, other=-2)
            match = blk_f[:, None] == p_blk[None, :]  # [8, KP_PAD]
            hit_f = tl.max(match.to(tl.int32), axis=1) > 0
            pos_f = tl.sum(tl.where(match, i_p[None, :], 0), axis=1)  # the hit's slot in P
            f_m, f_l, f_acc = _fold(bo_ptr, blse_ptr, hq0 * KP, pos_f, hit_f, col, m_col, f_m, f_l, f_acc, KP,
                                    False, D)
        f_o = f_acc / tl.where(f_l > 0, f_l, 1.0)
        f_lse = tl.where(f_l > 0, f_m + tl.log(f_l), float("-inf"))
        st = hq0 * NS2 + (col // D) * NS2 + 2 * i_split
        tl.store(so_ptr + st * D + col % D, f_o, mask=m_col)
        tl.store(slse_ptr + st, f_lse, mask=m_col & (col % D == 0))
    else:  # no reuse state: the empty state (0, -inf), never read by the merge
        st = hq0 * NS2 + (col // D) * NS2 + 2 * i_split
        tl.store(slse_ptr + st, tl.full([GD_PAD], float("-inf"), tl.float32), mask=m_col & (col % D == 0))

    # Repair: the misses of the range, CHUNK blocks per tile (the k-th tile takes misses ranked kC..kC+C-1).
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    i_c = tl.arange(0, CHUNK)
    for r0 in range(0, n_miss, CHUNK):
        one = (rank[None, :] == (r0 + i_c)[:, None]) & (miss[None, :] > 0)  # [CHUNK, PER_PAD]
        blk = tl.sum(tl.where(one, s_blk[None, :], 0), axis=1)
        _, phys, off, m_t = _block_tokens(blk, r0 + i_c < n_miss, seq_len, pt_row, CHUNK, BS, PAGE)
        s, b_v = _chunk_scores(q, k_ptr, v_ptr, phys, off, m_t, i_h, scale, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                               D, PREC)
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, b_v, PREC)
    _store_state(so_ptr, slse_ptr, (i_b * HKV * G + hq) * NS2 + 2 * i_split + 1, m_i, l_i, acc, m_g, D)

    if MERGE:
        # The last split of this (sequence, KV head) to finish merges all of them. The barrier orders every
        # thread's stores before the ticket (a release at GPU scope); the winner reads the states through L2.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + i_bh, 1, sem="acq_rel", scope="gpu")
        if ticket == NSPLIT - 1:
            tl.debug_barrier()
            o_m = tl.full([GD_PAD], float("-inf"), tl.float32)
            o_l = tl.zeros([GD_PAD], tl.float32)
            o_acc = tl.zeros([GD_PAD], tl.float32)
            for s0 in tl.static_range(0, NS2_PAD, 8):
                i_s = s0 + tl.arange(0, 8)
                o_m, o_l, o_acc = _fold(so_ptr, slse_ptr, hq0 * NS2, i_s, i_s < NS2, col, m_col, o_m, o_l, o_acc,
                                        NS2, True, D)
            if not EXACT:  # union: P's merged state
                one = tl.zeros([2], tl.int32)
                o_m, o_l, o_acc = _fold(bo_ptr, blse_ptr, hq0, one, tl.arange(0, 2) < 1, col, m_col, o_m, o_l,
                                        o_acc, 1, False, D)
            o = o_acc / tl.where(o_l > 0, o_l, 1.0)
            tl.store(out_ptr + hq0 * D + col, o.to(out_ptr.dtype.element_ty), mask=m_col)
            tl.store(out_lse_ptr + hq0 + col // D, tl.where(o_l > 0, o_m + tl.log(o_l), float("-inf")),
                     mask=m_col & (col % D == 0))
            tl.store(ticket_ptr + i_bh, 0)  # ready for the next launch (graph replays need no memset)


class Tickets:
    """Zeroed int32 ticket counters, one per (sequence, KV head), reused across launches (the kernel leaves
    them zero). A step that is captured in a CUDA graph passes its own, allocated before capture."""

    def __init__(self, n: int, device):
        self.t = torch.zeros(max(n, 1), dtype=torch.int32, device=device)


_tickets: dict = {}


def _default_tickets(n: int, device) -> torch.Tensor:
    key = (torch.device(device), n)
    if key not in _tickets:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            # zeros made during a capture are only zero once the graph replays: an eager launch would read garbage
            raise RuntimeError("the repair's ticket counters must exist before a CUDA graph capture: pass "
                               "tickets=Tickets(B * Hkv, device).t, or run the op once before capturing")
        _tickets[key] = Tickets(n, device)
    return _tickets[key].t


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


def repair_launch(q, cache: KVCache, block_size, p_idx, p_cnt, s_idx, s_cnt, states, scale, exact, *,
                  per: int | None = None, merge: bool = True, tickets: torch.Tensor | None = None):
    """Launch the kernel. ``states``: exact mode P's per-slot ``(block_o, block_lse)``; union mode P's merged
    ``(o, lse)``; ``None`` with ``p_idx=None`` (plain attention over S). ``per``: S slots per program (default
    :func:`slots_per_program`). Returns ``(o, lse)`` when ``merge`` (the merge in the launch), else the split
    states ``([B, Hq, 2 NSPLIT, D], [B, Hq, 2 NSPLIT])`` for :func:`merge_partials`."""
    check_layout(cache, q)
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    ks = s_idx.shape[-1]
    chunk = chunk_slots(block_size)
    has_p = p_idx is not None
    if per is None:
        per = slots_per_program(bsz * hkv, ks, chunk, q.device)
    nsplit = -(-max(ks, 1) // per)
    dev = q.device
    so = torch.empty(bsz, hq, 2 * nsplit, d, dtype=torch.float32, device=dev)
    slse = torch.empty(bsz, hq, 2 * nsplit, dtype=torch.float32, device=dev)
    out = torch.empty(bsz, hq, d, dtype=q.dtype, device=dev) if merge else so
    out_lse = torch.empty(bsz, hq, dtype=torch.float32, device=dev) if merge else slse
    if merge and tickets is None:
        tickets = _default_tickets(bsz * hkv, dev)
    if not has_p:
        p_idx, p_cnt = s_idx, s_cnt  # never read (HAS_P=False)
    kp = p_idx.shape[-1]
    bo, blse = states if states is not None else (so, slse)
    _repair_kernel[(bsz * hkv, nsplit)](
        q, cache.k, cache.v, cache.page_table, cache.seq_lens, p_idx, p_cnt, s_idx, s_cnt,
        bo, blse, so, slse, out, out_lse, tickets if merge else slse,
        scale, hkv, kp, per, nsplit,
        q.stride(0), q.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3], cache.page_table.stride(0),
        p_idx.stride(0), p_idx.stride(1), p_cnt.stride(0), p_cnt.stride(1),
        s_idx.stride(0), s_idx.stride(1), s_cnt.stride(0), s_cnt.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), GD_PAD=triton.next_power_of_2(g) * d, D=d, BS=block_size,
        PAGE=cache.page_size, CHUNK=chunk, KP_PAD=max(16, triton.next_power_of_2(kp)),
        PER_PAD=max(8, triton.next_power_of_2(per)), PREC=_prec(q.dtype), HAS_P=has_p, EXACT=exact, MERGE=merge,
        NS2_PAD=max(8, triton.next_power_of_2(2 * nsplit)), num_warps=4,
    )
    return out, out_lse


def _check_states(q, p_idx, exact, block_o, block_lse, spec_o, spec_lse):
    bsz, hq, d = q.shape
    if exact:
        want = (bsz, hq, p_idx.shape[-1])
        for name, t, shape in (("block_o", block_o, (*want, d)), ("block_lse", block_lse, want)):
            if t is None or not t.is_contiguous() or t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be a contiguous float32 {list(shape)} tensor of P's per-slot "
                                 "states (ops.block_states)")
        return block_o, block_lse
    if spec_o is None or spec_lse is None:
        raise ValueError("union mode needs spec_o and spec_lse (the merged state of P)")
    for name, t, shape in (("spec_o", spec_o, (bsz, hq, d)), ("spec_lse", spec_lse, (bsz, hq))):
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {list(shape)} tensor (P's merged state)")
    return spec_o, spec_lse.float()


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None, tickets=None):
    """Triton twin of :func:`prr.ops.repair.reference.repair_combine` (``tickets``: see :class:`Tickets`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    exact = mode == "exact"
    states = _check_states(q, p_idx, exact, block_o, block_lse, spec_o, spec_lse)
    return repair_launch(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, states, scale, exact, tickets=tickets)


def sparse_decode_fused(q, cache, indices, counts, block_size, scale=None, tickets=None):
    """Block-sparse attention over ``indices`` with the split merge inside the launch (one kernel): the same
    result as :func:`prr.ops.attention.triton.sparse_decode`. Splits as the plain attention's
    (``num_splits``: about 4 waves of one-tile programs)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bsz, ks = q.shape[0], indices.shape[-1]
    chunk = chunk_slots(block_size)
    nsplit = num_splits(bsz * cache.num_kv_heads, ks, q.device, chunk)
    per = chunk * -(-max(ks, 1) // (chunk * nsplit))
    return repair_launch(q, cache, block_size, None, None, indices, counts, None, scale, True, per=per,
                         tickets=tickets)


def repair_two_kernels(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, states, scale, exact, per=None):
    """The same repair with the merge as a second kernel (for comparison in benchmarks)."""
    so, slse = repair_launch(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, states, scale, exact, per=per,
                             merge=False)
    if exact:
        return merge_partials(so, slse, out_dtype=q.dtype)
    return merge_partials(so, slse, states[0][:, :, None], states[1][:, :, None], out_dtype=q.dtype)
