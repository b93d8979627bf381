"""Block scoring in Triton (twins: ``reference.quest_scores`` and ``reference.infllm_scores``).

Grid: (sequence x KV head, chunks of BLOCK_N blocks), so even batch 1 with two KV heads spreads a long
context over the whole GPU. The group's query heads are packed into the rows of one ``tl.dot`` (padded to 16)
and reduced (sum or max) before the single float32 store per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache import KVCache
from ..attention.triton import _prec, check_layout
from ..backend import pdl_launch
from ..pdl import pdl_prologue
from ..select.triton import GROUP, _dynamic_keys

# Tile of the Quest scoring kernel: blocks per program and warps (module-level so a sweep can set them). 64 x 2
# was the fastest of 32/64/128 x 2/4/8 in all five cases swept on the H200 (scripts/ab_select.py --sweep all).
QUEST_BLOCK_N = 64
QUEST_WARPS = 2


@triton.jit
def _aggregate_rows(s, m_g, AGG_MAX: tl.constexpr):
    if AGG_MAX:
        return tl.max(tl.where(m_g[:, None], s, float("-inf")), axis=0)
    return tl.sum(tl.where(m_g[:, None], s, 0.0), axis=0)


@triton.jit
def _store_group_max(g_row, agg, i_n, n, N_SINK, N_LOCAL, NG, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """The selection's stage 1 in the scoring kernel's tail (saves its launch): the order key of the best
    dynamic candidate (live, not sink or local, finite) of each group of GROUP blocks ``i_n [BLOCK_N]``,
    exactly what :func:`prr.ops.select.triton._group_max_kernel` stores."""
    key = _dynamic_keys(agg, i_n, n, N_SINK, N_LOCAL)
    gmax = tl.max(tl.reshape(key, (BLOCK_N // GROUP, GROUP)), axis=1)
    i_gr = tl.program_id(1) * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)  # BLOCK_N: whole groups
    tl.store(g_row + i_gr, gmax, mask=i_gr < NG)


@triton.jit
def _quest_bound(q, b_hi, b_lo, m_g, PREC: tl.constexpr, AGG_MAX: tl.constexpr):
    """Quest's bound ``q+ . max + q- . min`` of the packed query rows ``q [G_PAD, D]`` against the blocks' key
    maxima and minima ``[BLOCK, D]``, aggregated over the group's heads: ``[BLOCK]`` float32."""
    # q+ and q- are exact in the input dtype (cast back: max/min may promote bf16 to fp32).
    q_pos = tl.maximum(q, 0.0).to(q.dtype)
    q_neg = tl.minimum(q, 0.0).to(q.dtype)
    if PREC == "ieee":
        s = tl.dot(q_pos.to(tl.float32), tl.trans(b_hi.to(tl.float32)), input_precision="ieee")
        s += tl.dot(q_neg.to(tl.float32), tl.trans(b_lo.to(tl.float32)), input_precision="ieee")
    else:  # products of bf16/fp16 are exact in the float32 accumulator
        s = tl.dot(q_pos, tl.trans(b_hi))
        s += tl.dot(q_neg, tl.trans(b_lo))
    return _aggregate_rows(s, m_g, AGG_MAX)


