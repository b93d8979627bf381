"""The guessed top-K: DSA's selection found from the previous step's, exactly (guess, verify, refine).

For any threshold ``τ`` with at least K dynamic blocks scoring ``≥ τ``, the top K of the row lie in
``C(τ) = {j : s_j ≥ τ}``, and the top K of ``C(τ)`` (ties at the K-th score going to the lowest ids) *are* the
top K of the row. The guess: ``τ`` is the smallest *current* score among the previous selection's dynamic
blocks, so at least as many blocks as it held score at or above it; on real text ``|C(τ)|`` is ~1.5K (p99
~3.7K, SmolLM2, K = 64). The scoring kernel finds ``τ`` while it scores (one ``atomic_min`` per program over
the blocks the previous selection flags), so the top-K program only counts and compacts ``C(τ)`` from the
scores row, in ascending block order, and finds its K-th score by a radix select over that short list (a
handful of dependent passes, against ~30 for the full search). If ``|C(τ)| < K`` (no previous selection, or
one that held fewer than K blocks still dynamic) or ``|C(τ)|`` overflows the list, the full two-stage search
runs in the same program: graph-safe, no host sync. Either way the selection is the one
:func:`prr.select_blocks` returns; only the time differs.

The state is a per-block flag row ``prev [B, Hkv, N_max]`` (uint8: the previous selection's dynamic
blocks), replaced by this step's selection, and, on the kernel path, the threshold the scoring kernel left
(``bound [B, Hkv]`` int32 order keys, reset to ``INT32_MAX`` for the next step). The same program writes the
next step's predicted set P (PRR's speculation): the top ``spec_k`` blocks of ``C(τ)``, else S's own dynamic
blocks.

This module is the PyTorch twin of the kernel (the selection in the scores' own dtype; the paths and P
follow the kernel's rules exactly).

Shapes: ``scores [B, Hkv, N_max]``, ``num_blocks [B]``; the selection is ``indices [B, Hkv, K_max]`` int32
(ascending, -1 padded) and ``counts [B, Hkv]``; ``stats [2, B, Hkv]`` int32 holds ``|C(τ)|`` and the path
(:data:`HELD`, :data:`TOO_HIGH`, :data:`TOO_LOW`, :data:`SHORT`).
"""

from __future__ import annotations

import math

import torch

from ... import _checks as check
from ..select.reference import _mask_to_selection, check_select_inputs, selection_mask

HELD, TOO_HIGH, TOO_LOW, SHORT = 0, 1, 2, 3
"""Paths of a row: the guess held (``K <= |C(τ)| <=`` the list's capacity); it was too high (``|C(τ)| < K``:
full search); too low (``C(τ)`` overflows the list: full search); a short row (every block selected)."""
PATHS = ("held", "too_high", "too_low", "short")

INT_MIN = -(2 ** 31)
INT_MAX = 2 ** 31 - 1
LIST_MAX = 4096  # the list's capacity stops growing at 4K here (a radix pass is a [capacity, 16] compare)
MAX_BLOCKS = 1 << 24  # block ids fit 24 bits of the radix key


