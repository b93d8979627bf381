"""Block scores. Quest and InfLLM-v2 dispatch (see :mod:`prr.ops.backend`); the oracle is reference-only
(evaluation reads the whole cache anyway)."""

from ... import _checks as check
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


def quest_select(q, kmin, kmax, cache, block_size, aggregate, num_blocks, top_k, n_sink=1, n_local=2):
    """Quest's scores and the selection (sink, local and the top-K blocks) of this step: ``(scores, indices,
    counts)``, exactly :func:`quest_scores` then :func:`prr.select_blocks`. On the Triton backend rows short
    enough for one program (up to ``select.triton.TOPK_SINGLE_MAX`` blocks) take one launch for both; longer
    rows and the reference take the two ops."""
    from .. import select as sel

    if backend.use_triton(q):
        from . import triton as kernels

        if kernels.fused_select_fits(kmax.shape[2]):
            check_quest_inputs(q, kmin, kmax, cache, block_size)
            reference.check_aggregate(aggregate)
            nmax = kmax.shape[2]
            sel.check_budget(top_k, n_sink, n_local)
            check.tensor("num_blocks", num_blocks, ndim=1, dtypes=check.INDEX_DTYPES, device=q.device)
            check.shape("num_blocks", num_blocks, (q.shape[0],))
            check.in_range("num_blocks", num_blocks, 0, nmax, f"the metadata covers N_max = {nmax} blocks")
            return kernels.quest_select(q, kmin, kmax, cache, block_size, aggregate, num_blocks, top_k, n_sink,
                                        n_local)
    scores, gmax = quest_scores(q, kmin, kmax, cache, block_size, aggregate, group_max_for=(n_sink, n_local))
    idx, cnt = sel.select_blocks(scores, num_blocks, top_k, n_sink, n_local, group_max=gmax)
    return scores, idx, cnt


_GROUPS_DOC = """
    ``group_max_for=(n_sink, n_local)``: return ``(scores, group_max)``, where the Triton kernel also wrote the
    top-K's stage-1 group maxima for that selection (saving :func:`prr.select_blocks` a launch; pass them as
    its ``group_max``); the reference returns ``(scores, None)``."""
quest_scores.__doc__ = reference.quest_scores.__doc__ + _GROUPS_DOC
infllm_scores.__doc__ = reference.infllm_scores.__doc__ + _GROUPS_DOC

__all__ = ["AGGREGATES", "infllm_scores", "oracle_scores", "quest_scores", "quest_select"]
