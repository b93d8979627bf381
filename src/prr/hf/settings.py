"""prr's settings for a transformers model: one frozen object, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from .. import _checks as check
from ..algo.sparse import METHODS as SELECTORS
from ..algo.sparse import SparseConfig
from ..algo.step import STEP_MODES, speculative_top_k

METHODS = ("dense", "dsa", "prr")


@dataclass(frozen=True, slots=True)
class PrrSettings:
    """How the decode steps of a transformers model attend.

    Args:
        method: ``"dense"`` (every cached token, through prr's paged cache), ``"dsa"`` (serialized dynamic
            sparse attention: select, then attend) or ``"prr"`` (predict, speculate, reuse, repair).
        budget: tokens each (sequence, KV head) attends per step in a sparse layer, the sink and local blocks
            included (``SparseConfig.from_budget``).
        selector: ``"quest"`` (16-token blocks) or ``"infllm_v2"`` (64-token blocks); ``"oracle"`` for studies.
        block_size: overrides the selector's block size (a power of two, a multiple of 16).
        ratio: PRR's speculation ratio, ``K' = ceil(ratio K)``.
        mode: PRR's ``"exact"`` (DSA's output) or ``"union"`` (attention over ``P ∪ S``).
        dense_layers: the first layers stay dense, as Quest does.
        calibrate_window: PRR calibrates each layer's predictor on the last this-many prompt positions.
        collect_stats: keep every sparse layer's per-step block counts (hit rate) in ``PrrCache.step_stats``.
    """

    method: str = "dsa"
    budget: int = 2048
    selector: str = "quest"
    block_size: int | None = None
    ratio: float = 1.5
    mode: str = "exact"
    dense_layers: int = 2
    calibrate_window: int = 16
    collect_stats: bool = False

    def __post_init__(self):
        check.choice("method", self.method, METHODS)
        check.choice("selector", self.selector, SELECTORS)
        check.choice("mode", self.mode, STEP_MODES)
        check.positive_int("budget", self.budget)
        check.nonneg_int("dense_layers", self.dense_layers)
        check.nonneg_int("calibrate_window", self.calibrate_window)
        if self.block_size is not None:
            check.power_of_two("block_size", self.block_size)
        speculative_top_k(self.sparse.top_k, self.ratio)  # validates the ratio

    @property
    def sparse(self) -> SparseConfig:
        """The selector's configuration (raises ValueError where the budget leaves no dynamic block)."""
        kw = {} if self.block_size is None else {"block_size": self.block_size}
        return SparseConfig.from_budget(self.selector, self.budget, **kw)
