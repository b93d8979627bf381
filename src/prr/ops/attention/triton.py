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
from ..backend import pdl_launch
from ..merge.triton import merge_partials
from ..pdl import pdl_prologue


@triton.jit
def _block_tokens(blk, m_c, seq_len, pt_row, CAP, NPAGES, CHUNK: tl.constexpr, BS: tl.constexpr,
                  PAGE: tl.constexpr):
    """The tokens of CHUNK blocks ``blk [CHUNK]`` (valid where ``m_c``) as one flat tile of ``T = CHUNK * BS``
    positions: (slot of each token ``[T]``, physical page ``[T]`` int64, offset in page ``[T]``, mask ``[T]``).

    Never reads outside the tensors whatever the indices (a CUDA launch cannot check them without a host
    sync): tokens outside ``[0, min(seq_len, CAP))`` are masked (CAP: the page table's row, in tokens) and
    physical pages are clamped into the pool's ``NPAGES``. Valid inputs are unaffected; invalid ones give
    wrong numbers, not memory faults (the CPU reference and ``prr.set_debug`` reject them)."""
    T: tl.constexpr = CHUNK * BS
    tok = tl.reshape(blk[:, None] * BS + tl.arange(0, BS)[None, :], (T,))
    slot = tl.reshape(tl.broadcast_to(tl.arange(0, CHUNK)[:, None], (CHUNK, BS)), (T,))
    m_t = tl.reshape(tl.broadcast_to(m_c[:, None], (CHUNK, BS)), (T,))
    m_t = m_t & (tok < seq_len) & (tok >= 0) & (tok < CAP)
    phys = tl.load(pt_row + tok // PAGE, mask=m_t, other=0)
    phys = tl.minimum(tl.maximum(phys, 0), NPAGES - 1).to(tl.int64)
    return slot, phys, (tok % PAGE).to(tl.int64), m_t


@triton.jit
def _chunk_tokens(idx_row, c0, end, seq_len, pt_row, CAP, NPAGES, CHUNK: tl.constexpr, BS: tl.constexpr,
                  PAGE: tl.constexpr):
    """The tokens of slots ``c0 .. c0+CHUNK-1`` of a selection row (see :func:`_block_tokens`). All block ids
    are loaded at once, then all page ids: two dependent loads per chunk, not two per block."""
    i_c = c0 + tl.arange(0, CHUNK)
    m_c = i_c < end
    blk = tl.load(idx_row + i_c, mask=m_c, other=0)
    return _block_tokens(blk, m_c, seq_len, pt_row, CAP, NPAGES, CHUNK, BS, PAGE)


@triton.jit
def _chunk_scores(q, k_ptr, v_ptr, phys, off, m_t, h, scale, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                  D: tl.constexpr, PREC: tl.constexpr):
    """Masked scores ``[G_PAD, T]`` of the packed query rows against a token tile, and its values ``[T, D]``."""
    i_d = tl.arange(0, D)
    b_k = tl.load(k_ptr + phys[:, None] * s_kp + h * s_kh + off[:, None] * s_ks + i_d[None, :],
                  mask=m_t[:, None], other=0.0)
    b_v = tl.load(v_ptr + phys[:, None] * s_vp + h * s_vh + off[:, None] * s_vs + i_d[None, :],
                  mask=m_t[:, None], other=0.0)
    if PREC == "ieee":  # fp32 inputs: exact fp32 products (the CPU interpreter also takes this path)
        s = tl.dot(q, tl.trans(b_k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(b_k))
    return tl.where(m_t[None, :], s * scale, float("-inf")), b_v


@triton.jit
def _pv(p, b_v, PREC: tl.constexpr):
    if PREC == "ieee":
        return tl.dot(p, b_v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(b_v.dtype), b_v)


@triton.jit
def _online_update(m_i, l_i, acc, s, b_v, PREC: tl.constexpr):
    """Fold masked scores ``s [G_PAD, T]`` and values into the running (max, sum, unnormalised output)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + _pv(p, b_v, PREC)


@triton.jit
def _store_state(o_ptr, lse_ptr, row, m_i, l_i, acc, m_g, D: tl.constexpr):
    i_d = tl.arange(0, D)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    tl.store(o_ptr + row[:, None] * D + i_d[None, :], o, mask=m_g[:, None])
    tl.store(lse_ptr + row, lse, mask=m_g)


@triton.jit
def _group_queries(q_ptr, s_qb, s_qh, HKV, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   PREC: tl.constexpr):
    """This program's (sequence, KV head) and the G query heads of the group packed as rows ``[G_PAD, D]``.

    Returns (i_b, i_h, hq [G_PAD] query-head ids, m_g [G_PAD] valid rows, q)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_g = tl.arange(0, G_PAD)
    m_g = i_g < G
    hq = i_h * G + i_g
    q = tl.load(q_ptr + i_b * s_qb + hq[:, None] * s_qh + tl.arange(0, D)[None, :], mask=m_g[:, None], other=0.0)
    if PREC == "ieee":
        q = q.to(tl.float32)
    return i_b, i_h, hq, m_g, q


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, len_ptr, idx_ptr, cnt_ptr,
    so_ptr, slse_ptr,  # split states: [B, Hq, NSPLIT, D] fp32, [B, Hq, NSPLIT] fp32
    bo_ptr, blse_ptr,  # slot states:  [B, Hq, K, D] fp32,      [B, Hq, K] fp32
    scale, HKV, K, SLOTS_PER_SPLIT, NSPLIT, CAP, NPAGES,
    s_qb, s_qh, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs, s_ptb, s_ib, s_ih, s_cb, s_ch,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    CHUNK: tl.constexpr, PREC: tl.constexpr, WRITE_SPLITS: tl.constexpr, WRITE_BLOCKS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    i_split = tl.program_id(1)
    i_b, i_h, hq, m_g, q = _group_queries(q_ptr, s_qb, s_qh, HKV, G, G_PAD, D, PREC)
    i_d = tl.arange(0, D)
    seq_len = tl.load(len_ptr + i_b)
    cnt = tl.load(cnt_ptr + i_b * s_cb + i_h * s_ch)
    pt_row = pt_ptr + i_b * s_ptb
    idx_row = idx_ptr + i_b * s_ib + i_h * s_ih
    start = i_split * SLOTS_PER_SPLIT
    end = tl.minimum(tl.minimum(start + SLOTS_PER_SPLIT, cnt), K)  # counts past K_max read no other row

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for c0 in range(start, end, CHUNK):
        _, phys, off, m_t = _chunk_tokens(idx_row, c0, end, seq_len, pt_row, CAP, NPAGES, CHUNK, BS, PAGE)
        s, b_v = _chunk_scores(q, k_ptr, v_ptr, phys, off, m_t, i_h, scale, s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
                               D, PREC)
        if WRITE_BLOCKS:  # each slot's own state: the tile seen as [CHUNK, G_PAD, BS], one batched dot
            s3 = tl.permute(tl.reshape(s, (G_PAD, CHUNK, BS)), (1, 0, 2))
            m_c = tl.max(s3, axis=2)  # [CHUNK, G_PAD]
            m_safe = tl.where(m_c > float("-inf"), m_c, 0.0)
            p3 = tl.exp(s3 - m_safe[:, :, None])
            l_c = tl.sum(p3, axis=2)
            v3 = tl.reshape(b_v, (CHUNK, BS, D))
            if PREC == "ieee":
                o3 = tl.dot(p3, v3.to(tl.float32), input_precision="ieee")
            else:
                o3 = tl.dot(p3.to(v3.dtype), v3)
            o3 = o3 / tl.where(l_c > 0, l_c, 1.0)[:, :, None]
            lse_c = tl.where(l_c > 0, m_safe + tl.log(l_c), float("-inf"))
            i_c = tl.arange(0, CHUNK)
            row = (i_b * HKV * G + hq[None, :]) * K + c0 + i_c[:, None]  # [CHUNK, G_PAD]
            m_row = m_g[None, :] & ((c0 + i_c)[:, None] < end)
            tl.store(bo_ptr + row[:, :, None] * D + i_d[None, None, :], o3, mask=m_row[:, :, None])
            tl.store(blse_ptr + row, lse_c, mask=m_row)
        if WRITE_SPLITS:
            m_i, l_i, acc = _online_update(m_i, l_i, acc, s, b_v, PREC)
    if WRITE_BLOCKS:  # padding slots of this split: the empty state (0, -inf)
        for slot in range(tl.maximum(start, cnt), tl.minimum(start + SLOTS_PER_SPLIT, K)):
            row = (i_b * HKV * G + hq) * K + slot
            tl.store(bo_ptr + row[:, None] * D + i_d[None, :], tl.zeros([G_PAD, D], tl.float32), mask=m_g[:, None])
            tl.store(blse_ptr + row, tl.full([G_PAD], float("-inf"), tl.float32), mask=m_g)
    if WRITE_SPLITS:
        _store_state(so_ptr, slse_ptr, (i_b * HKV * G + hq) * NSPLIT + i_split, m_i, l_i, acc, m_g, D)


def chunk_slots(block_size: int) -> int:
    """Slots gathered per tile: 64 tokens per tile (4 Quest pages, or one 64-token block)."""
    return max(1, 64 // block_size)


def num_splits(batch_kv_heads: int, slots: int, device: torch.device, chunk: int = 4) -> int:
    """Splits per (sequence, KV head): as many one-chunk splits as ~4 waves of the GPU allow, so batch 1 with
    few KV heads still fills it and each program issues few dependent loads."""
    chunks = max(1, -(-slots // chunk))
    if device.type != "cuda":
        return min(chunks, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(batch_kv_heads, 1))
    return min(chunks, want)


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
    chunk = chunk_slots(block_size)
    nsplit = splits or num_splits(bsz * hkv, kmax, q.device, chunk)
    per = chunk * -(-max(kmax, 1) // (chunk * nsplit))  # whole chunks per split
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
        scale, hkv, kmax, per, nsplit, pt.shape[1] * cache.page_size, cache.k.shape[0],
        q.stride(0), q.stride(1), *cache.k.stride()[:3], *cache.v.stride()[:3], pt.stride(0),
        idx.stride(0), idx.stride(1), cnt.stride(0), cnt.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=block_size, PAGE=cache.page_size,
        CHUNK=chunk, PREC=_prec(q.dtype), WRITE_SPLITS=write_splits, WRITE_BLOCKS=write_blocks,
        num_warps=4, **pdl_launch(q),
    )
    return (so, slse), (bo, blse)


def _capped_splits(q, cache: KVCache, indices, block_size, max_programs):
    """Splits per (sequence, KV head) under a grid of at most ``max_programs`` (None: the kernel's own rule)."""
    if not max_programs:
        return None
    rows = q.shape[0] * cache.num_kv_heads
    return max(1, min(num_splits(rows, indices.shape[-1], q.device, chunk_slots(block_size)), max_programs // rows))


def block_states(q, cache: KVCache, indices, counts, block_size, scale=None, max_programs=None):
    """Triton twin of :func:`prr.ops.attention.reference.block_states`: per-slot states only (no split states,
    no merge: PRR's exact-mode speculation needs nothing else). ``max_programs`` caps the grid."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    splits = _capped_splits(q, cache, indices, block_size, max_programs)
    _, (bo, blse) = sparse_decode_launch(q, cache, indices, counts, block_size, scale, write_splits=False,
                                         write_blocks=True, splits=splits)
    return bo, blse


def sparse_decode(q, cache: KVCache, indices, counts, block_size, scale=None, return_block_states=False,
                  max_programs=None):
    """Triton twin of :func:`prr.ops.attention.reference.sparse_decode` (same arguments and results);
    ``max_programs`` caps the grid."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    (so, slse), (bo, blse) = sparse_decode_launch(q, cache, indices, counts, block_size, scale,
                                                  write_blocks=return_block_states,
                                                  splits=_capped_splits(q, cache, indices, block_size, max_programs))
    o, lse = merge_partials(so, slse, out_dtype=q.dtype)
    if return_block_states:
        return o, lse, bo, blse
    return o, lse
