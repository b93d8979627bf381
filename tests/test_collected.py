"""The collected top-K: the scoring kernel collects C(τ) at a carried threshold, the top-K ranks that list.
The selection equals the full top-K's at every step, whatever the threshold (held, too high, too low); the
next threshold and the statistics equal the PyTorch twin's bit for bit."""

import pytest
import torch
from conftest import make_cache, make_query

import prr
from prr.ops import backend
from prr.ops.guessed import HELD, SHORT, TOO_HIGH, TOO_LOW, reference
from prr.ops.guessed import triton as guessed_triton
from prr.ops.select import triton as select_triton

pytestmark = pytest.mark.usefixtures("poison_empty")


def _emulated_list(scores, nblk, tau, cap, n_sink=1, n_local=2, seed=0):
    """The scoring kernel's list for these scores: C(τ) packed, in a scrambled arrival order, cut at ``cap``
    (the counter counts all)."""
    srt, cnt = reference.collect_candidates(scores, nblk, n_sink, n_local, tau)
    b, h, _ = scores.shape
    col = torch.full((b, h, cap), -(2 ** 63), dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    for i in range(b):
        for j in range(h):
            v = srt[i, j, : int(cnt[i, j])]
            v = v[torch.randperm(len(v), generator=gen)][:cap]
            col[i, j, : len(v)] = v
    return col, cnt


def _check_step(scores, nblk, top_k, tau, cap, guess_k, n_sink=1, n_local=2, seed=0):
    """One step on the Triton kernel (interpreter) against the reference and the full top-K; returns the
    reference's next threshold and stats."""
    ref = reference.select_blocks_collected(scores, nblk, top_k, n_sink, n_local, tau=tau, guess_k=guess_k, cap=cap)
    col, cnt = _emulated_list(scores, nblk, tau, cap, n_sink, n_local, seed)
    gmax, _, _ = select_triton.group_maxima(scores, nblk, n_sink, n_local, None, 16)
    t = tau.clone()
    idx, c, st = guessed_triton.select_blocks_collected(scores, nblk, top_k, n_sink, n_local, tau=t,
                                                        collected=(col, cnt), guess_k=guess_k, group_max=gmax)
    full = select_triton.select_blocks(scores, nblk, top_k, n_sink, n_local)
    assert torch.equal(idx, full[0]) and torch.equal(c, full[1])
    assert torch.equal(idx, ref[0]) and torch.equal(c, ref[1])
    assert torch.equal(t.view(torch.int32), ref[2].view(torch.int32))
    assert torch.equal(st, ref[3])
    assert int(cnt.abs().sum()) == 0  # the counter is reset for the next step's scorer
    return ref[2], ref[3]


def test_carried_threshold_fed_back_over_drifting_steps():
    """Steps fed back as a decode runs them: held on most rows once the threshold settles, the rest fall back;
    the selection is the full top-K's every time."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 2, 1200, generator=gen)
    nblk = torch.tensor([1200, 1000], dtype=torch.int32)
    tau = torch.full((2, 2), float("-inf"))
    paths = []
    for step in range(6):
        scores = base + 0.15 * torch.randn(base.shape, generator=gen)
        tau, st = _check_step(scores, nblk, 40, tau, cap=256, guess_k=120, seed=step)
        paths += st[1].flatten().tolist()
        base = scores
    assert paths[:4] == [TOO_LOW] * 4  # -inf admits every block: more than the list holds
    assert paths[-4:].count(HELD) >= 3


def test_paths_ties_and_minus_inf():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 2, 900, generator=gen)
    scores[0, 0, 50:400] = 0.75  # ties across the K-th score
    scores[0, 1] = 1.0  # all equal
    scores[1, 0, ::2] = float("-inf")
    nblk = torch.tensor([900, 700, 20], dtype=torch.int32)  # the last row short
    tau = torch.tensor([[0.75, 1.0], [0.5, float("inf")], [0.0, float("nan")]])
    _, st = _check_step(scores, nblk, 30, tau, cap=512, guess_k=90)
    paths = st[1].tolist()
    assert paths[2] == [SHORT, SHORT] and paths[1][1] == TOO_HIGH
    assert paths[0][0] == HELD and paths[0][1] == TOO_LOW  # 350 ties held; a whole row of ties overflows


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_scorer_collects_the_candidates(method):
    """The scoring kernel's list holds exactly C(τ) (as a set) and its counter counts it, past the list's
    capacity too; the selection from it equals the full one (Quest: rows over 512 blocks, the collected
    top-K's length; InfLLM-v2's 64-token blocks give shorter rows: the list alone)."""
    lens = [9000, 8500, 8400]
    base = make_cache(lens, hkv=2, d=16, capacity=9216)
    cache = prr.KVCache(base.k.float(), base.v.float(), base.page_table, base.seq_lens)
    q = make_query(base, 2).float()
    cfg = prr.SparseConfig.from_budget(method, 480 if method == "quest" else 1024)  # K = 27 / 13 blocks
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
    with backend.use_backend("triton"):
        meta = prr.BlockMetadata(cfg, cache)
        plain = meta.scores(q, cache)
        kth = plain.sort(-1, descending=True).values
        tau = torch.stack([kth[0, :, 70], kth[1, :, 3], torch.full((2,), float("-inf"))]).contiguous()
        cap = 128
        col = torch.full((3, 2, cap), -(2 ** 63), dtype=torch.int64)
        cnt = torch.zeros(3, 2, dtype=torch.int32)
        scores, gmax = meta.scores(q, cache, with_groups=True, collect=(tau, col, cnt))
        assert torch.equal(scores, plain)
        srt, want = reference.collect_candidates(scores, nblk, cfg.n_sink, cfg.n_local, tau)
        assert torch.equal(cnt, want)
        for b in range(3):
            for h in range(2):
                c = int(want[b, h])
                got = col[b, h, : min(c, cap)].sort(descending=True).values
                if c <= cap:
                    assert torch.equal(got, srt[b, h, :c]), (b, h)
                else:  # overflow: the slots hold some of C(τ)
                    assert set(got.tolist()) <= set(srt[b, h, :c].tolist())
        if method != "quest":
            return
        t = tau.clone()
        idx, c, _t, st = prr.select_blocks_collected(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, tau=t,
                                                     collected=(col, cnt), guess_k=3 * cfg.top_k, group_max=gmax)
        full = prr.select_blocks(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local)
    assert torch.equal(idx, full[0]) and torch.equal(c, full[1])
    assert st[1].tolist() == [[HELD, HELD], [TOO_HIGH, TOO_HIGH], [TOO_LOW, TOO_LOW]]
    ref = reference.select_blocks_collected(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, tau=tau,
                                            guess_k=3 * cfg.top_k, cap=cap)
    assert torch.equal(t.view(torch.int32), ref[2].view(torch.int32)) and torch.equal(st, ref[3])


def test_reference_path_and_bad_inputs():
    scores = torch.randn(1, 2, 800, dtype=torch.float64)
    nblk = torch.tensor([800])
    tau = torch.zeros(1, 2)
    with backend.use_backend("reference"):
        idx, cnt, t, st = prr.select_blocks_collected(scores, nblk, 20, tau=tau, cap=100)
    assert t is tau and torch.equal(idx, prr.select_blocks(scores, nblk, 20)[0])
    with pytest.raises(ValueError, match="guess_k"):
        reference.select_blocks_collected(scores, nblk, 20, tau=torch.zeros(1, 2), guess_k=10, cap=100)
    with pytest.raises(ValueError, match="shape|tau"):
        reference.select_blocks_collected(scores, nblk, 20, tau=torch.zeros(2, 2), guess_k=60, cap=100)
    with backend.use_backend("triton"), pytest.raises(ValueError, match="collected"):
        prr.select_blocks_collected(scores.float(), nblk, 20, tau=tau)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ctx,batch", [(131072, 1), (524288, 1), (131072, 4)], ids=["128k-b1", "512k-b1", "128k-b4"])
def test_cuda_scorer_and_collected_topk_over_drifting_steps(ctx, batch):
    """On the GPU in bf16, the Quest scorer collecting and the collected top-K fed back over drifting queries:
    the selection equals the full top-K's on the same scores, the next threshold and stats equal the
    reference's on those scores (on the CPU)."""
    from prr.bench.kernels import RandomLayer
    from prr.bench.workload import drift

    lay = RandomLayer.make("llama-3.1-8b", batch, ctx, "quest", budget=2048)
    cfg, cache, meta, nblk = lay.cfg, lay.cache, lay.meta, lay.nblk
    hkv = cache.num_kv_heads
    cap = 1024
    tau = torch.full((batch, hkv), float("-inf"), device="cuda")
    col = torch.empty(batch, hkv, cap, dtype=torch.int64, device="cuda")
    cnt = torch.zeros(batch, hkv, dtype=torch.int32, device="cuda")
    q = lay.q
    gen = torch.Generator(device="cuda").manual_seed(0)
    paths = []
    for step in range(6):
        q = drift(q, 0.25, gen)
        tau_used = tau.clone()
        scores, gmax = meta.scores(q, cache, with_groups=True, collect=(tau, col, cnt))
        idx, c, _t, st = prr.select_blocks_collected(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, tau=tau,
                                                     collected=(col, cnt), guess_k=3 * cfg.top_k, group_max=gmax)
        full = prr.select_blocks(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gmax)
        assert torch.equal(idx, full[0]) and torch.equal(c, full[1]), step
        ref = reference.select_blocks_collected(scores.cpu(), nblk.cpu(), cfg.top_k, cfg.n_sink, cfg.n_local,
                                                tau=tau_used.cpu(), guess_k=3 * cfg.top_k, cap=cap)
        assert torch.equal(st.cpu(), ref[3]), step
        assert torch.equal(tau.cpu().view(torch.int32), ref[2].view(torch.int32)), step
        assert int(cnt.abs().sum()) == 0
        paths += st[1].flatten().tolist()
    assert paths.count(HELD) >= len(paths) // 2, paths


def test_dsa_layer_step_on_the_collected_top_k_equals_dsa_while_decoding():
    """DSA's layer step with ``topk="collected"`` (the reference path on the CPU), decoding with appends
    across block boundaries: the output bit for bit serialized DSA's; the threshold settles so most rows
    hold after the first steps; PRR refuses it."""
    from prr.runtime.layer import LayerStep

    base = make_cache([900, 700], hkv=2, d=64, capacity=1024, seed=2)
    cache = prr.KVCache(base.k, base.v, base.page_table, base.seq_lens)
    cfg = prr.SparseConfig.from_budget("quest", 256)
    meta = prr.BlockMetadata(cfg, cache)
    step = LayerStep(cache, meta, 8, method="dsa", topk="collected")
    gen = torch.Generator().manual_seed(4)
    q = make_query(cache, 4, scale=2.0)
    paths = []
    for _ in range(12):
        kv = torch.randn(2, 2, 2, 64, generator=gen, dtype=torch.float64)
        q = q + 0.3 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        cache.append(kv[0], kv[1])
        meta.append(cache)
        want = prr.dsa_step(q, cache, meta)
        o, _ = step.run(q)
        assert torch.equal(o, want.o) and torch.equal(step.last["s_idx"], want.selection.indices)
        paths += step.collected.stats[1].flatten().tolist()
    assert paths[:4] == [TOO_LOW] * 4 or paths[:4].count(TOO_LOW) + paths[:4].count(HELD) == 4
    assert paths[4:].count(HELD) >= len(paths[4:]) * 3 // 4, paths
    with pytest.raises(ValueError, match="collected"):
        LayerStep(cache, meta, 8, method="prr", topk="collected")
