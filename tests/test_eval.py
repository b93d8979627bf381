"""The offline evaluation: task generators and scoring, and the locality metrics on hand-made selections."""

import warnings

import pytest
import torch

import prr
from prr.eval import locality
from prr.eval.tasks import TASKS, make_task


@pytest.fixture(scope="module")
def tok(smollm):
    return smollm[1]


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_deterministic_fitted_and_hold_their_answers(tok, task):
    a = make_task(tok, task, 1500, seed=7)
    b = make_task(tok, task, 1500, seed=7)
    assert a.ids == b.ids and a.answers == b.answers
    assert abs(len(a.ids) - 1500) <= 0.02 * 1500
    assert make_task(tok, task, 1500, seed=8).ids != a.ids
    text = tok.decode(a.ids)
    if task == "common_words":  # each of the 10 answers is among the most frequent words of the list
        assert all(text.count(f". {w} ") == 6 for w in a.answers)
    elif task == "variable_tracking":  # each variable of the chain is assigned exactly once
        assert all(text.count(f"VAR {v} =") == 1 for v in a.answers) and a.meta["hops"] == 4
    else:
        assert all(text.count(x) == 1 for x in a.answers)
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("nothing") == 0.0


def test_task_errors(tok):
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        make_task(tok, "sudoku", 1000)
    with pytest.raises(ValueError, match="unknown haystack"):
        make_task(tok, "passkey", 1000, haystack="bible")
    assert make_task(tok, "niah_single", 1000, haystack="noise").task == "niah_single"


def test_noise_haystack_multivalue_scores_partial_credit(tok):
    t = make_task(tok, "niah_multivalue", 800, haystack="noise")
    assert len(t.answers) == 4 and t.score(f"{t.answers[0]} and {t.answers[2]}") == 0.5


def test_eval_run_on_a_small_instance(smollm, tok):
    from prr.eval import run

    model, _ = smollm
    rows = run.run_tasks(model, tok, ["passkey"], [600], ["dense", "quest", "prr_exact", "predicted"], [256],
                         progress=False)
    assert {r["method"] for r in rows} == {"dense", "quest", "prr_exact", "predicted"}
    assert next(r for r in rows if r["method"] == "prr_exact")["same_tokens_as_quest"] is True
    summ = run.summarize(rows)
    assert all(0 <= s["accuracy"] <= 100 for s in summ)
    ppl = run.run_perplexity(model, tok, 400, 8, ["dense", "quest"], [256], progress=False)
    assert ppl[0]["vs_dense_pct"] == 0.0 and all(r["perplexity"] < 100 for r in ppl)


def _history(sets, n=12, k=3):
    """Scores whose top-k dynamic blocks at step t are exactly sets[t] (sink 0, local n-1)."""
    t = len(sets)
    s = torch.zeros(t, 1, 1, n)
    for i, blocks in enumerate(sets):
        s[i, 0, 0, list(blocks)] = 10.0 + torch.arange(len(blocks), dtype=torch.float32)
    return s, torch.full((t, 1), n, dtype=torch.int32)


def test_overlap_against_lag_on_known_selections():
    sets = [{1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 6}, {5, 6, 7}]  # a window sliding one block per step
    scores, nblk = _history(sets)
    masks = locality.selections(scores, nblk, 3, 1, 1)
    for t, want in enumerate(sets):
        assert set(torch.nonzero(masks[t, 0, 0]).flatten().tolist()) == want
    ov = locality.overlap_vs_lag(masks, [1, 2, 3, 9])
    assert ov == pytest.approx({1: 2 / 3, 2: 1 / 3, 3: 0.0})  # lag 9 is longer than the history: absent


def test_previous_step_predictor_hit_rate_on_known_selections():
    sets = [{1, 2, 3}, {1, 2, 3}, {1, 2, 4}, {1, 2, 4}, {5, 6, 7}, {5, 6, 7}]
    scores, nblk = _history(sets)
    res = locality.predictor_hit_rates(scores, nblk, 3, 1, 1, ratios=(1.0,))
    # previous-step: steps 1..5 hit 3, 2, 3, 0, 3 of 3 blocks
    hit, fp = res[("previous", 1.0)]
    assert hit == pytest.approx(11 / 15) and fp == pytest.approx(4 / 5)
    # re-ranking with the live scores among 3K = 9 EMA candidates recovers every set the EMA has seen blocks of
    assert res[("rerank", 1.0)][0] >= hit


