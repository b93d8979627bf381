"""Sampling with parameters per row: each slot of a continuously batched decode has its own request's settings.

The draws are :func:`prr.model.sampling.sample`'s (Gumbel-max over a counter-based hash), keyed by the row's
own ``(seed, step)`` as if the sequence were row 0 of a batch of one: a request gets the same tokens whichever
slot it runs in and whatever runs beside it, and the same as :meth:`prr.model.engine.Engine.generate` gives it
alone with the same :class:`prr.model.sampling.SamplingConfig`. The repetition penalty is not supported here.

Shapes: ``logits [R, V]`` float32, one row per slot listed; ids ``[R]`` int64.
"""

from __future__ import annotations

import torch

from .sampling import SamplingConfig, hash32


def _row_uniforms(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, V]`` uniforms in (0, 1): :func:`prr.model.sampling.uniforms` with the seed hashed per row."""
    key = hash32(keys ^ steps)
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    bits = hash32(hash32(key[:, None] ^ ids) + 0x9E3779B9)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


class RowSampler:
    """Per-slot sampling settings on the device, and the number of tokens each slot sampled so far."""

    def __init__(self, batch: int, device):
        self.temperature = torch.zeros(batch, device=device)
        self.top_p = torch.ones(batch, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.int64, device=device)
        self.keys = torch.zeros(batch, dtype=torch.int64, device=device)
        self.steps = torch.zeros(batch, dtype=torch.int64, device=device)
        self.greedy = [True] * batch  # host copies: decide which work a step needs without reading the device
        self.filtered = [False] * batch

    def set(self, slot: int, cfg: SamplingConfig) -> None:
        if not isinstance(cfg, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(cfg).__name__}")
        if cfg.repetition_penalty != 1.0:
            raise ValueError("the repetition penalty is not supported in continuous batching")
        self.temperature[slot] = cfg.temperature
        self.top_p[slot] = cfg.top_p
        self.top_k[slot] = cfg.top_k
        # sampling.uniforms hashes (row ^ hash(seed)) with the row 0 of a batch of one
        self.keys[slot] = hash32(hash32(int(cfg.seed)))
        self.steps[slot] = 0
        self.greedy[slot] = cfg.greedy
        self.filtered[slot] = cfg.top_k > 0 or cfg.top_p < 1.0

    def sample(self, logits: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Next ids ``[R]`` for ``logits [R, V]`` whose row r belongs to ``slots[r]``; advances their steps."""
        dev = logits.device
        contiguous = slots == list(range(len(slots)))
        idx = slice(0, len(slots)) if contiguous else torch.tensor(slots, dtype=torch.long, device=dev)
        ids = logits.argmax(-1)
        if not all(self.greedy[s] for s in slots):
            temp, v = self.temperature[idx], logits.shape[-1]
            x = logits.float() / torch.where(temp > 0, temp, 1.0)[:, None]
            if any(self.filtered[s] for s in slots):
                x = _filter(x, self.top_k[idx], self.top_p[idx])
            gumbel = -torch.log(-torch.log(_row_uniforms(self.keys[idx], self.steps[idx], v)))
            ids = torch.where(temp > 0, (x + gumbel).argmax(-1), ids)
        self.steps[idx] += 1
        return ids


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """:func:`prr.model.sampling.filter_logits` with ``top_k [R]`` (0: off) and ``top_p [R]`` (1: off) per row."""
    srt, order = x.sort(dim=-1, descending=True)
    pos = torch.arange(x.shape[-1], device=x.device)[None, :]
    drop = (top_k[:, None] > 0) & (pos >= top_k[:, None])
    p = srt.softmax(-1)
    # a row with top_p = 1 filters nothing (its cumulative sum may round past 1 before the tail)
    drop |= (top_p[:, None] < 1.0) & ((p.cumsum(-1) - p) >= top_p[:, None])
    drop[:, 0] = False
    return x.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
