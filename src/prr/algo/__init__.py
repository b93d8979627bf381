"""The algorithm layer: selectors, the predictor and the decode step, as short orchestration of ops."""

from .predictor import Calibration, HoltPredictor, calibrate, normalize_scores
from .sparse import METHODS, BlockMetadata, Selection, SparseConfig, select
from .step import StepOutput, StepStats, dsa_step, prr_step, speculative_top_k

__all__ = [
    "METHODS",
    "BlockMetadata",
    "Calibration",
    "HoltPredictor",
    "Selection",
    "SparseConfig",
    "StepOutput",
    "StepStats",
    "calibrate",
    "dsa_step",
    "normalize_scores",
    "prr_step",
    "select",
    "speculative_top_k",
]
