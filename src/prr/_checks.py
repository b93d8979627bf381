"""Input validation shared by every public entry point.

Structural checks (shapes, dtypes, devices) read only tensor metadata and always run. Value checks (NaN/inf
in ``q``, ``seq_lens`` within capacity, used page-table entries inside the pool, selection counts within
``K_max``, block ids of the cache, no duplicate block in a selection, ``num_blocks`` within ``N_max``) read
tensor data: on the CPU they always run; on CUDA they would force a host sync inside the decode step, so they
run only when debugging is on (:func:`set_debug`) and never while a CUDA graph is being captured. Every
rejected input and its message: docs/ERRORS.md.
"""

from __future__ import annotations

import os

import torch

_DEBUG = os.environ.get("PRR_DEBUG", "") not in ("", "0")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def set_debug(enabled: bool) -> None:
    """Run value checks (NaN/inf, lengths, page-table entries, selection ids, counts and duplicates) on CUDA
    tensors too; they cost a host sync each."""
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
    """NaN or inf in a query poisons every output it touches (and the predictor's state): refuse it."""
    if values_checkable(t) and not bool(torch.isfinite(t).all()):
        kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
        at = [int(i) for i in (~torch.isfinite(t)).nonzero()[0]]
        raise ValueError(f"{name} contains {kind} (first at {at})")


def no_nan(name: str, t: torch.Tensor) -> None:
    """Like :func:`finite` but -inf/+inf are allowed (block scores use -inf for dead blocks)."""
    if values_checkable(t) and bool(torch.isnan(t).any()):
        at = [int(i) for i in torch.isnan(t).nonzero()[0]]
        raise ValueError(f"{name} contains NaN (first at {at})")


def in_range(name: str, t: torch.Tensor, lo: int, hi: int, why: str = "") -> None:
    """Every value of an index tensor in ``[lo, hi]`` (a value check)."""
    if values_checkable(t) and t.numel():
        bad = (t < lo) | (t > hi)
        if bool(bad.any()):
            at = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"{name}{at} = {int(t[tuple(at)])} is out of range: it must lie in [{lo}, {hi}]"
                             + (f" ({why})" if why else ""))


def counts_name(indices_name: str) -> str:
    """The name of a selection's counts from its indices' name: indices -> counts, p_idx -> p_cnt."""
    if indices_name.endswith("_idx"):
        return indices_name[:-4] + "_cnt"
    return indices_name.replace("indices", "counts") if "indices" in indices_name else indices_name + "_counts"


def selection_values(name: str, indices: torch.Tensor, counts: torch.Tensor, n_max: int, *,
                     unique: bool = True) -> None:
    """A selection's values (a value check): ``counts`` within the capacity ``K_max``; every valid slot (slot
    < count) holds -1 (padding) or a block id of the cache, below ``n_max`` (its blocks per sequence); with
    `unique`, no block twice in a row (it would be attended, and counted, twice). A block past a sequence's
    current end is allowed and attends nothing: a sequence the engine has finished shrinks under a prediction
    made before."""
    if not values_checkable(indices):
        return
    cname = counts_name(name)
    kmax = indices.shape[-1]
    in_range(cname, counts, 0, kmax, f"the selection's capacity K_max = {kmax}")
    slot = torch.arange(kmax, device=indices.device) < counts[..., None]
    ids = torch.where(slot, indices.long(), -1)
    bad = (ids < -1) | (ids >= n_max)
    if bool(bad.any()):
        b, h, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{b}, {h}, {k}] = {int(ids[b, h, k])} is out of range: the cache holds {n_max} blocks per "
            f"sequence, so a block id must lie in [0, {n_max - 1}] (or be -1, padding)")
    if unique and kmax > 1:
        srt = ids.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            b, h, k = (int(i) for i in dup.nonzero()[0])
            raise ValueError(f"{name}[{b}, {h}] holds block {int(srt[b, h, k])} twice: a selection must not repeat "
                             "a block (it would be attended and weighted twice)")


def page_table(cache, extra: int = 0) -> None:
    """Every page a sequence uses (logical page < ceil((seq_len + extra) / page_size)) maps to a physical page of the
    pool (a value check; entries past the end are never read and may hold anything)."""
    pt = cache.page_table
    if not values_checkable(pt) or not pt.numel():
        return
    used = -(-(cache.seq_lens.long() + extra) // cache.page_size)  # [B]
    live = torch.arange(pt.shape[1], device=pt.device)[None, :] < used[:, None]
    pool = cache.k.shape[0]
    bad = live & ((pt < 0) | (pt >= pool))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"cache.page_table[{b}, {j}] = {int(pt[b, j])} is out of range: sequence {b} uses "
                         f"{int(used[b])} pages, each must lie in [0, {pool - 1}] (the pool holds {pool} pages)")


def gqa(num_q_heads: int, num_kv_heads: int) -> int:
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"the number of query heads (Hq={num_q_heads}) must be a multiple of the number of KV heads "
            f"(Hkv={num_kv_heads})"
        )
    return num_q_heads // num_kv_heads
