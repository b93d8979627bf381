"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

- CUDA tensors run the Triton kernels (when triton imports), except float64, which has no kernel.
- CPU tensors run the reference, unless the backend is "triton" (``PRR_BACKEND=triton`` or
  :func:`use_backend`), which runs the kernels on the CPU through Triton's interpreter (set
  ``TRITON_INTERPRET=1`` before the first kernel is imported): slow, for tests.
- ``PRR_BACKEND=reference`` forces the reference everywhere (debugging).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")
_override: str | None = None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def current() -> str:
    mode = _override or os.environ.get("PRR_BACKEND", "auto")
    if mode not in BACKENDS:
        raise ValueError(f"unknown PRR_BACKEND {mode!r}; expected one of {', '.join(BACKENDS)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    mode = current()
    if mode == "reference" or t.dtype == torch.float64:
        return False
    if t.device.type == "cuda":
        return triton_available()
    return mode == "triton" and triton_available()


@contextlib.contextmanager
def use_backend(mode: str):
    """Run the ops inside the block on `mode` ("auto", "triton" or "reference")."""
    global _override
    if mode not in BACKENDS:
        raise ValueError(f"unknown backend {mode!r}; expected one of {', '.join(BACKENDS)}")
    prev, _override = _override, mode
    try:
        yield
    finally:
        _override = prev
