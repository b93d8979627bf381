"""The decode step's projections (``F.linear`` for a few rows); dispatches (see :mod:`prr.ops.backend`)."""

import torch
import torch.nn.functional as F

from .. import backend
from . import reference

WIDE_N, NARROW_K, LONG_K = 16384, 1024, 2048
"""Shape classes of the dispatch (:func:`plan`), from the H200 (scripts/gemv_probe.py,
results/gemv_probe_h200.json, bf16, weights read from HBM, one to eight rows)."""


def plan(m: int, n: int, k: int, dtype) -> tuple[str, int, int] | None:
    """Which GEMV a ``[m, k] @ [n, k]^T`` takes: ``("fma", BN, BK)`` (:func:`prr.ops.gemv.triton.linear`),
    ``("tc", BN, BK)`` (:func:`prr.ops.gemv.triton.linear_dot`) or None (``F.linear``), as measured:

    - one row: the FMA kernel, faster than cuBLAS on every decode shape of Llama-3.1-8B, GLM-4-9B and
      SmolLM2-135M but many output rows of a short K (SmolLM2's tied LM head, 49,152 x 576: 18.8 us against
      the kernel's best 22.9), left to cuBLAS;
    - 2 to 8 rows: cuBLAS for N >= 16,384 (gate/up, LM heads: it wins there); for K >= 2,048 the tensor-core
      kernel (4096x4096 at four rows 12.9 against 14.6 us, 4608x4096 14.0 against 15.8; bf16/fp16 only), 32 x
      512 tiles up to N = 4,096 and 64 x 256 above; short K (SmolLM2) up to four rows the FMA kernel (960x576 at
      two rows 3.0 against 4.1 us), else cuBLAS."""
    if m < 1 or n == 0 or k == 0:
        return None
    if m == 1:
        return None if n >= WIDE_N and k < NARROW_K else ("fma", 0, 0)
    if m > 8 or n >= WIDE_N:
        return None
    if k >= LONG_K:
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        return ("tc", 32, 512) if n <= 4096 else ("tc", 64, 256)
    return ("fma", 0, 0) if m <= 4 else None


def linear(x, w, bias=None):
    # CPU tensors leave at the first test (the reference ops' decode calls this ~120 times per token)
    if (x.is_cuda or backend.current() == "triton") and x.dim() == 2 and w.dim() == 2 and backend.use_triton(x):
        how = plan(x.shape[0], w.shape[0], w.shape[1], x.dtype)
        if how is not None and x.stride(-1) == 1 and w.stride(-1) == 1:
            reference.check_linear_inputs(x, w, bias)
            from . import triton as kernels

            if how[0] == "tc":
                return kernels.linear_dot(x, w, bias, bn=how[1], bk=how[2])
            return kernels.linear(x, w, bias)
    return F.linear(x, w, bias)


linear.__doc__ = reference.linear.__doc__

__all__ = ["linear", "plan"]
