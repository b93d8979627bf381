"""Candidate-list scoring and top-K in Triton (twins: ``reference.quest_candidate_scores``,
``reference.infllm_candidate_scores``, ``reference.select_candidates``).

Scoring: grid (sequence x KV head, chunks of BLOCK_C candidates); each program gathers its candidates'
metadata rows by id (the only metadata read) and packs the group's query heads in the rows of one ``tl.dot``,
as the full scorers do. Top-K: one program per (sequence, KV head) holds the whole list (a few hundred slots)
and finds the K-th key by the same order-preserving binary search as :mod:`prr.ops.select.triton`; the valid
ids are ascending, so a prefix sum writes the chosen ones already sorted between the sink and local blocks.
The Quest scorer can run that top-K itself (``select=``): the last of a row's scoring programs to finish,
counted on a per-row ticket, selects the row, so a re-score step is one launch.
Nothing reads device values on the host: the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..attention.triton import _prec, check_layout
from ..backend import pdl_launch
from ..pdl import pdl_prologue
from ..scoring.triton import _aggregate_rows, _quest_bound
from ..select.triton import _order_key, _top_k_mask
from .reference import check_force


@triton.jit
def _plan_rescore(cand_ptr, step_ptr, nscan_ptr, nblk_out_ptr, i_b, i_h, i_c, m_c, nblk, C, R, s_cb, s_ch):
    """The candidates of slots ``i_c`` after a re-score step's bookkeeping (the plan with force = 0): the last R
    slots list the blocks new since the scan, written back for the top-K; one program per sequence counts the
    step and stores its block count."""
    j = tl.load(cand_ptr + i_b * s_cb + i_h * s_ch + i_c, mask=m_c & (i_c < C - R), other=-1)
    is_new = m_c & (i_c >= C - R)
    new = tl.load(nscan_ptr + i_b) + (i_c - (C - R))
    j = tl.where(is_new, tl.where(new < nblk, new, -1), j)
    tl.store(cand_ptr + i_b * s_cb + i_h * s_ch + i_c, j, mask=is_new)
    if (i_h == 0) & (tl.program_id(1) == 0):
        tl.store(step_ptr + i_b, tl.load(step_ptr + i_b) + 1)
        tl.store(nblk_out_ptr + i_b, nblk)
    return j


@triton.jit
def _quest_candidate_kernel(q_ptr, kmin_ptr, kmax_ptr, len_ptr, cand_ptr, out_ptr, step_ptr, nscan_ptr, nblk_out_ptr,
                            HKV, C, NMAX, R, s_qb, s_qh, s_mb, s_mh, s_mn, s_cb, s_ch, s_ob, s_oh,
                            tick_ptr, idx_ptr, cnt_ptr, TOPK, N_SINK, N_LOCAL, KMAX, s_ib, s_ih,
                            G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                            BLOCK_C: tl.constexpr, PREC: tl.constexpr, AGG_MAX: tl.constexpr, PLAN: tl.constexpr,
                            FUSE: tl.constexpr = False, C_PAD: tl.constexpr = 16, BLOCK_K: tl.constexpr = 16,
                            PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    m_g = i_g < G
    m_c = i_c < C
    nblk = (tl.load(len_ptr + i_b) + BS - 1) // BS
    if PLAN:
        j = _plan_rescore(cand_ptr, step_ptr, nscan_ptr, nblk_out_ptr, i_b, i_h, i_c, m_c, nblk, C, R, s_cb, s_ch)
    else:
        j = tl.load(cand_ptr + i_b * s_cb + i_h * s_ch + i_c, mask=m_c, other=-1)
    m_j = m_c & (j >= 0) & (j < nblk) & (j < NMAX)
    q = tl.load(q_ptr + i_b * s_qb + (i_h * G + i_g)[:, None] * s_qh + i_d[None, :], mask=m_g[:, None], other=0.0)
    off = i_b * s_mb + i_h * s_mh + tl.where(m_j, j, 0)[:, None].to(tl.int64) * s_mn + i_d[None, :]
    b_hi = tl.load(kmax_ptr + off, mask=m_j[:, None], other=0.0)  # [BLOCK_C, D]
    b_lo = tl.load(kmin_ptr + off, mask=m_j[:, None], other=0.0)
    agg = tl.where(m_j, _quest_bound(q, b_hi, b_lo, m_g, PREC, AGG_MAX), float("-inf"))  # [BLOCK_C]
    tl.store(out_ptr + i_b * s_ob + i_h * s_oh + i_c, agg, mask=m_c)
    if FUSE:  # the row's last program to finish selects it (no second launch); it resets the ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(tick_ptr + i_bh, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:
            tl.atomic_xchg(tick_ptr + i_bh, 0)
            _select_candidates_row(cand_ptr + i_b * s_cb + i_h * s_ch, out_ptr + i_b * s_ob + i_h * s_oh, nblk,
                                   idx_ptr + i_b * s_ib + i_h * s_ih, cnt_ptr + i_bh, C, TOPK, N_SINK, N_LOCAL,
                                   KMAX, C_PAD, BLOCK_K, True)


@triton.jit
def _infllm_candidate_kernel(q_ptr, ck_ptr, len_ptr, cand_ptr, out_ptr, step_ptr, nscan_ptr, nblk_out_ptr,
                             HKV, C, NMAX, CMAX, R, s_qb, s_qh, s_kb, s_kh, s_kn, s_cb, s_ch, s_ob, s_oh,
                             G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             WINDOW: tl.constexpr, STRIDE: tl.constexpr, PER: tl.constexpr,
                             INSIDE: tl.constexpr, BLOCK_C: tl.constexpr, AGG_MAX: tl.constexpr,
                             PLAN: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    m_g = i_g < G
    m_c = i_c < C
    seq_len = tl.load(len_ptr + i_b)
    nblk = (seq_len + BS - 1) // BS
    if PLAN:
        j = _plan_rescore(cand_ptr, step_ptr, nscan_ptr, nblk_out_ptr, i_b, i_h, i_c, m_c, nblk, C, R, s_cb, s_ch)
    else:
        j = tl.load(cand_ptr + i_b * s_cb + i_h * s_ch + i_c, mask=m_c, other=-1)
    m_j = m_c & (j >= 0) & (j < nblk) & (j < NMAX)
    # The PER windows starting in each candidate block, flattened [BLOCK_C * PER]; the first INSIDE lie in it.
    i_w = tl.arange(0, BLOCK_C * PER)
    j_w = tl.reshape(tl.broadcast_to(tl.where(m_j, j, 0)[:, None], (BLOCK_C, PER)), (BLOCK_C * PER,))
    m_w = tl.reshape(tl.broadcast_to(m_j[:, None], (BLOCK_C, PER)), (BLOCK_C * PER,))
    win = j_w * PER + i_w % PER
    ok = m_w & ((i_w % PER) < INSIDE) & ((win * STRIDE + WINDOW) <= seq_len) & (win < CMAX)
    q = tl.load(q_ptr + i_b * s_qb + (i_h * G + i_g)[:, None] * s_qh + i_d[None, :], mask=m_g[:, None], other=0.0)
    ck = tl.load(ck_ptr + i_b * s_kb + i_h * s_kh + tl.where(ok, win, 0)[:, None].to(tl.int64) * s_kn + i_d[None, :],
                 mask=ok[:, None], other=0.0)
    s = tl.dot(q.to(tl.float32), tl.trans(ck.to(tl.float32)), input_precision="ieee")  # [G_PAD, BLOCK_C*PER]
    agg = tl.where(ok, _aggregate_rows(s, m_g, AGG_MAX), float("-inf"))
    blk = tl.max(tl.reshape(agg, (BLOCK_C, PER)), axis=1)
    tl.store(out_ptr + i_b * s_ob + i_h * s_oh + i_c, tl.where(m_j, blk, float("-inf")), mask=m_c)


@triton.jit
def _select_candidates_row(cand_row, s_row, n, out, cnt_at, C, TOPK, N_SINK, N_LOCAL, KMAX,
                           C_PAD: tl.constexpr, BLOCK_K: tl.constexpr, CG: tl.constexpr):
    """Top-K of one candidate row (sink blocks, the chosen ascending as listed, local blocks; -1 padding) and its
    count. ``CG``: load the row past L1 (it was written by other programs of the same launch)."""
    k = tl.arange(0, BLOCK_K)
    if n <= KMAX:  # a short context: every live block
        tl.store(out + k, tl.where(k < n, k, -1), mask=k < KMAX)
        tl.store(cnt_at, n)
    else:
        i_c = tl.arange(0, C_PAD)
        m_c = i_c < C
        if CG:
            j = tl.load(cand_row + i_c, mask=m_c, other=-1, cache_modifier=".cg")
            s = tl.load(s_row + i_c, mask=m_c, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
        else:
            j = tl.load(cand_row + i_c, mask=m_c, other=-1)
            s = tl.load(s_row + i_c, mask=m_c, other=float("-inf")).to(tl.float32)
        dyn = m_c & (j >= N_SINK) & (j < n - N_LOCAL) & (s > float("-inf"))  # NaN fails the compare
        chosen = _top_k_mask(tl.where(dyn, _order_key(s), -2147483648), TOPK)
        n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
        pos = N_SINK + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(out + pos, j, mask=chosen)
        tl.store(out + k, k, mask=k < N_SINK)
        tl.store(out + N_SINK + n_chosen + k, n - N_LOCAL + k, mask=k < N_LOCAL)
        count = N_SINK + n_chosen + N_LOCAL
        tl.store(out + k, tl.full([BLOCK_K], -1, tl.int32), mask=(k >= count) & (k < KMAX))
        tl.store(cnt_at, count)


@triton.jit
def _select_candidates_kernel(cand_ptr, s_ptr, nblk_ptr, idx_ptr, cnt_ptr, HKV, C, TOPK, N_SINK, N_LOCAL, KMAX,
                              s_cb, s_ch, s_sb, s_sh, s_ib, s_ih, C_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                              PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    _select_candidates_row(cand_ptr + i_b * s_cb + i_h * s_ch, s_ptr + i_b * s_sb + i_h * s_sh,
                           tl.load(nblk_ptr + i_b), idx_ptr + i_b * s_ib + i_h * s_ih, cnt_ptr + i_bh, C, TOPK,
                           N_SINK, N_LOCAL, KMAX, C_PAD, BLOCK_K, False)


# Warps of the candidate top-K (None: 4 up to 512 candidates, else 8; module-level for `prr bench select`'s
# sweep). H200, Llama-3.1-8B 512K, 1,005 candidates (c = 8): 4 warps 7.9 us, 8 warps 5.5, 16 warps 6.6 at b1;
# 7.6 / 5.0 / 6.0 at b8 (results/bench_select_h200.json, commit 05f882f); one warp 13-18 us
CAND_TOPK_WARPS: int | None = None


def _cand_topk_warps(c_pad: int) -> int:
    return CAND_TOPK_WARPS or (4 if c_pad <= 512 else 8)


def _check_cand(cand):
    if cand.dtype != torch.int32 or cand.stride(-1) != 1:
        raise ValueError(f"cand must be int32 with a unit last stride (got {cand.dtype}, strides {cand.stride()})")


def _out(cand, out):
    b, h, c = cand.shape
    return torch.empty(b, h, c, dtype=torch.float32, device=cand.device) if out is None else out


def _plan_args(plan, cand):
    """Kernel arguments of the fused re-score bookkeeping: (step, nblk_scan, nblk_out, R), or placeholders."""
    if plan is None:
        return cand, cand, cand, 0
    step, nblk_scan, new_slots, nblk_out = plan
    for name, t, dt in (("step", step, torch.int64), ("nblk_scan", nblk_scan, torch.int32),
                        ("nblk_out", nblk_out, torch.int32)):
        if t.dtype != dt or not t.is_contiguous() or t.shape != (cand.shape[0],):
            raise ValueError(f"plan: {name} must be a contiguous [B] {dt} tensor, got {t.dtype} {tuple(t.shape)}")
    if not 0 < new_slots <= cand.shape[-1]:
        raise ValueError(f"plan: new_slots must lie in [1, C={cand.shape[-1]}], got {new_slots}")
    return step, nblk_scan, nblk_out, new_slots


def quest_candidate_scores(q, kmin, kmax, cache: KVCache, cand, block_size: int, aggregate: str = "sum", out=None,
                           plan=None, select=None):
    """Triton twin of :func:`prr.ops.candidates.reference.quest_candidate_scores` (`out` reuses a buffer;
    `plan` fuses a re-score step's bookkeeping into the launch; ``select=(top_k, n_sink, n_local, tick)``
    fuses the candidate top-K too: the last program of each row to finish, counted on ``tick`` (``[B * Hkv]``
    int32, zero between launches), selects it; returns ``(indices, counts, scores)``)."""
    check_layout(cache, q)
    _check_cand(cand)
    step, nscan, nblk_out, r = _plan_args(plan, cand)
    if kmin.stride() != kmax.stride() or kmax.stride(-1) != 1:
        raise ValueError("kmin and kmax must share strides with a unit last stride")
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    c = cand.shape[2]
    out = _out(cand, out)
    block_c = 64
    c_pad = max(16, triton.next_power_of_2(c))
    top_k, n_sink, n_local, tick = select if select is not None else (0, 0, 0, cand)
    kmax_sel = n_sink + n_local + top_k
    idx = cnt = cand  # placeholders: the launch writes them only when it selects
    if select is not None:
        if tick.dtype != torch.int32 or tick.numel() != bsz * hkv or not tick.is_contiguous():
            raise ValueError(f"select: tick must be a contiguous int32 tensor of {bsz * hkv} zeros")
        idx = torch.empty(bsz, hkv, kmax_sel, dtype=torch.int32, device=q.device)
        cnt = torch.empty(bsz, hkv, dtype=torch.int32, device=q.device)
    _quest_candidate_kernel[(bsz * hkv, triton.cdiv(c, block_c))](
        q, kmin, kmax, cache.seq_lens, cand, out, step, nscan, nblk_out, hkv, c, kmax.shape[2], r,
        q.stride(0), q.stride(1), kmax.stride(0), kmax.stride(1), kmax.stride(2), cand.stride(0), cand.stride(1),
        out.stride(0), out.stride(1), tick, idx, cnt, top_k, n_sink, n_local, kmax_sel, idx.stride(0),
        idx.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, BLOCK_C=block_c, PREC=_prec(q.dtype),
        AGG_MAX=aggregate == "max", PLAN=plan is not None, FUSE=select is not None, C_PAD=c_pad,
        BLOCK_K=max(16, triton.next_power_of_2(kmax_sel)),
        num_warps=_cand_topk_warps(c_pad) if select is not None else 4, **pdl_launch(q),
    )
    return (idx, cnt, out) if select is not None else out


def infllm_candidate_scores(q, ckeys, cache: KVCache, cand, block_size=64, window=32, stride=16, aggregate="sum",
                            out=None, plan=None):
    """Triton twin of :func:`prr.ops.candidates.reference.infllm_candidate_scores`."""
    check_layout(cache, q)
    _check_cand(cand)
    step, nscan, nblk_out, r = _plan_args(plan, cand)
    if ckeys.stride(-1) != 1:
        raise ValueError("ckeys must have a unit last stride")
    per = block_size // stride
    if per & (per - 1):
        raise ValueError(f"the Triton InfLLM-v2 scorer needs block_size / stride a power of two, got {per}")
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    c = cand.shape[2]
    out = _out(cand, out)
    block_c = 16
    _infllm_candidate_kernel[(bsz * hkv, triton.cdiv(c, block_c))](
        q, ckeys, cache.seq_lens, cand, out, step, nscan, nblk_out, hkv, c, cache.max_blocks(block_size),
        ckeys.shape[2], r, q.stride(0), q.stride(1), ckeys.stride(0), ckeys.stride(1), ckeys.stride(2),
        cand.stride(0), cand.stride(1), out.stride(0), out.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, WINDOW=window, STRIDE=stride, PER=per,
        INSIDE=(block_size - window) // stride + 1, BLOCK_C=block_c, AGG_MAX=aggregate == "max",
        PLAN=plan is not None, num_warps=4, **pdl_launch(q),
    )
    return out


def select_candidates(cand, scores, num_blocks, top_k: int, n_sink: int = 1, n_local: int = 2, out=None,
                      num_warps: int | None = None):
    """Triton twin of :func:`prr.ops.candidates.reference.select_candidates`; the valid ids of each row must be
    ascending (the result is then sorted without a sort). Ties at the K-th score go to the lowest ids.
    `out=(indices, counts)` reuses buffers; `num_warps` overrides the launch's (benchmarks)."""
    _check_cand(cand)
    if scores.dtype != torch.float32 or scores.stride(-1) != 1:
        raise ValueError(f"scores must be float32 with a unit last stride (got {scores.dtype}, {scores.stride()})")
    bsz, hkv, c = cand.shape
    kmax = n_sink + n_local + top_k
    if out is None:
        idx = torch.empty(bsz, hkv, kmax, dtype=torch.int32, device=cand.device)
        cnt = torch.empty(bsz, hkv, dtype=torch.int32, device=cand.device)
    else:
        idx, cnt = out
    nb = num_blocks if num_blocks.dtype == torch.int32 else num_blocks.to(torch.int32)
    c_pad = max(16, triton.next_power_of_2(c))
    _select_candidates_kernel[(bsz * hkv,)](
        cand, scores, nb, idx, cnt, hkv, c, top_k, n_sink, n_local, kmax,
        cand.stride(0), cand.stride(1), scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
        C_PAD=c_pad, BLOCK_K=max(16, triton.next_power_of_2(kmax)),
        num_warps=num_warps or _cand_topk_warps(c_pad), **pdl_launch(cand),
    )
    return idx, cnt