def _pow2(x: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def list_capacity(top_k: int) -> int:
    """Candidates the kernel's list holds: a power of two covering 4K (at most 4,096 unless 2K needs more).
    On SmolLM2's traces ``|C(τ)| <= 4K`` on 99.4% of rows."""
    return max(_pow2(2 * top_k), min(_pow2(4 * top_k), LIST_MAX))


def order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 keys ordered as the floats (the kernel's ``_order_key``)."""
    u = x.float().contiguous().view(torch.int32)
    return torch.where(u >= 0, u, u ^ 0x7FFFFFFF)


def key_to_float(k: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`order_key`."""
    k = k.to(torch.int32)
    return torch.where(k >= 0, k, k ^ 0x7FFFFFFF).contiguous().view(torch.float32)


def selection_flags(indices: torch.Tensor, counts: torch.Tensor, n_max: int) -> torch.Tensor:
    """The flag row of a selection (uint8 ``[B, Hkv, n_max]``, 1 on its blocks): the state the guessed top-K
    starts from (e.g. the last prompt position's selection)."""
    return selection_mask(indices, counts, n_max).to(torch.uint8)


def check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, prev, bound, spec_k, num_blocks_next):
    kmax = check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
    check.tensor("prev", prev, ndim=3, dtypes=(torch.uint8, torch.bool), device=scores.device)
    check.shape("prev", prev, tuple(scores.shape))
    if scores.shape[-1] > MAX_BLOCKS:
        raise ValueError(f"the guessed top-K takes rows of at most {MAX_BLOCKS} blocks, got {scores.shape[-1]}")
    if bound is not None:
        check.tensor("bound", bound, ndim=2, dtypes=(torch.int32,), device=scores.device)
        check.shape("bound", bound, tuple(scores.shape[:2]))
    check.positive_int("spec_k", spec_k)
    if num_blocks_next is not None:
        check.tensor("num_blocks_next", num_blocks_next, ndim=1, dtypes=check.INDEX_DTYPES, device=scores.device)
        check.shape("num_blocks_next", num_blocks_next, (scores.shape[0],))
    return kmax


def dynamic_keys(scores: torch.Tensor, num_blocks: torch.Tensor, n_sink: int, n_local: int) -> torch.Tensor:
    """``[B, Hkv, N]`` int64 order keys of the dynamic candidates (live, not sink or local, finite score;
    INT_MIN elsewhere), as the kernels'."""
    n = num_blocks.long().clamp(0, scores.shape[-1])[:, None, None]
    j = torch.arange(scores.shape[-1], device=scores.device)
    s = scores.float()
    cand = (j < n) & (j >= n_sink) & (j < n - n_local) & (s > float("-inf"))
    return torch.where(cand, order_key(s).long(), INT_MIN)


def guess_bound(scores: torch.Tensor, num_blocks: torch.Tensor, prev: torch.Tensor, n_sink: int = 1,
                n_local: int = 2) -> torch.Tensor:
    """``[B, Hkv]`` int32: the threshold key the scoring kernel leaves (its ``bound_for``): the smallest key
    among the flagged blocks that are dynamic candidates now, ``INT32_MAX`` when none is."""
    keys = dynamic_keys(scores, num_blocks, n_sink, n_local)
    got = torch.where((prev != 0) & (keys > INT_MIN), keys, INT_MAX)
    return got.min(-1).values.to(torch.int32)


def select_blocks_guessed(scores: torch.Tensor, num_blocks: torch.Tensor, top_k: int, n_sink: int = 1,
                          n_local: int = 2, *, prev: torch.Tensor, bound: torch.Tensor | None = None,
                          spec_k: int | None = None, num_blocks_next: torch.Tensor | None = None,
                          prev_out: torch.Tensor | None = None):
    """DSA's selection ``sink ∪ local ∪ topK(rest)`` found from the previous one, plus the next predicted set.

    Args:
        scores, num_blocks, top_k, n_sink, n_local: as :func:`prr.select_blocks` (ties at the K-th score go to
            the lowest block ids).
        prev: uint8 ``[B, Hkv, N_max]``, the previous selection's blocks flagged (:func:`selection_flags`;
            all zero: no previous selection, the full search runs). Replaced in place by this selection's
            dynamic blocks (or written to ``prev_out`` instead, e.g. to replay one step).
        bound: the threshold keys the scoring kernel left (``[B, Hkv]`` int32, see ``bound_for`` of
            :func:`prr.ops.quest_scores`), reset to ``INT32_MAX`` in place; None: computed here from the
            scores (:func:`guess_bound`).
        spec_k: dynamic blocks of the next predicted set P (default ``top_k``).
        num_blocks_next: ``[B]`` blocks per sequence at the next step (P's local window; default num_blocks).

    Returns:
        ``(indices, counts, p_indices, p_counts, stats)``: the selection (equal to :func:`prr.select_blocks`
        with lowest-id ties), the next P ``[B, Hkv, n_sink + n_local + spec_k]`` int32 (ascending, -1 padded)
        with its counts, and ``stats [2, B, Hkv]`` int32 (``|C(τ)|``, or the row's blocks when short, and the
        path).
    """
    spec_k = top_k if spec_k is None else spec_k
    kmax = check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, prev, bound, spec_k, num_blocks_next)
    bsz, hkv, n_max = scores.shape
    keys = dynamic_keys(scores, num_blocks, n_sink, n_local)
    tk = guess_bound(scores, num_blocks, prev, n_sink, n_local).long() if bound is None else bound.long()
    n = num_blocks.long().clamp(0, n_max)[:, None, None]
    indices, counts = _stable_select(scores, n, top_k, n_sink, n_local, kmax)
    c = ((keys >= tk[..., None]) & (keys > INT_MIN)).sum(-1)  # [B, Hkv]
    short = (n[..., 0] <= kmax).expand(bsz, hkv)
    cap = list_capacity(top_k)
    held = ~short & (c >= top_k) & (c <= cap)
    path = torch.where(short, SHORT, torch.where(held, HELD, torch.where(c < top_k, TOO_HIGH, TOO_LOW)))
    stats = torch.stack([torch.where(short, n[..., 0].expand(bsz, hkv), c), path]).to(torch.int32)
    # the next P: the top min(spec_k, |C|) blocks of C(τ) where the guess held, else S's dynamic blocks (none
    # when P holds fewer than K)
    s_dyn = _dynamic_mask(indices, counts, n_max, n, n_sink, n_local)
    order = torch.sort(torch.where(keys > INT_MIN, keys, INT_MIN), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_max, device=scores.device).expand_as(order))
    top_p = (rank < torch.minimum(c, torch.tensor(spec_k))[..., None]) & (keys > INT_MIN)
    p_dyn = torch.where(held[..., None], top_p, s_dyn & (spec_k >= top_k))
    nn = (num_blocks if num_blocks_next is None else num_blocks_next).long().clamp(0, n_max)
    p_idx, p_cnt = _p_selection(p_dyn, nn, n_sink, n_local, n_sink + n_local + spec_k)
    (prev if prev_out is None else prev_out).copy_(s_dyn)
    if bound is not None:
        bound.fill_(INT_MAX)
    return indices, counts, p_idx, p_cnt, stats


def _stable_select(scores, n, top_k, n_sink, n_local, kmax):
    """The full selection with ties at the K-th score going to the lowest ids, scores ordered by their keys
    (the kernels' rules)."""
    n_max = scores.shape[-1]
    j = torch.arange(n_max, device=scores.device)
    live = j < n
    forced = (live & ((j < n_sink) | (j >= n - n_local) | (n <= kmax))).expand(scores.shape)
    s = scores.float()
    key = torch.where(forced | ~live | ~(s > float("-inf")), INT_MIN, order_key(s).long())  # -0 below +0
    order = torch.sort(key, dim=-1, descending=True, stable=True)
    kk = min(top_k, n_max)
    idx, val = order.indices[..., :kk], order.values[..., :kk]
    chosen = torch.zeros_like(forced).scatter_(-1, idx, val > INT_MIN)
    return _mask_to_selection(forced | chosen, kmax)


def _dynamic_mask(indices, counts, n_max, n, n_sink, n_local):
    """``[B, Hkv, N]``: the dynamic (not forced) blocks of a selection."""
    j = torch.arange(n_max, device=indices.device)
    return selection_mask(indices, counts, n_max) & (j >= n_sink) & (j < n - n_local)


def _p_selection(dyn, n_next, n_sink, n_local, cap):
    """P for the next step: its sink and local blocks (of ``n_next [B]`` blocks) and the dynamic blocks ``dyn``."""
    n_max = dyn.shape[-1]
    j = torch.arange(n_max, device=dyn.device)
    nn = n_next[:, None, None]
    live = j < nn
    forced = live & ((j < n_sink) | (j >= nn - n_local) | (nn <= cap))
    return _mask_to_selection((forced | (dyn & live)).expand(dyn.shape), cap)
