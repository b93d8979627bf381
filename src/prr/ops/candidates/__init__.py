"""Scoring and top-K over candidate-block lists (amortized selection). Dispatch: see :mod:`prr.ops.backend`."""

from .. import backend
from .._common import check_infllm_inputs, check_quest_inputs, num_blocks
from . import reference


def quest_candidate_scores(q, kmin, kmax, cache, cand, block_size, aggregate="sum", plan=None):
    if backend.use_triton(q):
        check_quest_inputs(q, kmin, kmax, cache, block_size)
        reference.check_aggregate(aggregate)
        reference.check_candidates(cand, cache)
        from . import triton as kernels

        return kernels.quest_candidate_scores(q, kmin, kmax, cache, cand, block_size, aggregate, plan=plan)
    return reference.quest_candidate_scores(q, kmin, kmax, cache, cand, block_size, aggregate, plan)


def quest_candidate_select(q, kmin, kmax, cache, cand, block_size, aggregate, plan, top_k, n_sink, n_local, tick):
    """A re-score step of amortized Quest selection in one op: :func:`quest_candidate_scores` (with its `plan`)
    then :func:`select_candidates` over the plan's block counts. The Triton path is one launch: the last
    program of each (sequence, KV head) to finish scoring selects the row, counted on `tick` (``[B * Hkv]``
    int32 zeros, left at zero). Returns ``(indices, counts, scores)``."""
    if backend.use_triton(q):
        check_quest_inputs(q, kmin, kmax, cache, block_size)
        reference.check_aggregate(aggregate)
        reference.check_candidates(cand, cache)
        from . import triton as kernels

        return kernels.quest_candidate_scores(q, kmin, kmax, cache, cand, block_size, aggregate, plan=plan,
                                              select=(top_k, n_sink, n_local, tick))
    scores = reference.quest_candidate_scores(q, kmin, kmax, cache, cand, block_size, aggregate, plan)
    nblk = plan[3] if plan is not None else num_blocks(cache.seq_lens, block_size)
    return (*reference.select_candidates(cand, scores, nblk, top_k, n_sink, n_local), scores)


def infllm_candidate_scores(q, ckeys, cache, cand, block_size=64, window=32, stride=16, aggregate="sum", plan=None):
    if backend.use_triton(q):
        check_infllm_inputs(q, ckeys, cache, block_size, window, stride)
        reference.check_aggregate(aggregate)
        reference.check_candidates(cand, cache)
        from . import triton as kernels

        return kernels.infllm_candidate_scores(q, ckeys, cache, cand, block_size, window, stride, aggregate,
                                               plan=plan)
    return reference.infllm_candidate_scores(q, ckeys, cache, cand, block_size, window, stride, aggregate, plan)


def select_candidates(cand, scores, num_blocks, top_k, n_sink=1, n_local=2):
    if backend.use_triton(scores):
        reference.check_candidate_select_inputs(cand, scores, num_blocks, top_k, n_sink, n_local)
        from . import triton as kernels

        return kernels.select_candidates(cand, scores.float(), num_blocks, top_k, n_sink, n_local)
    return reference.select_candidates(cand, scores, num_blocks, top_k, n_sink, n_local)


def amortized_plan(step, seq_lens, nblk_scan, cand, scans, every, new_slots, block_size, force=-1):
    if backend.use_triton(cand):
        from . import triton as kernels

        return kernels.amortized_plan(step, seq_lens, nblk_scan, cand, scans, every, new_slots, block_size, force)
    return reference.amortized_plan(step, seq_lens, nblk_scan, cand, scans, every, new_slots, block_size, force)


def commit_candidates(cand, scan_idx, scan):
    if backend.use_triton(cand):
        from . import triton as kernels

        return kernels.commit_candidates(cand, scan_idx, scan)
    return reference.commit_candidates(cand, scan_idx, scan)


amortized_plan.__doc__ = reference.amortized_plan.__doc__
commit_candidates.__doc__ = reference.commit_candidates.__doc__
quest_candidate_scores.__doc__ = reference.quest_candidate_scores.__doc__
infllm_candidate_scores.__doc__ = reference.infllm_candidate_scores.__doc__
select_candidates.__doc__ = reference.select_candidates.__doc__

__all__ = ["amortized_plan", "commit_candidates", "infllm_candidate_scores", "quest_candidate_scores",
           "quest_candidate_select", "select_candidates"]
