"""Quest scoring, the top-K and PRR's speculation in one launch (twin: ``reference.select_speculate``).

Issue #10's "speculation and scoring fused into one kernel whose CTAs do both" and "the selection's top-K folded
into the score kernel's tail", as one 1-D grid of programs with two roles:

- scoring programs (``NCHUNK`` per (sequence, KV head) row, BLOCK_N blocks each): the full scorer's work
  (:func:`prr.ops.scoring.triton._quest_score_chunk`, group maxima included); then a per-row ticket (acq_rel
  atomics; the winner resets it) elects the row's last program to finish, which runs the row's top-K
  (:func:`prr.ops.select.triton._topk_row`, its loads past L1): no second launch, no launch gap;
- speculation programs (when P is given): one split of P's slots each, writing each slot's partial state
  (:func:`prr.ops.attention.triton._attend_split`), so the speculation shares the launch with the selection
  instead of queueing on a side stream behind the scorer's programs.

``spec_first`` orders the roles by program id (the hardware dispatches low ids first): speculation first lets it
finish beside the scorer, before the top-K tails; last, it fills the SMs the top-K tails leave idle.
Nothing reads device values on the host: the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..attention.triton import _attend_split, _prec, check_layout, chunk_slots, num_splits
from ..scoring.triton import _quest_score_chunk
from ..select.triton import GROUP, TOPK_SINGLE_MAX, _topk_row, topk_warps

# Blocks per scoring program and the warps of the launch (None: the top-K's rule, at least 4); module-level so
# a sweep can set them.
SELECT_SPEC_BLOCK_N = 64
SELECT_SPEC_WARPS: int | None = None


@triton.jit
def _select_spec_kernel(
    q_ptr, kmin_ptr, kmax_ptr, len_ptr, nblk_ptr, sc_ptr, gmax_ptr, tick_ptr, cg_ptr, idx_ptr, cnt_ptr,
    k_ptr, v_ptr, pt_ptr, p_idx_ptr, p_cnt_ptr, bo_ptr, blse_ptr,
    HKV, NMAX, NG, NCHUNK, TOPK, N_SINK, N_LOCAL, KMAX, NSCORE, NSPEC,
    scale, KP, PER, NSPLIT, CAP, NPAGES,
    s_qb, s_qh, s_mb, s_mh, s_mn, s_ob, s_oh, s_ib, s_ih,
    s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb, s_pib, s_pih, s_pcb, s_pch,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, AGG_MAX: tl.constexpr, GROUP: tl.constexpr,
    NG_PAD: tl.constexpr, TG_PAD: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr,
    NMAX_PAD: tl.constexpr, SPEC: tl.constexpr, SPEC_FIRST: tl.constexpr,
):
    pid = tl.program_id(0)
    if SPEC_FIRST:
        is_spec = pid < NSPEC
        sp = pid - NSPEC
        wp = pid
    else:
        is_spec = pid >= NSCORE
        sp = pid
        wp = pid - NSCORE
    if SPEC and is_spec:
        _attend_split(q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr, p_idx_ptr, p_cnt_ptr, bo_ptr, blse_ptr, bo_ptr,
                      blse_ptr, wp // NSPLIT, wp % NSPLIT, scale, HKV, KP, PER, NSPLIT, CAP, NPAGES,
                      s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb, s_pib, s_pih, s_pcb, s_pch,
                      G, G_PAD, D, BS, PAGE, CHUNK, PREC, False, True)
    else:
        i_bh = sp // NCHUNK
        _quest_score_chunk(q_ptr, kmin_ptr, kmax_ptr, len_ptr, sc_ptr, gmax_ptr, i_bh, sp % NCHUNK, HKV, NMAX,
                           NG, N_SINK, N_LOCAL, s_qb, s_qh, s_mb, s_mh, s_mn, s_ob, s_oh,
                           G, G_PAD, D, BS, BLOCK_N, PREC, AGG_MAX, GROUP, not SINGLE)
        tl.debug_barrier()  # every thread's stores before the ticket's release
        ticket = tl.atomic_add(tick_ptr + i_bh, 1, sem="acq_rel")
        if ticket == NCHUNK - 1:  # the row's last scoring program: select the row
            tl.atomic_xchg(tick_ptr + i_bh, 0)
            i_b = i_bh // HKV
            i_h = i_bh % HKV
            n = tl.minimum(tl.maximum(tl.load(nblk_ptr + i_b), 0), NMAX)
            _topk_row(sc_ptr + i_b * s_ob + i_h * s_oh, n, gmax_ptr + i_bh * NG, cg_ptr + i_bh * TG_PAD,
                      idx_ptr + i_b * s_ib + i_h * s_ih, cnt_ptr + i_bh, NMAX, NG, TOPK, N_SINK, N_LOCAL, KMAX,
                      GROUP, NG_PAD, TG_PAD, BLOCK_K, SINGLE, NMAX_PAD, True)


class SelectSpecBuffers:
    """The launch's fixed scratch: the per-row tickets (zero between launches; the kernel resets them) and the
    top-K's candidate-group rows. Keep one per (layer, shape) and pass it to every call (graph replays too)."""

    def __init__(self, rows: int, top_k: int, nmax: int, device):
        ng = triton.cdiv(nmax, GROUP)
        self.tg_pad = max(16, triton.next_power_of_2(min(top_k, ng)))
        self.tick = torch.zeros(rows, dtype=torch.int32, device=device)
        self.cg = torch.empty(rows, self.tg_pad, dtype=torch.int32, device=device)
        self.gmax = torch.empty(rows, ng, dtype=torch.int32, device=device)


