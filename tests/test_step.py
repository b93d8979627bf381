"""prr_step against dsa_step: exact mode reproduces serialized DSA, union mode attends P ∪ S."""

import pytest
import torch

import prr

from conftest import make_cache, make_query


def _setup(method="quest", lens=(1500, 900), g=4, top_k=10, dtype=torch.float64):
    cache = make_cache(list(lens), hkv=2, d=64, dtype=dtype, capacity=1600)
    q = make_query(cache, g, scale=2.0)
    cfg = prr.SparseConfig.from_budget(method, (top_k + 3) * (64 if method == "infllm_v2" else 16))
    meta = prr.BlockMetadata(cfg, cache)
    nmax = -(-cache.capacity // cfg.block_size)
    return cache, q, cfg, meta, nmax


def _force_prediction(pred, sel, nblk, hit_fraction, gen):
    """Set the predictor so its dynamic top-K' holds `hit_fraction` of S's dynamic blocks, the rest misses."""
    level = torch.randn(pred.level.shape[1:], generator=gen, dtype=torch.float32) * 0.1  # [B, Hkv, N]
    in_s = prr.ops.selection_mask(sel.indices, sel.counts, level.shape[-1])
    keep = torch.rand(level.shape, generator=gen) < hit_fraction
    level = torch.where(in_s, torch.where(keep, 10.0, -10.0), level)
    pred.level[0] = level
    pred.trend[0] = 0
    pred.known[0] = nblk


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
@pytest.mark.parametrize("hit_fraction", [0.0, 0.5, 1.0], ids=["hit0", "hit0.5", "hit1"])
@pytest.mark.parametrize("ratio", [1.0, 1.5], ids=["r1", "r1.5"])
def test_prr_exact_equals_dsa_and_stats_add_up(method, hit_fraction, ratio):
    # Enough blocks outside S that a prediction can miss all of it (N - |S| >= K').
    cache, q, cfg, meta, nmax = _setup(method, lens=(1500, 1400), top_k=5 if method == "infllm_v2" else 10)
    dsa = prr.dsa_step(q, cache, meta)
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
    pred = prr.HoltPredictor(1, cache.batch, cache.num_kv_heads, nmax)
    _force_prediction(pred, dsa.selection, nblk, hit_fraction, torch.Generator().manual_seed(7))
    out = prr.prr_step(q, cache, meta, pred, 0, ratio=ratio, mode="exact")
    torch.testing.assert_close(out.o, dsa.o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.lse, dsa.lse, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.selection.indices, dsa.selection.indices)
    st = out.stats
    assert torch.equal(st.hits + st.misses, st.selected)
    assert torch.equal(st.hits + st.false_positives, st.predicted)
    assert torch.equal(st.selected, dsa.selection.counts) and torch.equal(st.predicted, out.predicted.counts)
    rate = st.hit_rate()
    assert abs(rate - hit_fraction) < 0.3 if hit_fraction == 0.5 else rate == hit_fraction
    if ratio > 1 or hit_fraction < 1:
        assert int(st.false_positives.sum()) > 0  # speculated blocks that S did not pick, discarded


@pytest.mark.parametrize("hit_fraction", [0.0, 0.5, 1.0])
def test_prr_union_equals_attention_over_p_union_s(hit_fraction):
    cache, q, cfg, meta, nmax = _setup()
    dsa = prr.dsa_step(q, cache, meta)
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
    pred = prr.HoltPredictor(1, cache.batch, cache.num_kv_heads, nmax)
    _force_prediction(pred, dsa.selection, nblk, hit_fraction, torch.Generator().manual_seed(8))
    out = prr.prr_step(q, cache, meta, pred, 0, ratio=1.5, mode="union")
    both = prr.ops.selection_mask(out.predicted.indices, out.predicted.counts, nmax) | \
        prr.ops.selection_mask(dsa.selection.indices, dsa.selection.counts, nmax)
    idx = torch.where(both, torch.arange(nmax, dtype=torch.int32), -1).sort(-1, descending=True).values
    o_ref, lse_ref = prr.sparse_decode(q, cache, idx, both.sum(-1, dtype=torch.int32), cfg.block_size)
    torch.testing.assert_close(out.o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.lse, lse_ref, rtol=1e-12, atol=1e-12)
    # Never fewer blocks than DSA: its lse (log of the attention mass covered) is at least DSA's.
    assert torch.all(out.lse >= dsa.lse - 1e-12)


def test_dsa_at_full_budget_equals_dense():
    cache = make_cache([700, 333], hkv=2, d=64, capacity=704)
    q = make_query(cache, 4)
    cfg = prr.SparseConfig(top_k=60)  # 63 blocks >= ceil(700/16) = 44
    out = prr.dsa_step(q, cache, prr.BlockMetadata(cfg, cache))
    o_ref, lse_ref = prr.dense_decode(q, cache)
    torch.testing.assert_close(out.o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.lse, lse_ref, rtol=1e-12, atol=1e-12)
    assert out.stats.hit_rate() == 1.0  # nothing dynamic


@pytest.mark.parametrize("method", ["quest", "infllm_v2", "oracle"])
def test_decode_loop_prr_tracks_dsa_with_a_drifting_query(method):
    """40 decode steps with appends: PRR exact == DSA at every step; the predictor earns real hits."""
    torch.manual_seed(1)
    b, hkv, g, d = 2, 2, 4, 64
    cache = prr.KVCache.allocate(b, 2048, hkv, d, dtype=torch.float64, shuffle_pages=torch.Generator().manual_seed(2))
    cache.write(torch.randn(b, hkv, 1200, d, dtype=torch.float64), torch.randn(b, hkv, 1200, d, dtype=torch.float64),
                torch.tensor([1200, 1000], dtype=torch.int32))
    bs = 64 if method == "infllm_v2" else 16
    cfg = prr.SparseConfig(method=method, block_size=bs, top_k=8 if bs == 64 else 16)
    meta = prr.BlockMetadata(cfg, cache)
    pred = prr.HoltPredictor(1, b, hkv, 2048 // bs, alpha=0.5)
    q = torch.randn(b, hkv * g, d, dtype=torch.float64) * 2
    rates = []
    for step in range(40):
        cache.append(torch.randn(b, hkv, d, dtype=torch.float64), torch.randn(b, hkv, d, dtype=torch.float64))
        meta.append(cache)
        q = q + 0.15 * torch.randn_like(q)  # slow drift: temporal locality
        dsa = prr.dsa_step(q, cache, meta)
        out = prr.prr_step(q, cache, meta, pred, 0, ratio=1.25)
        torch.testing.assert_close(out.o, dsa.o, rtol=1e-12, atol=1e-12)
        if step > 0:
            rates.append(out.stats.hit_rate())
    assert sum(rates) / len(rates) > 0.6, rates
