"""The Llama engine on the bundled real model (SmolLM2-135M-Instruct, CPU), its loaders and the CLI."""

import json
import os

import pytest
import torch

import prr
from prr.model import ModelConfig, load_model
from prr.model.engine import Engine
from prr.model.llama import Llama
from prr.model.prompts import passkey_prompt, pydoc_text
from prr.model.weights import load_gguf, load_hf_dir, random_weights


def test_chat_prompt_is_answered_sensibly(smollm):
    model, tok = smollm
    ids = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    out, st = Engine(model, tok).generate(ids, 16)
    assert "Paris" in tok.decode(out) and st.new_tokens <= 16


def test_perplexity_on_real_text_is_low(smollm):
    model, tok = smollm
    ids = torch.tensor([tok.encode(pydoc_text())[:1024]])
    logits = model.prefill(ids, lambda *a: None, all_logits=True)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(nll.exp()) < 15, float(nll.exp())


def test_dsa_and_prr_exact_give_identical_greedy_tokens(smollm):
    """64 greedy steps on ~2K tokens of real text: PRR exact reproduces serialized DSA token for token."""
    model, tok = smollm
    ids = tok.encode(pydoc_text())[5000:7000]
    cfg = prr.SparseConfig.from_budget("quest", 512)
    dense = Engine(model, tok, sparse=cfg)
    dense.prefill(ids, 64)
    a, _ = Engine(model, tok, attention="dsa", sparse=cfg).generate(ids, 64, stop_at_eos=False, prefilled_from=dense)
    p_eng = Engine(model, tok, attention="prr", sparse=cfg, ratio=1.5)
    p, st = p_eng.generate(ids, 64, stop_at_eos=False, prefilled_from=dense)
    assert a == p and len(a) == 64
    assert st.hit_rate > 0.8  # calibrated on the prompt, the predictor earns real hits
    assert st.blocks_per_step[0] == cfg.k_max


def test_dsa_covering_every_block_equals_dense(smollm):
    model, tok = smollm
    ids = tok.encode(pydoc_text())[:300]
    cfg = prr.SparseConfig(top_k=40)  # 43 blocks of 16 >= 332 tokens
    d, _ = Engine(model, tok, sparse=cfg).generate(ids, 32, stop_at_eos=False)
    s, _ = Engine(model, tok, attention="dsa", sparse=cfg).generate(ids, 32, stop_at_eos=False)
    assert d == s


def test_passkey_prompt_is_deterministic_and_fitted(smollm):
    _, tok = smollm
    ids, key = passkey_prompt(tok, 3000, 0.5, seed=3)
    ids2, key2 = passkey_prompt(tok, 3000, 0.5, seed=3)
    assert ids == ids2 and key == key2 and abs(len(ids) - 3000) <= 30
    assert tok.decode(ids).count(key) == 2  # "The pass key is K. ... K is the pass key."


def test_errors_are_clear(smollm, tmp_path):
    model, tok = smollm
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        load_model("gpt-5")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_gguf(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(str(bad))
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        Engine(model, tok).prefill(list(range(8190)), 8)
    with pytest.raises(ValueError, match="unknown attention 'fast'"):
        Engine(model, tok, attention="fast")


def _tiny_cfg(**kw):
    kw.setdefault("max_context", 128)
    return ModelConfig(vocab_size=64, hidden=32, ffn=48, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
                       **kw)


def test_gguf_rope_layout_equals_hf_layout_after_unpermuting():
    """GGUF q/k rows are llama.cpp's permutation of the Hugging Face ones; with the matching RoPE the two
    layouts give the same logits."""
    cfg = _tiny_cfg(rope_interleaved=True)
    w = random_weights(cfg, dtype=torch.float64)
    hf = dict(w)
    for i in range(cfg.num_layers):
        for name, heads in (("wq", cfg.num_q_heads), ("wk", cfg.num_kv_heads)):
            t = w[f"layers.{i}.{name}"]
            hf[f"layers.{i}.{name}"] = t.reshape(heads, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(t.shape)
    ids = torch.randint(0, 64, (1, 20))
    a = Llama(cfg, w).prefill(ids, lambda *x: None, all_logits=True)
    b = Llama(cfg.replace(rope_interleaved=False), hf).prefill(ids, lambda *x: None, all_logits=True)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_hf_checkpoint_directory_loads(tmp_path):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = _tiny_cfg()
    w = random_weights(cfg, dtype=torch.float32)
    hf = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"], "lm_head.weight": w["lm_head"]}
    names = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = w[f"layers.{i}.{ours}"].contiguous()
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "eos_token_id": 1,
        "rms_norm_eps": 1e-5}))
    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    model, tok = load_model(str(tmp_path))
    assert tok.encode("w3 w5") == [3, 5] and tok.eos_ids == [1]
    ids = torch.tensor([[3, 5, 7, 9]])
    ref = Llama(cfg, w).prefill(ids, lambda *x: None, all_logits=True)
    torch.testing.assert_close(model.prefill(ids, lambda *x: None, all_logits=True), ref)
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        os.remove(tmp_path / "model.safetensors")
        load_hf_dir(str(tmp_path))


