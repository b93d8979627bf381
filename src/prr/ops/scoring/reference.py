"""Block scores for DSA selection: one score per (sequence, KV head, block), GQA-aggregated.

Every scorer returns ``scores: [B, Hkv, N_max]`` float32 (float64 for float64 input) with ``-inf`` for blocks
at or past ``ceil(seq_len / BS)``. The G query heads of a group are aggregated by ``sum`` (default: more
local over time and more attention mass on real traces, DESIGN.md section 3) or ``max``.
"""

from __future__ import annotations

import math

import torch

from ... import _checks as check
from ...cache import KVCache
from .._common import (
    acc_dtype,
    check_block_size,
    check_infllm_inputs,
    check_query,
    check_quest_inputs,
    num_blocks,
)

AGGREGATES = ("sum", "max")


def check_aggregate(aggregate: str) -> str:
    return check.choice("aggregate", aggregate, AGGREGATES)


def _aggregate(s: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Reduce the G axis (dim 2) of ``[B, Hkv, G, N]``."""
    check_aggregate(aggregate)
    return s.sum(dim=2) if aggregate == "sum" else s.amax(dim=2)


def _mask_blocks(s: torch.Tensor, nblk: torch.Tensor) -> torch.Tensor:
    live = torch.arange(s.shape[-1], device=s.device)[None, :] < nblk[:, None]  # [B, N]
    return s.masked_fill(~live[:, None, :], float("-inf"))


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cache: KVCache, block_size: int,
                 aggregate: str = "sum") -> torch.Tensor:
    """Quest's upper bound ``q+ . kmax + q- . kmin`` per block (>= q.k for every key of the block).

    ``q: [B, Hq, D]``; ``kmin, kmax: [B, Hkv, N_max, D]`` from :func:`quest_metadata`.
    """
    g = check_quest_inputs(q, kmin, kmax, cache, block_size)
    nmax = kmax.shape[2]
    acc = acc_dtype(q.dtype)
    qg = q.to(acc).view(q.shape[0], cache.num_kv_heads, g, q.shape[-1])
    # Blocks past the end hold +-inf; zero them first so 0 * inf cannot make NaN.
    nblk = num_blocks(cache.seq_lens, block_size)
    live = (torch.arange(nmax, device=q.device)[None, :] < nblk[:, None])[:, None, :, None]
    hi = torch.where(live, kmax.to(acc), 0.0)
    lo = torch.where(live, kmin.to(acc), 0.0)
    s = torch.einsum("bhgd,bhnd->bhgn", qg.clamp(min=0), hi) + torch.einsum("bhgd,bhnd->bhgn", qg.clamp(max=0), lo)
    return _mask_blocks(_aggregate(s, aggregate), nblk)


def infllm_scores(q: torch.Tensor, ckeys: torch.Tensor, cache: KVCache, block_size: int = 64,
                  window: int = 32, stride: int = 16, aggregate: str = "sum") -> torch.Tensor:
    """InfLLM-v2-style: a block scores the max, over the complete windows lying inside it, of the
    group-aggregated ``q . c``. A block with no complete window inside (a short last block) scores -inf.

    ``ckeys: [B, Hkv, C_max, D]`` from :func:`infllm_metadata`.
    """
    g = check_infllm_inputs(q, ckeys, cache, block_size, window, stride)
    cmax = ckeys.shape[2]
    acc = acc_dtype(q.dtype)
    qg = q.to(acc).view(q.shape[0], cache.num_kv_heads, g, q.shape[-1])
    sc = _aggregate(torch.einsum("bhgd,bhcd->bhgc", qg, ckeys.to(acc)), aggregate)  # [B, Hkv, C]
    starts = torch.arange(cmax, device=q.device) * stride
    complete = (starts + window)[None, :] <= cache.seq_lens[:, None]  # [B, C]
    sc = sc.masked_fill(~complete[:, None, :], float("-inf"))
    nmax = cache.max_blocks(block_size)
    per_blk = block_size // stride  # windows starting in one block
    inside = (block_size - window) // stride + 1  # of which lie wholly inside it
    sc = torch.nn.functional.pad(sc, (0, nmax * per_blk - cmax), value=float("-inf"))
    s = sc.view(sc.shape[0], sc.shape[1], nmax, per_blk)[..., :inside].amax(dim=-1)
    return _mask_blocks(s, num_blocks(cache.seq_lens, block_size))


def oracle_scores(q: torch.Tensor, cache: KVCache, block_size: int, aggregate: str = "sum",
                  scale: float | None = None) -> torch.Tensor:
    """The true attention mass of each block (softmax over all tokens, summed per block), aggregated over
    the group. For evaluation: it reads the whole cache."""
    g = check_query(q, cache)
    check_block_size(block_size, cache.page_size)
    acc = acc_dtype(q.dtype)
    bsz, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nmax = cache.max_blocks(block_size)
    k = cache.logical("k").to(acc)
    k = torch.nn.functional.pad(k, (0, 0, 0, nmax * block_size - cache.capacity))
    qg = q.to(acc).view(bsz, cache.num_kv_heads, g, d)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < cache.seq_lens[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    mass = p.view(bsz, cache.num_kv_heads, g, nmax, block_size).sum(dim=-1)
    return _mask_blocks(_aggregate(mass, aggregate), num_blocks(cache.seq_lens, block_size))
