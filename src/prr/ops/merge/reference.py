"""Merge partial attention states over disjoint key sets (the repair primitive).

A partial state over a key set A is ``(o_A, lse_A)`` with ``lse_A = log sum_{t in A} exp(q.k_t * scale)``
(natural log) and ``o_A`` the softmax-weighted mean of the values over A. An empty set is ``(0, -inf)``. For
disjoint parts, ``lse = logsumexp_i lse_i`` and ``o = sum_i exp(lse_i - lse) o_i``; a part with
``lse_i = -inf`` weighs 0, and when every part is empty the result is ``(0, -inf)`` (never NaN).
"""

from __future__ import annotations

import torch

from ... import _checks as check
from .._common import acc_dtype


def check_merge_inputs(o, lse) -> None:
    check.tensor("o", o, dtypes=check.FLOAT_DTYPES)
    check.tensor("lse", lse, dtypes=check.FLOAT_DTYPES, device=o.device)
    if o.dim() < 2 or tuple(lse.shape) != tuple(o.shape[:-1]):
        raise ValueError(f"o must be [..., N, D] and lse [..., N]; got o {list(o.shape)}, lse {list(lse.shape)}")
    check.no_nan("lse", lse)


def merge_states(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial states.

    Args:
        o: ``[..., N, D]`` partial outputs (any float dtype).
        lse: ``[..., N]`` their log-sum-exps (natural log; -inf for an empty part).

    Returns:
        ``(o [..., D] in o.dtype, lse [...] float32; float64 if lse is float64)``.
    """
    check_merge_inputs(o, lse)
    acc = acc_dtype(lse.dtype)
    if lse.shape[-1] == 0:  # no parts: the empty state, as the kernel returns it (amax cannot reduce 0 items)
        return o.new_zeros(o.shape[:-2] + o.shape[-1:]), torch.full(lse.shape[:-1], float("-inf"), dtype=acc)
    lse_a = lse.to(acc)
    m = lse_a.amax(dim=-1, keepdim=True)
    # An all-empty row has m = -inf; shift by 0 there so exp() gives 0 weights instead of NaN.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_a - m)  # [..., N]; exactly 0 for -inf parts
    tot = w.sum(dim=-1, keepdim=True)
    out_lse = (torch.log(tot) + m).squeeze(-1)
    w = torch.where(tot > 0, w / tot, torch.zeros_like(w))
    # An empty part weighs 0 even if its o holds garbage (NaN/inf): select, do not multiply.
    w = w.unsqueeze(-1)
    out = torch.where(w > 0, w * o.to(acc), 0.0).sum(dim=-2)
    return out.to(o.dtype), out_lse


def merge_two(o_a, lse_a, o_b, lse_b, merge=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two states ``o: [..., D], lse: [...]`` (with `merge`, default :func:`merge_states`)."""
    return (merge or merge_states)(torch.stack([o_a, o_b.to(o_a.dtype)], dim=-2),
                                   torch.stack([lse_a, lse_b.to(lse_a.dtype)], -1))
