"""Candidate-list scoring and top-K (prr.ops.candidates): the references against the full scorers and
select_blocks (float64), and the Triton kernels against the references (interpreter on a CPU: fp32/fp16).

Tolerance rule for the scores (as tests/test_kernels.py): a few float32 ulps of the sum of |products|, against
a float64 reference on the same rounded inputs. Selections are compared as sets (no tied scores here)."""

import pytest
import torch

import prr
from prr.ops import candidates as cops
from prr.ops.backend import use_backend

from conftest import make_cache, make_query

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOWP = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]


pytestmark = pytest.mark.usefixtures("poison_empty")


def _cand(cache, bs, c, seed=0, ascending=True):
    """A random candidate list ``[B, Hkv, c]``: distinct live ids, some -1 slots, some ids past the live end
    (dead: they must score -inf and never be picked)."""
    gen = torch.Generator().manual_seed(seed)
    nmax = cache.max_blocks(bs)
    nblk = prr.num_blocks(cache.seq_lens, bs).tolist()
    out = torch.full((cache.batch, cache.num_kv_heads, c), -1, dtype=torch.int32)
    for b, n in enumerate(nblk):
        for h in range(cache.num_kv_heads):
            ids = torch.randperm(min(nmax, n + 3), generator=gen)[: c - 2]  # up to 3 dead ids
            ids = ids.sort().values if ascending else ids
            slots = torch.randperm(c, generator=gen)[: len(ids)].sort().values  # -1 slots interleaved
            out[b, h, slots] = ids.to(torch.int32)
    return out


def _gathered(full, cand):
    """``full[b, h, cand]`` with -inf at -1 slots."""
    g = full.gather(-1, cand.clamp(min=0).long())
    return g.masked_fill(cand < 0, float("-inf"))


# ---- references (float64) -------------------------------------------------------------------------------
@pytest.mark.parametrize("lens,g,aggregate", [([500, 37, 260], 4, "sum"), ([63, 1023], 1, "max"), ([16], 8, "sum")],
                         ids=["3seq-G4-sum", "63,1023-G1-max", "one-block-G8"])
def test_quest_candidate_scores_reference_equals_full_scores(lens, g, aggregate):
    cache = make_cache(lens, hkv=2, d=64, capacity=max(lens) + 40)
    q = make_query(cache, g)
    kmin, kmax = prr.quest_metadata(cache, 16)
    cand = _cand(cache, 16, 24)
    got = cops.quest_candidate_scores(q, kmin, kmax, cache, cand, 16, aggregate)
    want = _gathered(prr.quest_scores(q, kmin, kmax, cache, 16, aggregate), cand)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lens", [[700, 130], [4097, 63]], ids=["700,130", "4097,63"])
def test_infllm_candidate_scores_reference_equals_full_scores(lens):
    cache = make_cache(lens, hkv=2, d=32, capacity=max(lens) + 100)
    q = make_query(cache, 4)
    ck = prr.infllm_metadata(cache)
    cand = _cand(cache, 64, 12)
    got = cops.infllm_candidate_scores(q, ck, cache, cand, 64)
    want = _gathered(prr.infllm_scores(q, ck, cache, 64), cand)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _scattered(cand, scores, nmax):
    """Scores of the listed blocks in a ``[B, Hkv, nmax]`` row, -inf elsewhere."""
    full = torch.full((*cand.shape[:2], nmax + 1), float("-inf"), dtype=scores.dtype)
    full.scatter_(-1, torch.where(cand >= 0, cand, nmax).long().clamp(max=nmax), scores)
    return full[..., :nmax]


@pytest.mark.parametrize("nmax,c,top_k,n_sink,n_local", [(300, 60, 20, 1, 2), (50, 40, 7, 2, 3), (9, 12, 20, 1, 2),
                                                         (100, 10, 30, 1, 2)],
                         ids=["wide", "sink2-local3", "budget>=blocks", "fewer-candidates-than-K"])