@triton.jit
def _plan_kernel(step_ptr, len_ptr, nscan_ptr, cand_ptr, scans_ptr, scan_ptr, glen_ptr, gnblk_ptr, nblk_ptr,
                 HKV, EVERY, R, C, s_cb, s_ch,
                 BS: tl.constexpr, H_PAD: tl.constexpr, R_PAD: tl.constexpr, FORCE: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_b = tl.program_id(0)
    step = tl.load(step_ptr + i_b)
    seq_len = tl.load(len_ptr + i_b)
    nscan = tl.load(nscan_ptr + i_b)
    n = (seq_len + BS - 1) // BS
    if FORCE == -1:
        scan = ((step % EVERY) == 0) | (n > nscan + R) | (n < nscan)
    else:
        scan = (n * 0 + FORCE) != 0
    tl.store(step_ptr + i_b, step + 1)
    tl.store(scans_ptr + i_b, tl.load(scans_ptr + i_b) + scan.to(tl.int64))
    nscan = tl.where(scan, n, nscan)
    tl.store(nscan_ptr + i_b, nscan)
    tl.store(scan_ptr + i_b, scan.to(tl.int32))
    tl.store(glen_ptr + i_b, tl.where(scan, seq_len, 0))
    tl.store(gnblk_ptr + i_b, tl.where(scan, n, 0))
    tl.store(nblk_ptr + i_b, n)
    i_h = tl.arange(0, H_PAD)
    i_r = tl.arange(0, R_PAD)
    new = nscan + i_r
    new = tl.where(new < n, new, -1)
    ptr = cand_ptr + i_b * s_cb + i_h[:, None] * s_ch + (C - R + i_r)[None, :]
    tl.store(ptr, tl.broadcast_to(new[None, :], (H_PAD, R_PAD)), mask=(i_h[:, None] < HKV) & (i_r[None, :] < R))


@triton.jit
def _commit_kernel(cand_ptr, idx_ptr, scan_ptr, HKV, K, s_cb, s_ch, s_ib, s_ih, K_PAD: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    if tl.load(scan_ptr + i_b) != 0:
        i_k = tl.arange(0, K_PAD)
        row = tl.load(idx_ptr + i_b * s_ib + i_h * s_ih + i_k, mask=i_k < K)
        tl.store(cand_ptr + i_b * s_cb + i_h * s_ch + i_k, row, mask=i_k < K)


def amortized_plan(step, seq_lens, nblk_scan, cand, scans, every: int, new_slots: int, block_size: int,
                   force: int = -1):
    """Triton twin of :func:`prr.ops.candidates.reference.amortized_plan`: one launch for the bookkeeping."""
    _check_cand(cand)
    check_force(force)
    for name, t, dt in (("step", step, torch.int64), ("scans", scans, torch.int64), ("seq_lens", seq_lens, torch.int32),
                        ("nblk_scan", nblk_scan, torch.int32)):
        if t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dt} tensor, got {t.dtype}")
    bsz, hkv, c = cand.shape
    out = [torch.empty(bsz, dtype=torch.int32, device=cand.device) for _ in range(4)]
    _plan_kernel[(bsz,)](step, seq_lens, nblk_scan, cand, scans, *out, hkv, every, new_slots, c, cand.stride(0),
                         cand.stride(1), BS=block_size, H_PAD=triton.next_power_of_2(hkv),
                         R_PAD=triton.next_power_of_2(new_slots), FORCE=force, num_warps=1, **pdl_launch(step))
    return tuple(out)


def commit_candidates(cand, scan_idx, scan) -> None:
    """Triton twin of :func:`prr.ops.candidates.reference.commit_candidates`."""
    _check_cand(cand)
    if scan_idx.dtype != torch.int32 or scan_idx.stride(-1) != 1:
        raise ValueError("scan_idx must be int32 with a unit last stride")
    bsz, hkv, k = scan_idx.shape
    _commit_kernel[(bsz * hkv,)](cand, scan_idx, scan, hkv, k, cand.stride(0), cand.stride(1), scan_idx.stride(0),
                                 scan_idx.stride(1), K_PAD=triton.next_power_of_2(k), num_warps=4, **pdl_launch(cand))


__all__ = ["amortized_plan", "commit_candidates", "infllm_candidate_scores", "quest_candidate_scores",
           "select_candidates"]
