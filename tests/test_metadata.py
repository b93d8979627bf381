"""Block metadata: incremental append == bulk build; Quest is an upper bound; compressed keys are means."""

import pytest
import torch

import prr

from conftest import make_cache, make_query


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
@pytest.mark.parametrize("block_size,page_size", [(16, 16), (64, 16), (32, 8)])
def test_quest_incremental_equals_bulk(dtype, block_size, page_size):
    full = make_cache([300, 211, 150], hkv=2, d=64, page_size=page_size, capacity=320, dtype=dtype)
    start = torch.tensor([170, 0, 33], dtype=torch.int32)  # one sequence starts empty
    k_all, v_all = full.logical("k"), full.logical("v")
    cache = prr.KVCache.from_dense(k_all[:, :, :170], v_all[:, :, :170], start, page_size=page_size, capacity=320,
                                   shuffle_pages=torch.Generator().manual_seed(9))
    kmin, kmax = prr.quest_metadata(cache, block_size)
    for _ in range(130):  # 130 appended tokens cross several block boundaries
        pos = cache.seq_lens.long()
        rows = torch.arange(3)
        cache.append(k_all[rows, :, pos], v_all[rows, :, pos])
        prr.quest_metadata_append(kmin, kmax, cache, block_size)
    bmin, bmax = prr.quest_metadata(cache, block_size)
    assert torch.equal(kmin, bmin) and torch.equal(kmax, bmax)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_infllm_incremental_equals_bulk(dtype):
    full = make_cache([400, 260], hkv=2, d=64, capacity=400, dtype=dtype)
    k_all, v_all = full.logical("k"), full.logical("v")
    cache = prr.KVCache.from_dense(k_all[:, :, :10], v_all[:, :, :10], [10, 0], capacity=400,
                                   shuffle_pages=torch.Generator().manual_seed(4))
    ck = prr.infllm_metadata(cache)
    for _ in range(250):
        pos = cache.seq_lens.long()
        cache.append(k_all[torch.arange(2), :, pos], v_all[torch.arange(2), :, pos])
        prr.infllm_metadata_append(ck, cache)
    assert torch.equal(ck, prr.infllm_metadata(cache))


def test_infllm_compressed_keys_are_window_means():
    cache = make_cache([100], hkv=1, d=64, capacity=128)
    ck = prr.infllm_metadata(cache, window=32, stride=16)
    k = cache.logical("k")[0, 0]
    complete = (100 - 32) // 16 + 1  # windows ending at or before token 100
    for i in range(complete):
        torch.testing.assert_close(ck[0, 0, i], k[16 * i: 16 * i + 32].mean(0), rtol=1e-13, atol=1e-13)
    assert torch.all(ck[0, 0, complete:] == 0)


@pytest.mark.parametrize("g,aggregate", [(1, "sum"), (4, "sum"), (4, "max")])
def test_quest_score_bounds_every_key_of_its_block(g, aggregate):
    cache = make_cache([203, 64], hkv=2, d=64, capacity=208)
    q = make_query(cache, g)
    kmin, kmax = prr.quest_metadata(cache, 16)
    s = prr.quest_scores(q, kmin, kmax, cache, 16, aggregate)
    k = cache.logical("k")
    qk = torch.einsum("bhgd,bhtd->bhgt", q.view(2, 2, g, 64), k)  # unscaled, like Quest
    qk = qk.sum(2) if aggregate == "sum" else qk.amax(2)
    for b, n in enumerate(cache.seq_lens.tolist()):
        for t in range(n):
            assert torch.all(s[b, :, t // 16] >= qk[b, :, t] - 1e-12)
        assert torch.all(s[b, :, -(-n // 16):] == float("-inf"))
    # A block of one repeated key scores exactly q.k (the bound is tight).
    cache.k[cache.page_table[0, 0]] = cache.k[cache.page_table[0, 0], :, :1]
    kmin, kmax = prr.quest_metadata(cache, 16)
    s = prr.quest_scores(q, kmin, kmax, cache, 16, aggregate)
    k0 = cache.k[cache.page_table[0, 0], :, 0]
    qk0 = torch.einsum("hgd,hd->hg", q[0].view(2, g, 64), k0)
    torch.testing.assert_close(s[0, :, 0], qk0.sum(-1) if aggregate == "sum" else qk0.amax(-1))


def test_infllm_block_score_is_max_over_inner_windows():
    cache = make_cache([200], hkv=1, d=64, capacity=256)
    q = make_query(cache, 2)
    ck = prr.infllm_metadata(cache)
    s = prr.infllm_scores(q, ck, cache, block_size=64)
    sc = torch.einsum("gd,cd->gc", q[0], ck[0, 0]).sum(0)
    # Block j holds windows 4j, 4j+1, 4j+2 (each 32 tokens, stride 16, wholly inside 64 tokens).
    for j in range(3):
        torch.testing.assert_close(s[0, 0, j], sc[4 * j: 4 * j + 3].max())
    # Block 3 holds tokens 192..199: no complete window inside -> -inf (it is forced local anyway).
    assert s[0, 0, 3] == float("-inf")
