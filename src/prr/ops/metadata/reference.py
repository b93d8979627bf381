"""Block metadata for DSA selection, built in bulk and updated in place one token at a time.

Quest: per sequence, KV head and block, the element-wise min and max of the block's keys:
``kmin, kmax: [B, Hkv, N_max, D]`` in the cache dtype (min/max are exact in any dtype). Blocks past a
sequence's end hold ``(+inf, -inf)``.

InfLLM-v2-style compressed keys: the mean of the keys over windows of ``window`` tokens every ``stride``
tokens, ``ckeys: [B, Hkv, C_max, D]`` float32, with ``C_max = (capacity - window) // stride + 1``. Only
complete windows (``i*stride + window <= seq_len``) are defined; the others hold 0 and are never read.

The ``*_append`` functions take the cache *after* ``KVCache.append`` and fold in the token at
``seq_len - 1`` of every sequence, with no host sync; the result equals a bulk rebuild bit for bit.
"""

from __future__ import annotations

import torch

from ... import _checks as check
from ...cache import KVCache
from .._common import check_block_size


def quest_metadata(cache: KVCache, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bulk Quest metadata of every sequence: ``(kmin, kmax)``, each ``[B, Hkv, N_max, D]``.

    Built one sequence at a time, so the temporaries stay at one sequence's keys (long contexts on a GPU).
    """
    check_block_size(block_size, cache.page_size)
    nmax = cache.max_blocks(block_size)
    shape = (cache.batch, cache.num_kv_heads, nmax, cache.head_dim)
    kmin = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    kmax = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    pos = torch.arange(nmax * block_size, device=cache.device)
    for b in range(cache.batch):
        # [Hkv, N_max * BS, D], zero past the capacity
        k = torch.nn.functional.pad(cache.sequence(b), (0, 0, 0, nmax * block_size - cache.capacity))
        valid = (pos < cache.seq_lens[b])[None, :, None]
        blocks = (cache.num_kv_heads, nmax, block_size, cache.head_dim)
        kmin[b] = k.masked_fill(~valid, float("inf")).view(blocks).amin(dim=2)
        kmax[b] = k.masked_fill(~valid, float("-inf")).view(blocks).amax(dim=2)
    return kmin, kmax


def _last_token(cache: KVCache, which: str = "k") -> torch.Tensor:
    """The newest key of every sequence: ``[B, Hkv, D]``."""
    pool = cache.k if which == "k" else cache.v
    pos = (cache.seq_lens.long() - 1).clamp(min=0)
    rows = torch.arange(cache.batch, device=cache.device)
    page = cache.page_table.long()[rows, pos // cache.page_size]
    return pool[page, :, pos % cache.page_size]


def check_quest_append(kmin, kmax, cache: KVCache, block_size: int) -> None:
    check_block_size(block_size, cache.page_size)
    nmax = cache.max_blocks(block_size)
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        check.tensor(name, t, ndim=4, device=cache.device)
        check.shape(name, t, (cache.batch, cache.num_kv_heads, nmax, cache.head_dim))
        check.same_dtype(name, t, cache.dtype, "the cache")
    check_has_token(cache)


def check_has_token(cache: KVCache) -> None:
    """The appends fold in the token at ``seq_len - 1``: every sequence must hold one (a value check)."""
    check.in_range("cache.seq_lens", cache.seq_lens, 1, cache.capacity,
                   "metadata appends run after KVCache.append: every sequence needs a newest token")


def quest_metadata_append(kmin: torch.Tensor, kmax: torch.Tensor, cache: KVCache, block_size: int) -> None:
    """Fold the token at ``seq_len - 1`` of each sequence into its block's min/max, in place."""
    check_quest_append(kmin, kmax, cache, block_size)
    knew = _last_token(cache)  # [B, Hkv, D]
    pos = (cache.seq_lens.long() - 1).clamp(min=0)
    rows = torch.arange(cache.batch, device=cache.device)
    blk = pos // block_size
    first = (pos % block_size == 0)[:, None, None]
    kmin[rows, :, blk] = torch.where(first, knew, torch.minimum(kmin[rows, :, blk], knew))
    kmax[rows, :, blk] = torch.where(first, knew, torch.maximum(kmax[rows, :, blk], knew))


def _check_window(window: int, stride: int) -> None:
    check.positive_int("window", window)
    check.positive_int("stride", stride)
    if window % stride:
        raise ValueError(f"window={window} must be a multiple of stride={stride}")


def num_windows(capacity: int, window: int, stride: int) -> int:
    return max(0, (capacity - window) // stride + 1)


def _window_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim -2 of ``[..., window, D]`` in float32 (float64 stays); shared by bulk and append."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc).contiguous().sum(dim=-2) / x.shape[-2]


def infllm_metadata(cache: KVCache, window: int = 32, stride: int = 16) -> torch.Tensor:
    """Bulk compressed keys ``[B, Hkv, C_max, D]`` (float32; float64 for a float64 cache)."""
    _check_window(window, stride)
    cmax = num_windows(cache.capacity, window, stride)
    if cmax == 0:
        raise ValueError(f"the cache capacity ({cache.capacity}) is shorter than one window ({window})")
    acc = torch.float64 if cache.dtype == torch.float64 else torch.float32
    out = torch.empty(cache.batch, cache.num_kv_heads, cmax, cache.head_dim, dtype=acc, device=cache.device)
    starts = torch.arange(cmax, device=cache.device) * stride
    tok = starts[:, None] + torch.arange(window, device=cache.device)  # [C_max, window]
    for b in range(cache.batch):  # one sequence at a time: the window gather doubles the keys' size
        c = _window_mean(cache.sequence(b)[:, tok])  # [Hkv, C_max, D]
        complete = (starts + window) <= cache.seq_lens[b]
        out[b] = c.masked_fill(~complete[None, :, None], 0.0)
    return out


def check_infllm_append(ckeys, cache: KVCache, window: int, stride: int) -> int:
    _check_window(window, stride)
    cmax = num_windows(cache.capacity, window, stride)
    check.tensor("ckeys", ckeys, ndim=4, device=cache.device)
    check.shape("ckeys", ckeys, (cache.batch, cache.num_kv_heads, cmax, cache.head_dim))
    check_has_token(cache)
    return cmax


def infllm_metadata_append(ckeys: torch.Tensor, cache: KVCache, window: int = 32, stride: int = 16) -> None:
    """Write the compressed key whose window the newest token completes (if any), in place."""
    cmax = check_infllm_append(ckeys, cache, window, stride)
    end = cache.seq_lens.long()  # one past the newest token
    start = end - window
    done = (start >= 0) & (start % stride == 0)  # [B]
    i = (start // stride).clamp(0, cmax - 1)
    pos = start.clamp(min=0)[:, None] + torch.arange(window, device=cache.device)  # [B, window]
    pages = cache.page_table.long().gather(1, pos // cache.page_size)  # [B, window]
    win = cache.k[pages, :, pos % cache.page_size]  # [B, window, Hkv, D]
    c = _window_mean(win.transpose(1, 2))  # [B, Hkv, D]
    rows = torch.arange(cache.batch, device=cache.device)
    ckeys[rows, :, i] = torch.where(done[:, None, None], c.to(ckeys.dtype), ckeys[rows, :, i])
