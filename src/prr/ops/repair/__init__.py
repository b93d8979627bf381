"""Reuse + repair + merge of a PRR step; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from .._common import check_decode_inputs
from . import reference
from .reference import MODES


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None, tickets=None):
    kw = dict(block_o=block_o, block_lse=block_lse, spec_o=spec_o, spec_lse=spec_lse, mode=mode, scale=scale)
    if backend.use_triton(q):
        check_decode_inputs(q, cache, p_idx, p_cnt, block_size)
        check_decode_inputs(q, cache, s_idx, s_cnt, block_size)
        reference.check_mode(mode)
        from . import triton as kernels

        return kernels.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, tickets=tickets, **kw)
    return reference.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, **kw)


def sparse_decode_fused(q, cache, indices, counts, block_size, scale=None, tickets=None):
    """:func:`prr.sparse_decode`'s ``(o, lse)`` from one launch (Triton: the repair kernel with no prediction, the
    split merge inside it; reference: ``sparse_decode``). ``tickets`` as for :func:`repair_combine`."""
    if backend.use_triton(q):
        check_decode_inputs(q, cache, indices, counts, block_size)
        from . import triton as kernels

        return kernels.sparse_decode_fused(q, cache, indices, counts, block_size, scale, tickets=tickets)
    from ..attention.reference import sparse_decode

    return sparse_decode(q, cache, indices, counts, block_size, scale)


repair_combine.__doc__ = (reference.repair_combine.__doc__ or "") + """
    ``tickets`` (Triton only): int32 zeros ``[B * Hkv]`` the kernel counts finished splits in (and leaves zero);
    a step captured in a CUDA graph passes its own, allocated before the capture.
"""

__all__ = ["MODES", "repair_combine", "sparse_decode_fused"]
