"""Reuse + repair + merge of a PRR step; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference
from .reference import MODES


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None):
    kw = dict(block_o=block_o, block_lse=block_lse, spec_o=spec_o, spec_lse=spec_lse, mode=mode, scale=scale)
    if backend.use_triton(q):
        reference.check_repair_inputs(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, spec_o,
                                      spec_lse, mode)
        from . import triton as kernels

        return kernels.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, **kw)
    return reference.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, **kw)


repair_combine.__doc__ = reference.repair_combine.__doc__

__all__ = ["MODES", "repair_combine"]
