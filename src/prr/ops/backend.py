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
_overrides: dict[str, str | None] = {"PRR_BACKEND": None, "PRR_PDL": None}  # set by use_backend / use_pdl


def _mode(var: str, modes: tuple[str, ...]) -> str:
    """The mode a context manager set, else the environment variable ``var``'s (default "auto"), checked."""
    mode = _overrides[var] or os.environ.get(var, "auto")
    if mode not in modes:
        raise ValueError(f"unknown {var} {mode!r}; expected one of {', '.join(modes)}")
    return mode


@contextlib.contextmanager
def _overriding(var: str, mode: str, modes: tuple[str, ...], what: str):
    if mode not in modes:
        raise ValueError(f"unknown {what} {mode!r}; expected one of {', '.join(modes)}")
    prev, _overrides[var] = _overrides[var], mode
    try:
        yield
    finally:
        _overrides[var] = prev


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def current() -> str:
    return _mode("PRR_BACKEND", BACKENDS)


def use_triton(t: torch.Tensor) -> bool:
    mode = current()
    if mode == "reference" or t.dtype == torch.float64:
        return False
    if t.device.type == "cuda":
        return triton_available()
    return mode == "triton" and triton_available()


def use_backend(mode: str):
    """Run the ops inside the block on `mode` ("auto", "triton" or "reference")."""
    return _overriding("PRR_BACKEND", mode, BACKENDS, "backend")


# Programmatic dependent launch (Hopper and later): a kernel launched with it may be scheduled while the kernel
# before it in the stream is still running, and waits on the device (``griddepcontrol.wait``) until that kernel
# has finished and its writes are visible. Every prr kernel takes ``PDL`` and, when set, waits first thing
# (``prr.ops.pdl_prologue``) and lets its own dependents launch; a kernel that is not ours (PyTorch's) is never
# launched early, so the chain stays ordered whatever runs between two prr kernels.
PDL_MODES = ("auto", "on", "off")


def pdl_mode() -> str:
    return _mode("PRR_PDL", PDL_MODES)


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(t: torch.Tensor) -> dict:
    """The launch arguments of a kernel whose inputs include ``t``: ``{"PDL": True, "launch_pdl": True}`` on a
    CUDA device of compute capability 9.0 or later unless ``PRR_PDL=off`` (or :func:`use_pdl`), else ``{}``
    (the kernels' ``PDL`` defaults to off; the CPU interpreter never takes it)."""
    mode = "off" if t.device.type != "cuda" else pdl_mode()
    if mode == "off":
        return {}
    if not _pdl_capable(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        if mode == "on":
            raise RuntimeError("PRR_PDL=on needs a GPU of compute capability 9.0 or later (Hopper)")
        return {}
    return {"PDL": True, "launch_pdl": True}


def use_pdl(mode: str):
    """Launch the kernels inside the block with programmatic dependent launch ``mode`` ("auto", "on", "off");
    a CUDA graph keeps the mode it was captured with."""
    return _overriding("PRR_PDL", mode, PDL_MODES, "PDL mode")
