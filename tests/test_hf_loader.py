"""prr's loader of Hugging Face directories against transformers itself: tiny random Llama / Qwen2 / Mistral
checkpoints with every supported RoPE variant, saved by ``save_pretrained``, a 1,600-token input in float32.
Logits must agree within 1e-4 relative (what fp32 rounding over two layers leaves: the default-RoPE Llama
agrees to ~1e-6) and greedy tokens through prr's engine must equal transformers' ``generate``."""

import json
import warnings

import pytest
import torch
import transformers  # in the test extras: CI runs these tests, it does not skip them

from prr.model import load_model
from prr.model.config import hf_model_config, hf_rope
from prr.model.engine import Engine
from prr.model.rope import RopeScaling
from prr.model.weights import load_hf_dir

from conftest import rel_err

PROMPT = 1600
VOCAB = 96


def tiny_kwargs(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.15,
                tie_word_embeddings=False)
    base.update(kw)
    return base


def write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(path / "tokenizer.json"))


def save_tiny(path, family: str, seed: int = 0, **kw):
    """A random transformers model of `family` saved to `path` (with a word-level tokenizer.json)."""
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**tiny_kwargs(**kw))).float().eval()
    model.save_pretrained(str(path))
    write_tokenizer(path)
    return model


def greedy(ref, ids, steps):
    """transformers' own greedy tokens (an explicit mask: with a pad id among the ids it would guess one)."""
    ref.generation_config.eos_token_id = None
    return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                        pad_token_id=0, output_logits=True, return_dict_in_generate=True)


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
CASES = {
    "llama-default": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama-llama3": ("llama", {"rope_parameters": LLAMA3}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 512},
                             "max_position_embeddings": 2048}),
    "llama-yarn-mscale": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 512,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False}}),
    "llama-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
                                "max_position_embeddings": 1024}),
    "qwen2-1e6": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen2-yarn": ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                 "original_max_position_embeddings": 512},
                            "max_position_embeddings": 2048}),
    "mistral": ("mistral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "sliding_window": None}),
    "mistral-window-beyond-prompt": ("mistral", {"sliding_window": 2048}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(case, tmp_path):
    family, kw = CASES[case]
    ref = save_tiny(tmp_path, family, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sliding-window cap's warning (tested below)
        model, tok = load_model(str(tmp_path))
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits.float()
    got = model.prefill(ids, lambda *a: None, all_logits=True)
    print(f"{case}: prefill logits rel err {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4, rel_err(got, want)

    steps = 8
    with torch.no_grad():
        gen = greedy(ref, ids, steps)
    ref_tokens = gen.sequences[0, PROMPT:].tolist()
    eng = Engine(model, tok)
    out, _ = eng.generate(ids[0].tolist(), steps, stop_at_eos=False)
    assert out == ref_tokens
    # The decode steps' logits too (dynamic RoPE rotates each new token with the length of its own step).
    eng.prefill(ids[0].tolist(), steps)
    for i in range(1, steps):
        got = eng.step(torch.tensor([ref_tokens[i - 1]]))
        assert rel_err(got, gen.logits[i].float()) < 1e-4, (i, rel_err(got, gen.logits[i].float()))


def _old_format(hc: dict, key: str = "rope_type") -> dict:
    """A transformers-5 config dict rewritten as transformers <5 wrote it: top-level rope_theta, rope_scaling."""
    old = dict(hc)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    old["rope_scaling"] = None if kind == "default" else {key: kind, **rope}
    return old


@pytest.mark.parametrize("case", ["llama-default", "llama-llama3", "llama-yarn", "llama-dynamic", "qwen2-1e6"])
@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_both_config_formats_give_the_same_model(case, key, tmp_path):
    family, kw = CASES[case]
    save_tiny(tmp_path, family, **kw)
    new = json.loads((tmp_path / "config.json").read_text())
    old = _old_format(new, key)
    assert hf_model_config(old) == hf_model_config(new)
    assert hf_model_config(new).rope_base == kw["rope_parameters"]["rope_theta"]


def test_old_format_directory_matches_transformers(tmp_path):
    """A transformers-4-style config.json (Llama 3.1's llama3 scaling under rope_scaling) read by both."""
    save_tiny(tmp_path, "llama", **CASES["llama-llama3"][1])
    hc = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(_old_format(hc)))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    model, _ = load_model(str(tmp_path))
    assert model.cfg.rope_scaling == RopeScaling("llama3", 8.0, original_max_position=256)
    ids = torch.randint(0, VOCAB, (1, PROMPT))
    with torch.no_grad():
        want = ref(ids).logits.float()
    assert rel_err(model.prefill(ids, lambda *a: None, all_logits=True), want) < 1e-4


def test_missing_rope_theta_defaults_like_transformers():
    hc = {"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert hf_rope(hc) == (10000.0, RopeScaling("linear", 2.0))


BAD_ROPE = [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"rope_theta": 1e4, "partial_rotary_factor": 0.25}, "partial_rotary_factor=0.25"),
    ({"rope_scaling": {"type": "default", "mrope_section": [2, 2, 4]}}, "mrope_section"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per layer type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a 'factor'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
]


@pytest.mark.parametrize(("fields", "match"), BAD_ROPE, ids=[m for _, m in BAD_ROPE])
def test_rope_fields_that_change_the_math_are_refused(fields, match):
    hc = {"model_type": "llama", "max_position_embeddings": 4096, **fields}
    with pytest.raises(ValueError, match=match):
        hf_rope(hc)


def _hc(**kw):
    hc = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 4, "num_attention_heads": 2, "max_position_embeddings": 8192}
    hc.update(kw)
    return hc


def test_sliding_window_caps_the_context_with_a_warning():
    with pytest.warns(UserWarning, match="sliding_window=4096 < max_position_embeddings=8192"):
        assert hf_model_config(_hc(model_type="mistral", sliding_window=4096)).max_context == 4096
    # Qwen2: only with use_sliding_window, and only if some layer slides (layers from max_window_layers on).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_model_config(_hc(model_type="qwen2", sliding_window=1024)).max_context == 8192
        assert hf_model_config(_hc(model_type="qwen2", sliding_window=1024, use_sliding_window=True,
                                   max_window_layers=4)).max_context == 8192
        assert hf_model_config(_hc(model_type="llama", sliding_window=1024)).max_context == 8192
    with pytest.warns(UserWarning, match="sliding_window=1024"):
        cfg = hf_model_config(_hc(model_type="qwen2", sliding_window=1024, use_sliding_window=True,
                                  max_window_layers=2))
    assert cfg.max_context == 1024


@pytest.mark.parametrize(("fields", "match"), [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"layer_types": ["full_attention", "chunked_attention"] * 2}, "layer_types"),
    ({"vocab_size": None}, "missing field"),
])
def test_unsupported_configs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        hf_model_config(_hc(**fields))


def test_directory_errors_name_what_is_missing_or_unused(tmp_path):
    save_tiny(tmp_path, "llama", num_hidden_layers=1, attention_bias=True)
    with pytest.raises(ValueError, match=r"o_proj\.bias"):  # Llama's attention_bias adds an o_proj bias
        load_hf_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_hf_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hf_dir(str(tmp_path / "absent"))


def test_tied_embeddings_and_qwen2_biases_load(tmp_path):
    ref = save_tiny(tmp_path, "qwen2", tie_word_embeddings=True)
    model, _ = load_model(str(tmp_path))
    assert model.cfg.tie_embeddings and "layers.0.bq" in model.w
    ids = torch.randint(0, VOCAB, (1, 64))
    with torch.no_grad():
        want = ref(ids).logits.float()
    assert rel_err(model.prefill(ids, lambda *a: None, all_logits=True), want) < 1e-5
