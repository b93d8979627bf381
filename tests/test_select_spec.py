"""One-launch scoring + top-K + speculation (prr.ops.select_spec): the Triton kernel against the separate Triton
kernels it fuses (same code paths, so bit-equal scores, selections and per-slot states) and against the float64
reference, on the CPU interpreter (fp32/fp16) and, where CUDA exists, in bf16."""

import pytest
import torch

import prr
from prr import ops
from prr.ops import select_spec as sops
from prr.ops.backend import use_backend

from conftest import make_cache, make_query

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOWP = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]

pytestmark = pytest.mark.usefixtures("poison_empty")


def _setup(lens, dtype, g=4, top_k=6, seed=0):
    base = make_cache(lens, hkv=2, d=32, capacity=max(lens) + 40, seed=seed)
    cache = prr.KVCache(base.k.to(DEVICE, dtype), base.v.to(DEVICE, dtype), base.page_table.to(DEVICE),
                        base.seq_lens.to(DEVICE))
    q = make_query(base, g, seed=seed).to(DEVICE, dtype)
    kmin, kmax = prr.quest_metadata(cache, 16)
    nblk = prr.num_blocks(cache.seq_lens, 16)
    return cache, q, kmin, kmax, nblk


def _prediction(cache, nblk, kp, seed):
    """A P of K' random dynamic blocks per row (the predictor's output format: sorted, sinks and locals in)."""
    gen = torch.Generator().manual_seed(seed)
    nmax = cache.max_blocks(16)
    fake = torch.rand(cache.batch, cache.num_kv_heads, nmax, generator=gen, dtype=torch.float64)
    with use_backend("reference"):
        return ops.select_blocks(fake.to(torch.float32).to(cache.device), nblk, kp, 1, 2)


def _separate(q, kmin, kmax, cache, nblk, top_k, p):
    scores, gmax = ops.quest_scores(q, kmin, kmax, cache, 16, group_max_for=(1, 2))
    idx, cnt = ops.select_blocks(scores, nblk, top_k, 1, 2, group_max=gmax)
    bo = blse = None
    if p is not None:
        bo, blse = ops.block_states(q, cache, p[0], p[1], 16)
    return scores, idx, cnt, bo, blse


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("two_stage", [False, True], ids=["one-search", "two-stage"])
@pytest.mark.parametrize("spec", ["none", "first", "last"])
def test_one_launch_equals_separate_kernels(dtype, two_stage, spec, monkeypatch):
    from prr.ops.select_spec import triton as k

    if two_stage:  # rows this short take one search by default: force the group stage
        monkeypatch.setattr(k, "TOPK_SINGLE_MAX", 16)
    monkeypatch.setattr(k, "SELECT_SPEC_BLOCK_N", 32)  # several scoring programs per row: the ticket matters
    lens = [1200, 37, 500]  # a row shorter than the budget selects every live block
    cache, q, kmin, kmax, nblk = _setup(lens, dtype)
    top_k = 9
    p = _prediction(cache, nblk, 12, 3) if spec != "none" else None
    with use_backend("triton"):
        buf = k.SelectSpecBuffers(cache.batch * cache.num_kv_heads, top_k, kmax.shape[2], cache.device)
        want = _separate(q, kmin, kmax, cache, nblk, top_k, p)
        for _ in range(2):  # the second call reuses the tickets the first reset
            got = sops.select_speculate(q, kmin, kmax, cache, 16, top_k, 1, 2, nblk,
                                        p_idx=None if p is None else p[0], p_cnt=None if p is None else p[1],
                                        buffers=buf, spec_first=spec == "first")
            assert torch.equal(buf.tick, torch.zeros_like(buf.tick))
            assert torch.equal(got[0], want[0])  # scores
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # S
            if p is None:
                assert got[3] is None and got[4] is None
            else:
                assert torch.equal(got[4], want[4])
                live = want[4] > float("-inf")
                assert torch.equal(got[3][live], want[3][live])


@pytest.mark.parametrize("dtype", LOWP)
def test_one_launch_against_float64_reference(dtype, monkeypatch):
    """Same selection as the float64 reference (scores far from ties here) and states within the attention
    kernels' tolerance; the rows' top-K ran in the scoring programs' tail."""
    from prr.ops.select_spec import triton as k

    monkeypatch.setattr(k, "TOPK_SINGLE_MAX", 16)
    lens = [900, 260]
    cache, q, kmin, kmax, nblk = _setup(lens, dtype, seed=5)
    p = _prediction(cache, nblk, 10, 7)
    with use_backend("triton"):
        got = sops.select_speculate(q, kmin, kmax, cache, 16, 8, 1, 2, nblk, p_idx=p[0], p_cnt=p[1])
    c64 = prr.KVCache(cache.k.double().cpu(), cache.v.double().cpu(), cache.page_table.cpu(),
                      cache.seq_lens.cpu())  # the float64 reference on the rounded inputs
    q64 = q.double().cpu()
    kmin64, kmax64 = prr.quest_metadata(c64, 16)
    want = sops.reference.select_speculate(q64, kmin64, kmax64, c64, 16, 8, 1, 2, nblk.cpu(), p_idx=p[0].cpu(),
                                           p_cnt=p[1].cpu())
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=2e-2, atol=2e-2)
    for b in range(cache.batch):
        for h in range(cache.num_kv_heads):
            assert set(got[1][b, h, : got[2][b, h]].tolist()) == set(want[1][b, h, : want[2][b, h]].tolist())
    live = want[4] > float("-inf")
    torch.testing.assert_close(got[4].cpu()[live].double(), want[4][live], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[3].cpu()[live].double(), want[3][live], rtol=2e-2, atol=2e-2)


def test_bad_inputs_fail_clearly():
    cache, q, kmin, kmax, nblk = _setup([100], torch.float32)
    p = _prediction(cache, nblk, 4, 0)
    with pytest.raises(ValueError, match="go together"):
        sops.select_speculate(q, kmin, kmax, cache, 16, 4, 1, 2, nblk, p_idx=p[0])
