"""Decode attention. ``sparse_decode`` dispatches (see :mod:`prr.ops.backend`); ``dense_decode`` is the
reference oracle on every device."""

from .. import backend
from .._common import check_decode_inputs
from . import reference
from .reference import dense_decode, gather_blocks


def sparse_decode(q, cache, indices, counts, block_size, scale=None, return_block_states=False, max_programs=None):
    if backend.use_triton(q):
        check_decode_inputs(q, cache, indices, counts, block_size)
        from . import triton as kernels

        return kernels.sparse_decode(q, cache, indices, counts, block_size, scale, return_block_states,
                                     max_programs=max_programs)
    return reference.sparse_decode(q, cache, indices, counts, block_size, scale, return_block_states)


def block_states(q, cache, indices, counts, block_size, scale=None, max_programs=None):
    if backend.use_triton(q):
        check_decode_inputs(q, cache, indices, counts, block_size)
        from . import triton as kernels

        return kernels.block_states(q, cache, indices, counts, block_size, scale, max_programs=max_programs)
    return reference.block_states(q, cache, indices, counts, block_size, scale)


sparse_decode.__doc__ = (reference.sparse_decode.__doc__ or "") + """
    ``max_programs`` (Triton only): cap the kernel's grid (whole splits per (sequence, KV head)), so that a
    speculation running beside the top-K leaves its SMs free.
"""
block_states.__doc__ = (reference.block_states.__doc__ or "") + """
    ``max_programs`` (Triton only): cap the kernel's grid (whole splits per (sequence, KV head)), so that a
    speculation running beside the selection leaves SMs free for the selection's kernels.
"""

__all__ = ["block_states", "dense_decode", "gather_blocks", "sparse_decode"]
