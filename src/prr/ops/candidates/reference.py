"""Scoring and top-K over a *list* of candidate blocks (amortized selection, issue #12).

A candidate list is ``cand: [B, Hkv, C]`` int32 block ids per (sequence, KV head), -1 for an empty slot. Ids
must be distinct within a row; the Triton top-K also needs the valid ids in ascending order (-1 slots may sit
anywhere), which is how :class:`prr.algo.amortized.AmortizedSelector` builds them (a scan's sorted selection,
then the blocks that appeared since, in order).

The scores are those of the full scorers (:mod:`prr.ops.scoring`) at the listed blocks, GQA-aggregated the
same way: ``quest_candidate_scores(...)[b, h, i] == quest_scores(...)[b, h, cand[b, h, i]]``, and ``-inf`` for
an empty slot or a block at or past ``ceil(seq_len / BS)``. Only the listed blocks' metadata is read.
"""

from __future__ import annotations

import torch

from ... import _checks as check
from ...cache import KVCache
from .._common import acc_dtype, check_infllm_inputs, check_quest_inputs, num_blocks
from ..scoring.reference import _aggregate, check_aggregate
from ..select.reference import check_budget


def check_candidates(cand: torch.Tensor, cache: KVCache) -> None:
    check.tensor("cand", cand, ndim=3, dtypes=check.INDEX_DTYPES, device=cache.device)
    check.shape("cand", cand, (cache.batch, cache.num_kv_heads, None))


def _live(cand: torch.Tensor, nblk: torch.Tensor, limit: int) -> torch.Tensor:
    """``[B, Hkv, C]`` bool: the slot holds a block id below the sequence's block count (and the buffer)."""
    return (cand >= 0) & (cand < nblk.long()[:, None, None]) & (cand < limit)


