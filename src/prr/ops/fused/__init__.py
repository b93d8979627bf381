"""Fused small ops of the decode step outside attention; dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference


def rms_norm(x, w, eps, residual=None):
    reference.check_norm_inputs(x, w, residual)
    if backend.use_triton(x):
        from . import triton as kernels

        return kernels.rms_norm(x, w, eps, residual)
    return reference.rms_norm(x, w, eps, residual)


def swiglu(gu):
    reference.check_swiglu_inputs(gu)
    if backend.use_triton(gu):
        from . import triton as kernels

        return kernels.swiglu(gu)
    return reference.swiglu(gu)


def rope_qkv(qkv, cos, sin, hq, hkv, d, interleaved=False):
    reference.check_rope_inputs(qkv, cos, sin, hq, hkv, d)
    if backend.use_triton(qkv) and d & (d - 1) == 0:
        from . import triton as kernels

        return kernels.rope_qkv(qkv, cos, sin, hq, hkv, d, interleaved)
    return reference.rope_qkv(qkv, cos, sin, hq, hkv, d, interleaved)


def append_kv(cache, k, v, quest=None, advanced=False):
    reference.check_append_inputs(cache, k, v, quest)
    if backend.use_triton(k) and cache.head_dim & (cache.head_dim - 1) == 0:
        from . import triton as kernels

        return kernels.append_kv(cache, k, v, quest, advanced)
    return reference.append_kv(cache, k, v, quest, advanced)


rms_norm.__doc__ = reference.rms_norm.__doc__
swiglu.__doc__ = reference.swiglu.__doc__
rope_qkv.__doc__ = reference.rope_qkv.__doc__
append_kv.__doc__ = reference.append_kv.__doc__

__all__ = ["append_kv", "rms_norm", "rope_qkv", "swiglu"]
