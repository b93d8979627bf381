"""sparse_decode against dense_decode and a naive per-head loop (float64, CPU)."""

import math

import pytest
import torch

import prr

from conftest import all_blocks, make_cache, make_query


def _naive(q, cache, blocks_per_head, block_size):
    """Per (sequence, query head) softmax over explicitly listed token positions."""
    bsz, hq, d = q.shape
    g = hq // cache.num_kv_heads
    k, v = cache.logical("k"), cache.logical("v")
    o = torch.zeros(bsz, hq, d, dtype=torch.float64)
    lse = torch.full((bsz, hq), float("-inf"), dtype=torch.float64)
    for b in range(bsz):
        n = int(cache.seq_lens[b])
        for h in range(hq):
            kv = h // g
            pos = [t for j in blocks_per_head[b][kv] for t in range(j * block_size, (j + 1) * block_size) if t < n]
            if not pos:
                continue
            s = (k[b, kv, pos].double() @ q[b, h].double()) / math.sqrt(d)
            lse[b, h] = torch.logsumexp(s, 0)
            o[b, h] = torch.softmax(s, 0) @ v[b, kv, pos].double()
    return o, lse


@pytest.mark.parametrize("g", [1, 4, 8], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("lens", [[1023], [63, 400, 17]], ids=["B1-partial-block", "B3-mixed"])
def test_every_block_selected_equals_dense(g, d, lens):
    cache = make_cache(lens, hkv=2, d=d, capacity=1040)
    q = make_query(cache, g)
    o, lse = prr.sparse_decode(q, cache, *all_blocks(cache, 16), 16)
    o_ref, lse_ref = prr.dense_decode(q, cache)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_size,page_size", [(16, 16), (64, 16), (32, 8)], ids=["BS16-S16", "BS64-S16", "BS32-S8"])
def test_subset_matches_naive_loop_and_block_states_merge(block_size, page_size):
    cache = make_cache([250, 97], hkv=2, d=64, page_size=page_size, capacity=256)
    q = make_query(cache, 4)
    gen = torch.Generator().manual_seed(3)
    nblk = prr.num_blocks(cache.seq_lens, block_size).tolist()
    kmax = 5
    idx = torch.full((2, 2, kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(2, 2, dtype=torch.int32)
    chosen = [[None, None], [None, None]]
    for b in range(2):
        for h in range(2):
            c = min(nblk[b], 3 + h)
            blocks = torch.randperm(nblk[b], generator=gen)[:c].sort().values
            idx[b, h, :c] = blocks.to(torch.int32)
            cnt[b, h] = c
            chosen[b][h] = blocks.tolist()
    idx[0, 0, -1] = 2  # junk past counts must be ignored
    o, lse, bo, blse = prr.sparse_decode(q, cache, idx, cnt, block_size, return_block_states=True)
    o_ref, lse_ref = _naive(q, cache, chosen, block_size)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)
    assert bo.shape == (2, 8, kmax, 64) and blse.shape == (2, 8, kmax)
    pad = torch.arange(kmax) >= cnt.repeat_interleave(4, 1)[..., None]
    assert torch.all(blse[pad] == float("-inf")) and torch.all(bo[pad] == 0)
    mo, mlse = prr.merge_states(bo, blse)
    torch.testing.assert_close(mo, o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mlse, lse, rtol=1e-12, atol=1e-12)


def test_partial_last_block_masks_tokens_past_seq_len():
    cache = make_cache([40], hkv=1, d=64, capacity=64)
    q = make_query(cache, 2)
    sel = (torch.tensor([[[2]]], dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32))
    o, lse = prr.sparse_decode(q, cache, *sel, 16)
    # Poisoning the unused tail of the block must change nothing.
    cache.k[cache.page_table[0, 2], 0, 8:] = 1e6
    cache.v[cache.page_table[0, 2], 0, 8:] = float("nan")
    o2, lse2 = prr.sparse_decode(q, cache, *sel, 16)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    o_ref, _ = _naive(q, cache, [[[2]]], 16)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)


def test_empty_selection_is_zero_minus_inf():
    cache = make_cache([100], hkv=2, d=64)
    q = make_query(cache, 2)
    idx = torch.full((1, 2, 4), -1, dtype=torch.int32)
    o, lse = prr.sparse_decode(q, cache, idx, torch.zeros(1, 2, dtype=torch.int32), 16)
    assert torch.all(o == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_torch_own(dtype):
    cache64 = make_cache([777, 300], hkv=2, d=128, capacity=784)
    q64 = make_query(cache64, 4)
    ref, _ = prr.dense_decode(q64, cache64)
    cache = prr.KVCache(cache64.k.to(dtype), cache64.v.to(dtype), cache64.page_table, cache64.seq_lens)
    q = q64.to(dtype)
    o, _ = prr.sparse_decode(q, cache, *all_blocks(cache, 16), 16)
    # PyTorch's own attention on the same rounded inputs, in the same dtype.
    k, v = cache.logical("k")[:, :, :777], cache.logical("v")[:, :, :777]
    mask = torch.arange(777)[None, :] < cache.seq_lens[:, None]
    own = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float().to(dtype), k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
        attn_mask=mask[:, None, None, :]).squeeze(2)
    err = (o.double() - ref).abs().max()
    own_err = (own.double() - ref).abs().max()
    assert err <= 2 * own_err + 1e-7, (err, own_err)


def test_scale_argument_is_honoured():
    cache = make_cache([90], hkv=1, d=64)
    q = make_query(cache, 1)
    o1, l1 = prr.dense_decode(q, cache, scale=0.5)
    o2, l2 = prr.dense_decode(q * (0.5 * 8), cache)  # default scale 1/sqrt(64) = 1/8
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)


def test_blocks_past_a_sequence_end_but_inside_the_cache_attend_nothing():
    """A selection may name a block past a sequence's current end (a finished sequence shrinks under a
    prediction made before): accepted, and it adds nothing to the attention."""
    cache = make_cache([100, 40], hkv=1, d=64, capacity=128)
    q = make_query(cache, 2)
    idx = torch.tensor([[[0, 2, -1]], [[0, 1, 5]]], dtype=torch.int32)  # sequence 1 has 3 blocks; 5 is past it
    cnt = torch.tensor([[2], [3]], dtype=torch.int32)
    o, lse = prr.sparse_decode(q, cache, idx, cnt, 16)
    o2, lse2 = prr.sparse_decode(q, cache, torch.tensor([[[0, 2, -1]], [[0, 1, -1]]], dtype=torch.int32),
                                 torch.tensor([[2], [2]], dtype=torch.int32), 16)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse2, rtol=0, atol=0)
