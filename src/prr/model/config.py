"""Model configuration: one frozen dataclass, named presets (real shapes; random weights for latency work)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .. import _checks as check
from .rope import ROPE_TYPES, RopeScaling


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden: int
    ffn: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_context: int = 8192
    # GGUF stores q/k rows permuted for llama.cpp's adjacent-pair RoPE; Hugging Face checkpoints use the
    # half-split (rotate_half) layout.
    rope_interleaved: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # The RoPE variant (linear, llama3, yarn, dynamic); None: plain RoPE at rope_base.
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        for f in ("vocab_size", "hidden", "ffn", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
                  "max_context"):
            check.positive_int(f, getattr(self, f))
        check.gqa(self.num_q_heads, self.num_kv_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"rope_scaling must be a RopeScaling, got {type(self.rope_scaling).__name__}")

    def replace(self, **kw) -> ModelConfig:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return ModelConfig(**d)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            return MODEL_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_PRESETS)}") from None


MODEL_PRESETS = {
    "smollm2-135m": ModelConfig(49152, 576, 1536, 30, 9, 3, 64, rope_base=100000.0, tie_embeddings=True,
                                max_context=8192, rope_interleaved=True, bos_token_id=1, eos_token_id=2),
    "llama-3.1-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, 128, rope_base=500000.0, max_context=131072,
                                rope_scaling=RopeScaling("llama3", 8.0, original_max_position=8192)),
    "llama-3.1-70b": ModelConfig(128256, 8192, 28672, 80, 64, 8, 128, rope_base=500000.0, max_context=131072,
                                 rope_scaling=RopeScaling("llama3", 8.0, original_max_position=8192)),
    "glm-4-9b": ModelConfig(151552, 4096, 13696, 40, 32, 2, 128, rope_base=10000.0, max_context=131072),
    # The paper's model: GLM-4-9B-Chat-1M shapes (random weights; GLM's rope_ratio 10000 -> base 1e8).
    "glm-4-9b-1m": ModelConfig(151552, 4096, 13696, 40, 32, 2, 128, rope_base=1e8, rms_eps=1.5625e-07,
                               max_context=1 << 20),
    "qwen3-8b": ModelConfig(151936, 4096, 12288, 36, 32, 8, 128, rope_base=1000000.0, max_context=131072),
}


# ---- Hugging Face config.json --------------------------------------------------------------------------------
HF_FAMILIES = ("llama", "qwen2", "mistral")
# Keys a RoPE dict may carry; any other key (mrope_section, short_factor, ...) changes the math and is refused.
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
              "partial_rotary_factor"}
_MAX_POSITION_DEFAULTS = {"llama": 2048, "qwen2": 32768, "mistral": 131072}  # transformers' config defaults


def hf_rope(hc: dict, where: str = "config.json") -> tuple[float, RopeScaling | None]:
    """``(theta, scaling)`` from a Hugging Face config dict, in either format: transformers 5 writes a
    ``rope_parameters`` dict holding ``rope_theta`` and ``rope_type``; earlier versions a top-level
    ``rope_theta`` beside a ``rope_scaling`` dict (``rope_type``, or ``type`` in older files). ``rope_scaling``
    wins where both exist, as in transformers. ValueError, naming the field, for anything prr does not compute
    exactly (an unknown type or key, per-layer-type RoPE, ``partial_rotary_factor`` != 1)."""
    rope = hc.get("rope_scaling") or hc.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_parameters/rope_scaling must be a dict, got {type(rope).__name__}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{where}: rope_parameters per layer type ({', '.join(rope)}) are not supported")
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"{where}: RoPE field(s) {', '.join(unknown)} are not supported (they change the math)")
    theta = float(rope.get("rope_theta") or hc.get("rope_theta") or 10000.0)
    partial = rope.get("partial_rotary_factor", hc.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported (prr rotates the whole head)")
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    max_pos = hc.get("max_position_embeddings")
    # transformers' rule: a top-level original_max_position_embeddings wins, then the RoPE dict's, then max_pos.
    original = hc.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor")
    if factor is None and kind == "yarn" and max_pos and original:
        factor = max_pos / original
    if factor is None:
        raise ValueError(f"{where}: rope_type {kind!r} needs a 'factor'")
    kw = {"type": kind, "factor": float(factor)}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if rope.get(key) is None:
                raise ValueError(f"{where}: rope_type 'llama3' needs {key!r}")
            kw[key] = float(rope[key])
        kw["original_max_position"] = int(original)
    elif kind == "yarn":
        kw.update(original_max_position=int(original), beta_fast=float(rope.get("beta_fast") or 32),
                  beta_slow=float(rope.get("beta_slow") or 1), attention_factor=rope.get("attention_factor"),
                  mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
                  truncate=bool(rope.get("truncate", True)))
    elif kind == "dynamic":
        kw["max_position"] = int(max_pos or _MAX_POSITION_DEFAULTS.get(hc.get("model_type"), 2048))
    return theta, RopeScaling(**kw)


def hf_sliding_window(hc: dict, where: str = "config.json") -> int | None:
    """The sliding window some layer of the checkpoint actually uses (None: every layer attends everything);
    ValueError for a layer type other than full or sliding attention."""
    kind = hc.get("model_type")
    types = hc.get("layer_types")
    if types is not None:
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ValueError(f"{where}: layer_types {bad} are not supported (full_attention, sliding_attention)")
    window = hc.get("sliding_window")
    if kind == "llama" or window is None:
        return None  # Llama's modelling code has no window
    if kind == "qwen2":
        if not hc.get("use_sliding_window", False):
            return None
        if types is None:  # transformers' default: the layers from max_window_layers on slide
            types = ["sliding_attention" if i >= hc.get("max_window_layers", 28) else "full_attention"
                     for i in range(hc["num_hidden_layers"])]
        return int(window) if "sliding_attention" in types else None
    return int(window)  # Mistral: every layer


def hf_model_config(hc: dict, where: str = "config.json") -> ModelConfig:
    """Our config from a Hugging Face Llama / Qwen2 / Mistral ``config.json`` dict. The context is
    ``max_position_embeddings`` (times ``factor`` for dynamic NTK RoPE).

    A sliding window shorter than ``max_position_embeddings`` caps the context at the window: up to there the
    window masks nothing, so prr's full attention computes the same model (a warning says so)."""
    kind = hc.get("model_type")
    if kind not in HF_FAMILIES:
        raise ValueError(f"{where}: model_type {kind!r} is not supported ({', '.join(HF_FAMILIES)})")
    act = hc.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if hc.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    theta, scaling = hf_rope(hc, where)
    heads = hc["num_attention_heads"]
    max_pos = int(hc.get("max_position_embeddings") or _MAX_POSITION_DEFAULTS[kind])
    if scaling is not None and scaling.type == "dynamic":
        # Dynamic NTK exists to run past max_position_embeddings; `factor` is the extension it was set for.
        max_pos = int(max_pos * max(scaling.factor, 1.0))
    window = hf_sliding_window(hc, where)
    if window is not None and window < max_pos:
        import warnings

        warnings.warn(f"{where}: sliding_window={window} < max_position_embeddings={max_pos}; prr attends the whole "
                      f"context, which equals the model only up to {window} tokens: the context is capped there",
                      stacklevel=2)
        max_pos = window
    eos = hc.get("eos_token_id")
    return ModelConfig(
        vocab_size=hc["vocab_size"], hidden=hc["hidden_size"], ffn=hc["intermediate_size"],
        num_layers=hc["num_hidden_layers"], num_q_heads=heads, num_kv_heads=hc.get("num_key_value_heads") or heads,
        head_dim=hc.get("head_dim") or hc["hidden_size"] // heads, rope_base=theta,
        rms_eps=float(hc.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
        max_context=max_pos, rope_interleaved=False, bos_token_id=hc.get("bos_token_id"),
        eos_token_id=eos if isinstance(eos, int) else None, rope_scaling=scaling)
