"""Block metadata. Bulk builds run the reference (once per prefill); the per-token appends dispatch (see
:mod:`prr.ops.backend`)."""

from .. import backend
from . import reference
from .reference import infllm_metadata, num_windows, quest_metadata


def quest_metadata_append(kmin, kmax, cache, block_size):
    if backend.use_triton(kmax):
        reference.check_quest_append(kmin, kmax, cache, block_size)
        from . import triton as kernels

        return kernels.quest_metadata_append(kmin, kmax, cache, block_size)
    return reference.quest_metadata_append(kmin, kmax, cache, block_size)


def infllm_metadata_append(ckeys, cache, window=32, stride=16):
    if backend.use_triton(ckeys):
        reference.check_infllm_append(ckeys, cache, window, stride)
        from . import triton as kernels

        return kernels.infllm_metadata_append(ckeys, cache, window, stride)
    return reference.infllm_metadata_append(ckeys, cache, window, stride)


quest_metadata_append.__doc__ = reference.quest_metadata_append.__doc__
infllm_metadata_append.__doc__ = reference.infllm_metadata_append.__doc__

__all__ = ["infllm_metadata", "infllm_metadata_append", "num_windows", "quest_metadata", "quest_metadata_append"]