def _gather_rows(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``t[b, h, ids[b, h, ...]]`` of ``t: [B, Hkv, R, D]`` for ``ids: [B, Hkv, ...]`` (in range)."""
    flat = ids.reshape(ids.shape[0], ids.shape[1], -1).long()
    out = t.gather(2, flat[..., None].expand(-1, -1, -1, t.shape[-1]))
    return out.view(*ids.shape, t.shape[-1])


def plan_rescore(cand: torch.Tensor, cache: KVCache, block_size: int, plan) -> None:
    """A re-score step's bookkeeping, in place: what :func:`amortized_plan` does with ``force = 0``, fused into
    the candidate scorers by their ``plan=(step, nblk_scan, new_slots, nblk_out)`` argument: ``step += 1``, the
    last ``new_slots`` columns of ``cand`` list the blocks ``nblk_scan .. N - 1`` (-1 padded), and
    ``nblk_out [B]`` int32 receives N (for the top-K)."""
    step, nblk_scan, new_slots, nblk_out = plan
    nblk = num_blocks(cache.seq_lens, block_size)
    step.add_(1)
    nblk_out.copy_(nblk)
    new = nblk_scan[:, None] + torch.arange(new_slots, device=cand.device, dtype=torch.int32)
    new = torch.where(new < nblk[:, None], new, -1)
    cand[..., cand.shape[-1] - new_slots:] = new[:, None, :].to(cand.dtype)


def quest_candidate_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cache: KVCache,
                           cand: torch.Tensor, block_size: int, aggregate: str = "sum", plan=None) -> torch.Tensor:
    """Quest's bound ``q+ . kmax + q- . kmin`` of the candidate blocks: ``[B, Hkv, C]`` float32 (float64 for
    float64 input), ``-inf`` at empty or dead slots.

    ``q: [B, Hq, D]``; ``kmin, kmax: [B, Hkv, N_max, D]`` from :func:`prr.quest_metadata`; ``cand [B, Hkv, C]``.
    ``plan``: run :func:`plan_rescore` first (the Triton kernel does it in the same launch).
    """
    g = check_quest_inputs(q, kmin, kmax, cache, block_size)
    check_aggregate(aggregate)
    check_candidates(cand, cache)
    if plan is not None:
        plan_rescore(cand, cache, block_size, plan)
    acc = acc_dtype(q.dtype)
    live = _live(cand, num_blocks(cache.seq_lens, block_size), kmax.shape[2])
    ids = torch.where(live, cand, 0)
    # Zero the rows of dead slots first: a block past the end holds +-inf, and 0 * inf would make NaN.
    hi = torch.where(live[..., None], _gather_rows(kmax, ids).to(acc), 0.0)
    lo = torch.where(live[..., None], _gather_rows(kmin, ids).to(acc), 0.0)
    qg = q.to(acc).view(q.shape[0], cache.num_kv_heads, g, q.shape[-1])
    s = torch.einsum("bhgd,bhcd->bhgc", qg.clamp(min=0), hi) + torch.einsum("bhgd,bhcd->bhgc", qg.clamp(max=0), lo)
    return _aggregate(s, aggregate).masked_fill(~live, float("-inf"))


def infllm_candidate_scores(q: torch.Tensor, ckeys: torch.Tensor, cache: KVCache, cand: torch.Tensor,
                            block_size: int = 64, window: int = 32, stride: int = 16,
                            aggregate: str = "sum", plan=None) -> torch.Tensor:
    """InfLLM-v2's block score (the max over the complete windows inside the block of the group-aggregated
    ``q . c``) of the candidate blocks: ``[B, Hkv, C]`` float32, ``-inf`` at empty or dead slots and for a
    block with no complete window inside. ``ckeys: [B, Hkv, C_max, D]`` from :func:`prr.infllm_metadata`;
    ``plan`` as :func:`quest_candidate_scores`."""
    g = check_infllm_inputs(q, ckeys, cache, block_size, window, stride)
    check_aggregate(aggregate)
    check_candidates(cand, cache)
    if plan is not None:
        plan_rescore(cand, cache, block_size, plan)
    acc = acc_dtype(q.dtype)
    live = _live(cand, num_blocks(cache.seq_lens, block_size), cache.max_blocks(block_size))
    per_blk = block_size // stride  # windows starting in one block
    inside = (block_size - window) // stride + 1  # of which lie wholly inside it
    win = torch.where(live, cand, 0).long()[..., None] * per_blk + torch.arange(inside, device=q.device)
    complete = (win * stride + window <= cache.seq_lens.long()[:, None, None, None]) & (win < ckeys.shape[2])
    complete &= live[..., None]
    ck = _gather_rows(ckeys, torch.where(complete, win, 0)).to(acc)  # [B, Hkv, C, inside, D]
    qg = q.to(acc).view(q.shape[0], cache.num_kv_heads, g, q.shape[-1])
    s = _aggregate(torch.einsum("bhgd,bhcwd->bhgcw", qg, ck), aggregate)  # [B, Hkv, C, inside]
    return s.masked_fill(~complete, float("-inf")).amax(dim=-1)


def check_candidate_select_inputs(cand, scores, num_blocks, top_k, n_sink, n_local) -> int:
    kmax = check_budget(top_k, n_sink, n_local)
    check.tensor("cand", cand, ndim=3, dtypes=check.INDEX_DTYPES)
    check.tensor("scores", scores, ndim=3, dtypes=check.FLOAT_DTYPES, device=cand.device)
    check.shape("scores", scores, tuple(cand.shape))
    check.tensor("num_blocks", num_blocks, ndim=1, dtypes=check.INDEX_DTYPES, device=cand.device)
    check.shape("num_blocks", num_blocks, (cand.shape[0],))
    return kmax


def select_candidates(cand: torch.Tensor, scores: torch.Tensor, num_blocks: torch.Tensor, top_k: int,
                      n_sink: int = 1, n_local: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = sink ∪ local ∪ topK(candidates)`` per (sequence, KV head): :func:`prr.select_blocks` with every
    block outside the list scored ``-inf``.

    Args:
        cand: ``[B, Hkv, C]`` int block ids (distinct per row; -1 = empty slot).
        scores: ``[B, Hkv, C]`` float, the candidates' scores (``-inf`` or NaN: never a dynamic pick).
        num_blocks: ``[B]`` int, ``N = ceil(seq_len / BS)``; candidates at or past N are ignored.
        top_k, n_sink, n_local: the budget, as :func:`prr.select_blocks` (forced blocks need not be listed;
            if ``N <= n_sink + n_local + K`` every block is selected).

    Returns:
        ``indices [B, Hkv, K_max]`` int32 sorted, -1 padded, and ``counts [B, Hkv]`` int32.
    """
    kmax = check_candidate_select_inputs(cand, scores, num_blocks, top_k, n_sink, n_local)
    bsz, hkv, c = cand.shape
    n = num_blocks.long()[:, None, None]  # [B, 1, 1]
    ids = cand.long()
    dyn = (ids >= n_sink) & (ids < n - n_local) & (n > kmax) & (scores > float("-inf"))
    val, pos = scores.masked_fill(~dyn, float("-inf")).topk(min(top_k, c), dim=-1)
    big = torch.iinfo(torch.int32).max
    chosen = torch.where(val > float("-inf"), ids.gather(-1, pos), big)
    # Forced blocks by position j < K_max: all blocks of a short context; else sink j, then local blocks.
    j = torch.arange(kmax, device=cand.device)
    local = n - n_local + (j - n_sink)
    forced = torch.where(n <= kmax, torch.where(j < n, j, big),
                         torch.where(j < n_sink, j, torch.where(j < n_sink + n_local, local, big)))
    allids = torch.cat([forced.expand(bsz, hkv, kmax), chosen], dim=-1).sort(dim=-1).values[..., :kmax]
    counts = (allids != big).sum(-1, dtype=torch.int32)
    return torch.where(allids == big, -1, allids).to(torch.int32), counts


