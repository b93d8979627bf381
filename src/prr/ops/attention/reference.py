"""Decode attention over the paged cache, in plain PyTorch (the twin of the Triton kernels).

One query token per sequence. Query head ``i`` reads KV head ``i // G`` (GQA). Scores are scaled by
``scale`` (default ``1/sqrt(D)``); ``lse`` is the natural-log log-sum-exp of the scaled scores, float32
(float64 for float64 inputs); an empty key set gives ``o = 0, lse = -inf``.
"""

from __future__ import annotations

import math

import torch

from ...cache import KVCache
from .._common import acc_dtype, check_decode_inputs, check_query


def _softmax_state(s: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...]):
    """(o, lse) of masked scores ``s`` (-inf = masked) reduced over `dims` of s, v's trailing D."""
    lse = torch.logsumexp(s, dim=dims, keepdim=True)
    p = torch.where(torch.isfinite(lse), torch.exp(s - lse), torch.zeros_like(s))
    o = (p.unsqueeze(-1) * v).sum(dim=tuple(d - 1 if d < 0 else d for d in dims))
    return o, lse


def dense_decode(q: torch.Tensor, cache: KVCache, scale: float | None = None):
    """Attention of ``q: [B, Hq, D]`` over every cached token of its sequence (the exactness oracle).

    Returns ``o: [B, Hq, D]`` (q.dtype) and ``lse: [B, Hq]`` (float32; float64 for float64 input).
    """
    g = check_query(q, cache)
    bsz, hq, d = q.shape
    acc = acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = cache.logical("k").to(acc)  # [B, Hkv, C, D]
    v = cache.logical("v").to(acc)
    qg = q.to(acc).view(bsz, cache.num_kv_heads, g, d)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale
    valid = torch.arange(cache.capacity, device=q.device)[None, :] < cache.seq_lens[:, None]  # [B, C]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    v = torch.where(valid[:, None, :, None], v, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), torch.zeros_like(s))
    o = torch.einsum("bhgt,bhtd->bhgd", p, v)
    return o.reshape(bsz, hq, d).to(q.dtype), lse.reshape(bsz, hq)


def gather_blocks(cache: KVCache, indices: torch.Tensor, counts: torch.Tensor, block_size: int):
    """Keys, values and a validity mask of the selected blocks.

    Returns ``k, v: [B, Hkv, K, BS, D]`` (cache dtype) and ``valid: [B, Hkv, K, BS]`` (slot ``< counts`` and
    token ``< seq_len``). Padded slots read block 0 and are masked.
    """
    bsz, hkv, kmax = indices.shape
    ppb = block_size // cache.page_size
    blk = torch.where(indices >= 0, indices, torch.zeros_like(indices)).long()  # [B, Hkv, K]
    lpage = blk[..., None] * ppb + torch.arange(ppb, device=cache.device)  # [B, Hkv, K, ppb]
    lpage = lpage.clamp(max=cache.max_pages - 1).reshape(bsz, hkv, kmax * ppb)
    rows = torch.arange(bsz, device=cache.device)[:, None, None]
    phys = cache.page_table.long()[rows, lpage].clamp(0, cache.k.shape[0] - 1)  # [B, Hkv, K*ppb]
    heads = torch.arange(hkv, device=cache.device)[None, :, None]
    shape = (bsz, hkv, kmax, block_size, cache.head_dim)
    k = cache.k[phys, heads].reshape(shape)
    v = cache.v[phys, heads].reshape(shape)
    pos = blk[..., None] * block_size + torch.arange(block_size, device=cache.device)  # [B, Hkv, K, BS]
    slot_ok = torch.arange(kmax, device=cache.device)[None, None, :] < counts[..., None]
    valid = slot_ok[..., None] & (indices[..., None] >= 0) & (pos < cache.seq_lens[:, None, None, None])
    return k, v, valid


def sparse_decode(
    q: torch.Tensor,
    cache: KVCache,
    indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    return_block_states: bool = False,
):
    """Attention of each query head over the blocks its KV head selected.

    Args:
        q: ``[B, Hq, D]``, same dtype and device as the cache.
        cache: the paged KV cache.
        indices: ``[B, Hkv, K]`` int32 block ids (any order, no duplicates); slots ``>= counts`` and -1 are
            padding.
        counts: ``[B, Hkv]`` int32, the number of valid slots.
        block_size: tokens per block, a power of two and a multiple of the page size. Tokens past
            ``seq_len`` in a partial last block are masked.
        return_block_states: also return the per-slot partial states.

    Returns:
        ``o: [B, Hq, D]`` (q.dtype), ``lse: [B, Hq]`` (float32; float64 for float64 input); with
        `return_block_states`, also ``block_o: [B, Hq, K, D]`` and ``block_lse: [B, Hq, K]`` (float32 /
        float64; padding slots are ``(0, -inf)``), whose merge equals ``(o, lse)``.
    """
    g = check_decode_inputs(q, cache, indices, counts, block_size)
    bsz, hq, d = q.shape
    acc = acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v, valid = gather_blocks(cache, indices, counts, block_size)
    kmax = indices.shape[-1]
    qg = q.to(acc).view(bsz, cache.num_kv_heads, g, d)
    s = torch.einsum("bhgd,bhktd->bhgkt", qg, k.to(acc)) * scale  # [B, Hkv, G, K, BS]
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    # Masked tokens may hold garbage (NaN in never-written pages): zero them, 0 * NaN would leak.
    vv = torch.where(valid[..., None], v.to(acc), 0.0)[:, :, None]  # [B, Hkv, 1, K, BS, D]
    o, lse = _softmax_state(s, vv, dims=(-2, -1))
    o = o.reshape(bsz, hq, d).to(q.dtype)
    lse = lse.reshape(bsz, hq)
    if not return_block_states:
        return o, lse
    bo, blse = _softmax_state(s, vv, dims=(-1,))
    return o, lse, bo.reshape(bsz, hq, kmax, d), blse.reshape(bsz, hq, kmax)


def block_states(q, cache: KVCache, indices, counts, block_size: int, scale: float | None = None):
    """Only the per-slot partial states of :func:`sparse_decode` (PRR's exact-mode speculation):
    ``block_o [B, Hq, K, D]``, ``block_lse [B, Hq, K]`` float32 (float64 for float64 input), padding ``(0, -inf)``."""
    return sparse_decode(q, cache, indices, counts, block_size, scale, return_block_states=True)[2:]
