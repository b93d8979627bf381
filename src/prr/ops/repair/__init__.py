"""Reuse + repair + merge of a PRR step; dispatches (see :mod:`prr.ops.backend`)."""

import torch

from .. import backend
from . import reference
from .reference import MODES


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None, flag=None):
    kw = dict(block_o=block_o, block_lse=block_lse, spec_o=spec_o, spec_lse=spec_lse, mode=mode, scale=scale)
    if backend.use_triton(q):
        reference.check_repair_inputs(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, spec_o,
                                      spec_lse, mode)
        _check_flag(flag, q)
        from . import triton as kernels

        return kernels.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, flag=flag, **kw)
    _check_flag(flag, q)
    return reference.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, **kw)


def repair_signal(flag, q, cache, block_size, s_idx) -> None:
    _check_flag(flag, q)
    if backend.use_triton(q):
        from . import triton as kernels

        return kernels.repair_signal(flag, q, cache, block_size, s_idx)
    return reference.repair_signal(flag, q, cache, block_size, s_idx)


def repair_programs(batch: int, num_kv_heads: int, ks: int, block_size: int, device) -> int:
    """Programs of the repair kernel over S rows of ``ks`` slots (each waits for :func:`repair_signal`)."""
    from . import triton as kernels

    return kernels.repair_programs(batch, num_kv_heads, ks, block_size, torch.device(device))


def _check_flag(flag, q) -> None:
    if flag is not None and (not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or flag.numel() != 1
                             or flag.device != q.device):
        raise ValueError(f"flag must be a one-element int32 tensor on {q.device}")


repair_combine.__doc__ = reference.repair_combine.__doc__ + """
    ``flag``: wait on the device for :func:`repair_signal` before reading the speculation's states (kernels
    only; the reference ignores it)."""

repair_signal.__doc__ = reference.repair_signal.__doc__

__all__ = ["MODES", "repair_combine", "repair_programs", "repair_signal"]
