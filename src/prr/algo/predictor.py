"""Predicting the next selection: Holt's double exponential smoothing over block scores, and its calibration.

The state update itself is an op (:mod:`prr.ops.holt`, with a one-launch Triton kernel); this module keeps
the per-layer state and parameters and the grid-search calibration.

Per (layer, sequence, KV head, block), with the step's scores normalised first (z-scored over the live
blocks of each (sequence, KV head), because score scales drift from step to step):

    l_t = alpha * s_t + (1 - alpha) * (l_{t-1} + v_{t-1})
    v_t = beta * (l_t - l_{t-1}) + (1 - beta) * v_{t-1}
    prediction  s^_{t+1} = l_t + gamma * v_t

``alpha = 1, beta = 0, gamma = 0`` is the previous-step predictor. A block that appears during decoding starts
at its first score with zero trend. Blocks never scored predict ``-inf`` (never speculated).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .. import _checks as check
from .. import ops
from ..ops.holt import holt_predict, holt_step, holt_update_, normalize_scores

DEFAULT_GRID = {
    "alpha": (0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
    "beta": (0.0, 0.1, 0.3),
    "gamma": (0.0, 0.5, 1.0),
}


def dynamic_hits(pred_idx, pred_cnt, sel_idx, sel_cnt, num_blocks, n_sink, n_local, k_max):
    """Hits on dynamic blocks ``|P ∩ S| - forced`` and the dynamic size of S, both ``[B, Hkv]``."""
    hits = ops.selection_contains(sel_idx, sel_cnt, pred_idx, pred_cnt).sum(-1)
    forced = forced_blocks(num_blocks, n_sink, n_local, k_max)[:, None]
    return hits - forced, sel_cnt - forced


def forced_blocks(num_blocks: torch.Tensor, n_sink: int, n_local: int, k_max: int) -> torch.Tensor:
    """``[B]``: blocks every selection holds regardless of scores (sink ∪ local, or all when short)."""
    n = num_blocks.long()
    return torch.where(n <= k_max, n, torch.clamp(n, max=n_sink + n_local))


class HoltPredictor:
    """Holt state for every (layer, sequence, KV head, block) of a decode run, with per-layer parameters.

    State: ``level, trend: [L, B, Hkv, N_max]`` float32, ``known: [L, B]`` int32 (blocks scored so far).
    Everything stays on `device`; :meth:`predict` and :meth:`update` never sync with the host.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_blocks: int, *,
                 alpha: float = 0.5, beta: float = 0.0, gamma: float = 0.0, device="cpu"):
        for name, v in (("num_layers", num_layers), ("batch", batch), ("num_kv_heads", num_kv_heads),
                        ("max_blocks", max_blocks)):
            check.positive_int(name, v)
        shape = (num_layers, batch, num_kv_heads, max_blocks)
        self.level = torch.zeros(shape, device=device)
        self.trend = torch.zeros(shape, device=device)
        self.known = torch.zeros(num_layers, batch, dtype=torch.int32, device=device)
        # alpha, beta, gamma per layer, kept as floats: update() never reads the device for them
        self._params = [(alpha, beta, gamma)] * num_layers
        for layer in range(num_layers):
            self.set_params(layer, alpha, beta, gamma)

    @property
    def params(self) -> torch.Tensor:
        """``[L, 3]``: (alpha, beta, gamma) of every layer."""
        return torch.tensor(self._params, dtype=torch.float32)

    @property
    def num_layers(self) -> int:
        return self.level.shape[0]

    def set_params(self, layer: int, alpha: float, beta: float, gamma: float) -> None:
        if not (0.0 < alpha <= 1.0 and 0.0 <= beta <= 1.0 and gamma >= 0.0):
            raise ValueError(f"need 0 < alpha <= 1, 0 <= beta <= 1, gamma >= 0; got {alpha}, {beta}, {gamma}")
        self._params = [*self._params[:layer], (float(alpha), float(beta), float(gamma)), *self._params[layer + 1:]]

    def reset(self) -> None:
        self.level.zero_()
        self.trend.zero_()
        self.known.zero_()

    def predict(self, layer: int) -> torch.Tensor:
        """Predicted scores of the coming step, ``[B, Hkv, N_max]``; -inf for blocks never scored."""
        return holt_predict(self.level[layer], self.trend[layer], self.known[layer], self._params[layer][2])

    def update(self, layer: int, scores: torch.Tensor, num_blocks: torch.Tensor,
               pred: torch.Tensor | None = None) -> None:
        """Fold in the true scores ``[B, Hkv, N_max]`` of this step (``num_blocks [B]`` live blocks); with
        `pred`, also write the next step's prediction there (what :meth:`predict` would return, same pass)."""
        check.shape("scores", scores, tuple(self.level.shape[1:]))
        a, b, g = self._params[layer]
        holt_update_(self.level[layer], self.trend[layer], self.known[layer], scores, num_blocks.to(torch.int32),
                     a, b, g, pred)

    def calibrate(self, layer: int, scores: torch.Tensor, num_blocks: torch.Tensor, top_k: int,
                  n_sink: int, n_local: int, spec_k: int | None = None, grid=None) -> Calibration:
        """Grid-search this layer's parameters on a score history (see :func:`calibrate`), keep the best,
        and leave the state as the best parameters' replay of that history left it (a warm start)."""
        cal = calibrate(scores, num_blocks, top_k, n_sink, n_local, spec_k=spec_k, grid=grid)
        self.set_params(layer, cal.alpha, cal.beta, cal.gamma)
        self.level[layer].zero_()
        self.trend[layer].zero_()
        self.known[layer].zero_()
        for t in range(scores.shape[0]):
            self.update(layer, scores[t], num_blocks[t])
        return cal