def test_guess_replay_on_known_selections():
    """The previous selection bounds the next guess: it holds at every step, even when the set jumps; P (its
    top-K', here S itself at K' = K) hits what the previous-step predictor hits."""
    sets = [{1, 2, 3}, {1, 2, 3}, {1, 2, 4}, {1, 2, 4}, {5, 6, 7}, {5, 6, 7}]
    scores, nblk = _history(sets)
    g = locality.guess_replay(scores, nblk, 3, 1, 1, spec_k=3)
    assert g["held"] == 1.0 and g["too_high"] == g["too_low"] == 0.0 and g["rows"] == 5
    assert g["p_hit_rate"] == pytest.approx(11 / 15)
    carried = locality.guess_replay(scores, nblk, 3, 1, 1, spec_k=3, source="carried", guess_k=3)
    assert carried["rows"] == 5 and carried["held"] + carried["too_high"] + carried["too_low"] == pytest.approx(1.0)


def test_eval_cli_without_dense_prints_perplexity(smollm, tmp_path, capsys):
    """Without a dense baseline there is no "vs dense" to print: the command still finishes and saves."""
    from prr.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", "--tasks", "passkey", "--lengths", "600", "--methods", "quest", "--budgets", "256",
                 "--ppl-length", "400", "--ppl-steps", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "vs dense" not in text and out.exists()


def test_teacher_forced_nll_keeps_the_target_on_the_logits_device(monkeypatch):
    """Perplexity on CUDA once failed: "Expected all tensors to be on the same device ... target is on cpu".
    Without a GPU, logits on the meta device stand in for any non-CPU device: cross_entropy itself refuses
    a target on another device (the meta result is then replaced by a number so the mean can be taken)."""
    from types import SimpleNamespace

    from prr.eval import run

    real_ce = torch.nn.functional.cross_entropy
    seen = []

    def ce(logits, target):
        real_ce(logits, target)  # raises on a device mismatch
        seen.append((logits.device.type, target.device.type))
        return torch.tensor(2.0)

    meta_logits = torch.zeros(1, 16, device="meta")
    eng = SimpleNamespace(_last_logits=meta_logits, model=SimpleNamespace(device=torch.device("meta")),
                          step=lambda tokens: (seen.append(("step", tokens.device.type)), meta_logits)[1])
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    assert run.teacher_forced_nll(eng, [1, 2, 3, 4], 1, 3) == 2.0
    assert seen.count(("meta", "meta")) == 3 and seen.count(("step", "meta")) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["dense", "dsa", "prr"])
def test_teacher_forced_nll_graph_path_equals_eager_on_gpu(attention):
    """Perplexity's decode path on a GPU (first step eager, then the captured step replayed) gives the eager
    path's NLL, on a small random model (the bundled one is not needed for the graph mechanics)."""
    from prr.eval import run
    from prr.model import ModelConfig
    from prr.model.engine import Engine
    from prr.model.llama import Llama
    from prr.model.weights import random_weights

    cfg = ModelConfig(vocab_size=64, hidden=128, ffn=96, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=64,
                      max_context=1024)
    model = Llama(cfg, random_weights(cfg, dtype=torch.bfloat16, device="cuda"))
    ids = torch.randint(0, 64, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    nll = []
    for graphs in (False, True):
        eng = Engine(model, None, attention=attention, sparse=prr.SparseConfig(top_k=6), n_dense_layers=1,
                     graphs=graphs, ratio=1.5)
        eng.fill_random(1, 600, 12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to eager stepping would warn
            nll.append(run.teacher_forced_nll(eng, ids, 600, 8))
    assert nll[0] == pytest.approx(nll[1], rel=1e-6, abs=1e-6)
