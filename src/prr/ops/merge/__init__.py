"""Merging partial states; ``merge_states`` dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference


def merge_states(o, lse):
    if backend.use_triton(o) and backend.use_triton(lse):
        reference.check_merge_inputs(o, lse)
        from . import triton as kernels

        return kernels.merge_states(o, lse)
    return reference.merge_states(o, lse)


def merge_two(o_a, lse_a, o_b, lse_b):
    """Merge two states ``o: [..., D], lse: [...]``."""
    return reference.merge_two(o_a, lse_a, o_b, lse_b, merge=merge_states)


merge_states.__doc__ = reference.merge_states.__doc__

__all__ = ["merge_states", "merge_two"]