@dataclass
class Calibration:
    alpha: float
    beta: float
    gamma: float
    hit_rate: float
    table: list[tuple[float, float, float, float]] = field(default_factory=list)  # (a, b, g, hit rate)


def calibrate(scores: torch.Tensor, num_blocks: torch.Tensor, top_k: int, n_sink: int = 1, n_local: int = 2,
              *, spec_k: int | None = None, grid=None) -> Calibration:
    """Replay Holt over a score history for every grid point and keep the best mean dynamic hit rate.

    Args:
        scores: ``[W, B, Hkv, N_max]`` true block scores of W consecutive steps (e.g. the last W prompt
            positions, computed as if they were decode steps).
        num_blocks: ``[W, B]`` live blocks at each step.
        top_k, n_sink, n_local: the selection budget; ``spec_k`` (default top_k) dynamic blocks are predicted.
        grid: ``{"alpha": [...], "beta": [...], "gamma": [...]}``; default :data:`DEFAULT_GRID`.

    The hit rate is ``sum |P ∩ S| over dynamic blocks / sum of dynamic |S|`` over steps 1..W-1 (step 0 only
    seeds the state). Ties go to the earliest grid point.
    """
    check.tensor("scores", scores, ndim=4, dtypes=check.FLOAT_DTYPES)
    check.tensor("num_blocks", num_blocks, ndim=2, dtypes=check.INDEX_DTYPES, device=scores.device)
    check.shape("num_blocks", num_blocks, tuple(scores.shape[:2]))
    if scores.shape[0] < 2:
        raise ValueError(f"calibration needs a history of at least 2 steps, got {scores.shape[0]}")
    k_max = ops.select.check_budget(top_k, n_sink, n_local)
    spec_k = top_k if spec_k is None else check.positive_int("spec_k", spec_k)
    grid = grid or DEFAULT_GRID
    points = list(itertools.product(grid["alpha"], grid["beta"], grid["gamma"]))
    for a, b, g in points:
        if not (0.0 < a <= 1.0 and 0.0 <= b <= 1.0 and g >= 0.0):
            raise ValueError(f"grid point alpha={a}, beta={b}, gamma={g} is out of range")
    w, bsz, hkv, n = scores.shape
    npt = len(points)
    prm = torch.tensor(points, device=scores.device, dtype=torch.float32).view(npt, 1, 1, 1, 3)
    a, b, g = prm[..., 0], prm[..., 1], prm[..., 2]
    level = torch.zeros(npt, bsz, hkv, n, device=scores.device)
    trend = torch.zeros_like(level)
    known = torch.zeros(npt, bsz, dtype=torch.int32, device=scores.device)
    hits = torch.zeros(npt, dtype=torch.float64, device=scores.device)
    total = torch.zeros((), dtype=torch.float64, device=scores.device)
    for t in range(w):
        nb = num_blocks[t]
        if t > 0:
            pred = holt_predict(level, trend, known, g).reshape(npt * bsz, hkv, n)
            p_idx, p_cnt = ops.select_blocks(pred, nb.repeat(npt), spec_k, n_sink, n_local)
            s_idx, s_cnt = ops.select_blocks(scores[t], nb, top_k, n_sink, n_local)
            h, d = dynamic_hits(p_idx, p_cnt, s_idx.repeat(npt, 1, 1), s_cnt.repeat(npt, 1), nb.repeat(npt),
                                n_sink, n_local, k_max)
            hits += h.view(npt, -1).sum(-1).double()
            total += d[:bsz].sum().double()
        z = normalize_scores(scores[t], nb)
        level, trend = holt_step(level, trend, z, known, nb, a, b)
        known = torch.maximum(known, nb.to(torch.int32))
    rates = (hits / total.clamp(min=1)).tolist()
    best = max(range(npt), key=lambda i: (rates[i], -i))
    table = [(*points[i], rates[i]) for i in range(npt)]
    return Calibration(*points[best], hit_rate=rates[best], table=table)
