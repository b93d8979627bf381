"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p and a repetition
penalty, reproducible from a seed, with no host sync (so it runs inside a captured CUDA decode step).

Sampling is the Gumbel-max trick: ``argmax(log p + g)`` with ``g = -log(-log u)`` draws from ``p``. The
uniforms ``u`` come from a counter-based hash of ``(seed, row, step, token id)`` computed with integer tensor
ops, not from a torch generator: the same seed gives the same draws on any device, eager or in a CUDA graph
(a graph replays the generator offsets it saw at capture; a hash of device counters needs no bookkeeping).
``row`` is the sequence's index in its batch and ``step`` the number of tokens it generated before, so a
sequence's draws depend on where it sits in the batch; use ``seed`` to vary them.

Shapes: ``logits [B, V]`` float32, ``ids [B]`` int64, ``seen [B, V]`` bool (tokens already in the
sequence, for the repetition penalty), ``rows, steps [B]`` int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
# Thomas Mueller's 32-bit integer hash constant: < 2^27, so every product stays inside int64.
_MUL = 0x45D9F3B


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """``temperature`` 0 is greedy (the default: evaluation wants the argmax). ``top_k`` 0 and ``top_p`` 1 keep
    every token; ``repetition_penalty`` 1 is off (above 1 discourages tokens already in the sequence, prompt
    included: a positive logit is divided by it, a negative one multiplied, as in CTRL and Hugging Face)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        def num(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")

        for name in ("temperature", "top_p", "repetition_penalty"):
            num(name, getattr(self, name))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def hash32(x):
    """A 32-bit integer mix of int64 tensor (elementwise) or Python int ``x``; the same on every device."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    return x ^ (x >> 16)


def uniforms(seed: int, rows: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, V]`` float32 in the open interval (0, 1), a pure function of (seed, row, step, token id)."""
    # The seed is hashed on the host: a tensor made from it inside a CUDA graph capture would be a host copy.
    key = hash32(hash32(rows.long() ^ hash32(int(seed))) ^ steps.long())
    ids = torch.arange(vocab, dtype=torch.int64, device=rows.device)
    bits = hash32(hash32(key[:, None] ^ ids) + 0x9E3779B9)
    # 24 bits fit float32's mantissa exactly; the half step keeps u away from 0 and 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits of seen tokens by `penalty`, multiply negative ones (out of place)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled logits with the tokens outside top-k and top-p set to -inf (at least the best token
    always stays). Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``."""
    x = logits.float() / cfg.temperature
    if cfg.top_k == 0 and cfg.top_p >= 1.0:
        return x
    srt, order = x.sort(dim=-1, descending=True)
    drop = torch.zeros_like(srt, dtype=torch.bool)
    if cfg.top_k:
        drop |= torch.arange(x.shape[-1], device=x.device) >= cfg.top_k
    if cfg.top_p < 1.0:
        p = srt.softmax(-1)
        # A token goes when the more likely ones already reach top_p (exclusive cumulative sum).
        drop |= (p.cumsum(-1) - p) >= cfg.top_p
    drop[:, 0] = False
    return x.scatter(-1, order, srt.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, cfg: SamplingConfig, *, seen: torch.Tensor | None = None,
           rows: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` (int64) from ``logits [B, V]``: greedy argmax, or one draw from the filtered,
    temperature-scaled distribution keyed by ``(cfg.seed, rows, steps)`` (default: rows 0..B-1, step 0)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    b, v = logits.shape
    if cfg.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen`, the [B, V] mask of tokens in each sequence")
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    rows = torch.arange(b, device=logits.device) if rows is None else rows.long()
    steps = torch.zeros(b, dtype=torch.int64, device=logits.device) if steps is None else steps.long()
    gumbel = -torch.log(-torch.log(uniforms(cfg.seed, rows, steps, v)))
    return (filter_logits(logits, cfg) + gumbel).argmax(-1)
