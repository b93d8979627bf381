"""Reuse + repair + merge of a PRR step; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from .._common import check_decode_inputs
from . import reference
from .reference import MODES


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None, slot_map=None):
    kw = dict(block_o=block_o, block_lse=block_lse, spec_o=spec_o, spec_lse=spec_lse, mode=mode, scale=scale)
    if backend.use_triton(q):
        check_decode_inputs(q, cache, p_idx, p_cnt, block_size)
        check_decode_inputs(q, cache, s_idx, s_cnt, block_size)
        reference.check_mode(mode)
        from . import triton as kernels

        return kernels.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, slot_map=slot_map, **kw)
    return reference.repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, **kw)


def new_slot_map(batch: int, num_kv_heads: int, max_blocks: int, device):
    """An empty map from block id to P's slot, ``int32 [B, Hkv, max_blocks + 1]`` (the Triton repair finds hits
    through it; see :func:`write_slot_map`)."""
    import torch

    return torch.full((batch, num_kv_heads, max_blocks + 1), -1, dtype=torch.int32, device=device)


def write_slot_map(slot_map, p_idx):
    """``slot_map[b, h, P[b, h, j]] = j`` for P's live slots; run it whenever P changes (beside the
    speculation). Stale entries of earlier P never need clearing: the repair checks ``P[j] == block``."""
    import torch

    nmap = slot_map.shape[-1] - 1
    idx = torch.where(p_idx >= 0, p_idx, nmap).long()
    src = torch.arange(p_idx.shape[-1], dtype=slot_map.dtype, device=p_idx.device).expand_as(p_idx)
    return slot_map.scatter_(2, idx, src)


repair_combine.__doc__ = (reference.repair_combine.__doc__ or "") + """
    ``slot_map`` (Triton only, optional): P's slot map written by :func:`write_slot_map` for this P; without
    it the kernel launcher builds one (two more small kernels).
"""

__all__ = ["MODES", "new_slot_map", "repair_combine", "write_slot_map"]
