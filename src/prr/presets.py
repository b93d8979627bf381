"""Named attention shapes of real models (query heads, KV heads, head dim), for benchmarks and random
weights. Full model configs build on these (see the engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AttentionShape:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        if min(self.num_q_heads, self.num_kv_heads, self.head_dim) <= 0 or self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"invalid attention shape {self}")

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


ATTENTION_SHAPES = {
    "llama-3.1-8b": AttentionShape(32, 8, 128),
    "glm-4-9b": AttentionShape(32, 2, 128),
    "qwen3-8b": AttentionShape(32, 8, 128),
    "smollm2-135m": AttentionShape(9, 3, 64),
}


def attention_shape(name: str) -> AttentionShape:
    try:
        return ATTENTION_SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(ATTENTION_SHAPES)}") from None
