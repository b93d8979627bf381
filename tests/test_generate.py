"""Generation with the bundled SmolLM2 on the CPU: ragged batches, sampling, stop strings, streaming, errors."""

import json

import pytest
import torch

import prr
from prr.model.engine import Engine
from prr.model.generation import GenerationConfig
from prr.model.prompts import pydoc_text
from prr.model.sampling import SamplingConfig

QUEST = prr.SparseConfig.from_budget("quest", 256)  # 16 blocks: prompts of 200+ tokens are sparse


def _prompts(tok):
    ids = tok.encode(pydoc_text())
    # Three lengths (one shorter than the budget) and a chat question answered in a few tokens, then EOS.
    return [ids[5000:5420], ids[9000:9600], tok.chat([{"role": "user", "content": "What is the capital of France?"}]),
            ids[12000:12230]]


@pytest.mark.parametrize("attention", ["dense", "dsa", "prr"])
def test_ragged_batch_gives_each_prompt_its_tokens_alone(smollm, attention):
    """Each sequence of a ragged batch gets the greedy tokens it gets alone; the chat answer stops at EOS while
    the others go on, and from then on its cache holds one token (it no longer costs attention)."""
    model, tok = smollm
    prompts = _prompts(tok)
    eng = Engine(model, tok, attention=attention, sparse=QUEST)
    seqs, st = eng.generate_batch(prompts, GenerationConfig(14))
    for p, s in zip(prompts, seqs, strict=True):
        alone, _ = Engine(model, tok, attention=attention, sparse=QUEST).generate(p, 14)
        assert s.tokens == alone
    assert [s.finish_reason for s in seqs] == ["length", "length", "eos", "length"]
    assert len(seqs[2].tokens) < 12 and seqs[2].text == "The capital of France is Paris."
    lens = eng.caches[-1].seq_lens.tolist()
    assert lens[2] <= 1 and lens[0] == len(prompts[0]) + 13
    assert st.new_tokens == sum(len(s.tokens) for s in seqs) and st.steady_steps == 12 and st.warmup_steps == 1
    if attention == "dense":
        assert st.blocks_per_step == [] and seqs[0].blocks_per_step is None
    else:  # block counts were accumulated on the device, per sequence
        assert seqs[0].blocks_per_step == QUEST.k_max  # 27+ blocks: the full budget every step
        assert seqs[2].blocks_per_step < QUEST.k_max  # a short prompt: all of its few blocks
        assert (seqs[0].hit_rate is not None) == (attention == "prr")
        if attention == "prr":
            assert 0.5 < st.hit_rate <= 1.0


def test_seeded_sampling_is_reproducible(smollm):
    model, tok = smollm
    prompts = _prompts(tok)[1:3]

    def run(seed):
        cfg = GenerationConfig(12, SamplingConfig(temperature=1.2, top_p=0.95, top_k=50, seed=seed),
                               stop_at_eos=False)
        return [s.tokens for s in Engine(model, tok).generate_batch(prompts, cfg)[0]]

    a = run(7)
    assert a == run(7)
    assert a != run(8)
    greedy = [s.tokens for s in Engine(model, tok).generate_batch(prompts, GenerationConfig(12, stop_at_eos=False))[0]]
    assert a != greedy


def test_stop_strings_cut_where_they_should_and_streaming_adds_up(smollm):
    model, tok = smollm
    prompt = _prompts(tok)[0]
    full, _ = Engine(model, tok).generate(prompt, 20, stop_at_eos=False)
    text = tok.decode(full)
    stop = text[len(text) // 2:len(text) // 2 + 4]  # a piece of the greedy continuation's second half
    assert stop.strip()
    g = Engine(model, tok).stream([prompt], GenerationConfig(20, stop=(stop, "NEVER SEEN")))
    events = list(g)
    seq = g.sequences[0]
    assert seq.finish_reason == "stop" and seq.stop_string == stop
    assert seq.text == text[:text.find(stop)]
    assert seq.tokens == full[:len(seq.tokens)] and len(seq.tokens) < 20
    assert "".join(e.text for e in events) == seq.text  # the streamed pieces add up to the (cut) text
    assert [e.token for e in events] == seq.tokens and events[-1].finish_reason == "stop"


def test_bad_batches_are_clear_errors(smollm):
    model, tok = smollm
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="prompt 1 of the batch is empty"):
        eng.generate_batch([[1, 2, 3], []], GenerationConfig(4))
    with pytest.raises(ValueError, match="the prompt is empty"):
        eng.generate([], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        eng.generate_batch([[1] * 10, [1] * 8190], GenerationConfig(4))


def test_cli_generate_batch_from_files_with_sampling_and_json(smollm, tmp_path, capsys):
    from prr.cli import main

    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("Name a color.")
    b.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n\n" + json.dumps("Count to three.") + "\n")
    out = tmp_path / "g.json"
    argv = ["generate", "--prompt-file", str(a), "--prompt-file", str(b), "--attention", "dsa", "--budget", "256",
            "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert len(res["sequences"]) == 3 and res["stats"]["batch"] == 3
    assert res["env"]["torch"] == torch.__version__ and res["env"]["commit"] and res["env"]["source_sha1"]
    for s in res["sequences"]:
        assert 1 <= s["new_tokens"] <= 5 and s["finish_reason"] in ("eos", "length") and s["text"] is not None
    assert "steady state" in capsys.readouterr().err
    for extra, msg in ((["--temperature", "-1"], "temperature must be >= 0"),
                       (["--top-p", "1.5"], r"top_p must lie in (0, 1]"),
                       (["--prompt", "  "], "prompt 0 of the batch is empty")):
        assert main(argv[:5] + extra) == 2
        assert msg in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    assert main(["generate", "--prompt-file", str(bad)]) == 2
    assert 'bad.jsonl:1: expected a JSON string or an object with a "prompt" string' in capsys.readouterr().err
