"""Top-K selection with forced blocks, set operations, and what the selectors capture."""

import pytest
import torch

import prr

from conftest import make_cache, make_query


def _sets(idx, cnt):
    return [[set(idx[b, h, : cnt[b, h]].tolist()) for h in range(idx.shape[1])] for b in range(idx.shape[0])]


def test_select_forced_and_topk_and_padding():
    scores = torch.tensor([[[9.0, 1, 5, 7, 2, 8, 3, 0, 6, 4]]])
    idx, cnt = prr.select_blocks(scores, torch.tensor([10]), top_k=3, n_sink=1, n_local=2)
    # sink {0}, local {8, 9}, best of the rest {5, 3, 2}
    assert idx.tolist() == [[[0, 2, 3, 5, 8, 9]]] and cnt.tolist() == [[6]]
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    # Fewer live blocks than the budget: every live block, sorted, -1 padded; dead blocks never picked.
    idx, cnt = prr.select_blocks(scores, torch.tensor([5]), top_k=3, n_sink=1, n_local=2)
    assert idx.tolist() == [[[0, 1, 2, 3, 4, -1]]] and cnt.tolist() == [[5]]


def test_select_matches_bruteforce_on_random_scores():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 4, 50, generator=gen, dtype=torch.float64)
    nblk = torch.tensor([50, 12, 31], dtype=torch.int32)
    idx, cnt = prr.select_blocks(scores, nblk, top_k=7, n_sink=2, n_local=3)
    assert idx.shape == (3, 4, 12)
    for b in range(3):
        n = int(nblk[b])
        for h in range(4):
            forced = set(range(min(2, n))) | set(range(max(0, n - 3), n))
            rest = [j for j in range(n) if j not in forced]
            rest.sort(key=lambda j: -float(scores[b, h, j]))
            want = sorted(forced | set(rest[:7])) if n > 12 else list(range(n))
            got = idx[b, h, : cnt[b, h]].tolist()
            assert got == want
            assert torch.all(idx[b, h, cnt[b, h]:] == -1)


def test_minus_inf_scores_are_never_dynamic_picks():
    scores = torch.full((1, 1, 20), float("-inf"))
    scores[0, 0, 7] = 1.0
    idx, cnt = prr.select_blocks(scores, torch.tensor([20]), top_k=4, n_sink=1, n_local=1)
    assert idx[0, 0, : cnt[0, 0]].tolist() == [0, 7, 19]


def test_set_operations():
    a = torch.tensor([[[1, 3, 5, 7, -1]]], dtype=torch.int32)
    b = torch.tensor([[[0, 3, 7, 9, 5]]], dtype=torch.int32)
    ac, bc = torch.tensor([[4]], dtype=torch.int32), torch.tensor([[3]], dtype=torch.int32)  # b's 5 is padding
    assert prr.selection_contains(a, ac, b, bc).tolist() == [[[False, True, False, True, False]]]
    d_idx, d_cnt = prr.selection_difference(a, ac, b, bc)
    assert d_idx.tolist() == [[[1, 5, -1, -1, -1]]] and d_cnt.tolist() == [[2]]


def _captured_mass(q, cache, idx, cnt, lse_dense, g):
    _, lse = prr.sparse_decode(q, cache, idx, cnt, 16)
    mass = torch.exp(lse - lse_dense)  # share of each head's attention the selection holds
    return mass.view(mass.shape[0], -1, g).sum(-1)  # group-summed, as the selectors aggregate


def test_oracle_captures_the_most_attention_mass():
    cache = make_cache([1000, 700], hkv=2, d=64)
    q = make_query(cache, 4, scale=3.0)  # peaky attention, so selections differ
    _, lse_dense = prr.dense_decode(q, cache)
    cfg = prr.SparseConfig(method="oracle", block_size=16, top_k=8)
    nblk = prr.num_blocks(cache.seq_lens, 16)
    oracle = prr.select(q, cache, prr.BlockMetadata(cfg, cache))
    quest = prr.select(q, cache, prr.BlockMetadata(cfg.replace(method="quest"), cache))
    m_oracle = _captured_mass(q, cache, oracle.indices, oracle.counts, lse_dense, 4)
    m_quest = _captured_mass(q, cache, quest.indices, quest.counts, lse_dense, 4)
    assert torch.all(m_oracle >= m_quest - 1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        rnd = torch.rand(cache.batch, 2, 63, generator=gen, dtype=torch.float64)
        idx, cnt = prr.select_blocks(rnd, nblk, 8, 1, 2)
        assert torch.all(m_oracle >= _captured_mass(q, cache, idx, cnt, lse_dense, 4) - 1e-12)
    # And the oracle's scores are the block masses: they sum to G per (sequence, KV head).
    s = oracle.scores.masked_fill(oracle.scores == float("-inf"), 0)
    torch.testing.assert_close(s.sum(-1), torch.full((2, 2), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("method", ["quest", "infllm_v2", "oracle"])
def test_selector_holds_forced_blocks_and_respects_budget(method):
    cache = make_cache([2000, 333], hkv=2, d=64)
    q = make_query(cache, 2)
    cfg = prr.SparseConfig.from_budget(method, 512)
    sel = prr.select(q, cache, prr.BlockMetadata(cfg, cache))
    assert sel.indices.shape == (2, 2, cfg.k_max) and cfg.budget_tokens == 512
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size).tolist()
    for b, n in enumerate(nblk):
        for h in range(2):
            s = sel.indices[b, h, : sel.counts[b, h]].tolist()
            assert s == sorted(set(s)) and all(0 <= j < n for j in s)
            assert 0 in s and n - 1 in s and n - 2 in s
            assert len(s) == min(n, cfg.k_max)
