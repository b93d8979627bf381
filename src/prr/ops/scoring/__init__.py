"""Block scores. Quest and InfLLM-v2 dispatch (see :mod:`prr.ops.backend`); the oracle is reference-only
(evaluation reads the whole cache anyway)."""

from .. import backend
from .._common import check_infllm_inputs, check_quest_inputs
from . import reference
from .reference import AGGREGATES, oracle_scores


def quest_scores(q, kmin, kmax, cache, block_size, aggregate="sum"):
    if backend.use_triton(q):
        check_quest_inputs(q, kmin, kmax, cache, block_size)
        reference.check_aggregate(aggregate)
        from . import triton as kernels

        return kernels.quest_scores(q, kmin, kmax, cache, block_size, aggregate)
    return reference.quest_scores(q, kmin, kmax, cache, block_size, aggregate)


def infllm_scores(q, ckeys, cache, block_size=64, window=32, stride=16, aggregate="sum"):
    if backend.use_triton(q):
        check_infllm_inputs(q, ckeys, cache, block_size, window, stride)
        reference.check_aggregate(aggregate)
        from . import triton as kernels

        return kernels.infllm_scores(q, ckeys, cache, block_size, window, stride, aggregate)
    return reference.infllm_scores(q, ckeys, cache, block_size, window, stride, aggregate)


quest_scores.__doc__ = reference.quest_scores.__doc__
infllm_scores.__doc__ = reference.infllm_scores.__doc__

__all__ = ["AGGREGATES", "infllm_scores", "oracle_scores", "quest_scores"]
