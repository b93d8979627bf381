"""Pure functions on tensors: the only layer that will import Triton.

Each op lives in its own folder with ``reference.py``, the PyTorch ground truth (any device, dtype-generic).
"""

from ._common import num_blocks
from .attention import dense_decode, sparse_decode
from .merge import merge_states, merge_two
from .metadata import infllm_metadata, infllm_metadata_append, quest_metadata, quest_metadata_append
from .scoring import infllm_scores, oracle_scores, quest_scores
from .select import select_blocks, selection_contains, selection_difference, selection_mask

__all__ = [
    "dense_decode",
    "infllm_metadata",
    "infllm_metadata_append",
    "infllm_scores",
    "merge_states",
    "merge_two",
    "num_blocks",
    "oracle_scores",
    "quest_metadata",
    "quest_metadata_append",
    "quest_scores",
    "select_blocks",
    "selection_contains",
    "selection_difference",
    "selection_mask",
    "sparse_decode",
]