def check_force(force: int) -> None:
    if force not in (-1, 0, 1):
        raise ValueError(f"force must be -1 (the device decides), 0 (no scan) or 1 (every sequence scans), "
                         f"got {force!r}")


def amortized_plan(step: torch.Tensor, seq_lens: torch.Tensor, nblk_scan: torch.Tensor, cand: torch.Tensor,
                   scans: torch.Tensor, every: int, new_slots: int, block_size: int, force: int = -1):
    """One amortized step's bookkeeping, in place, per sequence (no host sync):

    - ``force = -1`` (the device decides): ``scan = step % every == 0``, or more blocks appeared since the last
      scan than ``new_slots``, or the sequence got shorter; ``force = 1``: every sequence scans; ``force = 0``:
      none does (the host's schedule says this step re-scores; blocks past the slots are then not listed);
    - ``step += 1``, ``scans += scan``; a scanning sequence sets ``nblk_scan = N``;
    - the last ``new_slots`` columns of ``cand [B, Hkv, C]`` list the blocks ``nblk_scan ..  N - 1``
      (ascending, -1 padded), for every KV head.

    ``step, scans: [B]`` int64, ``seq_lens, nblk_scan: [B]`` int32. Returns ``(scan [B] int32, gated_lens [B]
    int32, gated_nblk [B] int32, nblk [B] int32)``: the lengths and block counts with 0 where a sequence does
    not scan (a full scorer then reads nothing for it), and the true block counts.
    """
    check_force(force)
    nblk = num_blocks(seq_lens, block_size)
    if force == -1:
        scan = ((step % every) == 0) | (nblk > nblk_scan + new_slots) | (nblk < nblk_scan)
    else:
        scan = torch.full_like(nblk, force, dtype=torch.bool)
    step.add_(1)
    scans.add_(scan.to(scans.dtype))
    nblk_scan.copy_(torch.where(scan, nblk, nblk_scan))
    new = nblk_scan[:, None] + torch.arange(new_slots, device=cand.device, dtype=torch.int32)
    new = torch.where(new < nblk[:, None], new, -1)
    cand[..., cand.shape[-1] - new_slots:] = new[:, None, :].to(cand.dtype)
    zero = torch.zeros_like(nblk)
    return (scan.to(torch.int32), torch.where(scan, seq_lens.to(torch.int32), zero), torch.where(scan, nblk, zero),
            nblk)


def commit_candidates(cand: torch.Tensor, scan_idx: torch.Tensor, scan: torch.Tensor) -> None:
    """``cand[b, :, :K_scan] = scan_idx[b]`` where ``scan[b]`` (the scan's selection becomes the list), in place.
    ``scan_idx: [B, Hkv, K_scan]`` int32, ``scan: [B]`` int."""
    k = scan_idx.shape[-1]
    cand[..., :k] = torch.where(scan.bool()[:, None, None], scan_idx.to(cand.dtype), cand[..., :k])
