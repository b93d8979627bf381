"""The layer runtime (eager on CPU; graph == eager on a GPU) and the speculation budget."""

import json
import os

import pytest
import torch

import prr
from prr.algo.sparse import GuessedTopK
from prr.runtime import BudgetCache, BudgetDecision, LayerStep, StepStreams, choose_budget

from conftest import make_cache, make_query

CUDA = torch.cuda.is_available()


def _decode_setup(method, device="cpu", dtype=torch.float64, b=2, hkv=2, g=4, seed=0):
    base = make_cache([900, 700], hkv=hkv, d=64, capacity=1024, dtype=dtype, seed=seed)
    cache = prr.KVCache(base.k.to(device), base.v.to(device), base.page_table.to(device), base.seq_lens.to(device))
    cfg = prr.SparseConfig.from_budget(method, 256 if method == "quest" else 512)
    meta = prr.BlockMetadata(cfg, cache)
    nmax = -(-cache.capacity // cfg.block_size)
    return cache, cfg, meta, prr.HoltPredictor(1, b, hkv, nmax, alpha=0.5, device=device)


@pytest.mark.parametrize("mode", ["exact", "union"])
def test_layer_step_eager_equals_prr_step(mode):
    cache, _cfg, meta, pred = _decode_setup("quest")
    twin = prr.HoltPredictor(1, 2, 2, pred.level.shape[-1], alpha=0.5)
    step = LayerStep(cache, meta, 8, method="prr", predictor=pred, ratio=1.5, mode=mode)
    q = make_query(cache, 4, scale=2.0)
    for _ in range(4):
        q = q + 0.3 * torch.randn_like(q)
        o, lse = step.run(q)
        ref = prr.prr_step(q, cache, meta, twin, 0, ratio=1.5, mode=mode)
        torch.testing.assert_close(o, ref.o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, ref.lse, rtol=1e-12, atol=1e-12)
        assert torch.equal(pred.level, twin.level) and torch.equal(pred.known, twin.known)
    dsa = LayerStep(cache, meta, 8, method="dsa")
    torch.testing.assert_close(dsa.run(q)[0], prr.dsa_step(q, cache, meta).o, rtol=1e-12, atol=1e-12)


def test_layer_step_with_fixed_counts_equals_counting_itself():
    """A step given the model's block counts (a benchmark of one layer as a model runs it) gives the outputs
    and selections of a step that counts them itself; counts given to run() still take precedence."""
    from prr.algo.step import StepCounts

    cache, cfg, meta, pred = _decode_setup("quest")
    twin = prr.HoltPredictor(1, 2, 2, pred.level.shape[-1], alpha=0.5)
    counts = StepCounts.of(cache.seq_lens, cfg, 2)
    q = make_query(cache, 4, scale=2.0)
    for method, p1, p2 in (("dsa", None, None), ("prr", pred, twin)):
        fixed = LayerStep(cache, meta, 8, method=method, predictor=p1, ratio=1.5, counts=counts)
        own = LayerStep(cache, meta, 8, method=method, predictor=p2, ratio=1.5)
        for _ in range(3):
            q = q + 0.3 * torch.randn_like(q)
            assert torch.equal(fixed.run(q)[0], own.run(q)[0])
            assert torch.equal(fixed.last["s_idx"], own.last["s_idx"])
        assert fixed.counts is counts
    wrong = StepCounts.of(cache.seq_lens - 200, cfg, 2)  # fewer blocks: run()'s own counts win over the step's
    step = LayerStep(cache, meta, 8, method="dsa", counts=counts)
    assert not torch.equal(step.run(q, wrong)[0], step.run(q)[0])
    assert step.counts is counts


@pytest.mark.parametrize("mode", ["exact", "union", "predicted"])
def test_layer_step_decoding_with_appends_equals_prr_step(mode):
    """The engine's path: one token appended before every step (``grow=1``), across block boundaries, with the
    predictor tail deferred: outputs, P, the stats and the predictor state equal prr_step's, step for step."""
    cache, cfg, meta, pred = _decode_setup("quest")
    cache2 = prr.KVCache(cache.k.clone(), cache.v.clone(), cache.page_table.clone(), cache.seq_lens.clone())
    meta2 = prr.BlockMetadata(cfg, cache2)
    twin = prr.HoltPredictor(1, 2, 2, pred.level.shape[-1], alpha=0.5)
    step = LayerStep(cache, meta, 8, method="prr", predictor=pred, ratio=1.25, mode=mode, grow=1,
                     streams=StepStreams(defer_tail=True), collect_stats=True)
    gen = torch.Generator().manual_seed(3)
    q = make_query(cache, 4, scale=2.0)
    crossed = 0
    for _ in range(20):  # 20 tokens: both sequences start a new 16-token block on the way
        kv = torch.randn(2, 2, 2, 64, generator=gen, dtype=torch.float64)
        q = q + 0.3 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        for c, m in ((cache, meta), (cache2, meta2)):
            c.append(kv[0], kv[1])
            m.append(c)
        crossed += int((cache.seq_lens % cfg.block_size == 1).sum())
        p_used = step.p_idx.clone()
        o, lse = step.run(q)
        step.join()
        ref = prr.prr_step(q, cache2, meta2, twin, 0, ratio=1.25, mode=mode)
        assert torch.equal(p_used, ref.predicted.indices)
        torch.testing.assert_close(o, ref.o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, ref.lse, rtol=1e-12, atol=1e-12)
        assert torch.equal(step.stats.hits, ref.stats.hits) and torch.equal(step.stats.forced, ref.stats.forced)
        assert torch.equal(pred.level, twin.level)
    assert crossed >= 2


def test_layer_step_rejects_bad_setup():
    cache, _, meta, pred = _decode_setup("quest")
    with pytest.raises(ValueError, match="other K' take it from the guessed top-K"):
        LayerStep(cache, meta, 8, method="prr", topk="full", ratio=1.5)
    with pytest.raises(TypeError, match="HoltPredictor or None"):
        LayerStep(cache, meta, 8, method="prr", predictor=object())
    with pytest.raises(ValueError, match="unknown topk"):
        LayerStep(cache, meta, 8, method="dsa", topk="fast")
    with pytest.raises(ValueError, match="amortized selection runs with"):
        LayerStep(cache, meta, 8, method="dsa", topk="guessed", amortized=object())
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        LayerStep(cache, meta, 8, method="fast", predictor=pred)
    with pytest.raises(ValueError, match="Hq=5"):
        LayerStep(cache, meta, 5, method="prr", predictor=pred)
    with pytest.raises(RuntimeError, match="CUDA graphs need"):
        LayerStep(cache, meta, 8, method="dsa").capture()


def test_choose_budget_picks_largest_hidden_k_and_falls_back():
    # Selection 50 us, attention 20 us; speculation of 64/96/128 blocks takes 30/45/60 us.
    spec = {64: 30.0, 96: 45.0, 128: 60.0}
    d = choose_budget(50.0, 20.0, spec, {64: 6.0, 96: 3.0, 128: 2.0})
    assert d.enabled and d.spec_k == 96  # 128 would not hide under the selection
    assert d.t_prr_us == pytest.approx(50 + 3) and d.gain == pytest.approx(1 - 53 / 70)
    # A repair that costs as much as the attention it replaces: no gain, speculation off.
    off = choose_budget(50.0, 20.0, spec, {64: 20.0, 96: 19.9, 128: 19.0})
    assert not off.enabled and off.gain < 0.02 and off.reason.startswith("off")
    # Nothing hides: take the cheapest speculation and model the overrun.
    slow = choose_budget(10.0, 40.0, {64: 30.0, 96: 45.0}, {64: 4.0, 96: 2.0})
    assert slow.spec_k == 64 and slow.t_prr_us == pytest.approx(34.0)
    with pytest.raises(ValueError, match="same K'"):
        choose_budget(1.0, 1.0, {64: 1.0}, {96: 1.0})


def _write_entries(path, rank, n):
    from prr.jsoncache import JsonCache

    cache = JsonCache("x", path)
    for i in range(n):
        cache.put_entry(f"rank{rank}-{i % 4}", {"i": i})


def test_json_cache_takes_concurrent_writers(tmp_path):
    """Tensor-parallel ranks profile at once and write the same cache file: no writer fails or leaves a file
    that does not parse (each writes its own temporary file, then replaces the cache atomically)."""
    import multiprocessing as mp

    path = str(tmp_path / "shared.json")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_entries, args=(path, r, 300)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with open(path) as f:
        data = json.load(f)
    assert data and all(k.startswith("rank") for k in data)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_budget_cache_roundtrip(tmp_path):
    cache = BudgetCache(str(tmp_path / "b.json"))
    key = BudgetCache.key("NVIDIA H200", 1, 32, 8, 128, "quest", 2048, 100_000)
    assert key.endswith("ctx131072|guessed") and cache.get(key) is None
    dec = BudgetDecision(96, 70.0, 53.0, 0.24, "on")
    cache.put(key, dec)
    assert BudgetCache(str(tmp_path / "b.json")).get(key) == dec
    (tmp_path / "b.json").write_text("{broken")  # a corrupt file reads as empty, never crashes
    assert cache.get(key) is None


@pytest.mark.parametrize("mode", ["exact", "union"])
def test_prr_on_the_guessed_top_k_equals_dsa_while_decoding(mode):
    """The default PRR step (the guessed top-K finds S and writes the next P) and DSA with the guessed top-K,
    decoding with appends across block boundaries: PRR exact equals serialized DSA (float64), guessed DSA
    equals it bit for bit, P is the previous step's, and after the seeded first step every guess held."""
    from prr.ops.guessed import HELD, NARROWED

    cache, _cfg, meta, _ = _decode_setup("quest")
    step = LayerStep(cache, meta, 8, method="prr", ratio=1.5, mode=mode, grow=1, collect_stats=True)
    gdsa = LayerStep(cache, meta, 8, method="dsa", topk="guessed", collect_stats=True)
    gen = torch.Generator().manual_seed(4)
    q = make_query(cache, 4, scale=2.0)
    first = prr.select(q, cache, meta)
    step.seed((first.indices, first.counts))
    gdsa.seed((first.indices, first.counts))
    hits = []
    for _ in range(20):  # both sequences start a new 16-token block on the way
        kv = torch.randn(2, 2, 2, 64, generator=gen, dtype=torch.float64)
        q = q + 0.3 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        cache.append(kv[0], kv[1])
        meta.append(cache)
        p_used = (step.p_idx.clone(), step.p_cnt.clone())
        want = prr.dsa_step(q, cache, meta)
        o, lse = step.run(q)
        og, _ = gdsa.run(q)
        assert torch.equal(og, want.o) and torch.equal(gdsa.last["s_idx"], want.selection.indices)
        assert torch.equal(step.last["s_idx"], want.selection.indices)
        if mode == "exact":
            torch.testing.assert_close(o, want.o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse, want.lse, rtol=1e-12, atol=1e-12)
        else:  # attention over P ∪ S: never below DSA's own log-sum-exp
            assert bool((lse >= want.lse - 1e-9).all())
        assert torch.equal(step.stats.predicted, p_used[1])
        assert set(step.stats.guess[1].flatten().tolist()) <= {HELD, NARROWED}
        hits.append(step.stats.hit_rate())
    assert sum(hits) / len(hits) > 0.5


@pytest.mark.parametrize("mode", ["exact", "union"])
def test_prr_on_the_full_top_k_takes_p_from_the_previous_selection(mode):
    """PRR on the full top-K with no Holt predictor: P is the step before's S (K' = K), S is DSA's, and PRR exact
    equals serialized DSA while decoding with appends across block boundaries; any other K' is refused."""
    cache, _cfg, meta, _ = _decode_setup("quest")
    step = LayerStep(cache, meta, 8, method="prr", topk="full", ratio=1.0, mode=mode, grow=1, collect_stats=True)
    gen = torch.Generator().manual_seed(5)
    q = make_query(cache, 4, scale=2.0)
    prev = None
    hits = []
    for _ in range(20):
        kv = torch.randn(2, 2, 2, 64, generator=gen, dtype=torch.float64)
        q = q + 0.3 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        cache.append(kv[0], kv[1])
        meta.append(cache)
        if prev is not None:
            assert torch.equal(step.p_idx, prev[0]) and torch.equal(step.p_cnt, prev[1])
        want = prr.dsa_step(q, cache, meta)
        o, lse = step.run(q)
        assert torch.equal(step.last["s_idx"], want.selection.indices)
        if mode == "exact":
            torch.testing.assert_close(o, want.o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse, want.lse, rtol=1e-12, atol=1e-12)
        else:
            assert bool((lse >= want.lse - 1e-9).all())
        prev = (want.selection.indices.clone(), want.selection.counts.clone())
        hits.append(step.stats.hit_rate())
    assert sum(hits[1:]) / len(hits[1:]) > 0.5
    with pytest.raises(ValueError, match="K' = K"):
        LayerStep(cache, meta, 8, method="prr", topk="full", ratio=1.5)


def _decode_steps(runs, replay, seed, steps=6):
    """Drive identical ``(cache, meta, LayerStep)`` states through ``steps`` CUDA decode steps with the same
    appends and a drifting bf16 query, each run eagerly or (``replay[i]``) from its captured graph; yields
    ``(q, outs)`` per step, ``outs[i]`` run i's cloned outputs."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, 8, 64, device="cuda", generator=gen, dtype=torch.bfloat16) * 2
    for _ in range(steps):
        kv = torch.randn(2, 2, 2, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
        q = q + 0.3 * torch.randn(q.shape, device="cuda", generator=gen, dtype=torch.bfloat16)
        outs = []
        for (cache, meta, step), rep in zip(runs, replay, strict=True):
            cache.append(kv[0], kv[1])
            meta.append(cache)
            outs.append([t.clone() for t in (step.replay(q) if rep else step.run(q))])
        yield q, outs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("topk", ["full", "guessed"])
@pytest.mark.parametrize("method,mode,split", [("dsa", "exact", False), ("prr", "exact", False),
                                               ("prr", "union", False), ("prr", "exact", True)])
def test_graph_replay_equals_eager_over_decode_steps(method, mode, split, topk):
    """Two identical states; one steps eagerly, the other replays one captured graph (or the critical path and
    the predictor tail as two graphs). Over 6 decode steps with appends, outputs and predictor states agree bit
    for bit, and PRR exact matches serialized DSA."""
    runs = []
    for _ in range(2):
        cache, _cfg, meta, pred = _decode_setup("quest", device="cuda", dtype=torch.bfloat16)
        holt = pred if topk == "full" else None  # PRR on the guessed top-K takes P from it
        runs.append((cache, meta, pred, LayerStep(cache, meta, 8, method=method, predictor=holt, ratio=1.5,
                                                   mode=mode, topk=topk, grow=1)))
    runs[1][3].capture(split_tail=split)
    assert (runs[1][3].tail_graph is not None) == (split and method == "prr")
    for q, outs in _decode_steps([(c, m, s) for c, m, _, s in runs], replay=(False, True), seed=0):
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        if method == "prr":
            assert torch.equal(runs[0][2].level, runs[1][2].level)
            assert torch.equal(runs[0][3].p_idx, runs[1][3].p_idx)
        if mode == "exact":
            dsa = prr.dsa_step(q, runs[0][0], runs[0][1])
            torch.testing.assert_close(outs[0][0].float(), dsa.o.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU")
@pytest.mark.parametrize("method,mode,topk", [("dsa", "exact", "full"), ("prr", "exact", "full"),
                                              ("prr", "exact", "guessed"), ("prr", "union", "guessed")])
def test_graph_with_dependent_launch_equals_graph_without(method, mode, topk):
    """The same decode steps replayed from a graph captured with programmatic dependent launch and from one
    captured without: outputs and P equal bit for bit over 6 steps with appends (every kernel waits for the ones
    before it before it reads or writes anything)."""
    runs = []
    for pdl in ("off", "on"):
        cache, _cfg, meta, pred = _decode_setup("quest", device="cuda", dtype=torch.bfloat16)
        step = LayerStep(cache, meta, 8, method=method, predictor=pred if topk == "full" else None, ratio=1.5,
                         mode=mode, topk=topk, grow=1)
        with prr.ops.backend.use_pdl(pdl):
            step.capture()
        runs.append((cache, meta, step))
    for _q, outs in _decode_steps(runs, replay=(True, True), seed=1):
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        if method == "prr":
            assert torch.equal(runs[0][2].p_idx, runs[1][2].p_idx)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode,topk,holt", [("exact", "full", True), ("exact", "guessed", False),
                                            ("union", "guessed", False), ("exact", "full", False)])
@pytest.mark.parametrize("replay", [False, True])
def test_speculation_beside_the_topk_equals_beside_the_selection(mode, topk, holt, replay):
    """PRR's speculation started after the scores (``overlap="topk"``) computes what it computes beside the whole
    selection: outputs and P equal bit for bit over 6 steps with appends, eagerly and from graphs (P from Holt's
    predictor, the guessed top-K, or the previous selection on the full top-K)."""
    runs = []
    for overlap in ("selection", "topk"):
        cache, _cfg, meta, pred = _decode_setup("quest", device="cuda", dtype=torch.bfloat16)
        step = LayerStep(cache, meta, 8, method="prr", predictor=pred if holt else None,
                         ratio=1.0 if topk == "full" and not holt else 1.5, mode=mode, topk=topk, grow=1,
                         overlap=overlap)
        if replay:
            step.capture()
        runs.append((cache, meta, step))
    for _q, outs in _decode_steps(runs, replay=(replay, replay), seed=2):
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert torch.equal(runs[0][2].p_idx, runs[1][2].p_idx) and torch.equal(runs[0][2].p_cnt, runs[1][2].p_cnt)


@pytest.mark.parametrize("guessed", [False, True])
def test_after_scores_runs_between_the_scores_and_the_topk(guessed):
    """The selection calls ``after_scores`` once, after the scores are written and before the top-K, and selects
    the same S with it as without."""
    cache, cfg, meta, _ = _decode_setup("quest")
    q = make_query(cache, 4)
    nblk = prr.ops.num_blocks(cache.seq_lens, cfg.block_size)
    want = prr.select(q, cache, meta, nblk=nblk)
    seen = []
    real_scores = meta.scores

    def scores(*a, **k):
        seen.append("scores")
        return real_scores(*a, **k)

    meta.scores = scores
    if guessed:
        g = GuessedTopK(cache.batch, cache.num_kv_heads, cfg)
        g.seed(want.indices, want.counts)
        got = g.select(q, cache, meta, nblk, after_scores=lambda: seen.append("hook"))
    else:
        got = prr.select(q, cache, meta, nblk=nblk, after_scores=lambda: seen.append("hook"))
    assert seen == ["scores", "hook"]
    assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)


def test_step_overlap_is_checked():
    cache, _cfg, meta, _ = _decode_setup("quest")
    with pytest.raises(ValueError, match="unknown overlap 'scores'"):
        LayerStep(cache, meta, 8, method="prr", overlap="scores")


def test_dependent_launch_is_off_on_the_cpu_and_checked():
    """Programmatic dependent launch only reaches CUDA launches; an unknown mode is an error."""
    x = torch.zeros(4)
    for mode in ("auto", "on", "off"):
        with prr.ops.backend.use_pdl(mode):
            assert prr.ops.backend.pdl_launch(x) == {}
    with pytest.raises(ValueError, match="unknown PDL mode"):
        with prr.ops.backend.use_pdl("1"):
            pass


def test_dsa_layer_step_ignores_a_predictor():
    """A DSA step given a predictor (as a model wires every layer alike) neither reads nor snapshots it."""
    cache, _, meta, pred = _decode_setup("quest")
    step = LayerStep(cache, meta, 8, method="dsa", predictor=pred)
    assert step._snapshot() == []
    q = make_query(cache, 4)
    torch.testing.assert_close(step.run(q)[0], prr.dsa_step(q, cache, meta).o, rtol=1e-12, atol=1e-12)


def test_guessed_top_k_must_pay_by_a_margin():
    from prr.runtime.budget import guessed_pays

    assert not guessed_pays(34.7, 34.3, 11.8)  # 0.9% of the step: noise, serialized DSA on the full top-K
    assert guessed_pays(34.7, 30.0, 11.8) and not guessed_pays(30.0, 34.7, 11.8)
    assert guessed_pays(34.7, 34.3, 11.8, min_gain=0.0)


def test_measure_dsa_steps_times_dsa_on_both_top_ks():
    """The guessed top-K's confirmation, run eagerly on the CPU through an injected timer: DSA's step on the full
    and on the guessed top-K, the same selection and output; a gain seen in the selections but not in the steps
    (what GLM-4-9B b1 32K / 8192 measured on the H100) keeps the full top-K."""
    from prr.runtime.budget import guessed_pays, measure_dsa_steps

    cache, _cfg, meta, _ = _decode_setup("quest")
    q = make_query(cache, 4)
    s = prr.select(q, cache, meta)
    seen = {}

    def timer(step):
        seen[step.settings.topk] = (step.run(step.q), step.last["s_idx"].clone())
        return {"full": 27.9, "guessed": 28.9}[step.settings.topk]

    assert measure_dsa_steps(cache, meta, q, (s.indices, s.counts), timer=timer) == (27.9, 28.9)
    assert torch.equal(seen["full"][1], seen["guessed"][1]) and torch.equal(seen["full"][1], s.indices)
    torch.testing.assert_close(seen["guessed"][0][0], seen["full"][0][0], rtol=0, atol=0)
    assert guessed_pays(19.0, 18.2, 9.7) and not guessed_pays(27.9, 28.9, 0.0)


def test_prediction_with_hit_rate_and_cached_profile(tmp_path):
    from prr.runtime.budget import _prediction_with_hit_rate, profile_budget, trace_hit_rate

    assert trace_hit_rate(1.0) == pytest.approx(0.80) and trace_hit_rate(1.5) == pytest.approx(0.94)
    assert trace_hit_rate(3.0) == 1.0
    cache, cfg, meta, _ = _decode_setup("quest")
    q = make_query(cache, 4)
    sel = prr.select(q, cache, meta)
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
    p_idx, p_cnt = _prediction_with_hit_rate(sel, nblk, cfg, cfg.top_k, 0.8)
    hits = prr.ops.selection_contains(sel.indices, sel.counts, p_idx, p_cnt).sum() - 3 * 4
    rate = float(hits) / float(sel.counts.sum() - 3 * 4)
    assert 0.6 < rate < 0.95 and torch.all(p_cnt == cfg.k_max)
    # A decision already in the cache is returned without timing anything (this runs on the CPU).
    store = BudgetCache(str(tmp_path / "b.json"))
    key = BudgetCache.key("test-gpu", 2, 8, 2, 64, "quest", cfg.budget_tokens, 900)
    store.put(key, BudgetDecision(None, 1.0, 2.0, -1.0, "off"))
    assert profile_budget(cache, meta, q, budget_cache=store, gpu_name="test-gpu").reason == "off"


@pytest.mark.parametrize("hit", [0.5, 0.8, 1.0])
def test_benchmark_imposes_the_hit_rate_it_reports(hit):
    """The layer benchmark's setup on the CPU: a random layer at a real shape, and a predictor state whose
    top-K' holds the wanted share of the true selection."""
    from prr.bench.kernels import RandomLayer
    from prr.bench.layer import impose_hit_rate

    lay = RandomLayer.make("glm-4-9b", 1, 4096, "quest", device="cpu", dtype=torch.float32)
    assert lay.case == "glm-4-9b/b1/4K/quest" and lay.q.shape == (1, 32, 128)
    sel = prr.select(lay.q, lay.cache, lay.meta)
    nmax = sel.scores.shape[-1]
    pred = prr.HoltPredictor(2, 1, 2, nmax)
    impose_hit_rate(pred, sel.indices, sel.counts, lay.nblk, lay.cfg, lay.cfg.top_k, hit)
    p_idx, p_cnt = prr.select_blocks(pred.predict(0), lay.nblk, lay.cfg.top_k, lay.cfg.n_sink, lay.cfg.n_local)
    forced = lay.cfg.n_sink + lay.cfg.n_local
    hits = prr.ops.selection_contains(sel.indices, sel.counts, p_idx, p_cnt).sum(-1) - forced
    rate = float(hits.sum()) / float((sel.counts - forced).sum())
    assert abs(rate - hit) <= 1.0 / lay.cfg.top_k + 1e-9


def test_drifting_workload_is_monotone_and_calibrates_to_a_target_hit_rate():
    """More drift, fewer hits; the bisection lands near the real-trace hit rate (0.80 at K' = K)."""
    from prr.bench.workload import calibrate_drift, drift, measure_hit_rate

    gen = torch.Generator().manual_seed(0)
    cache = prr.KVCache.allocate(1, 4096, 2, 64)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    cache.seq_lens.fill_(4096)
    meta = prr.BlockMetadata(prr.SparseConfig(top_k=32), cache)
    q0 = torch.randn(1, 8, 64, generator=gen) * 2
    rates = [measure_hit_rate(cache, meta, q0, s) for s in (0.01, 0.2, 1.0)]
    assert rates[0] > rates[1] > rates[2] and rates[0] > 0.95
    sigma, rate = calibrate_drift(cache, meta, q0, target=0.80)
    assert abs(rate - 0.80) < 0.03 and 0.01 < sigma < 1.0
    q1 = drift(q0, 0.5, torch.Generator().manual_seed(1))  # the norm of every head is kept
    torch.testing.assert_close(q1.norm(dim=-1), q0.norm(dim=-1))


def test_confirm_budget_keeps_speculation_only_when_the_timed_step_wins():
    from prr.runtime.budget import confirm_budget

    modelled = choose_budget(50.0, 30.0, {64: 40.0}, {64: 10.0})  # modelled 60 vs 80: on
    assert modelled.enabled
    lost = confirm_budget(modelled, 84.1, 94.6)  # what Llama b8 32K Quest measured: contention ate the gain
    assert not lost.enabled and lost.reason.startswith("off") and "measured overlapped step 94.6" in lost.reason
    won = confirm_budget(modelled, 84.0, 70.0)
    assert won.spec_k == 64 and won.gain == pytest.approx(1 - 70 / 84) and won.reason.startswith("on")
    off = choose_budget(10.0, 1.0, {64: 40.0}, {64: 10.0})
    assert confirm_budget(off, 1.0, 0.1) is off  # an "off" is never turned on


def test_measure_steps_runs_dsa_and_prr_over_the_given_prediction():
    """The confirmation's two steps, run eagerly on the CPU through an injected timer: PRR speculates over
    exactly the P it was given (held), and in exact mode its output is DSA's."""
    from prr.runtime.budget import _prediction_with_hit_rate, measure_steps

    cache, cfg, meta, _ = _decode_setup("quest")
    q = make_query(cache, 4)
    sel = prr.select(q, cache, meta)
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
    k = cfg.top_k + cfg.top_k // 4
    p_idx, p_cnt = _prediction_with_hit_rate(sel, nblk, cfg, k, 0.8)
    seen = {}

    def timer(step):
        seen[step.method] = (step.run(step.q), {n: t.clone() for n, t in step.last.items()})
        return {"dsa": 80.0, "prr": 70.0}[step.method]

    assert measure_steps(cache, meta, q, p_idx, p_cnt, k, timer=timer) == (80.0, 70.0)
    assert torch.equal(seen["prr"][1]["p_idx"], p_idx)
    torch.testing.assert_close(seen["prr"][0][0], seen["dsa"][0][0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        measure_steps(cache, meta, q, p_idx, p_cnt, k + 1, timer=timer)


def test_confirm_best_keeps_the_k_that_measured_best_not_the_modelled_one():
    """The model picks the largest K' that hides under the selection; contention can make it lose while a
    smaller K' wins (GLM-4-9B b1 32K / 8192 on the H200): the confirmation times the candidates and keeps the
    best; failures are skipped, and with nothing measured speculation stays off."""
    from prr.runtime.budget import choose_budget, confirm_best

    t_spec = {64: 10.0, 128: 20.0, 192: 30.0}
    t_rep = {64: 12.0, 128: 8.0, 192: 6.0}
    dec = choose_budget(30.0, 20.0, t_spec, t_rep)
    assert dec.enabled and dec.spec_k == 192  # the model's choice: the largest K' that hides
    measured = {64: (50.0, 46.0), 128: (50.0, 40.0), 192: (50.0, 51.0)}  # 192 loses once timed, 128 wins
    got = confirm_best(dec, 30.0, 20.0, t_spec, t_rep, measured.__getitem__)
    assert got.enabled and got.spec_k == 128 and abs(got.gain - 0.2) < 1e-9

    def fails(k):
        raise RuntimeError("capture failed")

    assert not confirm_best(dec, 30.0, 20.0, t_spec, t_rep, fails).enabled
    off = choose_budget(30.0, 1.0, t_spec, t_rep)
    assert not off.enabled and confirm_best(off, 30.0, 1.0, t_spec, t_rep, measured.__getitem__) is off
