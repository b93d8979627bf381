"""Input validation shared by every public entry point.

Structural checks (shapes, dtypes, devices) read only tensor metadata and always run. Value checks (NaN in
``q``, ``seq_lens`` within capacity) read tensor data: on the CPU they always run; on CUDA they would force a
host sync inside the decode step, so they run only when debugging is on (:func:`set_debug`) and never while a
CUDA graph is being captured.
"""

from __future__ import annotations

import os

import torch

_DEBUG = os.environ.get("PRR_DEBUG", "") not in ("", "0")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def set_debug(enabled: bool) -> None:
    """Run value checks (NaN, lengths within capacity) on CUDA tensors too; they cost a host sync each."""
    global _DEBUG
    _DEBUG = bool(enabled)


def values_checkable(t: torch.Tensor) -> bool:
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return _DEBUG


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but must be on {device} (same device as the cache)")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """`expected` may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape, strict=True))
    if not ok:
        exp = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {exp}, got {list(t.shape)}")


def same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, other: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {other} has {dtype}; they must match")


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def power_of_two(name: str, v) -> int:
    positive_int(name, v)
    if v & (v - 1):
        raise ValueError(f"{name} must be a power of two, got {v}")
    return v


def choice(name: str, v, options) -> str:
    if v not in options:
        raise ValueError(f"unknown {name} {v!r}; expected one of {', '.join(map(repr, options))}")
    return v


def finite(name: str, t: torch.Tensor) -> None:
    if values_checkable(t) and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")


def gqa(num_q_heads: int, num_kv_heads: int) -> int:
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"the number of query heads (Hq={num_q_heads}) must be a multiple of the number of KV heads "
            f"(Hkv={num_kv_heads})"
        )
    return num_q_heads // num_kv_heads
