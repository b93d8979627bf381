"""Model configuration: one frozen dataclass, named presets (real shapes; random weights for latency work)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .. import _checks as check


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

    def __post_init__(self):
        for f in ("vocab_size", "hidden", "ffn", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
                  "max_context"):
            check.positive_int(f, getattr(self, f))
        check.gqa(self.num_q_heads, self.num_kv_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

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
    "llama-3.1-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, 128, rope_base=500000.0, max_context=131072),
    "glm-4-9b": ModelConfig(151552, 4096, 13696, 40, 32, 2, 128, rope_base=10000.0, max_context=131072),
    # The paper's model: GLM-4-9B-Chat-1M shapes (random weights; GLM's rope_ratio 10000 -> base 1e8).
    "glm-4-9b-1m": ModelConfig(151552, 4096, 13696, 40, 32, 2, 128, rope_base=1e8, rms_eps=1.5625e-07,
                               max_context=1 << 20),
    "qwen3-8b": ModelConfig(151936, 4096, 12288, 36, 32, 8, 128, rope_base=1000000.0, max_context=131072),
}
