"""Reuse, repair, merge: from the speculation's partial states and the true selection, the final state.

Exact mode: ``merge({partial_j : j in S ∩ P} ∪ {attn(S \\ P)})`` == attention over S.
Union mode: ``merge(attn(P), attn(S \\ P))`` == attention over ``P ∪ S``.
"""

from __future__ import annotations

import torch

from ... import _checks as check
from .._common import check_decode_inputs
from ..attention.reference import sparse_decode
from ..merge.reference import merge_states, merge_two
from ..select.reference import selection_contains, selection_difference

MODES = ("exact", "union")


def check_mode(mode: str) -> str:
    return check.choice("mode", mode, MODES)


def check_repair_inputs(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, spec_o, spec_lse,
                        mode) -> None:
    """Both selections and the speculation's states (shapes always; selection values where checkable)."""
    check_mode(mode)
    check_decode_inputs(q, cache, p_idx, p_cnt, block_size, name="p_idx")
    check_decode_inputs(q, cache, s_idx, s_cnt, block_size, name="s_idx")
    bsz, hq, d = q.shape
    if mode == "exact":
        if block_o is None or block_lse is None:
            raise ValueError("exact mode needs block_o and block_lse (per-slot partial states of P)")
        check.tensor("block_o", block_o, ndim=4, dtypes=check.FLOAT_DTYPES, device=cache.device)
        check.shape("block_o", block_o, (bsz, hq, p_idx.shape[-1], d))
        check.tensor("block_lse", block_lse, ndim=3, dtypes=check.FLOAT_DTYPES, device=cache.device)
        check.shape("block_lse", block_lse, (bsz, hq, p_idx.shape[-1]))
    else:
        if spec_o is None or spec_lse is None:
            raise ValueError("union mode needs spec_o and spec_lse (the merged state of P)")
        check.tensor("spec_o", spec_o, ndim=3, dtypes=check.FLOAT_DTYPES, device=cache.device)
        check.shape("spec_o", spec_o, (bsz, hq, d))
        check.tensor("spec_lse", spec_lse, ndim=2, dtypes=check.FLOAT_DTYPES, device=cache.device)
        check.shape("spec_lse", spec_lse, (bsz, hq))


def repair_combine(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, *, block_o=None, block_lse=None,
                   spec_o=None, spec_lse=None, mode="exact", scale=None):
    """Finish a PRR step.

    Args:
        p_idx, p_cnt: the speculated selection P ``[B, Hkv, K'_max]``, ``[B, Hkv]``.
        s_idx, s_cnt: the true selection S ``[B, Hkv, K_max]``, ``[B, Hkv]``.
        block_o, block_lse: exact mode: P's per-slot partial states ``[B, Hq, K'_max, D]``, ``[B, Hq, K'_max]``.
        spec_o, spec_lse: union mode: P's merged state ``[B, Hq, D]``, ``[B, Hq]``.

    Returns:
        ``(o [B, Hq, D] q.dtype, lse [B, Hq] float32; float64 for float64 input)``.
    """
    check_repair_inputs(q, cache, block_size, p_idx, p_cnt, s_idx, s_cnt, block_o, block_lse, spec_o, spec_lse,
                        mode)
    g = q.shape[1] // cache.num_kv_heads
    # Reuse: which speculated slots are in S.
    hit = selection_contains(p_idx, p_cnt, s_idx, s_cnt)  # [B, Hkv, K'_max]
    # Repair: attention over the misses S \ P.
    m_idx, m_cnt = selection_difference(s_idx, s_cnt, p_idx, p_cnt)
    o_m, lse_m = sparse_decode(q, cache, m_idx, m_cnt, block_size, scale)
    # Merge the disjoint parts.
    if mode == "exact":
        kept_lse = block_lse.masked_fill(~hit.repeat_interleave(g, dim=1), float("-inf"))
        o, lse = merge_states(torch.cat([block_o, o_m.to(block_o.dtype)[:, :, None]], dim=2),
                              torch.cat([kept_lse, lse_m.to(kept_lse.dtype)[:, :, None]], dim=2))
        o = o.to(q.dtype)
    else:
        o, lse = merge_two(spec_o, spec_lse, o_m, lse_m)
    return o, lse
