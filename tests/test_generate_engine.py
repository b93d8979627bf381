"""The generation engine on small random models: attention="auto", ragged caches filled directly, the GLM-4-9B-1M
preset, and (on a GPU) the captured decode step against eager decoding."""

import pytest
import torch

import prr
from prr.model import MODEL_PRESETS, ModelConfig
from prr.model import auto as auto_mod
from prr.model.engine import Engine
from prr.model.generation import GenerationConfig
from prr.model.llama import Llama
from prr.model.sampling import SamplingConfig
from prr.model.weights import random_weights


def _model(dtype=torch.float64, device="cpu", max_context=2048, head_dim=8):
    cfg = ModelConfig(vocab_size=64, hidden=64 if head_dim == 8 else 128, ffn=96, num_layers=3, num_q_heads=4,
                      num_kv_heads=2, head_dim=head_dim, max_context=max_context)
    return Llama(cfg, random_weights(cfg, dtype=dtype, device=device))


def test_glm_1m_preset_has_the_papers_shapes():
    c = MODEL_PRESETS["glm-4-9b-1m"]
    assert (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim, c.hidden, c.ffn, c.vocab_size) == (
        40, 32, 2, 128, 4096, 13696, 151552)
    assert c.max_context == 1 << 20 and ModelConfig.from_name("glm-4-9b-1m") is c


def test_find_crossover_takes_the_first_context_from_which_dsa_keeps_winning():
    # dense grows with the context, DSA has a fixed selection cost: they cross between 2K and 4K
    def measure(ctx):
        return 0.01 * ctx, 30 + 0.001 * ctx

    cross, times = auto_mod.find_crossover(measure, auto_mod.probe_contexts(1 << 20))
    assert cross == 4096 and list(times) == ["1024", "2048", "4096", "8192"]  # stops after two wins in a row
    # a win that does not last is no crossover
    noisy = {1024: (1, 2), 2048: (3, 2), 4096: (5, 6), 8192: (9, 6), 16384: (20, 7)}
    assert auto_mod.find_crossover(lambda c: noisy[c], sorted(noisy))[0] == 8192
    assert auto_mod.find_crossover(lambda c: (1, 2), [1024, 2048])[0] == auto_mod.NEVER

    def oom(ctx):
        if ctx > 2048:
            raise torch.cuda.OutOfMemoryError("test")
        return 1, 2

    assert auto_mod.find_crossover(oom, [1024, 2048, 4096])[0] == auto_mod.NEVER  # stops at what fits
    assert auto_mod.probe_contexts(5000) == [1024, 2048, 4096, 5000]


def test_profiled_crossover_is_cached_per_gpu_and_shape(tmp_path):
    calls = []

    def measure(ctx):
        calls.append(ctx)
        return 0.01 * ctx, 30 + 0.001 * ctx

    store = auto_mod.CrossoverCache(str(tmp_path / "x.json"))
    cfg = prr.SparseConfig.from_budget("quest", 2048)
    kw = dict(dtype=torch.bfloat16, device="cpu", max_context=1 << 17, cache=store, measure=measure, gpu_name="G")
    assert auto_mod.profile_crossover(32, 8, 128, 1, cfg, **kw) == 4096
    n = len(calls)
    assert auto_mod.profile_crossover(32, 8, 128, 1, cfg, **kw) == 4096 and len(calls) == n  # from the cache
    auto_mod.profile_crossover(32, 8, 128, 4, cfg, **kw)  # another batch is another shape
    assert len(calls) > n
    m = len(calls)
    auto_mod.profile_crossover(32, 8, 128, 1, cfg, refresh=True, **kw)
    assert len(calls) > m


def test_auto_attention_is_dense_below_the_crossover_and_sparse_above():
    model = _model()
    sparse = prr.SparseConfig(top_k=4)
    for ctx, expected in ((300, "dense"), (700, "dsa")):
        eng = Engine(model, None, attention="auto", sparse=sparse, auto_crossover=512)
        eng.fill_random(2, ctx, 4)
        assert eng.attention == expected and eng.auto_decision["crossover"] == 512
        assert (eng.metas[-1] is not None) == (expected == "dsa")
    eng = Engine(model, None, attention="auto", sparse=sparse, auto_sparse="prr", auto_crossover=512)
    eng.fill_random(1, 600, 4)  # resolved against the caches' context
    assert eng.attention == "prr"
    # On the CPU the documented default: the bundled model's whole window stays dense.
    assert Engine(model, None, attention="auto").crossover(1) == auto_mod.CPU_CROSSOVER > 8192
    with pytest.raises(ValueError, match="auto_sparse"):
        Engine(model, None, attention="auto", auto_sparse="dense")


