"""Reuse + repair + merge of a PRR step; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference
from .reference import MODES


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None, before_merge=None):
    kw = dict(block_o=block_o, block_lse=block_lse, spec_o=spec_o, spec_lse=spec_lse, mode=mode, scale=scale)
    if before_merge is not None and not callable(before_merge):
        raise TypeError(f"before_merge must be callable or None, got {type(before_merge).__name__}")
    if backend.use_triton(q):
        reference.check_repair_inputs(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, spec_o,
                                      spec_lse, mode)
        from . import triton as kernels

        return kernels.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, before_merge=before_merge,
                                      **kw)
    if before_merge is not None:  # (the reference reads every input in one go)
        before_merge()
    return reference.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, **kw)


repair_combine.__doc__ = reference.repair_combine.__doc__ + """
    ``before_merge``: called once the kernels that read ``block_o`` / ``block_lse`` are launched and before the
    merge that reads ``spec_o`` / ``spec_lse``: in union mode the repair itself reads neither speculation
    state, so a caller that runs the speculation on another stream can join that stream here and let the
    repair start beside it (the PyTorch reference reads everything at once: it calls it first)."""

__all__ = ["MODES", "repair_combine"]
