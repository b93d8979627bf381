"""One decode-attention step of one layer: serialized DSA, and PRR.

Both take the cache *after* the current token was appended (the query attends to itself) and the block
metadata kept in step with it, and return a :class:`StepOutput`. PRR in ``exact`` mode returns attention over
the true selection S (serialized DSA's output up to float rounding); in ``union`` mode attention over
``P ∪ S``. This module is the reference orchestration; the GPU runtime runs the same stages on two streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks as check
from .. import ops
from ..cache import KVCache
from .predictor import HoltPredictor, forced_blocks
from .sparse import BlockMetadata, Selection, select

MODES = ("exact", "union")
# "predicted" is the ablation of the evaluation: attention over P alone, no selection-driven repair.
STEP_MODES = (*MODES, "predicted")


@dataclass
class StepStats:
    """Per (sequence, KV head) block counts of one step, each ``[B, Hkv]`` int32.

    ``hits + misses == selected`` and ``hits + false_positives == predicted``. ``forced`` blocks (sink and
    local, or all blocks of a short context) are in both S and P. For serialized DSA, P is empty.
    """

    selected: torch.Tensor  # |S|
    predicted: torch.Tensor  # |P|
    hits: torch.Tensor  # |S ∩ P|
    misses: torch.Tensor  # |S \ P|, attended after the selection
    false_positives: torch.Tensor  # |P \ S|
    forced: torch.Tensor  # blocks in every selection
    # the guessed top-K's rows, [2, B, Hkv] int32: |C(τ)| (-1: not counted) and the path (prr.ops.guessed.PATHS)
    guess: torch.Tensor | None = None

    def hit_rate(self) -> float:
        """Dynamic hit rate ``sum(hits - forced) / sum(selected - forced)`` (1.0 when nothing is dynamic)."""
        dyn = (self.selected - self.forced).sum()
        return float((self.hits - self.forced).sum() / dyn) if bool(dyn > 0) else 1.0

    def summary(self) -> dict:
        return {
            "selected": float(self.selected.float().mean()),
            "predicted": float(self.predicted.float().mean()),
            "hits": float(self.hits.float().mean()),
            "misses": float(self.misses.float().mean()),
            "false_positives": float(self.false_positives.float().mean()),
            "hit_rate": self.hit_rate(),
        }


@dataclass
class StepOutput:
    o: torch.Tensor  # [B, Hq, D], q.dtype
    lse: torch.Tensor  # [B, Hq] float32 (float64 for float64 input)
    selection: Selection  # the true S with its scores
    stats: StepStats
    predicted: Selection | None = None  # P (PRR only)


@dataclass
class StepCounts:
    """The block counts every sparse layer of one model step shares (their caches grow in lockstep), computed
    once per token instead of once per layer (each is a few small kernels; at batch 1 a kernel's launch costs
    more than its work): blocks per sequence ``nblk [B]``, the blocks forced into every selection ``forced``
    and into both S and P ``forced_prr`` (``[B, Hkv]``), and a ``zero [B, Hkv]``; all int32."""

    nblk: torch.Tensor
    forced: torch.Tensor
    forced_prr: torch.Tensor
    zero: torch.Tensor
    nblk_next: torch.Tensor | None = None  # blocks per sequence one token later (PRR predicts P over them)

    @classmethod
    def of(cls, seq_lens: torch.Tensor, cfg, num_kv_heads: int, spec_k: int | None = None,
           grow: int = 0) -> StepCounts:
        """Counts for caches holding ``seq_lens [B]`` tokens (after this step's append); ``grow``: tokens the
        caches gain before the next step (``nblk_next`` is counted then)."""
        counts = cls.from_blocks(ops.num_blocks(seq_lens, cfg.block_size), cfg, num_kv_heads, spec_k)
        if grow:
            counts.nblk_next = ops.num_blocks(seq_lens + grow, cfg.block_size)
        return counts

    @classmethod
    def from_blocks(cls, nblk: torch.Tensor, cfg, num_kv_heads: int, spec_k: int | None = None) -> StepCounts:
        """Counts for ``nblk [B]`` blocks per sequence."""
        forced = forced_blocks(nblk, cfg.n_sink, cfg.n_local, cfg.k_max)
        both = forced
        if spec_k is not None:  # P's capacity may be the smaller one when K' < K
            both = torch.minimum(forced, forced_blocks(nblk, cfg.n_sink, cfg.n_local,
                                                       cfg.n_sink + cfg.n_local + spec_k))
        shape = (nblk.shape[0], num_kv_heads)
        return cls(nblk, forced.to(torch.int32)[:, None].expand(shape), both.to(torch.int32)[:, None].expand(shape),
                   torch.zeros(shape, dtype=torch.int32, device=nblk.device))


def dsa_step(q: torch.Tensor, cache: KVCache, meta: BlockMetadata, scale: float | None = None,
             counts: StepCounts | None = None) -> StepOutput:
    """Serialized DSA: select, then attend over the selection. ``counts``: this step's shared
    :class:`StepCounts` (a model passes one for all its layers; default: computed here)."""
    cfg = meta.cfg if isinstance(meta, BlockMetadata) else None
    if counts is None:
        counts = StepCounts.of(cache.seq_lens, cfg, cache.num_kv_heads)
    sel = select(q, cache, meta, nblk=counts.nblk)
    o, lse = ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size, scale)
    zero = counts.zero
    return StepOutput(o, lse, sel, StepStats(sel.counts, zero, zero, sel.counts, zero, counts.forced))


def speculative_top_k(top_k: int, ratio: float) -> int:
    """``K' = ceil(r * K)`` dynamic blocks speculated for a budget of K."""
    if not (isinstance(ratio, (int, float)) and ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be a positive number, got {ratio!r}")
    return max(1, math.ceil(ratio * top_k - 1e-9))


def prr_step(
    q: torch.Tensor,
    cache: KVCache,
    meta: BlockMetadata,
    predictor: HoltPredictor,
    layer: int,
    *,
    ratio: float = 1.0,
    mode: str = "exact",
    scale: float | None = None,
    update: bool = True,
) -> StepOutput:
    """Predict, speculate, select, reuse, repair, merge (and update the predictor).

    Args:
        q: ``[B, Hq, D]`` queries of this step; cache/meta hold the current token already.
        predictor: Holt state; its ``layer`` slot is read, then updated with the true scores.
        ratio: speculation ratio r; ``K' = ceil(r * K)`` dynamic blocks are speculated.
        mode: ``"exact"`` (attention over S), ``"union"`` (attention over ``P ∪ S``) or ``"predicted"``
            (the ablation: attention over P alone, S computed only to update the predictor and the stats).
    """
    check.choice("mode", mode, STEP_MODES)
    if not isinstance(predictor, HoltPredictor):
        raise TypeError(f"predictor must be a HoltPredictor, got {type(predictor).__name__}")
    if not isinstance(meta, BlockMetadata):
        raise TypeError(f"meta must be a BlockMetadata, got {type(meta).__name__}")
    cfg = meta.cfg
    nblk = ops.num_blocks(cache.seq_lens, cfg.block_size)

    # 1. Predict P: sink ∪ local ∪ the K' blocks with the best predicted scores.
    spec_k = speculative_top_k(cfg.top_k, ratio)
    p_idx, p_cnt = ops.select_blocks(predictor.predict(layer), nblk, spec_k, cfg.n_sink, cfg.n_local)

    # 2. Speculate: attention over P -- per-block partial states (exact) or one merged state (union). On the
    #    GPU this runs on a side stream, concurrently with step 3.
    if mode == "exact":
        blk_o, blk_lse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size, scale)
        spec = dict(block_o=blk_o, block_lse=blk_lse)
    else:
        o_p, lse_p = ops.sparse_decode(q, cache, p_idx, p_cnt, cfg.block_size, scale)
        spec = dict(spec_o=o_p, spec_lse=lse_p)

    # 3. Select: the true S and its scores.
    sel = select(q, cache, meta)

    # 4-6. Reuse the partials of S ∩ P, repair the misses S \ P from the cache, merge the disjoint parts
    #      (one fused op; its reference spells the three stages out).
    if mode == "predicted":
        o, lse = spec["spec_o"], spec["spec_lse"]
    else:
        o, lse = ops.repair_combine(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts, mode=mode,
                                    scale=scale, **spec)

    # 7. Update the predictor with the scores the selection already produced.
    if update:
        predictor.update(layer, sel.scores, nblk)

    stats = prr_stats(p_idx, p_cnt, sel, nblk, cfg, spec_k)
    return StepOutput(o, lse, sel, stats, Selection(p_idx, p_cnt))


def prr_stats(p_idx, p_cnt, sel: Selection, nblk: torch.Tensor, cfg, spec_k: int,
              forced: torch.Tensor | None = None) -> StepStats:
    """Block counts of a PRR step from its P and S (``nblk``: blocks per sequence this step; ``forced``: the
    blocks forced into both, ``StepCounts.forced_prr``, computed here when not given)."""
    hits, misses, false_pos = ops.selection_overlap(p_idx, p_cnt, sel.indices, sel.counts)  # one kernel on a GPU
    if forced is None:
        forced = StepCounts.from_blocks(nblk, cfg, hits.shape[1], spec_k).forced_prr
    return StepStats(sel.counts, p_cnt, hits, misses, false_pos, forced)
