"""Memory estimates checked before large allocations (weights, KV caches, benchmark buffers).

An allocation that does not fit is refused up front with :class:`NotEnoughMemory`, naming what it was for, how
many bytes it needs and how many are free, instead of the OS killing the process (host RAM) or a CUDA
out-of-memory error half way through a load. Free memory is ``MemAvailable`` of ``/proc/meminfo`` on the CPU
(the kernel's estimate of what can be allocated without swapping) and ``torch.cuda.mem_get_info`` on a GPU.
Only a fraction (:data:`HEADROOM`) of it may be planned: the process needs room for activations, temporaries
and the Python heap besides the big buffers. The estimates count the big tensors only.

This module is a low layer: it reads configuration objects by attribute (no import of prr.model).
"""

from __future__ import annotations

import math
import os

import torch

# The share of free memory that one allocation may take.
HEADROOM = 0.9


class NotEnoughMemory(MemoryError, ValueError):
    """An allocation would not fit in free memory. A ValueError too, so the CLI reports it as a bad input."""


def gib(nbytes: float) -> str:
    """A size for people: GiB, MiB or KiB, one decimal."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        return None
    return None


def free_bytes(device) -> tuple[int | None, str]:
    """``(bytes free, where the figure comes from)`` on `device`; ``(None, why)`` where it is unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free memory of {torch.cuda.get_device_name(dev)} (torch.cuda.mem_get_info)"
    if dev.type == "cpu":
        avail = _meminfo_available()
        if avail is not None:
            return avail, "host RAM available (MemAvailable in /proc/meminfo)"
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host RAM (sysconf)"
        except (ValueError, OSError):
            return None, "unknown on this system"
    return None, f"not measured on {dev.type}"


def require(nbytes: int, device, what: str) -> None:
    """Raise :class:`NotEnoughMemory` if `nbytes` exceed :data:`HEADROOM` of the free memory of `device`."""
    if nbytes <= 0:
        return
    free, source = free_bytes(device)
    if free is None:
        return  # nothing to compare with (meta tensors, unknown systems): let the allocator decide
    if nbytes > HEADROOM * free:
        raise NotEnoughMemory(
            f"not enough memory for {what} on {torch.device(device)}: it needs {gib(nbytes)} "
            f"({nbytes} bytes) and {gib(free)} is free ({source}); prr plans at most {HEADROOM:.0%} of it. Use a "
            "smaller model, context or batch, a lower-precision dtype, or another device")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_params(cfg) -> int:
    """Parameters of a Llama-family model config (``prr.model.ModelConfig``), biases aside."""
    h, hd = cfg.hidden, cfg.head_dim
    per_layer = (h * cfg.num_q_heads * hd * 2  # wq, wo
                 + h * cfg.num_kv_heads * hd * 2  # wk, wv
                 + 3 * h * cfg.ffn  # gate, up, down
                 + 2 * h)  # the two norms
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + head + h + cfg.num_layers * per_layer


def weight_bytes(cfg, dtype: torch.dtype, staging_dtype: torch.dtype | None = torch.float32) -> int:
    """Bytes of the weights in `dtype`, plus the largest tensor once more in `staging_dtype` (loaders
    dequantize or draw each tensor in float32 before the cast)."""
    total = weight_params(cfg) * dtype_bytes(dtype)
    if staging_dtype is not None:
        largest = max(cfg.vocab_size * cfg.hidden, cfg.ffn * cfg.hidden, cfg.num_q_heads * cfg.head_dim * cfg.hidden)
        total += largest * dtype_bytes(staging_dtype)
    return total


def kv_cache_bytes(num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, *, page_size: int = 16, block_size: int | None = None) -> int:
    """Bytes of `num_layers` paged KV caches (keys and values, whole pages) plus Quest-sized block metadata
    (min and max per block) when `block_size` is given."""
    tokens = math.ceil(capacity / page_size) * page_size
    kv = 2 * batch * tokens * num_kv_heads * head_dim * dtype_bytes(dtype)
    meta = 0
    if block_size:
        meta = 2 * batch * num_kv_heads * math.ceil(tokens / block_size) * head_dim * dtype_bytes(dtype)
    return num_layers * (kv + meta)
