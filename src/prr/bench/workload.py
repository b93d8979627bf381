"""A synthetic decode workload whose selections drift like a real model's.

The query of each step is the previous one plus Gaussian noise of relative size ``sigma`` (renormalised so its
norm stays put), over a fixed cache. The larger the drift, the less the selection of step t predicts step t+1;
:func:`calibrate_drift` finds the ``sigma`` at which the Holt predictor's hit rate at K' = K matches a target
(about 0.80 on real-model traces, DESIGN.md), so latency can be measured at a realistic hit rate produced by
the predictor itself rather than imposed on it. Runs on any device (the ops dispatch).
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..algo.predictor import HoltPredictor, dynamic_hits
from ..algo.sparse import BlockMetadata, select
from ..algo.step import speculative_top_k
from ..cache import KVCache


def drift(q: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """One step of drift: ``q + sigma * |q| * noise`` per head, rescaled to the old norm."""
    noise = torch.randn(q.shape, generator=gen, device=q.device, dtype=torch.float32)
    qf = q.float()
    norm = qf.norm(dim=-1, keepdim=True)
    step = qf + sigma * norm * noise / math.sqrt(q.shape[-1])
    return (step * norm / step.norm(dim=-1, keepdim=True).clamp(min=1e-12)).to(q.dtype)


def measure_hit_rate(cache: KVCache, meta: BlockMetadata, q0: torch.Tensor, sigma: float, steps: int = 24,
                     warmup: int = 4, ratio: float = 1.0, seed: int = 0, alpha: float = 0.5) -> float:
    """Mean dynamic hit rate of a Holt predictor over `steps` drifting queries (after `warmup` steps)."""
    cfg = meta.cfg
    gen = torch.Generator(device=q0.device).manual_seed(seed)
    nblk = ops.num_blocks(cache.seq_lens, cfg.block_size)
    nmax = cache.max_blocks(cfg.block_size)
    pred = HoltPredictor(1, cache.batch, cache.num_kv_heads, nmax, alpha=alpha, device=q0.device)
    spec_k = speculative_top_k(cfg.top_k, ratio)
    q, hits, total = q0, 0.0, 0.0
    for t in range(warmup + steps):
        sel = select(q, cache, meta)
        if t >= warmup:
            p_idx, p_cnt = ops.select_blocks(pred.predict(0), nblk, spec_k, cfg.n_sink, cfg.n_local)
            h, d = dynamic_hits(p_idx, p_cnt, sel.indices, sel.counts, nblk, cfg.n_sink, cfg.n_local, cfg.k_max)
            hits += float(h.sum())
            total += float(d.sum())
        pred.update(0, sel.scores, nblk)
        q = drift(q, sigma, gen)
    return hits / max(total, 1.0)


def calibrate_drift(cache: KVCache, meta: BlockMetadata, q0: torch.Tensor, target: float = 0.80,
                    iters: int = 8, lo: float = 1e-3, hi: float = 2.0, **kw) -> tuple[float, float]:
    """Bisect log(sigma) until the hit rate at K' = K is near `target`; returns (sigma, hit rate)."""
    best = (lo, measure_hit_rate(cache, meta, q0, lo, **kw))
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        rate = measure_hit_rate(cache, meta, q0, mid, **kw)
        if abs(rate - target) < abs(best[1] - target):
            best = (mid, rate)
        if rate > target:  # too predictable: drift more
            lo = mid
        else:
            hi = mid
    return best


def drifted_query(cache: KVCache, meta: BlockMetadata, q: torch.Tensor, target: float = 0.80,
                  seed: int = 1) -> tuple[torch.Tensor, float]:
    """A query one decode step before ``q``: drifted so the predictor's hit rate at K' = K is about ``target``
    (consecutive selections overlapping as real text's do); ``(q_prev, sigma)``."""
    sigma, _ = calibrate_drift(cache, meta, q, target)
    return drift(q, sigma, torch.Generator(device=q.device).manual_seed(seed)), sigma
