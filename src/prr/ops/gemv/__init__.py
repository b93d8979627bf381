"""The decode step's projections (``F.linear`` for a few rows); dispatches (see :mod:`prr.ops.backend`)."""

import torch.nn.functional as F

from .. import backend
from . import reference

MAX_ROWS = 1
"""Rows up to which the Triton GEMV runs (more rows: ``F.linear``). Measured on the H200 at one row (faster
than cuBLAS on every decode shape of Llama-3.1-8B, GLM-4-9B and SmolLM2-135M but one); module-level for a
sweep. At four rows cuBLAS or a tensor-core tile won (scripts/gemv_probe.py, results/gemv_probe_h200.json)."""
WIDE_N, NARROW_K = 16384, 1024
"""The one shape where cuBLAS wins at one row: many output rows of a short K (SmolLM2's tied LM head,
49,152 x 576: 18.8 us against the kernel's best 22.9), so matrices with N >= WIDE_N and K < NARROW_K stay
with ``F.linear``."""


def linear(x, w, bias=None):
    if (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and w.dim() == 2
            and not (w.shape[0] >= WIDE_N and w.shape[1] < NARROW_K) and backend.use_triton(x)):
        reference.check_linear_inputs(x, w, bias)
        if x.stride(-1) == 1 and w.stride(-1) == 1:
            from . import triton as kernels

            return kernels.linear(x, w, bias)
    return F.linear(x, w, bias)


linear.__doc__ = reference.linear.__doc__

__all__ = ["MAX_ROWS", "linear"]
