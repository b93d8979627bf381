"""merge_states: the identity attn(A ∪ B) == merge(attn(A), attn(B)) behind every repair."""

import pytest
import torch

import prr

from conftest import make_cache, make_query


def _random_partition(n_blocks, parts, gen):
    owner = torch.randint(0, parts, (n_blocks,), generator=gen)
    return [torch.nonzero(owner == p).flatten() for p in range(parts)]


def _as_selection(blocks, cache, kmax):
    idx = torch.full((cache.batch, cache.num_kv_heads, kmax), -1, dtype=torch.int32)
    idx[..., : len(blocks)] = blocks.to(torch.int32)
    cnt = torch.full((cache.batch, cache.num_kv_heads), len(blocks), dtype=torch.int32)
    return idx, cnt


@pytest.mark.parametrize("parts", [2, 3, 7], ids=lambda p: f"{p}-way")
def test_merge_of_disjoint_parts_equals_attention_over_union(parts):
    cache = make_cache([333], hkv=2, d=64)
    q = make_query(cache, 4)
    nb = -(-333 // 16)
    pieces = _random_partition(nb, parts, torch.Generator().manual_seed(parts))
    os, lses = [], []
    for blocks in pieces:  # some parts may be empty: they must weigh nothing
        o, lse = prr.sparse_decode(q, cache, *_as_selection(blocks, cache, nb), 16)
        os.append(o)
        lses.append(lse)
    o, lse = prr.merge_states(torch.stack(os, -2), torch.stack(lses, -1))
    o_ref, lse_ref = prr.dense_decode(q, cache)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)


def test_empty_parts_are_neutral_and_all_empty_is_zero_minus_inf():
    o = torch.randn(3, 4, 8, dtype=torch.float64)
    lse = torch.randn(3, 4, dtype=torch.float64)
    lse[0, 1:] = float("-inf")  # one live part
    lse[1, :] = float("-inf")  # all empty
    o[0, 1:] = float("nan")  # an empty part's output must never leak, not even NaN garbage
    o[1] = 123.0
    out, out_lse = prr.merge_states(o, lse)
    torch.testing.assert_close(out[0], o[0, 0])
    assert out_lse[0] == lse[0, 0]
    assert torch.all(out[1] == 0) and out_lse[1] == float("-inf")
    assert not torch.isnan(out).any()


def test_merge_two_matches_merge_states_and_is_order_free():
    o = torch.randn(5, 2, 16, dtype=torch.float64)
    lse = torch.randn(5, 2, dtype=torch.float64) * 10
    a = prr.merge_two(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1])
    b = prr.merge_two(o[:, 1], lse[:, 1], o[:, 0], lse[:, 0])
    c = prr.merge_states(o, lse)
    for x, y in ((a, b), (a, c)):
        torch.testing.assert_close(x[0], y[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(x[1], y[1], rtol=1e-13, atol=1e-13)


def test_merge_is_stable_for_huge_lse():
    o = torch.randn(4, 3, 8)
    lse = torch.tensor([[1e4, 1e4 - 1, -1e4]] * 4)
    out, out_lse = prr.merge_states(o, lse)
    assert torch.isfinite(out).all() and torch.isfinite(out_lse).all()
    w = torch.softmax(lse.double(), -1)
    torch.testing.assert_close(out.double(), (w[..., None] * o.double()).sum(-2), rtol=1e-5, atol=1e-6)
