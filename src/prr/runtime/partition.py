"""Two CUDA streams on disjoint sets of SMs (CUDA green contexts), for PRR's ``overlap="partition"``.

Beside the speculation, the top-K (a few programs, one per row, each a chain of dependent block-wide passes)
shares its SMs with the speculation's programs and stretches with every warp beside it. Green contexts split
the GPU's SMs: the top-K's stream gets a group of SMs to itself, the speculation's stream the rest; the scorer
and everything else still run on the whole GPU. PyTorch's ``GreenContext`` takes the device's first SMs for
every context it creates, so two of them would overlap: the split is made through the driver API (``libcuda``,
CUDA 12.4 and later) and the streams come back as ``torch.cuda.ExternalStream``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_SM_RESOURCE = 1  # CU_DEV_RESOURCE_TYPE_SM
_GREEN_DEFAULT_STREAM = 1  # CU_GREEN_CTX_DEFAULT_STREAM
_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING
_RESOURCE_BYTES = 4096  # CUdevResource is at most a few hundred bytes in every CUDA version
_SM_COUNT_OFFSET = 96  # CUdevResource: type (4 bytes), 92 bytes of padding, then the SM union's smCount


class PartitionUnavailable(RuntimeError):
    """This GPU, driver or platform cannot split its SMs between streams."""


@functools.lru_cache(maxsize=1)
def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise PartitionUnavailable(f"the CUDA driver library cannot be loaded ({e})") from None


def _call(cu, name, *args):
    fn = getattr(cu, name, None)
    if fn is None:
        raise PartitionUnavailable(f"the CUDA driver has no {name} (green contexts need CUDA 12.4 or later)")
    r = fn(*args)
    if r != 0:
        raise PartitionUnavailable(f"{name} failed (CUresult {r})")


@functools.cache
def partition_streams(device_index: int, sms: int) -> tuple[torch.cuda.Stream, torch.cuda.Stream, int, int]:
    """``(group stream, rest stream, group SMs, rest SMs)``: a stream on a group of at least ``sms`` SMs of
    device ``device_index`` (the driver rounds up to its granularity: 8 on Hopper) and one on the SMs that
    remain. Created once per (device, sms) and kept for the process (graphs captured on them replay later).
    Raises :class:`PartitionUnavailable` where the driver cannot."""
    if sms < 1:
        raise ValueError(f"sms must be a positive count, got {sms}")
    cu = _driver()
    torch.cuda.init()
    with torch.cuda.device(device_index):
        torch.zeros(1, device="cuda")  # the primary context exists and is current
        dev = ctypes.c_int()
        _call(cu, "cuDeviceGet", ctypes.byref(dev), device_index)
        full, group, rest = (ctypes.create_string_buffer(_RESOURCE_BYTES) for _ in range(3))
        _call(cu, "cuDeviceGetDevResource", dev, full, _SM_RESOURCE)
        groups = ctypes.c_uint(1)  # one group: the array stride (the struct's size) never matters
        _call(cu, "cuDevSmResourceSplitByCount", group, ctypes.byref(groups), full, rest, 0, ctypes.c_uint(sms))
        out, counts = [], []
        for res in (group, rest):
            count = int.from_bytes(res.raw[_SM_COUNT_OFFSET:_SM_COUNT_OFFSET + 4], "little")
            if count < 1:
                raise PartitionUnavailable(f"a split of {sms} SMs left a part with {count} SMs")
            desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
            _call(cu, "cuDevResourceGenerateDesc", ctypes.byref(desc), res, 1)
            _call(cu, "cuGreenCtxCreate", ctypes.byref(ctx), desc, dev, _GREEN_DEFAULT_STREAM)
            _call(cu, "cuGreenCtxStreamCreate", ctypes.byref(stream), ctx, _NON_BLOCKING, 0)
            out.append(torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device_index)))
            counts.append(count)
    return out[0], out[1], counts[0], counts[1]
