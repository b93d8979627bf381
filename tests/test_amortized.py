"""Amortized selection (prr.algo.amortized): a full scan every m steps, candidates re-scored in between.

Invariants: m = 1 is the full selection at every step; every step equals the top-K of the *full* scores
restricted to (the last scan's top c·K ∪ forced ∪ blocks appeared since), computed independently here; scan
steps equal the full selection; the Triton path (interpreter, fp32) equals the reference path; the runtime's
LayerStep uses it; the host schedule (a graph per step kind) selects what the device schedule (one graph)
does; on a GPU the captured graphs replay every step kind."""

import math

import pytest
import torch

import prr
from prr.algo.amortized import AmortizedSelector
from prr.ops.backend import use_backend
from prr.runtime.layer import LayerStep

from conftest import make_cache, make_query


def _decode(method, steps, every, factor, dtype=torch.float64, bsz=2, g=4, seed=0, backend="auto", device="cpu",
            schedule="device", replay=False):
    """Append a token per step with a drifting query; yield (step, amortized selection, full selection, config,
    cache) of each step. 19-24 blocks of 16 (Quest) or 64 (InfLLM-v2) tokens, K = 5. ``replay``: step the host
    schedule as a two-graph replay does (the kind from the host clock, the step run forced to it, then the clock
    advanced)."""
    if backend == "triton" and torch.cuda.is_available():
        device = "cuda"  # the kernels run natively on a GPU (Triton's interpreter only on a CPU-only machine)
    start = 300 if method == "quest" else 1500
    cache = make_cache([start, start - 77][:bsz], hkv=2, d=32, capacity=start + steps + 16, dtype=dtype, seed=seed)
    cache = prr.KVCache(cache.k.to(device), cache.v.to(device), cache.page_table.to(device),
                        cache.seq_lens.to(device))
    cfg = prr.SparseConfig(method=method, block_size=16 if method == "quest" else 64, top_k=5)
    meta = prr.BlockMetadata(cfg, cache)
    am = AmortizedSelector(meta, cache, every=every, factor=factor, schedule=schedule)
    gen = torch.Generator().manual_seed(seed + 7)
    q = make_query(cache, g).to(device)
    with use_backend(backend):
        for t in range(steps):
            k, v = (torch.randn(bsz, 2, 32, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(2))
            cache.append(k, v)
            meta.append(cache)
            q = q + 0.3 * torch.randn(q.shape, generator=gen, dtype=torch.float64).to(device, dtype)
            if replay:
                with am.forced(am.next_is_scan()):
                    got = prr.select(q, cache, meta, amortized=am)
                am.advance()
            else:
                got = prr.select(q, cache, meta, amortized=am)
            full = prr.select(q, cache, meta)
            yield t, got, full, cfg, cache


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_every_step_scan_is_the_full_selection(method):
    for _t, got, full, _cfg, _cache in _decode(method, 20, every=1, factor=1.0):
        assert torch.equal(got.indices, full.indices) and torch.equal(got.counts, full.counts)


@pytest.mark.parametrize("method,every,factor", [("quest", 8, 2.0), ("quest", 5, 1.0), ("infllm_v2", 6, 2.5)],
                         ids=["quest-m8-c2", "quest-m5-c1", "infllm-m6-c2.5"])
def test_steps_between_scans_pick_the_best_candidates(method, every, factor):
    """Independent model: the top-K of the full scores over {last scan's selection at c·K} ∪ {blocks >= the scan's
    block count}; equal to the full selection on scan steps."""
    differs = 0
    for t, got, full, cfg, cache in _decode(method, 40, every, factor):
        nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
        if t % every == 0:
            assert torch.equal(got.indices, full.indices), t
            scan_k = math.ceil(factor * cfg.top_k)
            s_idx, s_cnt = prr.select_blocks(full.scores, nblk, scan_k, cfg.n_sink, cfg.n_local)
            listed = prr.ops.selection_mask(s_idx, s_cnt, full.scores.shape[-1])
            nblk_scan = nblk.clone()
        j = torch.arange(full.scores.shape[-1])
        allowed = listed | (j >= nblk_scan[:, None, None])
        want = prr.select_blocks(full.scores.masked_fill(~allowed, float("-inf")), nblk, cfg.top_k, cfg.n_sink,
                                 cfg.n_local)
        assert torch.equal(got.indices, want[0]) and torch.equal(got.counts, want[1]), t
        differs += int(not torch.equal(got.indices, full.indices))
    assert differs > 0  # the drift is strong enough that the candidates matter: the test can fail


def test_rescan_when_the_list_overflows_or_the_cache_shrinks():
    cache = make_cache([200], hkv=2, d=32, capacity=400)
    cfg = prr.SparseConfig(top_k=3)
    meta = prr.BlockMetadata(cfg, cache)
    am = AmortizedSelector(meta, cache, every=100, factor=1.0, new_slots=1, schedule="device")
    q = make_query(cache, 2)
    am.select(q, cache)
    assert am.scans.tolist() == [1]
    cache.append(torch.randn(1, 2, 32, dtype=torch.float64), torch.randn(1, 2, 32, dtype=torch.float64))
    meta.append(cache)
    cache.seq_lens += 16  # 217 tokens: one new block (14 in all) fits the list's single slot
    meta.build(cache)
    am.select(q, cache)
    assert am.scans.tolist() == [1]
    cache.seq_lens += 16  # two new blocks since the scan: more than the list holds
    meta.build(cache)
    am.select(q, cache)
    assert am.scans.tolist() == [2]
    cache.seq_lens -= 100  # a shorter cache (reused): rescan
    meta.build(cache)
    got = am.select(q, cache)
    assert am.scans.tolist() == [3]
    assert torch.equal(got.indices, prr.select(q, cache, meta).indices)
    am.reset()
    assert int(am.step) == 0 and am.scans.tolist() == [0]


def test_shipped_defaults():
    """m = 32, c = 6 on the host schedule: the setting that met issue #12's quality targets on SmolLM2
    (docs/RESULTS.md) and its speed targets on the H200 (README). The fused one-launch re-score is taken for
    Quest at up to FUSED_RESCORE_MAX_ROWS (sequence, KV head) rows."""
    from prr.algo.amortized import FUSED_RESCORE_MAX_ROWS

    cache = make_cache([100], hkv=2, d=32)
    am = AmortizedSelector(prr.BlockMetadata(prr.SparseConfig(top_k=5), cache), cache)
    assert (am.every, am.factor, am.scan_k, am.schedule, am.fused_rescore) == (32, 6.0, 30, "host", True)
    wide = make_cache([100] * (FUSED_RESCORE_MAX_ROWS // 2 + 1), hkv=2, d=32)
    assert not AmortizedSelector(prr.BlockMetadata(prr.SparseConfig(top_k=5), wide), wide).fused_rescore


def test_bad_configuration_is_refused():
    cache = make_cache([100], hkv=2, d=32)
    meta = prr.BlockMetadata(prr.SparseConfig(), cache)
    with pytest.raises(ValueError, match="factor"):
        AmortizedSelector(meta, cache, every=4, factor=0.5)
    with pytest.raises(ValueError, match="every"):
        AmortizedSelector(meta, cache, every=0)
    with pytest.raises(ValueError, match="oracle"):
        AmortizedSelector(prr.BlockMetadata(prr.SparseConfig(method="oracle"), cache), cache)
    with pytest.raises(ValueError, match="dsa"):
        LayerStep(cache, meta, 4, method="prr", predictor=prr.HoltPredictor(1, 1, 2, 8),
                  amortized=AmortizedSelector(meta, cache))
    meta.amortized = AmortizedSelector(meta, cache)  # attached to the metadata: PRR would get no scores either
    with pytest.raises(ValueError, match="dsa"):
        LayerStep(cache, meta, 4, method="prr", predictor=prr.HoltPredictor(1, 1, 2, 8))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_host_schedule_selects_what_the_device_schedule_selects(method, backend):
    """Decoding a token per step (no overflow, no shrink): the host schedule (a plain run, and a replay of one
    graph per step kind chosen by the host clock) selects exactly what the one-graph device schedule does, at
    every step."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    kw = dict(dtype=dtype, backend=backend)
    dev = [(g.indices.cpu(), g.counts.cpu()) for _t, g, *_ in _decode(method, 13, 4, 2.0, **kw)]
    for replay in (False, True):
        host = [(g.indices.cpu(), g.counts.cpu()) for _t, g, *_ in _decode(method, 13, 4, 2.0, schedule="host",
                                                                            replay=replay, **kw)]
        for t, (a, b) in enumerate(zip(dev, host, strict=True)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (replay, t)


def test_host_schedule_rescore_steps_skip_the_full_scorer(monkeypatch):
    """A re-score step on the host schedule runs no full scorer (the device schedule's one graph runs it gated,
    with length 0, at every step); a scan step runs it for every sequence."""
    cache = make_cache([300, 250], hkv=2, d=32, capacity=340)
    meta = prr.BlockMetadata(prr.SparseConfig(top_k=4), cache)
    calls = []
    real = meta.scores
    monkeypatch.setattr(meta, "scores", lambda q, c: calls.append(c.seq_lens.tolist()) or real(q, c))
    q = make_query(cache, 2)
    for schedule, want in (("device", [[300, 250], [0, 0], [0, 0], [300, 250], [0, 0]]),
                           ("host", [[300, 250], [300, 250]])):
        calls.clear()
        am = AmortizedSelector(meta, cache, every=3, factor=2.0, schedule=schedule)
        for _ in range(5):
            am.select(q, cache)
        assert calls == want and am.scans.tolist() == [2, 2] and am.host_step == (5 if schedule == "host" else 0)
    with pytest.raises(RuntimeError, match="host schedule"):
        AmortizedSelector(meta, cache, schedule="device").forced(True).__enter__()
    with pytest.raises(ValueError, match="schedule"):
        AmortizedSelector(meta, cache, schedule="gpu")


def test_host_schedule_lists_only_the_slots_until_the_next_scan():
    """The host schedule's known limit, pinned: more new blocks in a period than slots are not candidates until
    the next scan (the device schedule rescans at once); a reset() makes the next step a scan."""
    cache = make_cache([200], hkv=2, d=32, capacity=400)
    meta = prr.BlockMetadata(prr.SparseConfig(top_k=3), cache)
    am = AmortizedSelector(meta, cache, every=100, factor=1.0, new_slots=1, schedule="host")
    q = make_query(cache, 2)
    am.select(q, cache)
    cache.seq_lens += 48  # three new blocks (13, 14, 15), one slot
    meta.build(cache)
    am.select(q, cache)
    assert am.scans.tolist() == [1] and am.cand[0, 0, -1].item() == 13
    am.reset()
    got = am.select(q, cache)
    assert am.scans.tolist() == [1] and am.host_step == 1  # reset zeroed the counters: this was a scan
    assert torch.equal(got.indices, prr.select(q, cache, meta).indices)


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_triton_path_equals_reference_path(method):
    ref = [(g.indices, g.counts) for _t, g, *_ in _decode(method, 12, 4, 2.0, dtype=torch.float32)]
    tri = [(g.indices.cpu(), g.counts.cpu())
           for _t, g, *_ in _decode(method, 12, 4, 2.0, dtype=torch.float32, backend="triton")]
    for t, (a, b) in enumerate(zip(ref, tri, strict=True)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), t


def test_layer_step_runs_the_amortized_selection():
    cache = make_cache([300], hkv=2, d=32, capacity=340)
    cfg = prr.SparseConfig(top_k=4)
    meta = prr.BlockMetadata(cfg, cache)
    am = AmortizedSelector(meta, cache, every=4, factor=2.0)
    twin = AmortizedSelector(meta, cache, every=4, factor=2.0)
    step = LayerStep(cache, meta, 8, method="dsa", amortized=am)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        cache.append(*(torch.randn(1, 2, 32, generator=gen, dtype=torch.float64) for _ in range(2)))
        meta.append(cache)
        q = torch.randn(1, 8, 32, generator=gen, dtype=torch.float64)
        o, _ = step.run(q)
        sel = twin.select(q, cache)
        assert torch.equal(step.last["s_idx"], sel.indices)
        o_ref, _ = prr.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size)
        torch.testing.assert_close(o, o_ref)
    assert int(am.scans) == 2  # steps 0 and 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schedule", ["device", "host"])
@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_graphs_serve_scan_and_rescore_steps(method, schedule):
    """Device schedule: one graph for every step; host schedule: a graph per step kind, replayed by the host
    clock. Either way the replayed selections are the eager selector's (device schedule) at every step."""
    dev = "cuda"
    base = make_cache([5000, 3001], hkv=2, d=64, capacity=5100, dtype=torch.float32)
    cache = prr.KVCache(base.k.to(dev, torch.bfloat16), base.v.to(dev, torch.bfloat16), base.page_table.to(dev),
                        base.seq_lens.to(dev))
    cfg = prr.SparseConfig.from_budget(method, 1024)
    meta = prr.BlockMetadata(cfg, cache)
    am = AmortizedSelector(meta, cache, every=4, factor=3.0, schedule=schedule)
    twin = AmortizedSelector(meta, cache, every=4, factor=3.0, schedule="device")
    step = LayerStep(cache, meta, 8, method="dsa", amortized=am)
    step.capture()
    assert (step.kind_graphs is not None) == (schedule == "host")
    am.reset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(9):  # scans at 0, 4, 8
        q = torch.randn(2, 8, 64, generator=gen).to(dev, torch.bfloat16)
        step.replay(q)
        sel = twin.select(q, cache)
        assert torch.equal(step.last["s_idx"], sel.indices)
    assert am.scans.tolist() == [3, 3]


def test_bench_select_code_runs_on_cpu_with_a_stand_in_timer():
    """The GPU benchmark's case code (not its timing) on a CPU: every op it times runs, one row each, and the
    target check reads the rows."""
    from prr.bench import amortized as bench

    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 100.0

    rows = bench.bench_case("llama-3.1-8b", 1, 8192, "quest", [(4, 2.0)], 4.0, 5.0, timer=timer, device="cpu",
                            dtype=torch.float32)
    ops_ = [r.op for r in rows]
    assert ops_ == ["selection", "dsa_step", "gated_scan_idle", "amortized_scan_c2", "amortized_rescore_c2",
                    "candidate_score_c2", "candidate_topk_c2", "dsa_step_rescore_c2", "amortized_rescore_c2_host",
                    "dsa_step_rescore_c2_host", "selection_m4c2", "dsa_step_m4c2", "selection_m4c2_host",
                    "dsa_step_m4c2_host"]
    assert len(calls) == len(rows)
    assert rows[-1].median_us == 25.0  # four steps per timed call
    fake = [{**r.to_dict(), "case": "llama-3.1-8b/b8/512K/quest"} for r in rows]
    fake[-2]["net_us"] = 10.0  # the host schedule's selection: 100 / 10, met
    targets = bench.check_targets(fake)
    assert [t["op"] for t in targets] == ["selection_m4c2", "dsa_step_m4c2", "selection_m4c2_host",
                                          "dsa_step_m4c2_host"]
    assert [t["met"] for t in targets[::2]] == [False, True]


def test_locality_replay_is_the_selector_offline():
    """prr locality's offline replay (score history -> amortized selections) picks what the selector picks."""
    from prr.eval import locality

    hist, got = [], []
    for _t, sel, full, cfg, cache in _decode("quest", 30, every=6, factor=1.5, bsz=2):
        hist.append((full.scores, prr.num_blocks(cache.seq_lens, cfg.block_size)))
        got.append(prr.ops.selection_mask(sel.indices, sel.counts, full.scores.shape[-1]))
    scores, nblk = torch.stack([s for s, _ in hist]), torch.stack([n for _, n in hist])
    offline = locality.amortized_selections(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, 6, 1.5)
    j = torch.arange(scores.shape[-1])
    forced = (j < cfg.n_sink) | (j >= nblk.long()[:, :, None, None] - cfg.n_local)
    assert torch.equal(offline, torch.stack(got) & ~forced)
    hits = locality.amortized_hit_rates(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, [(1, 1.0), (6, 1.5)])
    assert hits["scan m1 c1"] == 1.0 and hits["ema m1 c1"] <= 1.0
    assert 0.5 < hits["scan m6 c1.5"] < 1.0  # the drifting query makes candidates miss: the metric can move


def test_eval_names_and_agreement():
    from prr.eval.amortized import agreement, method_name, parse_method, relative_cost

    assert method_name("quest", 16, 4.0) == "quest_m16c4" and parse_method("quest_m16c4") == ("quest", 16, 4.0)
    assert parse_method("infllm_v2_m8c2.5") == ("infllm_v2", 8, 2.5) and parse_method("quest") is None
    base = {"task": "passkey", "length": 2048, "seed": 0, "budget": 1024}
    rows = [{**base, "method": "quest", "output": "42", "score": 1.0},
            {**base, "method": "quest_m8c3", "output": "42", "score": 1.0},
            {**base, "seed": 1, "method": "quest", "output": "7", "score": 0.0},
            {**base, "seed": 1, "method": "quest_m8c3", "output": "8", "score": 0.0}]
    assert agreement(rows) == [{"method": "quest_m8c3", "budget": 1024, "instances": 2, "same_output": 0.5,
                                "same_score": 1.0, "same_output_count": 1, "same_score_count": 2}]
    # Per instance: the same outputs on different instances do not count.
    swapped = [rows[0], {**rows[1], "output": "7"}, rows[2], {**rows[3], "output": "42"}]
    assert agreement(swapped)[0]["same_output_count"] == 0
    assert relative_cost(16, 4, 32768, 125) == pytest.approx(1 / 16 + (3 + 500 + 2) / 32768)


def test_eval_cli_amortized_with_a_scan_every_step_is_the_full_scan(smollm, tmp_path, capsys):
    """`prr eval --amortized`: m = 1 (a scan every step) gives the full-scan Quest's answers and perplexity
    exactly; the agreement and the perplexity against the full scan are saved and printed."""
    import json

    from prr.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", "--tasks", "passkey", "--lengths", "600", "--methods", "quest", "--budgets", "256",
                 "--amortized", "1x1,4x2", "--ppl-length", "400", "--ppl-steps", "6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    agree = {a["method"]: a for a in res["amortized_agreement"]}
    assert set(agree) == {"quest_m1c1", "quest_m4c2"}
    assert agree["quest_m1c1"]["same_output"] == 1.0
    ppl = {r["method"]: r for r in res["perplexity"]}
    assert ppl["quest_m1c1"]["vs_full_scan_pct"] == 0.0 and "vs_full_scan_pct" in ppl["quest_m4c2"]
    assert "same output as the full scan" in capsys.readouterr().out


def _tiny_engine(schedule, device="cpu", dtype=torch.float64):
    from prr.eval.amortized import AmortizedEngine
    from prr.model import ModelConfig
    from prr.model.llama import Llama
    from prr.model.weights import random_weights

    cfg = ModelConfig(vocab_size=64, hidden=128, ffn=256, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=64,
                      max_context=1024)
    model = Llama(cfg, random_weights(cfg, dtype=dtype, device=device))
    eng = AmortizedEngine(model, None, every=3, factor=2.0, schedule=schedule, sparse=prr.SparseConfig(top_k=6),
                          n_dense_layers=1)
    eng.fill_random(2, 500, 16)
    return eng


def test_engine_prepares_host_scheduled_selectors_for_capture():
    """Before capturing a graph per step kind the engine runs both kinds once per selector (compiling their
    kernels) and puts every selector's state back; selectors whose clocks disagree are refused."""
    eng = _tiny_engine("host")
    sels = [m.amortized for m in eng.metas if m is not None]
    assert len(sels) == 2
    before = [[t.clone() for t in (s.cand, s.nblk_scan, s.step, s.scans)] for s in sels]
    assert eng._host_scheduled_selectors() == sels
    for s, b in zip(sels, before, strict=True):
        assert all(torch.equal(x, y) for x, y in zip((s.cand, s.nblk_scan, s.step, s.scans), b, strict=True))
        assert s.host_step == 0
    sels[0].advance()
    with pytest.raises(RuntimeError, match="share"):
        eng._host_scheduled_selectors()
    assert _tiny_engine("device")._host_scheduled_selectors() == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_graphs_per_step_kind_equal_eager():
    """A whole decode step captured once per step kind (host schedule) replays what eager decoding computes,
    across scan and re-score steps (m = 3, 7 steps), and as the device schedule's one graph does."""
    runs = {}
    for name, schedule, graph in (("eager", "host", False), ("host", "host", True), ("device", "device", True)):
        eng = _tiny_engine(schedule, device="cuda", dtype=torch.bfloat16)
        tok = torch.tensor([3, 4], device="cuda")
        out = [eng.step(tok).clone()]  # one eager step compiles the kernels before a capture
        if graph:
            eng.capture_decode()
            assert (len(eng._graph.kinds) == 2) == (schedule == "host")
        for _ in range(7):
            logits = eng.step(tok).clone()
            out.append(logits)
            tok = logits.argmax(-1)
        runs[name] = torch.stack(out)
    assert torch.equal(runs["eager"], runs["host"]) and torch.equal(runs["eager"], runs["device"])
