"""prr.hf: prr's decode attention inside transformers models (tiny random Llama / Qwen2 / Mistral / GLM-4, CPU,
float32). With a budget covering the whole context DSA must give transformers' own tokens; PRR exact must give
DSA's; batch 1 and 2; generate (greedy and sampling) and a plain forward loop."""

import pytest
import torch
import transformers  # in the test extras: CI runs these tests

import prr.hf as ph

from conftest import rel_err

VOCAB = 96
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
            "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM,
                     {"head_dim": 16, "pad_token_id": 0, "eos_token_id": 1})}


def tiny(family="llama", seed=0, **kw):
    config_cls, model_cls, extra = FAMILIES[family]
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.15, **extra)
    args.update(kw)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**args)).float().eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def run(model, ids, attn, settings=None, steps=12, **kw):
    """Tokens and per-step logits of ``model.generate`` with attention `attn` ("sdpa" or prr `settings`: the
    transformers-driven path over a PrrCache, prr.hf.cached_generate)."""
    args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps, pad_token_id=0, output_logits=True,
                return_dict_in_generate=True, **kw)
    kw.setdefault("do_sample", False)
    args.setdefault("do_sample", False)
    with torch.no_grad():
        if attn == "sdpa":
            model.set_attn_implementation("sdpa")
            out = model.generate(ids, **args)
        else:
            ph.enable(model)
            out = ph.cached_generate(model, ids, settings, **args)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


def prompt(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dsa_covering_the_context_gives_transformers_tokens(family, batch):
    model = tiny(family)
    ids = prompt(batch, 150)
    want, want_logits = run(model, ids, "sdpa")
    # 256-token budget >= 150 + 12 tokens: every block selected, in the 2 sparse layers (the first stays dense).
    got, logits = run(model, ids, "prr", ph.PrrSettings(method="dsa", budget=256, dense_layers=1))
    assert torch.equal(got, want)
    assert rel_err(logits, want_logits) < 1e-5
    dense, dense_logits = run(model, ids, "prr", ph.PrrSettings(method="dense"))
    assert torch.equal(dense, want) and rel_err(dense_logits, want_logits) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("family", "selector"), [("llama", "quest"), ("qwen2", "quest"), ("mistral", "infllm_v2"),
                                                      ("glm4", "quest")])
def test_prr_exact_gives_dsa_tokens(family, selector, batch):
    """A budget well below the context (the selection matters): PRR exact reproduces serialized DSA."""
    model = tiny(family)
    ids = prompt(batch, 700)
    budget = 128 if selector == "quest" else 256
    dsa, dsa_logits = run(model, ids, "prr", ph.PrrSettings(method="dsa", budget=budget, selector=selector,
                                                             dense_layers=1), steps=16)
    settings = ph.PrrSettings(method="prr", budget=budget, selector=selector, dense_layers=1, collect_stats=True)
    model.set_attn_implementation("sdpa")
    ph.enable(model)
    cache = ph.PrrCache(model, settings, max_cache_len=700 + 16)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             **{ph.cache_kwarg(model): cache})
    assert torch.equal(out.sequences[:, 700:], dsa)
    assert rel_err(torch.stack(out.logits), dsa_logits) < 1e-5
    assert len(cache.step_stats) == 15 * 2 and 0 <= cache.hit_rate() <= 1  # 15 decode steps x 2 sparse layers
    # The selection changes the numbers: this is not dense attention by another name.
    dense_logits = run(model, ids, "prr", ph.PrrSettings(method="dense"), steps=16)[1]
    assert rel_err(dsa_logits[1:], dense_logits[1:]) > 1e-3


def test_sampling_matches_transformers_with_the_same_seed():
    model = tiny("llama")
    ids = prompt(2, 120)
    sample = dict(do_sample=True, temperature=0.8, top_k=20)
    torch.manual_seed(5)
    want, _ = run(model, ids, "sdpa", **sample)
    torch.manual_seed(5)
    got, _ = run(model, ids, "prr", ph.PrrSettings(method="dsa", budget=256, dense_layers=1), **sample)
    assert torch.equal(got, want)


def test_plain_forward_loop_equals_generate():
    model = tiny("qwen2")
    ids = prompt(2, 90)
    settings = ph.PrrSettings(method="prr", budget=64, dense_layers=1)
    want, _ = run(model, ids, "prr", settings, steps=10)
    cache = ph.PrrCache(model, settings, max_cache_len=100)
    toks = []
    with torch.no_grad():
        logits = model(ids, use_cache=True, **{ph.cache_kwarg(model): cache}).logits[:, -1]
        for _ in range(10):
            nxt = logits.argmax(-1)
            toks.append(nxt)
            logits = model(nxt[:, None], use_cache=True, **{ph.cache_kwarg(model): cache}).logits[:, -1]
    assert torch.equal(torch.stack(toks, 1), want)
    assert cache.get_seq_length() == 100


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        ph.PrrSettings(method="fast")
    with pytest.raises(ValueError, match="leaves no dynamic block"):
        ph.PrrSettings(budget=32)
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        ph.PrrSettings(ratio=0)
    with pytest.raises(ValueError, match="unknown mode"):
        ph.PrrSettings(mode="fuzzy")
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ph.PrrSettings(block_size=24)


def test_unsupported_models_and_inputs_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="got 'gpt2'"):
        ph.enable(gpt2)
    model = ph.enable(tiny("llama"))
    ids = prompt(2, 40)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        ph.PrrCache(model, max_cache_len=0)
    with pytest.raises(TypeError, match="settings must be a PrrSettings"):
        ph.PrrCache(model, {"method": "dsa"}, max_cache_len=64)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded batch
    with pytest.raises(ValueError, match="unpadded batches"), torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                       **{ph.cache_kwarg(model): ph.PrrCache(model, max_cache_len=64)})
    with pytest.raises(ValueError, match="max_cache_len=41"), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0,
                       **{ph.cache_kwarg(model): ph.PrrCache(model, max_cache_len=41)})
    with pytest.raises(RuntimeError, match="decodes through a prr.hf.PrrCache"), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)
    # Beam search is transformers' generate's alone: prr.hf.generate falls back to it, whose cache refuses it.
    with pytest.raises(NotImplementedError, match="beam search"), torch.no_grad(), \
            pytest.warns(ph.PrrFallbackWarning, match="num_beams=2"):
        ph.generate(model, ids, max_new_tokens=3, num_beams=2, pad_token_id=0, attention_mask=torch.ones_like(ids))
    cache = ph.PrrCache(model, max_cache_len=64)
    with torch.no_grad():
        model(ids, **{ph.cache_kwarg(model): cache})
        with pytest.raises(ValueError, match="one token per sequence per call"):
            model(ids[:, :3], **{ph.cache_kwarg(model): cache})
    mistral = ph.enable(tiny("mistral", sliding_window=64))
    with pytest.raises(ValueError, match="sliding_window=64"):
        ph.PrrCache(mistral, max_cache_len=65)
    ph.PrrCache(mistral, max_cache_len=64)  # the window masks nothing up to its length