def test_cli_generate_and_errors(smollm, tmp_path, capsys):
    from prr.cli import main

    out = tmp_path / "g.json"
    assert main(["generate", "--prompt", "Name a color.", "--attention", "prr", "--max-new-tokens", "6",
                 "--budget", "256", "--ratio", "1.5", "--json", str(out)]) == 0
    stats = json.loads(out.read_text())["stats"]
    assert stats["new_tokens"] >= 1 and stats["attention"] == "prr"
    assert set(stats["guess"]) >= {"rows", "held", "too_high", "too_low", "candidates_over_k"}
    assert main(["generate", "--model", "nope", "--prompt", "x"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["generate", "--prompt-file", str(tmp_path / "absent.txt")]) == 2


def test_fill_random_engine_dsa_equals_prr_on_a_random_model():
    """The latency path (caches filled directly, no prompt, empty predictor): PRR exact still matches DSA."""
    cfg = _tiny_cfg(max_context=1024)
    model = Llama(cfg, random_weights(cfg, dtype=torch.float64))
    sparse = prr.SparseConfig(top_k=6)
    outs = []
    for attention, predictor in (("dsa", "selection"), ("prr", "selection"), ("prr", "previous")):
        eng = Engine(model, None, attention=attention, sparse=sparse, n_dense_layers=1, predictor=predictor,
                     ratio=1.0 if predictor == "previous" else 1.5)
        eng.fill_random(2, 500, 8)
        tok = torch.tensor([3, 4])
        outs.append(torch.stack([eng.step(tok) for _ in range(6)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="CUDA graphs need"):
        eng.capture_decode()


def test_calibrate_seeds_the_first_selection_and_decides_auto_again():
    """Calibration queries given after fill_random: ratio="auto" is decided again (on a CPU: serialized DSA),
    PRR seeded from them still matches DSA, and malformed queries are refused with nothing changed."""
    cfg = _tiny_cfg(max_context=1024)
    model = Llama(cfg, random_weights(cfg, dtype=torch.float64))
    sparse = prr.SparseConfig(top_k=6)
    gen = torch.Generator().manual_seed(3)
    qs = {1: torch.randn(2, 2, cfg.num_q_heads, cfg.head_dim, generator=gen, dtype=torch.float64)}
    auto = Engine(model, None, attention="prr", ratio="auto", sparse=sparse, n_dense_layers=1)
    auto.fill_random(2, 500, 8)
    auto.calibrate(qs)
    assert auto.attention == "dsa" and auto.spec_decision["speculation"] == "off"
    outs = []
    for attention in ("dsa", "prr"):
        eng = Engine(model, None, attention=attention, sparse=sparse, n_dense_layers=1)
        eng.fill_random(2, 500, 8)
        eng.calibrate(qs)
        tok = torch.tensor([3, 4])
        outs.append(torch.stack([eng.step(tok) for _ in range(6)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for bad, match in (({0: qs[1]}, "sparse layers"), ({1: qs[1][:, :1]}, r"\[W, 2, 4, 8\]")):
        with pytest.raises(ValueError, match=match):
            eng.calibrate(bad)
    with pytest.raises(ValueError, match="nothing prefilled"):
        Engine(model, None, attention="prr", sparse=sparse).calibrate(qs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_prr_on_gpu_graph_equals_eager_and_matches_dsa():
    """On a GPU the engine's PRR layers run the runtime step (selection and speculation on two streams, the
    predictor tail deferred to the token's end): the captured decode graph equals eager bit for bit over several
    tokens, and PRR exact gives DSA's greedy tokens (head dim 64: the kernels' tiles need 16 or more)."""
    cfg = ModelConfig(vocab_size=64, hidden=128, ffn=256, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=64,
                      max_context=1024)
    model = Llama(cfg, random_weights(cfg, dtype=torch.bfloat16, device="cuda"))
    sparse = prr.SparseConfig(top_k=6)
    runs = {}
    for name, attention, graph in (("dsa", "dsa", False), ("prr", "prr", False), ("prr_graph", "prr", True)):
        eng = Engine(model, None, attention=attention, sparse=sparse, n_dense_layers=1)
        eng.fill_random(2, 500, 16)
        tok = torch.tensor([3, 4], device="cuda")
        out = [eng.step(tok).clone()]  # one eager step compiles the kernels before a capture
        if graph:
            eng.capture_decode()
        for _ in range(5):
            logits = eng.step(tok).clone()
            out.append(logits)
            tok = logits.argmax(-1)
        runs[name] = torch.stack(out)
        if attention == "prr":
            assert eng._step_stats and all(s.selected.sum() > 0 for s in eng._step_stats)
    assert torch.equal(runs["prr"], runs["prr_graph"])
    assert torch.equal(runs["prr"].argmax(-1), runs["dsa"].argmax(-1))
    torch.testing.assert_close(runs["prr"].float(), runs["dsa"].float(), rtol=5e-2, atol=5e-2)
