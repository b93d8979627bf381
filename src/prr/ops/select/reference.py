"""Top-K block selection with forced blocks, and set operations on selections.

A *selection* is ``indices: [B, Hkv, K_max]`` int32 (block ids sorted ascending, padded with -1) and
``counts: [B, Hkv]`` int32. Its capacity ``K_max`` is fixed, so a decode step that produces one can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from ... import _checks as check


def _mask_to_selection(mask: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask: [B, Hkv, N]`` bool -> sorted, -1 padded ``indices [B, Hkv, kmax]`` and ``counts``."""
    n = mask.shape[-1]
    ids = torch.arange(n, device=mask.device, dtype=torch.int32).expand_as(mask)
    big = torch.full_like(ids, torch.iinfo(torch.int32).max)
    keyed = torch.where(mask, ids, big)
    if n < kmax:
        keyed = torch.nn.functional.pad(keyed, (0, kmax - n), value=torch.iinfo(torch.int32).max)
    picked = keyed.topk(kmax, dim=-1, largest=False, sorted=True).values
    indices = torch.where(picked == torch.iinfo(torch.int32).max, -1, picked).to(torch.int32)
    return indices, mask.sum(dim=-1, dtype=torch.int32)


def check_budget(top_k: int, n_sink: int, n_local: int) -> int:
    """Validate a budget; return the selection capacity ``K_max = n_sink + n_local + top_k``."""
    check.positive_int("top_k", top_k)
    check.nonneg_int("n_sink", n_sink)
    check.positive_int("n_local", n_local)  # the newest token's own block is always attended
    return n_sink + n_local + top_k


def check_select_inputs(scores, num_blocks, top_k, n_sink, n_local) -> int:
    kmax = check_budget(top_k, n_sink, n_local)
    check.tensor("scores", scores, ndim=3, dtypes=check.FLOAT_DTYPES)
    check.tensor("num_blocks", num_blocks, ndim=1, dtypes=check.INDEX_DTYPES, device=scores.device)
    check.shape("num_blocks", num_blocks, (scores.shape[0],))
    # Value checks (CPU; CUDA in debug mode): a count past N_max would select blocks the scores do not cover.
    check.in_range("num_blocks", num_blocks, 0, scores.shape[-1], f"scores cover N_max = {scores.shape[-1]} blocks")
    check.no_nan("scores", scores)
    return kmax


def select_blocks(scores: torch.Tensor, num_blocks: torch.Tensor, top_k: int, n_sink: int = 1,
                  n_local: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = sink ∪ local ∪ topK(rest)`` per (sequence, KV head).

    Args:
        scores: ``[B, Hkv, N_max]`` float block scores; entries at or past ``num_blocks`` are ignored, and a
            block scored ``-inf`` is never picked as a dynamic block.
        num_blocks: ``[B]`` int, ``N = ceil(seq_len / BS)`` per sequence.
        top_k: K dynamic blocks; ``n_sink`` first and ``n_local`` last blocks are forced (``n_local >= 1``:
            the partial last block is always in). If ``N <= n_sink + n_local + K`` every block is selected.

    Returns:
        ``indices [B, Hkv, K_max]`` int32 sorted, -1 padded, and ``counts [B, Hkv]`` int32, with
        ``K_max = n_sink + n_local + top_k``. Ties are broken as ``torch.topk`` breaks them.
    """
    kmax = check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
    n_max = scores.shape[-1]
    j = torch.arange(n_max, device=scores.device)
    n = num_blocks.long()[:, None, None]  # [B, 1, 1]
    live = j < n
    forced = (live & ((j < n_sink) | (j >= n - n_local) | (n <= kmax))).expand(scores.shape)
    dyn = scores.masked_fill(forced | ~live, float("-inf"))
    kk = min(top_k, n_max)
    val, idx = dyn.topk(kk, dim=-1)
    chosen = torch.zeros_like(forced).scatter_(-1, idx, val > float("-inf"))
    return _mask_to_selection(forced | chosen, kmax)


def selection_mask(indices: torch.Tensor, counts: torch.Tensor, n_max: int) -> torch.Tensor:
    """``[B, Hkv, n_max]`` bool: which blocks a selection holds."""
    slot_ok = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    ok = slot_ok & (indices >= 0) & (indices < n_max)
    mask = torch.zeros(*indices.shape[:-1], n_max + 1, dtype=torch.bool, device=indices.device)
    # Invalid slots write into a spare column n_max, dropped below (no data-dependent shapes).
    mask.scatter_(-1, torch.where(ok, indices, n_max).long(), True)
    return mask[..., :n_max]


def selection_contains(a_idx: torch.Tensor, a_cnt: torch.Tensor, b_idx: torch.Tensor,
                       b_cnt: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, Ka]`` bool: slot i of selection A is valid and its block is in selection B."""
    a_ok = torch.arange(a_idx.shape[-1], device=a_idx.device) < a_cnt[..., None]
    b_ok = torch.arange(b_idx.shape[-1], device=b_idx.device) < b_cnt[..., None]
    eq = (a_idx[..., :, None] == b_idx[..., None, :]) & b_ok[..., None, :]
    return a_ok & (a_idx >= 0) & eq.any(dim=-1)


def selection_overlap(p_idx: torch.Tensor, p_cnt: torch.Tensor, s_idx: torch.Tensor,
                      s_cnt: torch.Tensor) -> torch.Tensor:
    """``[3, B, Hkv]`` int32 counts of a prediction P against a selection S: ``|P ∩ S|`` (valid slots of P
    whose block S holds), ``|S| - |P ∩ S|`` and ``|P| - |P ∩ S|`` (PRR's hits, misses, false positives)."""
    hits = selection_contains(p_idx, p_cnt, s_idx, s_cnt).sum(-1, dtype=torch.int32)
    return torch.stack([hits, s_cnt.to(torch.int32) - hits, p_cnt.to(torch.int32) - hits])


def selection_difference(a_idx: torch.Tensor, a_cnt: torch.Tensor, b_idx: torch.Tensor,
                         b_cnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A \\ B`` as a selection with A's capacity (sorted if A is sorted, -1 padded)."""
    keep = (torch.arange(a_idx.shape[-1], device=a_idx.device) < a_cnt[..., None]) & (a_idx >= 0)
    keep = keep & ~selection_contains(a_idx, a_cnt, b_idx, b_cnt)
    big = torch.iinfo(torch.int32).max
    keyed = torch.where(keep, a_idx.to(torch.int32), big)
    picked = keyed.sort(dim=-1).values
    return torch.where(picked == big, -1, picked).to(torch.int32), keep.sum(-1, dtype=torch.int32)
