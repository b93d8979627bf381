"""The paged KV cache.

Shape letters used across prr (defined once, here):

    B    batch (sequences)             Hq   query heads        Hkv  KV heads       G = Hq / Hkv
    D    head dimension                T    tokens             S    tokens per page (page_size)
    P    physical pages                BS   tokens per DSA block (a power of two, a multiple of S)
    N    blocks of a sequence          K    selected blocks (capacity K_max = n_sink + n_local + top_k)

Layout ("HND" per page, as FlashInfer calls it): ``k, v: [P, Hkv, S, D]``, so one page of one KV head is a
contiguous ``S x D`` tile. ``page_table: [B, max_pages] int32`` maps a sequence's logical page to a physical
page; a contiguous cache is the identity table. ``seq_lens: [B] int32``. The capacity of a sequence is
``max_pages * S`` tokens. Entries of ``page_table`` past a sequence's last page are never dereferenced
(kernels clamp them), so they may hold anything, -1 included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks as check


@dataclass
class KVCache:
    k: torch.Tensor  # [P, Hkv, S, D]
    v: torch.Tensor  # [P, Hkv, S, D]
    page_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32

    def __post_init__(self):
        check.tensor("cache.k", self.k, ndim=4, dtypes=check.FLOAT_DTYPES)
        dev = self.k.device
        check.tensor("cache.v", self.v, ndim=4, dtypes=check.FLOAT_DTYPES, device=dev)
        check.same_dtype("cache.v", self.v, self.k.dtype, "cache.k")
        check.shape("cache.v", self.v, tuple(self.k.shape))
        check.tensor("cache.page_table", self.page_table, ndim=2, dtypes=check.INDEX_DTYPES, device=dev)
        check.tensor("cache.seq_lens", self.seq_lens, ndim=1, dtypes=check.INDEX_DTYPES, device=dev)
        check.shape("cache.seq_lens", self.seq_lens, (self.page_table.shape[0],))
        self.check_lengths()

    # ---- geometry -------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold."""
        return self.max_pages * self.page_size

    def max_blocks(self, block_size: int) -> int:
        """Blocks of `block_size` tokens the capacity holds (``N_max``: the length of per-block buffers)."""
        return -(-self.capacity // block_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def check_lengths(self, extra: int = 0) -> None:
        """ValueError if any sequence (plus `extra` tokens) exceeds the capacity, or uses a page-table entry
        outside the page pool (value checks)."""
        if check.values_checkable(self.seq_lens):
            longest = int(self.seq_lens.max()) + extra if self.batch else 0
            if longest > self.capacity or (self.batch and int(self.seq_lens.min()) < 0):
                raise ValueError(
                    f"seq_lens must lie in [0, capacity={self.capacity}] "
                    f"(max_pages={self.max_pages} x page_size={self.page_size}); got up to {longest}"
                )
            check.page_table(self, extra)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def allocate(
        cls,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        shuffle_pages: torch.Generator | None = None,
    ) -> KVCache:
        """An empty cache of `capacity` tokens per sequence (rounded up to whole pages).

        Pages are assigned in order unless `shuffle_pages` (a generator) is given, which scatters them over
        the pool: tests use it to prove that every path honours the page table.
        """
        for name, v in (("batch", batch), ("capacity", capacity), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            check.positive_int(name, v)
        check.power_of_two("page_size", page_size)
        max_pages = -(-capacity // page_size)
        num_pages = batch * max_pages
        order = torch.arange(num_pages)
        if shuffle_pages is not None:
            order = torch.randperm(num_pages, generator=shuffle_pages)
        page_table = order.view(batch, max_pages).to(torch.int32).to(device)
        k = torch.zeros(num_pages, num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k), page_table, torch.zeros(batch, dtype=torch.int32, device=device))

    @classmethod
    def from_dense(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens,
        *,
        page_size: int = 16,
        capacity: int | None = None,
        shuffle_pages: torch.Generator | None = None,
    ) -> KVCache:
        """A cache holding ``k, v: [B, Hkv, T, D]``; sequence b keeps its first ``seq_lens[b]`` tokens."""
        check.tensor("k", k, ndim=4, dtypes=check.FLOAT_DTYPES)
        check.tensor("v", v, ndim=4, dtypes=check.FLOAT_DTYPES, device=k.device)
        check.shape("v", v, tuple(k.shape))
        bsz, hkv, t, d = k.shape
        cache = cls.allocate(bsz, capacity or max(t, 1), hkv, d, page_size=page_size, dtype=k.dtype,
                             device=k.device, shuffle_pages=shuffle_pages)
        if t > cache.capacity:
            raise ValueError(f"k holds {t} tokens, more than capacity={cache.capacity}")
        lens = torch.as_tensor(seq_lens, dtype=torch.int32, device=k.device).reshape(-1)
        check.shape("seq_lens", lens, (bsz,))
        if bool((lens > t).any()) or bool((lens < 0).any()):
            raise ValueError(f"seq_lens must lie in [0, {t}] (the tokens given), got {lens.tolist()}")
        cache.write(k, v, lens)
        return cache

    # ---- writes ---------------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Prefill: store ``k, v: [B, Hkv, T, D]`` at positions ``0..seq_lens[b]-1`` and set `seq_lens`."""
        check.tensor("k", k, ndim=4, device=self.device)
        check.same_dtype("k", k, self.dtype, "the cache")
        check.shape("k", k, (self.batch, self.num_kv_heads, None, self.head_dim))
        check.shape("v", v, tuple(k.shape))
        t = k.shape[2]
        pos = torch.arange(t, device=self.device)
        pages = self.page_table[:, pos // self.page_size].long()  # [B, T]
        keep = pos[None, :] < seq_lens[:, None].to(self.device)  # [B, T]
        offs = (pos % self.page_size)[None, :].expand_as(pages)
        self.k[pages[keep], :, offs[keep]] = k.permute(0, 2, 1, 3)[keep]
        self.v[pages[keep], :, offs[keep]] = v.permute(0, 2, 1, 3)[keep]
        self.seq_lens.copy_(seq_lens.to(self.seq_lens.dtype))
        self.check_lengths()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Decode: store one token per sequence, ``k, v: [B, Hkv, D]``, at ``seq_lens`` and advance it.

        No host sync on CUDA (the capacity check runs only where values are checkable).
        """
        check.tensor("k", k, ndim=3, device=self.device)
        check.same_dtype("k", k, self.dtype, "the cache")
        check.shape("k", k, (self.batch, self.num_kv_heads, self.head_dim))
        check.shape("v", v, tuple(k.shape))
        self.check_lengths(extra=1)
        pos = self.seq_lens.long()
        rows = torch.arange(self.batch, device=self.device)
        page = self.page_table[rows, pos // self.page_size].long()
        off = pos % self.page_size
        self.k[page, :, off] = k
        self.v[page, :, off] = v
        self.seq_lens.add_(1)

    # ---- reads (reference paths) ------------------------------------------------------------------------
    def sequence(self, b: int, which: str = "k") -> torch.Tensor:
        """Sequence b in logical order, ``[Hkv, capacity, D]`` (a copy; positions past seq_len are junk)."""
        pool = self.k if which == "k" else self.v
        pages = self.page_table[b].long().clamp(0, pool.shape[0] - 1)
        return pool[pages].permute(1, 0, 2, 3).reshape(self.num_kv_heads, self.capacity, self.head_dim)

    def logical(self, which: str = "k") -> torch.Tensor:
        """The cache in logical order, ``[B, Hkv, capacity, D]`` (a copy; positions past seq_len are junk)."""
        pool = self.k if which == "k" else self.v
        pages = self.page_table.long().clamp(0, pool.shape[0] - 1)  # [B, max_pages]
        x = pool[pages]  # [B, max_pages, Hkv, S, D]
        return x.permute(0, 2, 1, 3, 4).reshape(self.batch, self.num_kv_heads, self.capacity, self.head_dim)
