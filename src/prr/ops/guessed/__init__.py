"""The guessed top-K (:func:`select_blocks_guessed`): DSA's selection from a predicted threshold, exactly.
Dispatch: see :mod:`prr.ops.backend`."""

from .. import backend
from . import reference
from .reference import HELD, NARROWED, PATHS, SHORT, TOO_HIGH, TOO_LOW, key_to_float, order_key


def select_blocks_guessed(scores, num_blocks, top_k, n_sink=1, n_local=2, *, guess=None, prev=None, guess_k=None,
                          spec_k=None,
                          num_blocks_next=None, group_max=None, out=None, interp=False):
    guess_k = 2 * top_k if guess_k is None else guess_k
    spec_k = top_k if spec_k is None else spec_k
    if backend.use_triton(scores):
        reference.check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, guess, prev, guess_k, spec_k,
                                     num_blocks_next)
        from . import triton as kernels

        return kernels.select_blocks_guessed(scores.float(), num_blocks, top_k, n_sink, n_local, guess=guess, prev=prev,
                                             guess_k=guess_k, spec_k=spec_k, num_blocks_next=num_blocks_next,
                                             group_max=group_max, out=out, interp=interp)
    res = reference.select_blocks_guessed(scores, num_blocks, top_k, n_sink, n_local, guess=guess, prev=prev,
                                          guess_k=guess_k,
                                          spec_k=spec_k, num_blocks_next=num_blocks_next, interp=interp)
    if out is None:
        return res
    for dst, src in zip(out, res, strict=True):
        if dst is not None:
            dst.copy_(src)
    return tuple(src if dst is None else dst for dst, src in zip(out, res, strict=True))


select_blocks_guessed.__doc__ = reference.select_blocks_guessed.__doc__ + """
    ``group_max``: the full search's stage-1 group maxima written by the scoring kernel (as for
    :func:`prr.select_blocks`; ignored by the reference). ``out``: a 6-tuple of buffers for the six results
    (None entries are allocated); ``prev`` may be ``(out[0], out[1])`` (the previous step's selection, in
    place) and ``guess`` may be ``out[2]``: each row reads them before writing."""

__all__ = ["HELD", "NARROWED", "PATHS", "SHORT", "TOO_HIGH", "TOO_LOW", "key_to_float", "order_key",
           "select_blocks_guessed"]
