"""Pure functions on tensors: the only layer that imports Triton.

Each op lives in its own folder: ``reference.py`` is the PyTorch ground truth (any device, dtype-generic),
``triton.py`` the kernel with the same signature, and the folder's ``__init__`` dispatches between them
(:mod:`prr.ops.backend`): CUDA tensors run the kernels, CPU tensors the reference.
"""

from . import backend
from ._common import num_blocks
from .attention import block_states, dense_decode, sparse_decode
from .guessed import select_blocks_guessed
from .holt import holt_update_
from .merge import merge_states, merge_two
from .metadata import infllm_metadata, infllm_metadata_append, quest_metadata, quest_metadata_append
from .repair import repair_combine
from .scoring import infllm_scores, oracle_scores, quest_scores
from .select import select_blocks, selection_contains, selection_difference, selection_mask, selection_overlap

__all__ = [
    "backend",
    "block_states",
    "dense_decode",
    "holt_update_",
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
    "repair_combine",
    "select_blocks",
    "select_blocks_guessed",
    "selection_contains",
    "selection_difference",
    "selection_mask",
    "selection_overlap",
    "sparse_decode",
]
