"""The decode step's projections (``F.linear`` for a few rows); dispatches (see :mod:`prr.ops.backend`)."""

import torch.nn.functional as F

from .. import backend
from . import reference

MAX_ROWS = 1
"""Rows up to which the Triton GEMV runs (more rows: ``F.linear``). Measured on the H200 at one row (faster
than cuBLAS on every decode shape of Llama-3.1-8B and GLM-4-9B); module-level for a sweep."""


def linear(x, w, bias=None):
    if x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and backend.use_triton(x):
        reference.check_linear_inputs(x, w, bias)
        if x.stride(-1) == 1 and w.stride(-1) == 1:
            from . import triton as kernels

            return kernels.linear(x, w, bias)
    return F.linear(x, w, bias)


linear.__doc__ = reference.linear.__doc__

__all__ = ["MAX_ROWS", "linear"]
