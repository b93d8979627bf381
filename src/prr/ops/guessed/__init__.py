"""The guessed top-K (:func:`select_blocks_guessed`): DSA's selection from the previous one, exactly.
Dispatch: see :mod:`prr.ops.backend`."""

from .. import backend
from . import reference
from .reference import (
    HELD,
    PATHS,
    SHORT,
    TOO_HIGH,
    TOO_LOW,
    guess_bound,
    key_to_float,
    list_capacity,
    order_key,
    selection_flags,
)


def select_blocks_guessed(scores, num_blocks, top_k, n_sink=1, n_local=2, *, prev, bound=None, spec_k=None,
                          num_blocks_next=None, group_max=None, out=None, prev_out=None, write_p=True):
    spec_k = top_k if spec_k is None else spec_k
    if backend.use_triton(scores):
        reference.check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, prev, bound, spec_k,
                                     num_blocks_next)
        from . import triton as kernels

        return kernels.select_blocks_guessed(scores.float(), num_blocks, top_k, n_sink, n_local, prev=prev,
                                             bound=bound, spec_k=spec_k, num_blocks_next=num_blocks_next,
                                             group_max=group_max, out=out, prev_out=prev_out, write_p=write_p)
    res = reference.select_blocks_guessed(scores, num_blocks, top_k, n_sink, n_local, prev=prev, bound=bound,
                                          spec_k=spec_k, num_blocks_next=num_blocks_next, prev_out=prev_out)
    if out is None:
        return res
    for dst, src in zip(out, res, strict=True):
        if dst is not None:
            dst.copy_(src)
    return tuple(src if dst is None else dst for dst, src in zip(out, res, strict=True))


select_blocks_guessed.__doc__ = reference.select_blocks_guessed.__doc__ + """
    ``group_max``: the full search's stage-1 group maxima written by the scoring kernel (as for
    :func:`prr.select_blocks`; ignored by the reference). ``out``: a 5-tuple of buffers for the five results
    (None entries are allocated). ``write_p=False``: the kernel skips P (its buffers are left as they were;
    the reference computes it anyway)."""

__all__ = ["HELD", "PATHS", "SHORT", "TOO_HIGH", "TOO_LOW", "guess_bound", "key_to_float", "list_capacity",
           "order_key", "select_blocks_guessed", "selection_flags"]