@triton.jit
def _quest_scores_kernel(q_ptr, kmin_ptr, kmax_ptr, len_ptr, out_ptr, gmax_ptr, HKV, NMAX, NG, N_SINK, N_LOCAL,
                         s_qb, s_qh, s_mb, s_mh, s_mn, s_ob, s_oh,
                         G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         BLOCK_N: tl.constexpr, PREC: tl.constexpr, AGG_MAX: tl.constexpr, GROUP: tl.constexpr,
                         WRITE_GMAX: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    m_g = i_g < G
    nblk = (tl.load(len_ptr + i_b) + BS - 1) // BS
    m_n = (i_n < nblk) & (i_n < NMAX)  # a length past the capacity reads no metadata outside it
    if tl.program_id(1) * BLOCK_N < nblk:  # a chunk past the sequence reads no metadata and multiplies nothing
        q = tl.load(q_ptr + i_b * s_qb + (i_h * G + i_g)[:, None] * s_qh + i_d[None, :], mask=m_g[:, None],
                    other=0.0)
        off = i_b * s_mb + i_h * s_mh + i_n[:, None].to(tl.int64) * s_mn + i_d[None, :]
        b_hi = tl.load(kmax_ptr + off, mask=m_n[:, None], other=0.0)
        b_lo = tl.load(kmin_ptr + off, mask=m_n[:, None], other=0.0)
        agg = tl.where(m_n, _quest_bound(q, b_hi, b_lo, m_g, PREC, AGG_MAX), float("-inf"))
        tl.store(out_ptr + i_b * s_ob + i_h * s_oh + i_n, agg, mask=i_n < NMAX)
    else:
        agg = tl.full([BLOCK_N], float("-inf"), tl.float32)
        tl.store(out_ptr + i_b * s_ob + i_h * s_oh + i_n, agg, mask=i_n < NMAX)
    if WRITE_GMAX:
        _store_group_max(gmax_ptr + i_bh * NG, agg, i_n, tl.minimum(nblk, NMAX), N_SINK, N_LOCAL, NG, BLOCK_N,
                         GROUP)


@triton.jit
def _infllm_scores_kernel(q_ptr, ck_ptr, len_ptr, out_ptr, gmax_ptr, HKV, NMAX, CMAX, NG, N_SINK, N_LOCAL,
                          s_qb, s_qh, s_cb, s_ch, s_cn, s_ob, s_oh,
                          G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                          WINDOW: tl.constexpr, STRIDE: tl.constexpr, INSIDE: tl.constexpr,
                          BLOCK_N: tl.constexpr, AGG_MAX: tl.constexpr, GROUP: tl.constexpr,
                          WRITE_GMAX: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    PER: tl.constexpr = BS // STRIDE  # windows starting in one block; the first INSIDE lie wholly inside
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_c = tl.program_id(1) * BLOCK_N * PER + tl.arange(0, BLOCK_N * PER)  # window ids
    i_g = tl.arange(0, G_PAD)
    i_d = tl.arange(0, D)
    m_g = i_g < G
    seq_len = tl.load(len_ptr + i_b)
    ok = ((i_c * STRIDE + WINDOW) <= seq_len) & (i_c < CMAX) & ((i_c % PER) < INSIDE)
    q = tl.load(q_ptr + i_b * s_qb + (i_h * G + i_g)[:, None] * s_qh + i_d[None, :], mask=m_g[:, None], other=0.0)
    ck = tl.load(ck_ptr + i_b * s_cb + i_h * s_ch + i_c[:, None].to(tl.int64) * s_cn + i_d[None, :],
                 mask=ok[:, None], other=0.0)
    s = tl.dot(q.to(tl.float32), tl.trans(ck.to(tl.float32)), input_precision="ieee")  # [G_PAD, BLOCK_N*PER]
    agg = _aggregate_rows(s, m_g, AGG_MAX)
    agg = tl.where(ok, agg, float("-inf"))
    blk = tl.max(tl.reshape(agg, (BLOCK_N, PER)), axis=1)
    i_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nblk = (seq_len + BS - 1) // BS
    blk = tl.where(i_n < nblk, blk, float("-inf"))
    tl.store(out_ptr + i_b * s_ob + i_h * s_oh + i_n, blk, mask=i_n < NMAX)
    if WRITE_GMAX:
        _store_group_max(gmax_ptr + i_bh * NG, blk, i_n, tl.minimum(nblk, NMAX), N_SINK, N_LOCAL, NG, BLOCK_N,
                         GROUP)


def _group_max_buffer(q, hkv, nmax, forced):
    """``(buffer, NG, n_sink, n_local)`` for a scoring kernel that also writes the selection's group maxima
    (``forced = (n_sink, n_local)``), or a dummy when it does not."""
    if forced is None:
        return torch.empty(1, dtype=torch.int32, device=q.device), 1, 0, 0
    ng = triton.cdiv(nmax, GROUP)
    return torch.empty(q.shape[0] * hkv, ng, dtype=torch.int32, device=q.device), ng, *forced


def quest_scores(q, kmin, kmax, cache: KVCache, block_size: int, aggregate: str = "sum", out=None,
                 group_max_for=None):
    """Triton twin of :func:`prr.ops.scoring.reference.quest_scores` (`out` reuses a buffer).

    ``group_max_for=(n_sink, n_local)``: also return the top-K's stage-1 group maxima for that selection
    (``(scores, group_max)``; pass it on to :func:`prr.ops.select.triton.select_blocks`)."""
    check_layout(cache, q)
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    nmax = kmax.shape[2]
    if kmin.stride() != kmax.stride() or kmax.stride(-1) != 1:
        raise ValueError("kmin and kmax must share strides with a unit last stride")
    out = torch.empty(bsz, hkv, nmax, dtype=torch.float32, device=q.device) if out is None else out
    block_n = QUEST_BLOCK_N
    gmax, ng, n_sink, n_local = _group_max_buffer(q, hkv, nmax, group_max_for)
    _quest_scores_kernel[(bsz * hkv, triton.cdiv(nmax, block_n))](
        q, kmin, kmax, cache.seq_lens, out, gmax, hkv, nmax, ng, n_sink, n_local,
        q.stride(0), q.stride(1), kmax.stride(0), kmax.stride(1), kmax.stride(2), out.stride(0), out.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, BLOCK_N=block_n,
        PREC=_prec(q.dtype), AGG_MAX=aggregate == "max", GROUP=GROUP, WRITE_GMAX=group_max_for is not None,
        num_warps=QUEST_WARPS, **pdl_launch(q),
    )
    return out if group_max_for is None else (out, gmax)


def infllm_scores(q, ckeys, cache: KVCache, block_size=64, window=32, stride=16, aggregate="sum", out=None,
                  group_max_for=None):
    """Triton twin of :func:`prr.ops.scoring.reference.infllm_scores` (``group_max_for``: see
    :func:`quest_scores`)."""
    check_layout(cache, q)
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    nmax = cache.max_blocks(block_size)
    if ckeys.stride(-1) != 1:
        raise ValueError("ckeys must have a unit last stride")
    out = torch.empty(bsz, hkv, nmax, dtype=torch.float32, device=q.device) if out is None else out
    block_n = 16
    gmax, ng, n_sink, n_local = _group_max_buffer(q, hkv, nmax, group_max_for)
    _infllm_scores_kernel[(bsz * hkv, triton.cdiv(nmax, block_n))](
        q, ckeys, cache.seq_lens, out, gmax, hkv, nmax, ckeys.shape[2], ng, n_sink, n_local,
        q.stride(0), q.stride(1), ckeys.stride(0), ckeys.stride(1), ckeys.stride(2), out.stride(0), out.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, WINDOW=window, STRIDE=stride,
        INSIDE=(block_size - window) // stride + 1, BLOCK_N=block_n, AGG_MAX=aggregate == "max", GROUP=GROUP,
        WRITE_GMAX=group_max_for is not None, num_warps=4, **pdl_launch(q),
    )
    return out if group_max_for is None else (out, gmax)


__all__ = ["infllm_scores", "quest_scores"]