def select_speculate(q, kmin, kmax, cache: KVCache, block_size, top_k, n_sink, n_local, nblk, *, aggregate="sum",
                     p_idx=None, p_cnt=None, scale=None, buffers: SelectSpecBuffers | None = None,
                     spec_first: bool = True, spec_programs: int | None = None):
    """Triton twin of :func:`prr.ops.select_spec.reference.select_speculate` (one launch). ``buffers``: the
    launch's scratch (:class:`SelectSpecBuffers`; a fresh one per call if None); ``spec_programs`` caps the
    speculation's programs (None: the attention's split rule)."""
    check_layout(cache, q)
    if kmin.stride() != kmax.stride() or kmax.stride(-1) != 1:
        raise ValueError("kmin and kmax must share strides with a unit last stride")
    if (p_idx is None) != (p_cnt is None):
        raise ValueError("p_idx and p_cnt go together")
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    rows = bsz * hkv
    nmax = kmax.shape[2]
    dev = q.device
    buf = buffers or SelectSpecBuffers(rows, top_k, nmax, dev)
    if buf.tick.numel() != rows or buf.gmax.shape != (rows, triton.cdiv(nmax, GROUP)):
        raise ValueError("buffers were made for another shape")
    kmax_sel = n_sink + n_local + top_k
    scores = torch.empty(bsz, hkv, nmax, dtype=torch.float32, device=dev)
    idx = torch.empty(bsz, hkv, kmax_sel, dtype=torch.int32, device=dev)
    cnt = torch.empty(bsz, hkv, dtype=torch.int32, device=dev)
    nb = nblk if nblk.dtype == torch.int32 else nblk.to(torch.int32)
    block_n = SELECT_SPEC_BLOCK_N
    nchunk = triton.cdiv(nmax, block_n)
    ng = triton.cdiv(nmax, GROUP)
    ng_pad = max(16, triton.next_power_of_2(ng))
    nmax_pad = max(16, triton.next_power_of_2(nmax))
    single = nmax_pad <= TOPK_SINGLE_MAX
    chunk = chunk_slots(block_size)
    spec = p_idx is not None
    bo = blse = None
    kp, per, nsplit, nspec = 1, 1, 1, 0
    if spec:
        if p_idx.stride(-1) != 1 or p_idx.dtype != torch.int32 or p_cnt.dtype != torch.int32:
            raise ValueError("p_idx and p_cnt must be int32, p_idx with a unit last stride")
        kp = p_idx.shape[-1]
        nsplit = num_splits(rows, kp, dev, chunk)
        if spec_programs:
            nsplit = max(1, min(nsplit, spec_programs // rows))
        per = chunk * -(-max(kp, 1) // (chunk * nsplit))
        nsplit = -(-max(kp, 1) // per)
        nspec = rows * nsplit
        bo = torch.empty(bsz, hq, kp, d, dtype=torch.float32, device=dev)
        blse = torch.empty(bsz, hq, kp, dtype=torch.float32, device=dev)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pi, pc = (p_idx, p_cnt) if spec else (idx, cnt)  # placeholders when there is no speculation
    lens = cache.seq_lens if cache.seq_lens.dtype == torch.int32 else cache.seq_lens.to(torch.int32)
    pt = cache.page_table
    warps = SELECT_SPEC_WARPS or max(4, topk_warps(max(ng_pad, buf.tg_pad * GROUP, nmax_pad if single else 0)))
    nscore = rows * nchunk
    _select_spec_kernel[(nscore + nspec,)](
        q, kmin, kmax, lens, nb, scores, buf.gmax, buf.tick, buf.cg, idx, cnt,
        cache.k, cache.v, pt, pi, pc, bo if spec else scores, blse if spec else scores,
        hkv, nmax, ng, nchunk, top_k, n_sink, n_local, kmax_sel, nscore, nspec,
        scale, kp, per, nsplit, pt.shape[1] * cache.page_size, cache.k.shape[0],
        q.stride(0), q.stride(1), kmax.stride(0), kmax.stride(1), kmax.stride(2), scores.stride(0),
        scores.stride(1), idx.stride(0), idx.stride(1),
        *cache.k.stride()[:3], *cache.v.stride()[:3], pt.stride(0),
        pi.stride(0), pi.stride(1), pc.stride(0), pc.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, PAGE=cache.page_size, CHUNK=chunk,
        BLOCK_N=block_n, PREC=_prec(q.dtype), AGG_MAX=aggregate == "max", GROUP=GROUP, NG_PAD=ng_pad,
        TG_PAD=buf.tg_pad, BLOCK_K=max(16, triton.next_power_of_2(kmax_sel)), SINGLE=single,
        NMAX_PAD=nmax_pad if single else 16, SPEC=spec, SPEC_FIRST=spec_first, num_warps=warps,
    )
    return scores, idx, cnt, bo, blse
