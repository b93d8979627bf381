"""Selection and set operations on selections. ``select_blocks`` dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference
from .reference import check_budget, selection_contains, selection_difference, selection_mask


def select_blocks(scores, num_blocks, top_k, n_sink=1, n_local=2):
    if backend.use_triton(scores):
        reference.check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
        from . import triton as kernels

        return kernels.select_blocks(scores.float(), num_blocks, top_k, n_sink, n_local)
    return reference.select_blocks(scores, num_blocks, top_k, n_sink, n_local)


select_blocks.__doc__ = reference.select_blocks.__doc__

__all__ = ["check_budget", "select_blocks", "selection_contains", "selection_difference", "selection_mask"]