def test_auto_ratio_follows_the_budget_profiler(monkeypatch):
    """ratio="auto": on a CPU the fixed ratio; where the profiler says speculation does not pay, PRR decodes as
    serialized DSA (the same tokens) and says why; where it pays, K' is the profiler's; a new prefill decides
    again."""
    from prr.runtime import BudgetDecision

    model = _model()
    sparse = prr.SparseConfig(top_k=4)
    prompt = torch.randint(0, 64, (1, 200), generator=torch.Generator().manual_seed(3))  # 13 blocks: K + 6
    toks = {}
    for name, attention, ratio in (("dsa", "dsa", 1.5), ("fixed", "prr", 1.5), ("auto", "prr", "auto")):
        eng = Engine(model, None, attention=attention, sparse=sparse, ratio=ratio, calibrate_window=3)
        toks[name], _ = eng.generate(prompt[0], 6)
        if name == "auto":  # a CPU: not profiled, serialized DSA
            assert eng.attention == "dsa" and eng.spec_decision["topk"] == "full"
            assert eng.spec_decision["speculation"] == "off" and "a CPU" in eng.spec_decision["reason"]
    assert toks["fixed"] == toks["auto"] == toks["dsa"]

    decisions = iter([BudgetDecision(None, 10.0, 10.5, -0.05, "off: gain -5.0% < 2%"),
                      BudgetDecision(3, 10.0, 9.0, 0.1, "on: gain +10.0%", topk="guessed"),
                      BudgetDecision(None, 10.0, 10.5, -0.05, "off: gain -5.0% < 2%", topk="guessed")])
    monkeypatch.setattr(Engine, "_profile_speculation", lambda self, layer: next(decisions))
    eng = Engine(model, None, attention="prr", sparse=sparse, ratio="auto", calibrate_window=3)
    out, _ = eng.generate(prompt[0], 6)
    assert eng.attention == "dsa" and eng.requested == "prr" and out == toks["dsa"]
    assert eng.spec_decision["speculation"] == "off" and eng.spec_decision["gain"] == -0.05
    out, _ = eng.generate(prompt[0], 6)  # a new prefill: the profiler again, now K' = 3
    assert eng.attention == "prr" and eng.spec_decision["speculation"] == "on" and out == toks["dsa"]
    assert prr.algo.step.speculative_top_k(sparse.top_k, eng.ratio) == 3
    out, st = eng.generate(prompt[0], 6)  # speculation off, the guessed top-K on: DSA on the guessed top-K
    assert eng.attention == "prr" and not eng.speculate and out == toks["dsa"]
    assert all(s.settings.method == "dsa" and s.settings.topk == "guessed" for s in eng._steps.values())
    assert st.guess is not None and st.guess["held"] == 1.0


def test_auto_ratio_under_tensor_parallelism_takes_rank_0s_decision():
    """Each rank times its own slice and might decide otherwise: every rank takes rank 0's K' and search (the
    collective itself is tested over gloo in test_tp.py); a rank that agrees keeps its own decision."""
    from types import SimpleNamespace

    from prr.model.engine import _rank0_decision
    from prr.runtime import BudgetDecision

    def group(rank0):  # a TP group whose rank 0 decided `rank0` ([K' or -1, guessed])
        return SimpleNamespace(active=True, rank0_ints=lambda mine, device: list(rank0))

    dev = torch.device("cpu")
    off = BudgetDecision(None, 10.0, 10.5, -0.05, "off: gain -5.0% < 2%", topk="full")
    on = BudgetDecision(3, 10.0, 9.0, 0.1, "on: gain +10.0%", topk="guessed")
    assert _rank0_decision(None, off, dev) is off and _rank0_decision(SimpleNamespace(active=False), on, dev) is on
    assert _rank0_decision(group([-1, 0]), off, dev) is off
    got = _rank0_decision(group([3, 1]), off, dev)
    assert got.spec_k == 3 and got.topk == "guessed" and got.enabled and got.reason.startswith("rank 0's decision")
    got = _rank0_decision(group([-1, 1]), on, dev)
    assert got.spec_k is None and got.topk == "guessed" and not got.enabled and "+10.0%" in got.reason


