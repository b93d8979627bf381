"""Kernels never read or write outside their tensors, whatever the index values (a CUDA launch cannot check them
without a host sync): called below the dispatchers, which reject such inputs on the CPU."""

import torch

import prr

from conftest import make_cache, make_query

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16  # loads correctly in the CPU interpreter (bf16 does not) and on a GPU


def _to(cache, dtype):
    return prr.KVCache(cache.k.to(DEVICE, dtype), cache.v.to(DEVICE, dtype), cache.page_table.to(DEVICE),
                       cache.seq_lens.to(DEVICE))


def test_kernels_never_read_outside_their_tensors_on_bad_indices():
    """A CUDA launch cannot check index values without a host sync, so the kernels mask and clamp: block ids
    out of range (999, -5) add nothing, counts past K_max read no other row, seq_lens past the capacity and
    page-table entries outside the pool are clamped. Called below the dispatcher (which rejects these on
    the CPU), against attention over the valid blocks alone."""
    from prr.ops.attention import triton as attn_kernels
    from prr.ops.repair import triton as repair_kernels

    dtype = DTYPE
    base = make_cache([300, 170], hkv=2, d=64, capacity=320)
    cache = _to(base, dtype)
    q = make_query(base, 2).to(DEVICE, dtype)
    good = torch.tensor([[[0, 3, 7, 18], [1, 2, 5, 9]], [[0, 4, 8, 10], [2, 3, 6, 10]]], dtype=torch.int32)
    bad = good.clone()
    bad[0, 0, 1], bad[1, 1, 2] = 999, -5  # out-of-range block ids
    cnt_good = torch.tensor([[4, 4], [4, 4]], dtype=torch.int32)
    keep = (bad >= 0) & (bad < 20)
    want_idx = torch.where(keep, bad, -1).sort(-1, descending=True).values.to(DEVICE)
    want_cnt = keep.sum(-1, dtype=torch.int32).to(DEVICE)
    bad, cnt_bad = bad.to(DEVICE), torch.full((2, 2), 9, dtype=torch.int32, device=DEVICE)  # counts > K_max
    want = attn_kernels.sparse_decode(q, cache, want_idx, want_cnt, 16)
    got = attn_kernels.sparse_decode(q, cache, bad, cnt_bad, 16)
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    bo, blse = attn_kernels.block_states(q, cache, good.to(DEVICE), cnt_good.to(DEVICE), 16)
    so, slse = repair_kernels.repair_launch(q, cache, 16, good.to(DEVICE), cnt_good.to(DEVICE), bad, cnt_bad, bo,
                                            blse, 1 / 8, True)
    assert torch.isfinite(so).all() and not torch.isnan(slse).any()
    # seq_lens past the capacity and page-table entries outside the pool: finite numbers, no fault
    wild = prr.KVCache(cache.k, cache.v, cache.page_table.clone(), cache.seq_lens.clone())
    wild.seq_lens[0] = 10_000
    wild.page_table[1, 3] = 1_000_000
    o, lse = attn_kernels.sparse_decode(q, wild, good.to(DEVICE), cnt_good.to(DEVICE), 16)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


def test_metadata_append_kernels_touch_nothing_on_lengths_outside_the_cache():
    """seq_lens of 0 or past the capacity (unchecked on CUDA): the append kernels leave the metadata as it was
    instead of writing outside it."""
    from prr.ops.metadata import triton as meta_kernels

    base = make_cache([64, 40], hkv=2, d=64, capacity=64)
    cache = _to(base, DTYPE)
    kmin, kmax = prr.quest_metadata(cache, 16)
    ck = prr.infllm_metadata(cache, 32, 16)
    before = [t.clone() for t in (kmin, kmax, ck)]
    wild = prr.KVCache(cache.k, cache.v, cache.page_table, cache.seq_lens.clone())
    for lens in ([0, 0], [10_000, 65]):
        wild.seq_lens.copy_(torch.tensor(lens, dtype=wild.seq_lens.dtype))
        meta_kernels.quest_metadata_append(kmin, kmax, wild, 16)
        meta_kernels.infllm_metadata_append(ck, wild, 32, 16)
    for t, b in zip((kmin, kmax, ck), before, strict=True):
        assert torch.equal(t, b)
