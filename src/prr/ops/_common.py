"""Helpers shared by the reference ops (no kernels here)."""

from __future__ import annotations

import torch

from .. import _checks as check
from ..cache import KVCache


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (exactness tests), everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_query(q: torch.Tensor, cache: KVCache) -> int:
    """Validate ``q: [B, Hq, D]`` against the cache; return G = Hq / Hkv."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a prr.KVCache, got {type(cache).__name__}")
    check.tensor("q", q, ndim=3, dtypes=check.FLOAT_DTYPES, device=cache.device)
    check.shape("q", q, (cache.batch, None, cache.head_dim))
    check.same_dtype("q", q, cache.dtype, "the cache")
    check.finite("q", q)
    check_cache_values(cache)
    return check.gqa(q.shape[1], cache.num_kv_heads)


def check_cache_values(cache: KVCache) -> None:
    """The cache may have been edited since it was built: lengths and used pages again (value checks), once per
    change of ``page_table`` or ``seq_lens`` (their version counters), not once per op of a decode step."""
    if not check.values_checkable(cache.seq_lens):
        return
    try:
        stamp = (id(cache.page_table), cache.page_table._version, id(cache.seq_lens), cache.seq_lens._version)
    except RuntimeError:  # inference-mode tensors keep no version counter: check every time
        stamp = None
    if stamp is None or getattr(cache, "_checked", None) != stamp:
        cache.check_lengths()
        cache._checked = stamp


def check_block_size(block_size: int, page_size: int) -> int:
    check.power_of_two("block_size", block_size)
    if block_size % page_size:
        raise ValueError(f"block_size={block_size} must be a multiple of the page size ({page_size})")
    return block_size


def check_selection(indices: torch.Tensor, counts: torch.Tensor, cache: KVCache, name: str = "indices"):
    check.tensor(name, indices, ndim=3, dtypes=check.INDEX_DTYPES, device=cache.device)
    check.shape(name, indices, (cache.batch, cache.num_kv_heads, None))
    cname = check.counts_name(name)
    check.tensor(cname, counts, ndim=2, dtypes=check.INDEX_DTYPES, device=cache.device)
    check.shape(cname, counts, (cache.batch, cache.num_kv_heads))


def num_blocks(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks per sequence, ``ceil(seq_len / BS)``: [B] int32."""
    return ((seq_lens + block_size - 1) // block_size).to(torch.int32)


def check_selection_values(indices, counts, cache: KVCache, block_size: int, name: str = "indices") -> None:
    """Value checks of a selection against the cache (CPU always; CUDA in debug mode): counts within K_max,
    block ids of the cache, no duplicates."""
    check.selection_values(name, indices, counts, cache.max_blocks(block_size))


def check_decode_inputs(q, cache, indices, counts, block_size, name: str = "indices") -> int:
    """Checks shared by both sparse_decode implementations; returns G."""
    g = check_query(q, cache)
    check_block_size(block_size, cache.page_size)
    check_selection(indices, counts, cache, name)
    check_selection_values(indices, counts, cache, block_size, name)
    return g


def check_quest_inputs(q, kmin, kmax, cache, block_size) -> int:
    g = check_query(q, cache)
    check_block_size(block_size, cache.page_size)
    nmax = cache.max_blocks(block_size)
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        check.tensor(name, t, ndim=4, dtypes=check.FLOAT_DTYPES, device=cache.device)
        check.shape(name, t, (cache.batch, cache.num_kv_heads, nmax, cache.head_dim))
    return g


def check_infllm_inputs(q, ckeys, cache, block_size, window, stride) -> int:
    g = check_query(q, cache)
    check_block_size(block_size, cache.page_size)
    if block_size % stride or block_size < window:
        raise ValueError(f"block_size={block_size} must be a multiple of stride={stride} and >= window={window}")
    check.tensor("ckeys", ckeys, ndim=4, dtypes=check.FLOAT_DTYPES, device=cache.device)
    # C_max windows exactly (ops.infllm_metadata's layout): the kernels index windows up to it.
    cmax = max(0, (cache.capacity - window) // stride + 1)
    check.shape("ckeys", ckeys, (cache.batch, cache.num_kv_heads, cmax, cache.head_dim))
    return g
