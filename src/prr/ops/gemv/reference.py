"""The decode step's projections: ``y = x @ W^T (+ b)`` for a few rows (twin: ``triton.py``).

The reference is ``F.linear`` itself: float32 accumulation, the bias added before the one rounding to the
output dtype (what cuBLAS's epilogue does on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _checks as check


def check_linear_inputs(x, w, bias) -> None:
    check.tensor("x", x, ndim=2, dtypes=check.FLOAT_DTYPES)
    check.tensor("w", w, ndim=2, dtypes=check.FLOAT_DTYPES, device=x.device)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w has rows of {w.shape[1]} for x's rows of {x.shape[1]}")
    check.same_dtype("w", w, x.dtype, "x")
    if bias is not None:
        check.tensor("bias", bias, ndim=1, device=x.device)
        check.shape("bias", bias, (w.shape[0],))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ w [N, K]^T + bias [N]`` -> ``[M, N]`` in x's dtype."""
    check_linear_inputs(x, w, bias)
    return F.linear(x, w, bias)