def test_select_candidates_reference_equals_select_blocks_on_listed_scores(nmax, c, top_k, n_sink, n_local):
    gen = torch.Generator().manual_seed(nmax + c)
    bsz, hkv = 3, 2
    nblk = torch.tensor([nmax, max(1, nmax // 3), max(1, nmax - 1)], dtype=torch.int32)
    cand = torch.full((bsz, hkv, c), -1, dtype=torch.int32)
    for b in range(bsz):
        for h in range(hkv):  # forced blocks may be listed too: they must not take a dynamic slot
            ids = torch.randperm(nmax, generator=gen)[: c - 1]
            cand[b, h, : len(ids)] = ids.to(torch.int32)
    scores = torch.randn(bsz, hkv, c, generator=gen, dtype=torch.float64)
    scores[0, 0, :3] = float("-inf")
    idx, cnt = cops.select_candidates(cand, scores, nblk, top_k, n_sink, n_local)
    ridx, rcnt = prr.select_blocks(_scattered(cand, scores, nmax), nblk, top_k, n_sink, n_local)
    assert torch.equal(cnt, rcnt)
    assert torch.equal(idx, ridx)


def test_select_candidates_refuses_bad_input():
    cand = torch.zeros(2, 2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="scores"):
        cops.select_candidates(cand, torch.zeros(2, 2, 7), torch.ones(2, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="cand"):
        cops.select_candidates(cand.float(), torch.zeros(2, 2, 8), torch.ones(2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="top_k"):
        cops.select_candidates(cand, torch.zeros(2, 2, 8), torch.ones(2, dtype=torch.int32), 0)


# ---- kernels (interpreter on a CPU) ----------------------------------------------------------------------
def _to(cache, dtype):
    return prr.KVCache(cache.k.to(DEVICE, dtype), cache.v.to(DEVICE, dtype), cache.page_table.to(DEVICE),
                       cache.seq_lens.to(DEVICE))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("g,aggregate,c", [(1, "sum", 70), (4, "sum", 24), (8, "max", 5)],
                         ids=["G1-sum-C70", "G4-sum-C24", "G8-max-C5"])
def test_quest_candidate_kernel(dtype, g, aggregate, c):
    base = make_cache([500, 37, 260], hkv=2, d=64, capacity=527)
    cache = _to(base, dtype)
    q = make_query(base, g).to(DEVICE, dtype)
    kmin, kmax = prr.quest_metadata(cache, 16)
    cand = _cand(base, 16, c, seed=c)
    with use_backend("triton"):
        s = cops.quest_candidate_scores(q, kmin, kmax, cache, cand.to(DEVICE), 16, aggregate)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    kmin64, kmax64 = kmin.cpu().double(), kmax.cpu().double()
    s_ref = cops.quest_candidate_scores(q.cpu().double(), kmin64, kmax64, ref64, cand, 16, aggregate)
    dead = s_ref == float("-inf")
    assert s.dtype == torch.float32 and not torch.isnan(s).any()
    assert torch.equal(s.cpu() == float("-inf"), dead)
    mag = _gathered(torch.einsum("bhgd,bhnd->bhn", q.cpu().double().abs().view(3, 2, g, 64),
                                 torch.maximum(kmin64.abs(), kmax64.abs()).nan_to_num(0, 0, 0)), cand)
    assert torch.all((s.cpu().double() - s_ref).abs()[~dead] <= 1e-5 * mag[~dead] + 1e-6)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_infllm_candidate_kernel(dtype):
    base = make_cache([700, 130], hkv=2, d=64, capacity=770)
    cache = _to(base, dtype)
    q = make_query(base, 4).to(DEVICE, dtype)
    ck = prr.infllm_metadata(cache)
    cand = _cand(base, 64, 9)
    with use_backend("triton"):
        s = cops.infllm_candidate_scores(q, ck, cache, cand.to(DEVICE), 64)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    s_ref = cops.infllm_candidate_scores(q.cpu().double(), ck.cpu().double(), ref64, cand, 64)
    dead = s_ref == float("-inf")
    assert not torch.isnan(s).any()
    assert torch.equal(s.cpu() == float("-inf"), dead)
    # float32 accumulation bound, as for Quest: ulps of sum |q| |c| (the max picks one window's sum).
    mag = (q.cpu().double().abs().sum() * ck.cpu().double().abs().max()).item()
    assert torch.all((s.cpu().double() - s_ref).abs()[~dead] <= 1e-6 * mag)


@pytest.mark.parametrize("nmax,c,top_k,n_sink,n_local", [(300, 70, 20, 1, 2), (50, 40, 7, 2, 3), (9, 12, 20, 1, 2),
                                                         (4097, 523, 125, 1, 2)],
                         ids=["wide", "sink2-local3", "budget>=blocks", "C523-K125"])
def test_select_candidates_kernel_matches_reference(nmax, c, top_k, n_sink, n_local):
    gen = torch.Generator().manual_seed(c)
    bsz, hkv = 3, 2
    nblk = torch.tensor([nmax, max(1, nmax // 3), max(1, nmax - 1)], dtype=torch.int32)
    cand = torch.full((bsz, hkv, c), -1, dtype=torch.int32)
    for b in range(bsz):
        for h in range(hkv):  # ascending ids with -1 slots interleaved, forced ones included
            ids = torch.randperm(nmax, generator=gen)[: c - 3].sort().values
            slots = torch.randperm(c, generator=gen)[: len(ids)].sort().values
            cand[b, h, slots] = ids.to(torch.int32)
    scores = torch.randn(bsz, hkv, c, generator=gen)
    scores[0, 1, 5:9] = float("-inf")
    scores[1, 0, 2] = float("nan")  # never picked
    with use_backend("triton"):
        idx, cnt = cops.select_candidates(cand.to(DEVICE), scores.to(DEVICE), nblk.to(DEVICE), top_k, n_sink,
                                          n_local)
    ridx, rcnt = cops.select_candidates(cand, scores, nblk, top_k, n_sink, n_local)
    assert torch.equal(cnt.cpu(), rcnt)
    assert torch.equal(idx.cpu(), ridx)


def test_amortized_plan_and_commit_kernels_match_reference():
    """The bookkeeping of an amortized step: scan flags (period, overflow of the new-block slots, a shorter
    sequence), gated lengths, new-block slots, counters; then the commit of a scan's selection."""
    bsz, hkv, c, r = 4, 3, 12, 3
    step = torch.tensor([0, 5, 7, 9], dtype=torch.int64)  # every 4: only sequence 0 is on the period
    seq_lens = torch.tensor([100, 200, 300, 90], dtype=torch.int32)  # 7, 13, 19, 6 blocks of 16
    nblk_scan = torch.tensor([5, 12, 15, 7], dtype=torch.int32)  # seq 2: 4 new > 3 slots; seq 3 shrank
    cand = torch.arange(bsz * hkv * c, dtype=torch.int32).view(bsz, hkv, c)
    scans = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    state = [t.to(DEVICE) for t in (step, seq_lens, nblk_scan, cand, scans)]  # copies on a GPU: updated in place
    ref_state = [t.clone() for t in (step, seq_lens, nblk_scan, cand, scans)]
    with use_backend("triton"):
        got = cops.amortized_plan(*state, 4, r, 16)
    want = cops.amortized_plan(*ref_state, 4, r, 16)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.cpu(), b)
    assert want[0].tolist() == [1, 0, 1, 1] and want[1].tolist() == [100, 0, 300, 90]
    assert ref_state[3][1, 0, -r:].tolist() == [12, -1, -1]  # one block new since the scan at 12
    for a, b in zip(state, ref_state, strict=True):
        assert torch.equal(a.cpu(), b)
    s_idx = -torch.arange(bsz * hkv * 5, dtype=torch.int32).view(bsz, hkv, 5)
    planned = ref_state[3].clone()  # (on a CPU `cand` is state[3] itself, on a GPU the unplanned original)
    cand2 = ref_state[3].to(DEVICE)
    with use_backend("triton"):
        cops.commit_candidates(cand2, s_idx.to(DEVICE), want[0].to(DEVICE))
    cops.commit_candidates(ref_state[3], s_idx, want[0])
    cand2 = cand2.cpu()
    assert torch.equal(cand2, ref_state[3])
    assert torch.equal(cand2[1], planned[1]) and torch.equal(cand2[0, :, :5], s_idx[0])


@pytest.mark.parametrize("force", [1, 0], ids=["host-scan", "host-rescore"])
def test_amortized_plan_on_the_hosts_schedule(force):
    """The host's schedule overrides the device's flags: force = 1 scans every sequence (off the period too),
    force = 0 none (on the period, an overflow of the slots or a shorter sequence too: the slots list the first
    new blocks only, and a shrunk sequence lists none); the kernel equals the reference."""
    r = 3
    step = torch.tensor([0, 5, 7, 9], dtype=torch.int64)
    seq_lens = torch.tensor([100, 200, 300, 90], dtype=torch.int32)  # 7, 13, 19, 6 blocks of 16
    nblk_scan = torch.tensor([5, 12, 15, 7], dtype=torch.int32)
    cand = torch.arange(4 * 3 * 12, dtype=torch.int32).view(4, 3, 12)
    scans = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    state = [t.to(DEVICE) for t in (step, seq_lens, nblk_scan, cand, scans)]
    ref_state = [t.clone() for t in (step, seq_lens, nblk_scan, cand, scans)]
    with use_backend("triton"):
        got = cops.amortized_plan(*state, 4, r, 16, force=force)
    want = cops.amortized_plan(*ref_state, 4, r, 16, force=force)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(state, ref_state, strict=True):
        assert torch.equal(a.cpu(), b)
    assert want[0].tolist() == [force] * 4 and want[3].tolist() == [7, 13, 19, 6]
    assert ref_state[0].tolist() == [1, 6, 8, 10] and ref_state[4].tolist() == [1 + force, 2 + force, 3 + force,
                                                                                 4 + force]
    if force:
        assert want[1].tolist() == [100, 200, 300, 90] and ref_state[2].tolist() == [7, 13, 19, 6]
        assert ref_state[3][2, 1, -r:].tolist() == [-1, -1, -1]  # nothing new since this scan
    else:
        assert want[1].tolist() == [0] * 4 and ref_state[2].tolist() == [5, 12, 15, 7]
        assert ref_state[3][2, 1, -r:].tolist() == [15, 16, 17]  # 4 new blocks, 3 slots: block 18 not listed
        assert ref_state[3][3, 0, -r:].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="force"):
        cops.amortized_plan(*ref_state, 4, r, 16, force=2)


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_candidate_scores_with_the_rescore_bookkeeping_fused(method):
    """``plan=`` fuses a re-score step's bookkeeping into the candidate scorer's launch: the kernel's scores,
    list (new-block slots written back, the kept slots untouched), step counters and block counts equal the
    reference's, which equal amortized_plan(force=0) followed by the plain scorer."""
    bs = 16 if method == "quest" else 64
    cache = make_cache([1600, 1100], hkv=2, d=32, capacity=1700, dtype=torch.float32, seed=4)
    cfg = prr.SparseConfig(method=method, block_size=bs, top_k=4)
    meta = prr.BlockMetadata(cfg, cache)
    q = make_query(cache, 4)
    # The new-block slots straddle two programs' chunks (64 candidates each for Quest, 16 for InfLLM-v2).
    r, c = 3, (66 if method == "quest" else 18)
    n = prr.num_blocks(cache.seq_lens, bs)
    gen = torch.Generator().manual_seed(1)
    cand = torch.full((2, 2, c), 99, dtype=torch.int32)  # the last r slots: overwritten by the bookkeeping
    for b in range(2):
        for h in range(2):
            kept = torch.randperm(int(n[b]) - 2, generator=gen)[:c - r].sort().values
            cand[b, h, :c - r] = -1
            cand[b, h, :len(kept)] = kept.to(torch.int32)
    nblk_scan = (n - torch.tensor([2, 0], dtype=torch.int32))  # two new blocks, none

    def state(device=DEVICE):
        return [t.clone().to(device) for t in (cand, torch.tensor([5, 9]), nblk_scan)]

    def scores(q_, cache_, cand_, plan):
        if method == "quest":
            return cops.quest_candidate_scores(q_, meta.kmin.to(q_.device), meta.kmax.to(q_.device), cache_, cand_,
                                               bs, plan=plan)
        return cops.infllm_candidate_scores(q_, meta.ckeys.to(q_.device), cache_, cand_, bs, plan=plan)

    dcache = prr.KVCache(*(t.to(DEVICE) for t in (cache.k, cache.v, cache.page_table, cache.seq_lens)))
    kc, ks, kn = state()
    kout = torch.full((2,), -7, dtype=torch.int32, device=DEVICE)
    with use_backend("triton"):
        got = scores(q.to(DEVICE), dcache, kc, (ks, kn, r, kout))
    rc, rs, rn = state("cpu")  # the reference's state stays on the CPU
    rout = torch.full((2,), -7, dtype=torch.int32)
    want = scores(q, cache, rc, (rs, rn, r, rout))
    pc, ps, pn = state("cpu")
    cops.amortized_plan(ps, cache.seq_lens, pn, pc, torch.zeros(2, dtype=torch.int64), 4, r, bs, force=0)
    assert torch.equal(pc, rc) and torch.equal(ps, rs) and torch.equal(pn, rn)
    torch.testing.assert_close(want, scores(q, cache, pc, None), rtol=0, atol=0)
    assert rc[0, 1, -r:].tolist() == [int(n[0]) - 2, int(n[0]) - 1, -1] and rc[1, 0, -r:].tolist() == [-1] * r
    assert torch.equal(rc[..., :-r], cand[..., :-r]) and rs.tolist() == [6, 10] and rout.tolist() == n.tolist()
    assert torch.equal(kc.cpu(), rc) and torch.equal(ks.cpu(), rs) and torch.equal(kout.cpu(), rout)
    live = want > float("-inf")
    assert torch.equal(got.cpu() > float("-inf"), live)
    torch.testing.assert_close(got.cpu()[live], want[live].float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c,top_k", [(66, 9), (300, 40), (40, 60)], ids=["2-programs", "5-programs", "K-over-list"])
def test_quest_rescore_with_the_top_k_in_the_same_launch(c, top_k):
    """``quest_candidate_select``: one launch scores the candidates (bookkeeping fused) and the last program of
    each row to finish selects it. Same selection, scores, list and counters as the two-launch path (scorer with
    ``plan``, then ``select_candidates``), and as the float64 reference; the tick buffer is left at zero, so the
    next step (and a replayed graph) starts clean. Three steps in a row, one of them with a short sequence."""
    bs, r = 16, 3
    cache = make_cache([4000, 1500], hkv=2, d=32, capacity=4100, dtype=torch.float32, seed=6)
    meta = prr.BlockMetadata(prr.SparseConfig(block_size=bs, top_k=top_k), cache)
    n = prr.num_blocks(cache.seq_lens, bs)
    cand = _cand(cache, bs, c, seed=2)
    cand[..., -r:] = 99  # new-block slots, overwritten by the bookkeeping
    nblk_scan = n - torch.tensor([2, 0], dtype=torch.int32)
    dcache = prr.KVCache(*(t.to(DEVICE) for t in (cache.k, cache.v, cache.page_table, cache.seq_lens)))
    kmin, kmax = meta.kmin.to(DEVICE), meta.kmax.to(DEVICE)
    fused = [t.clone().to(DEVICE) for t in (cand, torch.tensor([5, 9]), nblk_scan)]
    split = [t.clone().to(DEVICE) for t in (cand, torch.tensor([5, 9]), nblk_scan)]
    ref = [t.clone() for t in (cand, torch.tensor([5, 9]), nblk_scan)]
    tick = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    for step in range(3):
        q = make_query(cache, 4, seed=step)
        out_f, out_s, out_r = (torch.zeros(2, dtype=torch.int32, device=d) for d in (DEVICE, DEVICE, "cpu"))
        with use_backend("triton"):
            idx, cnt, sc = cops.quest_candidate_select(q.to(DEVICE), kmin, kmax, dcache, fused[0], bs, "sum",
                                                       (fused[1], fused[2], r, out_f), top_k, 1, 2, tick)
            s2 = cops.quest_candidate_scores(q.to(DEVICE), kmin, kmax, dcache, split[0], bs,
                                             plan=(split[1], split[2], r, out_s))
            idx2, cnt2 = cops.select_candidates(split[0], s2, out_s, top_k, 1, 2)
        r_idx, r_cnt, r_sc = cops.quest_candidate_select(q.double(), meta.kmin.double(), meta.kmax.double(),
                                                         prr.KVCache(cache.k.double(), cache.v.double(),
                                                                     cache.page_table, cache.seq_lens),
                                                         ref[0], bs, "sum", (ref[1], ref[2], r, out_r), top_k, 1,
                                                         2, torch.zeros(4, dtype=torch.int32))
        assert torch.equal(idx, idx2) and torch.equal(cnt, cnt2) and torch.equal(sc, s2)
        assert torch.equal(idx.cpu(), r_idx) and torch.equal(cnt.cpu(), r_cnt)
        assert torch.equal(fused[0], split[0]) and torch.equal(fused[1], split[1]) and torch.equal(out_f, out_s)
        assert torch.equal(tick.cpu(), torch.zeros(4, dtype=torch.int32))
        live = r_sc > float("-inf")
        torch.testing.assert_close(sc.cpu()[live], r_sc[live].float(), rtol=1e-5, atol=1e-4)
        if step == 1:  # a sequence shorter than the budget: every live block
            for c_ in (cache, dcache):
                c_.seq_lens[1] = 40
