"""Block scores. Quest and InfLLM-v2 dispatch (see :mod:`prr.ops.backend`); the oracle is reference-only
(evaluation reads the whole cache anyway)."""

from .. import backend
from .._common import check_infllm_inputs, check_quest_inputs
from . import reference
from .reference import AGGREGATES, oracle_scores


def _with_groups(scores, group_max_for):
    return scores if group_max_for is None else (scores, None)


def quest_scores(q, kmin, kmax, cache, block_size, aggregate="sum", *, group_max_for=None):
    if backend.use_triton(q):
        check_quest_inputs(q, kmin, kmax, cache, block_size)
        reference.check_aggregate(aggregate)
        from . import triton as kernels

        return kernels.quest_scores(q, kmin, kmax, cache, block_size, aggregate, group_max_for=group_max_for)
    return _with_groups(reference.quest_scores(q, kmin, kmax, cache, block_size, aggregate), group_max_for)


def infllm_scores(q, ckeys, cache, block_size=64, window=32, stride=16, aggregate="sum", *, group_max_for=None):
    if backend.use_triton(q):
        check_infllm_inputs(q, ckeys, cache, block_size, window, stride)
        reference.check_aggregate(aggregate)
        from . import triton as kernels

        return kernels.infllm_scores(q, ckeys, cache, block_size, window, stride, aggregate,
                                     group_max_for=group_max_for)
    return _with_groups(reference.infllm_scores(q, ckeys, cache, block_size, window, stride, aggregate),
                        group_max_for)


_GROUPS_DOC = """
    ``group_max_for=(n_sink, n_local)``: return ``(scores, group_max)``, where the Triton kernel also wrote the
    top-K's stage-1 group maxima for that selection (saving :func:`prr.select_blocks` a launch; pass them as
    its ``group_max``); the reference returns ``(scores, None)``."""
quest_scores.__doc__ = reference.quest_scores.__doc__ + _GROUPS_DOC
infllm_scores.__doc__ = reference.infllm_scores.__doc__ + _GROUPS_DOC

__all__ = ["AGGREGATES", "infllm_scores", "oracle_scores", "quest_scores"]
