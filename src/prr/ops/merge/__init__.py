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
    import torch

    return merge_states(torch.stack([o_a, o_b.to(o_a.dtype)], dim=-2),
                        torch.stack([lse_a, lse_b.to(lse_a.dtype)], -1))


merge_states.__doc__ = reference.merge_states.__doc__

__all__ = ["merge_states", "merge_two"]
