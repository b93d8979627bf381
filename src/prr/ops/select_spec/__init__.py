"""Scoring, selection and speculation of a PRR step in one call; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference


def select_speculate(q, kmin, kmax, cache, block_size, top_k, n_sink, n_local, nblk, *, aggregate="sum",
                     p_idx=None, p_cnt=None, scale=None, buffers=None, spec_first=True, spec_programs=None):
    if backend.use_triton(q):
        from . import triton as kernels

        return kernels.select_speculate(q, kmin, kmax, cache, block_size, top_k, n_sink, n_local, nblk,
                                        aggregate=aggregate, p_idx=p_idx, p_cnt=p_cnt, scale=scale,
                                        buffers=buffers, spec_first=spec_first, spec_programs=spec_programs)
    return reference.select_speculate(q, kmin, kmax, cache, block_size, top_k, n_sink, n_local, nblk,
                                      aggregate=aggregate, p_idx=p_idx, p_cnt=p_cnt, scale=scale)


select_speculate.__doc__ = reference.select_speculate.__doc__ + """
    Triton: one launch. ``buffers`` (:class:`prr.ops.select_spec.triton.SelectSpecBuffers`) holds its tickets
    and scratch (pass the same one to every call, graph replays included); ``spec_first`` puts the speculation's
    programs before the scoring ones; ``spec_programs`` caps them."""

__all__ = ["select_speculate"]
