"""Reuse + repair + merge of a PRR step; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from .._common import check_decode_inputs
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


def select_repair(scores, num_blocks, top_k, n_sink, n_local, q, cache, block_size, p_idx, p_cnt, block_o,
                  block_lse, *, scale=None, group_max=None, out=None):
    if backend.use_triton(q):
        from ..select import _check_out
        from ..select.reference import check_select_inputs

        check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
        if out is not None:
            _check_out(out, scores, top_k + n_sink + n_local)
        from . import triton as kernels

        check_decode_inputs(q, cache, p_idx, p_cnt, block_size, name="p_idx")
        if tuple(scores.shape[:2]) != (cache.batch, cache.num_kv_heads):
            raise ValueError(f"scores must be [B={cache.batch}, Hkv={cache.num_kv_heads}, N], got "
                             f"{list(scores.shape)}")
        return kernels.select_repair(scores.float(), num_blocks, top_k, n_sink, n_local, q, cache, block_size,
                                     p_idx, p_cnt, block_o, block_lse, scale=scale, group_max=group_max, out=out)
    return reference.select_repair(scores, num_blocks, top_k, n_sink, n_local, q, cache, block_size, p_idx, p_cnt,
                                   block_o, block_lse, scale=scale, group_max=group_max, out=out)


select_repair.__doc__ = reference.select_repair.__doc__

__all__ = ["MODES", "repair_combine", "select_repair"]
