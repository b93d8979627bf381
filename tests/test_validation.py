"""Bad input fails early with a clear ValueError/TypeError naming the argument, and changes nothing."""

import pytest
import torch

import prr

from conftest import all_blocks, make_cache, make_query


@pytest.fixture
def setup():
    cache = make_cache([100, 50], hkv=2, d=64, capacity=128)
    q = make_query(cache, 4)
    idx, cnt = all_blocks(cache, 16)
    return cache, q, idx, cnt


def test_query_shape_dtype_device_and_nan(setup):
    cache, q, idx, cnt = setup
    with pytest.raises(ValueError, match=r"q must have shape \[2, \*, 64\]"):
        prr.sparse_decode(q[..., :32], cache, idx, cnt, 16)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        prr.dense_decode(q[0], cache)
    with pytest.raises(TypeError, match="q has dtype torch.float32 but the cache has torch.float64"):
        prr.dense_decode(q.float(), cache)
    with pytest.raises(ValueError, match="q is on meta but must be on cpu"):
        prr.dense_decode(q.to("meta"), cache)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        prr.dense_decode(q.tolist(), cache)
    bad = q.clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        prr.sparse_decode(bad, cache, idx, cnt, 16)


def test_gqa_ratio_must_divide(setup):
    cache, q, idx, cnt = setup
    with pytest.raises(ValueError, match=r"Hq=5.*multiple.*Hkv=2"):
        prr.sparse_decode(q[:, :5], cache, idx, cnt, 16)


def test_selection_shapes_and_dtypes(setup):
    cache, q, idx, cnt = setup
    with pytest.raises(ValueError, match=r"indices must have shape \[2, 2, \*\]"):
        prr.sparse_decode(q, cache, idx[:, :1], cnt, 16)
    with pytest.raises(TypeError, match="indices must have dtype in"):
        prr.sparse_decode(q, cache, idx.float(), cnt, 16)
    with pytest.raises(ValueError, match=r"counts must have shape \[2, 2\]"):
        prr.sparse_decode(q, cache, idx, cnt[:1], 16)


@pytest.mark.parametrize("block_size,match", [(24, "block_size must be a power of two"),
                                              (8, "block_size=8 must be a multiple of the page size"),
                                              (0, "block_size must be > 0")])
def test_block_size_rules(setup, block_size, match):
    cache, q, idx, cnt = setup
    with pytest.raises(ValueError, match=match):
        prr.sparse_decode(q, cache, idx, cnt, block_size)
    with pytest.raises(ValueError, match=match):
        prr.quest_metadata(cache, block_size)


def test_budget_rules():
    with pytest.raises(ValueError, match="top_k must be > 0"):
        prr.SparseConfig(top_k=0)
    with pytest.raises(ValueError, match="top_k must be > 0"):
        prr.select_blocks(torch.zeros(1, 1, 8), torch.tensor([8]), top_k=-1)
    with pytest.raises(ValueError, match="n_local must be > 0"):
        prr.SparseConfig(n_local=0)
    with pytest.raises(ValueError, match="leaves no dynamic block"):
        prr.SparseConfig.from_budget("quest", 32)
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        prr.speculative_top_k(8, 0.0)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'qwest'"):
        prr.SparseConfig(method="qwest")
    with pytest.raises(ValueError, match="unknown aggregate 'mean'"):
        prr.SparseConfig(aggregate="mean")
    cache = make_cache([100], hkv=1, d=64)
    q = make_query(cache, 1)
    meta = prr.BlockMetadata(prr.SparseConfig(top_k=2), cache)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        prr.prr_step(q, cache, meta, prr.HoltPredictor(1, 1, 1, 7), 0, mode="fast")


def test_seq_len_beyond_capacity_is_refused_and_cache_untouched():
    with pytest.raises(ValueError, match=r"seq_lens must lie in \[0, capacity=32\]"):
        prr.KVCache(torch.zeros(2, 1, 16, 8), torch.zeros(2, 1, 16, 8), torch.tensor([[0, 1]]), torch.tensor([40]))
    cache = prr.KVCache.allocate(1, 32, 1, 8)
    cache.write(torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8), torch.tensor([32], dtype=torch.int32))
    before = cache.k.clone()
    with pytest.raises(ValueError, match="capacity=32"):
        cache.append(torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    assert torch.equal(cache.k, before) and cache.seq_lens.tolist() == [32]
    with pytest.raises(ValueError, match="k holds 40 tokens, more than capacity=32"):
        prr.KVCache.from_dense(torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8), [40], capacity=32)


def test_cache_construction_checks():
    with pytest.raises(TypeError, match="cache.v has dtype"):
        prr.KVCache(torch.zeros(2, 1, 16, 8), torch.zeros(2, 1, 16, 8, dtype=torch.float16),
                    torch.tensor([[0, 1]]), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"cache.seq_lens must have shape \[1\]"):
        prr.KVCache(torch.zeros(2, 1, 16, 8), torch.zeros(2, 1, 16, 8), torch.tensor([[0, 1]]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        prr.KVCache.allocate(1, 64, 1, 8, page_size=12)
    with pytest.raises(TypeError, match="cache must be a prr.KVCache"):
        prr.dense_decode(torch.zeros(1, 1, 8), {"k": None})


def test_merge_states_shape_mismatch():
    with pytest.raises(ValueError, match=r"o must be \[..., N, D\] and lse \[..., N\]"):
        prr.merge_states(torch.zeros(2, 3, 8), torch.zeros(2, 4))


def test_calibrate_inputs():
    with pytest.raises(ValueError, match="at least 2 steps"):
        prr.calibrate(torch.zeros(1, 1, 1, 8), torch.full((1, 1), 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="out of range"):
        prr.calibrate(torch.zeros(3, 1, 1, 8), torch.full((3, 1), 8, dtype=torch.int32), 2,
                      grid={"alpha": (0.0,), "beta": (0.0,), "gamma": (0.0,)})
