"""Selection and set operations on selections. ``select_blocks`` dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference
from .reference import check_budget, selection_contains, selection_difference, selection_mask


def select_blocks(scores, num_blocks, top_k, n_sink=1, n_local=2, *, group_max=None):
    if backend.use_triton(scores):
        reference.check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
        from . import triton as kernels

        return kernels.select_blocks(scores.float(), num_blocks, top_k, n_sink, n_local, group_max=group_max)
    return reference.select_blocks(scores, num_blocks, top_k, n_sink, n_local)


select_blocks.__doc__ = reference.select_blocks.__doc__ + """
    ``group_max``: the Triton top-K's stage-1 group maxima, written by the scoring kernel
    (``quest_scores(..., group_max_for=(n_sink, n_local))``) for these scores and this selection; ignored by
    the reference."""

__all__ = ["check_budget", "select_blocks", "selection_contains", "selection_difference", "selection_mask"]
