"""Holt's double exponential smoothing over block scores (the predictor's state update), in PyTorch.

State per (sequence, KV head, block): ``level, trend: [..., B, Hkv, N]`` float32 and ``known: [..., B]`` int32
(blocks scored so far). Scores are z-scored over the live finite blocks of each row first (score scales drift
from step to step). Blocks below ``known`` follow Holt; blocks that appear (``known <= j < num_blocks``)
start at their first score with zero trend. The functions broadcast over leading dimensions (the calibration
grid) and never sync with the host.
"""

from __future__ import annotations

import torch

from ... import _checks as check


def normalize_scores(scores: torch.Tensor, num_blocks: torch.Tensor) -> torch.Tensor:
    """Z-score ``[..., B, Hkv, N]`` over the live, finite blocks of each row; dead blocks -> 0.

    A live block with a non-finite score (an InfLLM-v2 block with no complete window yet) takes the row's
    lowest z-score.
    """
    live = torch.arange(scores.shape[-1], device=scores.device) < num_blocks[..., None, None]
    ok = live & torch.isfinite(scores)
    s = torch.where(ok, scores.float(), 0.0)
    n = ok.sum(-1, keepdim=True).clamp(min=1)
    mean = s.sum(-1, keepdim=True) / n
    var = (torch.where(ok, s - mean, 0.0) ** 2).sum(-1, keepdim=True) / n
    z = (s - mean) / var.sqrt().clamp(min=1e-6)
    zmin = torch.where(ok, z, float("inf")).amin(-1, keepdim=True)
    zmin = torch.where(torch.isfinite(zmin), zmin, 0.0)
    z = torch.where(ok, z, zmin)
    return torch.where(live, z, 0.0)


def holt_step(level, trend, z, known, num_blocks, alpha, beta):
    """One Holt step on normalised scores `z`; returns the new ``(level, trend)``."""
    j = torch.arange(z.shape[-1], device=z.device)
    old = j < known[..., None, None]
    new = (j < num_blocks[..., None, None]) & ~old
    lvl = alpha * z + (1 - alpha) * (level + trend)
    trd = beta * (lvl - level) + (1 - beta) * trend
    level_out = torch.where(old, lvl, torch.where(new, z, level))
    trend_out = torch.where(old, trd, torch.where(new, torch.zeros_like(trend), trend))
    return level_out, trend_out


def holt_predict(level, trend, known, gamma):
    """Predicted scores ``level + gamma * trend``; -inf for blocks never scored."""
    j = torch.arange(level.shape[-1], device=level.device)
    return torch.where(j < known[..., None, None], level + gamma * trend, float("-inf"))


def check_holt_inputs(level, trend, known, scores, num_blocks, pred=None) -> None:
    check.tensor("level", level, ndim=3, dtypes=(torch.float32, torch.float64))
    for name, t in (("trend", trend), ("scores", scores)) + ((("pred", pred),) if pred is not None else ()):
        check.tensor(name, t, dtypes=check.FLOAT_DTYPES, device=level.device)
        check.shape(name, t, tuple(level.shape))
    for name, t in (("known", known), ("num_blocks", num_blocks)):
        check.tensor(name, t, ndim=1, dtypes=check.INDEX_DTYPES, device=level.device)
        check.shape(name, t, (level.shape[0],))
    check.in_range("num_blocks", num_blocks, 0, level.shape[-1], f"the state covers N = {level.shape[-1]} blocks")


def holt_update_(level, trend, known, scores, num_blocks, alpha, beta, gamma, pred=None) -> None:
    """In place: fold this step's ``scores [B, Hkv, N]`` into ``level, trend [B, Hkv, N]`` and ``known [B]``;
    if `pred` is given, also write the next step's prediction into it."""
    check_holt_inputs(level, trend, known, scores, num_blocks, pred)
    z = normalize_scores(scores, num_blocks)
    lvl, trd = holt_step(level, trend, z, known, num_blocks, alpha, beta)
    level.copy_(lvl)
    trend.copy_(trd)
    known.copy_(torch.maximum(known, num_blocks.to(known.dtype)))
    if pred is not None:
        pred.copy_(holt_predict(level, trend, known, gamma))
