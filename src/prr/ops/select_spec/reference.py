"""The selection and the speculation of a PRR step in one call (reference: the three ops in sequence).

``select_speculate`` = Quest's block scores, the true selection S (sink ∪ local ∪ top-K) and, when P is given,
the speculation's per-slot states over P (PRR exact mode's reuse input). The Triton twin runs all of it in one
launch; this reference defines what it must return.
"""

from __future__ import annotations

import torch

from ..attention.reference import block_states
from ..scoring.reference import quest_scores
from ..select.reference import select_blocks


def select_speculate(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cache, block_size: int, top_k: int,
                     n_sink: int, n_local: int, nblk: torch.Tensor, *, aggregate: str = "sum",
                     p_idx: torch.Tensor | None = None, p_cnt: torch.Tensor | None = None,
                     scale: float | None = None, tick: torch.Tensor | None = None, spec_first: bool = True):
    """Score every block (Quest), select S and, given P (``p_idx [B, Hkv, K'_max]``, ``p_cnt [B, Hkv]``),
    attend each slot of P on its own.

    Returns ``(scores [B, Hkv, N_max] float32, s_idx [B, Hkv, K_max] int32, s_cnt [B, Hkv] int32, block_o,
    block_lse)``; ``block_o [B, Hq, K'_max, D]`` and ``block_lse [B, Hq, K'_max]`` float32 (float64 for float64
    input) are None without P. ``tick`` and ``spec_first`` only steer the Triton kernel (ignored here)."""
    if (p_idx is None) != (p_cnt is None):
        raise ValueError("p_idx and p_cnt go together")
    scores = quest_scores(q, kmin, kmax, cache, block_size, aggregate)
    idx, cnt = select_blocks(scores, nblk, top_k, n_sink, n_local)
    bo = blse = None
    if p_idx is not None:
        bo, blse = block_states(q, cache, p_idx, p_cnt, block_size, scale)
    return scores, idx, cnt, bo, blse