def test_ragged_random_fill_decodes_and_prr_matches_dsa():
    """Caches filled directly at different lengths (the GPU benchmark's path): PRR exact gives DSA's tokens,
    greedy and sampled, and every sequence runs to max_new_tokens (no tokenizer, no EOS)."""
    model = _model()
    sparse = prr.SparseConfig(top_k=4)
    out = {}
    for attention in ("dsa", "prr"):
        for name, sampling in (("greedy", SamplingConfig()), ("sampled", SamplingConfig(temperature=1.0, seed=5))):
            eng = Engine(model, None, attention=attention, sparse=sparse, n_dense_layers=1)
            eng.fill_random(3, [150, 400, 257], 10)
            seqs, st = eng.generate_batch(None, GenerationConfig(10, sampling))
            assert [s.finish_reason for s in seqs] == ["length"] * 3 and st.new_tokens == 30
            assert [s.prompt_tokens for s in seqs] == [150, 400, 257] and seqs[0].text is None
            out[attention, name] = [s.tokens for s in seqs]
    assert out["dsa", "greedy"] == out["prr", "greedy"] and out["dsa", "sampled"] == out["prr", "sampled"]
    assert out["dsa", "greedy"] != out["dsa", "sampled"]
    with pytest.raises(ValueError, match="context must be a positive length or 2 of them"):
        Engine(model, None).fill_random(2, [10], 4)


class _EosTokenizer:
    """Just what generation asks of a tokenizer: EOS ids and a decoder."""

    def __init__(self, eos: int):
        self.eos_ids = [eos]

    def decode(self, ids):
        return " ".join(map(str, ids))


def _early_stop_run(model, attention, lens, graphs=True):
    """Decode a random-filled ragged batch, then again with one of sequence 1's tokens as EOS: every sequence
    must stop at its first EOS and keep the tokens it had, while the sequence that stopped no longer grows."""
    sparse = prr.SparseConfig(top_k=6)

    def run(tok):
        eng = Engine(model, tok, attention=attention, sparse=sparse, n_dense_layers=1, graphs=graphs)
        eng.fill_random(len(lens), lens, 12)
        return eng, eng.generate_batch(None, GenerationConfig(12))[0]

    _, free = run(None)
    eos = free[1].tokens[3]
    eng, seqs = run(_EosTokenizer(eos))
    for f, s in zip(free, seqs, strict=True):
        cut = f.tokens.index(eos) + 1 if eos in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:cut]
        assert s.finish_reason == ("eos" if cut < len(f.tokens) or f.tokens[-1] == eos else "length")
    assert seqs[1].finish_reason == "eos" and len(seqs[1].tokens) <= 4
    if any(s.finish_reason == "length" for s in seqs):  # later steps ran: the finished sequence attends 1 token
        assert eng.caches[-1].seq_lens[1].item() <= 1
    return [s.tokens for s in seqs]


@pytest.mark.parametrize("attention", ["dense", "dsa", "prr"])
def test_a_sequence_that_stops_early_leaves_the_others_unchanged(attention):
    _early_stop_run(_model(), attention, [150, 400, 257])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["dense", "dsa", "prr"])
def test_generate_graph_equals_eager_on_gpu_when_sequences_stop_early(attention):
    model = _model(torch.bfloat16, "cuda", max_context=1024, head_dim=64)
    lens = [300, 520, 131]
    assert _early_stop_run(model, attention, lens, graphs=False) == _early_stop_run(model, attention, lens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["dense", "dsa", "prr"])
def test_generate_graph_equals_eager_on_gpu(attention):
    """The captured decode step (model, sampler, device statistics, freezing of finished sequences) gives the
    eager step's tokens and statistics, greedy and sampled, on a ragged batch (head dim 64: the kernels' tiles
    need 16 or more)."""
    model = _model(torch.bfloat16, "cuda", max_context=1024, head_dim=64)
    sparse = prr.SparseConfig(top_k=6)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, top_p=0.9, top_k=20, seed=3,
                                                      repetition_penalty=1.1)):
        runs = []
        for graphs in (False, True):
            eng = Engine(model, None, attention=attention, sparse=sparse, n_dense_layers=1, graphs=graphs)
            eng.fill_random(3, [300, 520, 131], 12)
            seqs, st = eng.generate_batch(None, GenerationConfig(12, sampling))
            assert st.cuda_graph == graphs and st.steady_steps == 10
            runs.append(([s.tokens for s in seqs], [(s.blocks_per_step, s.hit_rate) for s in seqs]))
        assert runs[0] == runs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crossover_profiles_on_gpu(tmp_path):
    cfg = prr.SparseConfig.from_budget("quest", 512)
    store = auto_mod.CrossoverCache(str(tmp_path / "x.json"))
    cross = auto_mod.profile_crossover(32, 8, 128, 1, cfg, dtype=torch.bfloat16, device="cuda", max_context=16384,
                                       cache=store)
    entry = next(iter(store._load().values()))
    assert entry["crossover"] == cross and entry["times_us"]["1024"][0] > 0
