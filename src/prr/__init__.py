"""prr: Predict, Reuse, and Repair — fast long-context decoding with dynamic sparse attention.

Conventions (all public functions): ``q: [B, Hq, D]``; the paged cache ``k, v: [P, Hkv, S, D]`` (see
:mod:`prr.cache` for every shape letter); a partial attention state is ``(o, lse)`` with ``lse`` the
natural-log log-sum-exp of the scaled scores in float32 (float64 for float64 inputs), and an empty key set is
``(o = 0, lse = -inf)``.
"""

from ._checks import set_debug
from .algo import (
    METHODS,
    BlockMetadata,
    Calibration,
    HoltPredictor,
    Selection,
    SparseConfig,
    StepOutput,
    StepStats,
    calibrate,
    dsa_step,
    normalize_scores,
    prr_step,
    select,
    speculative_top_k,
)
from .cache import KVCache
from .ops import (
    dense_decode,
    infllm_metadata,
    infllm_metadata_append,
    infllm_scores,
    merge_states,
    merge_two,
    num_blocks,
    oracle_scores,
    quest_metadata,
    quest_metadata_append,
    quest_scores,
    select_blocks,
    select_blocks_guessed,
    selection_contains,
    selection_difference,
    sparse_decode,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BlockMetadata",
    "Calibration",
    "HoltPredictor",
    "KVCache",
    "Selection",
    "SparseConfig",
    "StepOutput",
    "StepStats",
    "__version__",
    "calibrate",
    "dense_decode",
    "dsa_step",
    "infllm_metadata",
    "infllm_metadata_append",
    "infllm_scores",
    "merge_states",
    "merge_two",
    "normalize_scores",
    "num_blocks",
    "oracle_scores",
    "prr_step",
    "quest_metadata",
    "quest_metadata_append",
    "quest_scores",
    "select",
    "select_blocks",
    "select_blocks_guessed",
    "selection_contains",
    "selection_difference",
    "set_debug",
    "sparse_decode",
    "speculative_top_k",
]
