"""The guessed top-K: DSA's selection found from a predicted threshold (guess, verify, refine), exactly.

For any threshold ``τ`` with at least K dynamic blocks scoring ``≥ τ``, the top K of the row lie in
``C(τ) = {j : s_j ≥ τ}``, and the top K of ``C(τ)`` (ties at the K-th score going to the lowest ids) *are* the
top K of the row. So a good guess of ``τ`` turns the row's top-K into a count (verify) and a short search over
``C(τ)`` (refine); a guess that fails the count (``|C(τ)| < K``, or more candidate groups than the kernel
gathers) falls back to the full search. Either way the selection is the one :func:`prr.select_blocks`
returns; only the time differs.

Besides the selection the op returns what the next step needs, computed from this step's search at no extra
pass: the next threshold guess (a threshold expected to hold about ``guess_k`` blocks) and the next
predicted set ``P`` (the visited threshold holding the most blocks within P's capacity, else S's own
dynamic blocks), so that PRR keeps no predictor state beyond these two buffers.

This module is the PyTorch twin of the kernel: the selection is the full top-K in the scores' own dtype, and
the statistics, next guess and next P follow the kernel's search step by step on float32 order keys
(integer arithmetic, so the two agree bit for bit).

Shapes: ``scores [B, Hkv, N_max]``, ``num_blocks [B]``, ``guess [B, Hkv]`` float32; the selection is
``indices [B, Hkv, K_max]`` int32 (ascending, -1 padded) and ``counts [B, Hkv]``; ``stats [2, B, Hkv]`` int32
holds ``|C(τ)|`` (-1 when the guess was too low to count: more candidate groups than gathered) and the path
taken (:data:`HELD`, :data:`TOO_HIGH`, :data:`TOO_LOW`, :data:`SHORT`).
"""

from __future__ import annotations

import math

import torch

from ... import _checks as check
from ..select.reference import _mask_to_selection, check_select_inputs, selection_mask

HELD, TOO_HIGH, TOO_LOW, SHORT, NARROWED = 0, 1, 2, 3, 4
"""Paths of a row: the guess held; it was too high (``|C(τ)| < K``: full search); too low even after narrowing
(full search); a short row (every block selected, no search); held after narrowing (more candidate groups than
the kernel gathers qualified, so the threshold was first raised over the group maxima)."""
PATHS = ("held", "too_high", "too_low", "short", "narrowed")

GROUP = 16  # blocks per group (the top-K's stage 1), as in the kernel
SINGLE_MAX = 512  # rows of up to this many blocks (padded to a power of two) search the whole row, as the kernel
INT_MIN = -(2 ** 31)
KEY_NEG_INF = -2139095041  # order key of -inf
KEY_POS_INF = 2139095040  # order key of +inf


def guess_capacity(top_k: int, guess_k: int, num_groups: int) -> int:
    """Candidate groups the kernel gathers: a power of two >= 16 covering ``guess_k`` groups (or all of the
    row's, if fewer; never fewer than the full search's ``top_k`` groups). More qualifying groups means a guess
    too low: it is first raised over the group maxima."""
    return _pow2(min(max(guess_k, top_k), num_groups))


def compact_capacity(top_k: int, guess_k: int) -> int:
    """Candidates the kernel's search list holds (a power of two >= 16 covering ``guess_k + top_k``): a larger
    C(τ) is first narrowed over its own keys. (Each search pass is a block-wide reduction whose cost grows with
    the list: on an H100 a pass over the 8,192 keys of 512 gathered groups cost about 0.6 us.)"""
    return _pow2(guess_k + top_k)


def _pow2(x: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 keys ordered as the floats (the kernel's ``_order_key``)."""
    u = x.float().contiguous().view(torch.int32)
    return torch.where(u >= 0, u, u ^ 0x7FFFFFFF)


def key_to_float(k: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`order_key`."""
    k = k.to(torch.int32)
    return torch.where(k >= 0, k, k ^ 0x7FFFFFFF).contiguous().view(torch.float32)


def check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, guess, prev, guess_k, spec_k, num_blocks_next):
    kmax = check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
    if (guess is None) == (prev is None):
        raise ValueError("give exactly one of guess (a threshold per row) and prev (a selection whose blocks "
                         "bound the threshold)")
    if guess is not None:
        check.tensor("guess", guess, ndim=2, dtypes=(torch.float32,), device=scores.device)
        check.shape("guess", guess, tuple(scores.shape[:2]))
    else:
        if not (isinstance(prev, (tuple, list)) and len(prev) == 2):
            raise TypeError("prev must be a selection (indices [B, Hkv, K'], counts [B, Hkv])")
        check.tensor("prev indices", prev[0], ndim=3, dtypes=(torch.int32,), device=scores.device)
        check.shape("prev indices", prev[0], (*scores.shape[:2], None))
        check.tensor("prev counts", prev[1], ndim=2, dtypes=check.INDEX_DTYPES, device=scores.device)
        check.shape("prev counts", prev[1], tuple(scores.shape[:2]))
    check.positive_int("guess_k", guess_k)
    if guess_k < top_k:
        raise ValueError(f"guess_k ({guess_k}) must be at least top_k ({top_k})")
    check.positive_int("spec_k", spec_k)
    if num_blocks_next is not None:
        check.tensor("num_blocks_next", num_blocks_next, ndim=1, dtypes=check.INDEX_DTYPES, device=scores.device)
        check.shape("num_blocks_next", num_blocks_next, (scores.shape[0],))
    return kmax


def _dynamic_keys(scores: torch.Tensor, n: torch.Tensor, n_sink: int, n_local: int) -> torch.Tensor:
    """``[B, Hkv, N]`` int64 order keys of the dynamic candidates (INT_MIN elsewhere), as the kernel's."""
    j = torch.arange(scores.shape[-1], device=scores.device)
    s = scores.float()
    cand = (j < n) & (j >= n_sink) & (j < n - n_local) & (s > float("-inf"))
    return torch.where(cand, order_key(s).long(), INT_MIN)


def search(keys: torch.Tensor, k_lo: int, k_hi: int, p_cap: int, interp: bool):
    """The kernel's search, row by row: ``keys [R, M]`` int64 (INT_MIN: not a candidate), each row holding at
    least ``k_lo`` candidates. Returns int64 ``[R]``: a threshold ``T`` with ``k_lo <= #(keys >= T) <= k_hi``
    (for ``k_lo == k_hi == k``: the k-th key, or a threshold with exactly k keys at or above it; where ties
    leave no threshold in the window, the largest T counting at least k_lo), and the visited threshold
    ``T_P`` holding the most keys but at most ``p_cap``, with that count ``c_P`` (0 when none).

    Between the smallest and largest candidate key, each step counts the keys at or above a midpoint: by
    linear interpolation of the two known counts, aiming at the window's middle, followed by a bisection step
    whenever it did not halve the interval (so at least every other step halves it); ``interp=False``:
    bisection only. It stops as soon as a count lands in the window. (In NumPy on the host: a decode step
    runs it per layer, and its many small steps cost several times more as torch ops on a CPU.)"""
    import numpy as np

    dev = keys.device
    kk = keys.cpu().numpy()
    live = kk > INT_MIN
    n = live.sum(-1).astype(np.int64)
    lo = np.where(live, kk, 2 ** 31 - 1).min(-1)
    hi = np.where(n > k_hi, kk.max(-1), lo)
    c_lo, c_hi = n.copy(), np.zeros_like(n)
    first = n <= p_cap
    t_p = np.where(first, lo, 0)
    c_p = np.where(first, n, 0)
    bisect = np.zeros(n.shape, dtype=bool)
    while True:
        act = lo < hi
        if not act.any():
            return tuple(torch.from_numpy(np.ascontiguousarray(x)).to(dev) for x in (lo, t_p, c_p))
        width = hi - lo
        half = lo + (width + 1) // 2
        if interp:
            num = (2 * c_lo - (k_lo + k_hi - 1)) * (width + 1)
            den = np.maximum(2 * (c_lo - c_hi), 1)
            mid = np.where(bisect, half, lo + np.minimum(np.maximum(num // den, 1), width))
        else:
            mid = half
        c = (kk >= mid[:, None]).sum(-1)
        upd = act & (c <= p_cap) & (c > c_p)
        t_p, c_p = np.where(upd, mid, t_p), np.where(upd, c, c_p)
        up = act & (c >= k_lo)
        new_lo = np.where(up, mid, lo)
        new_hi = np.where(act, np.where(c > k_hi, hi, np.where(c >= k_lo, mid, mid - 1)), hi)
        c_lo = np.where(up, c, c_lo)
        c_hi = np.where(act & (c < k_lo), c, c_hi)
        if interp:
            bisect = np.where(act, ~bisect & ((new_hi - new_lo) * 2 > width), bisect)
        lo, hi = new_lo, new_hi


def next_guess_key(lo0: torch.Tensor, c0: torch.Tensor, t_k: torch.Tensor, k: int, guess_k: int) -> torch.Tensor:
    """The next step's threshold key: the line through ``(lo0, c0)`` (the search's smallest candidate key and
    the candidates' count) and ``(T, k)``, read at count ``guess_k``; a mirror below ``lo0`` when ``c0 == k``.
    Clamped to the keys of -inf and +inf (never a NaN)."""
    spread = (t_k - lo0).clamp(min=0)
    d = c0 - k
    lin = t_k - spread * (guess_k - k) // d.clamp(min=1)
    t = torch.where(d > 0, lin, lo0 - spread - 1)
    return t.clamp(KEY_NEG_INF, KEY_POS_INF)


def prev_threshold_key(keys: torch.Tensor, prev_idx: torch.Tensor, prev_cnt: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv]`` int64: the smallest key among the dynamic candidates a selection holds (``keys`` as
    :func:`_dynamic_keys` gives them), the key of -inf when it holds none. At least as many blocks as it holds
    dynamic candidates score at or above it."""
    n_max = keys.shape[-1]
    slot = torch.arange(prev_idx.shape[-1], device=keys.device) < prev_cnt[..., None].long()
    ids = prev_idx.long()
    ok = slot & (ids >= 0) & (ids < n_max)
    got = torch.gather(keys, -1, torch.where(ok, ids, 0))
    got = torch.where(ok & (got > INT_MIN), got, 2 ** 31 - 1)
    low = got.min(-1).values
    return torch.where(low == 2 ** 31 - 1, KEY_NEG_INF, low)


def select_blocks_guessed(scores: torch.Tensor, num_blocks: torch.Tensor, top_k: int, n_sink: int = 1,
                          n_local: int = 2, *, guess: torch.Tensor | None = None,
                          prev: tuple[torch.Tensor, torch.Tensor] | None = None, guess_k: int | None = None,
                          spec_k: int | None = None, num_blocks_next: torch.Tensor | None = None,
                          interp: bool = False):
    """DSA's selection ``sink ∪ local ∪ topK(rest)`` found from a guessed threshold, plus the next step's guess
    and predicted set.

    Args:
        scores, num_blocks, top_k, n_sink, n_local: as :func:`prr.select_blocks` (ties at the K-th score go to
            the lowest block ids).
        guess: ``[B, Hkv]`` float32 threshold per row (any value is safe: a wrong guess costs time, never the
            result; -inf means every block is a candidate, NaN is read as -inf).
        prev: instead of ``guess``, a selection ``(indices [B, Hkv, K'], counts [B, Hkv])`` over these blocks
            (e.g. the previous step's S): the threshold is the smallest current score among its dynamic blocks,
            so at least as many blocks as it holds score above it: with K of them the guess holds by
            construction (on real text its ``|C(τ)|`` was ~1.7K, against ~2.5K for a threshold carried over).
        guess_k: the count the next guess aims at (default ``2 * top_k``): more blocks above it is a safer
            guess, fewer a shorter search.
        spec_k: dynamic blocks of the next predicted set P (default ``top_k``).
        num_blocks_next: ``[B]`` blocks per sequence at the next step (P's local window; default num_blocks).
        interp: interpolation steps in the search; False (the default): bisection only, the faster on an H100
            (its 64-bit division costs more than the passes it saves: 11.2 against 12.9 us at Llama-3.1-8B b1
            128K, `results/bench_topk_h100.json`).

    Returns:
        ``(indices, counts, next_guess, p_indices, p_counts, stats)``: the selection (equal to
        :func:`prr.select_blocks` with lowest-id ties), ``next_guess [B, Hkv]`` float32, the next P
        ``[B, Hkv, n_sink + n_local + spec_k]`` int32 (ascending, -1 padded) with its counts, and ``stats
        [2, B, Hkv]`` int32 (``|C(τ)|`` or -1, and the path).
    """
    guess_k = 2 * top_k if guess_k is None else guess_k
    spec_k = top_k if spec_k is None else spec_k
    kmax = check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, guess, prev, guess_k, spec_k,
                              num_blocks_next)
    bsz, hkv, n_max = scores.shape
    dev = scores.device
    n = num_blocks.long().clamp(0, n_max)[:, None, None]  # [B, 1, 1]
    keys = _dynamic_keys(scores, n, n_sink, n_local)  # [B, Hkv, N]
    indices, counts = _stable_select(scores, n, top_k, n_sink, n_local, kmax)

    if prev is None:
        tk = order_key(torch.where(torch.isnan(guess), float("-inf"), guess.float())).long()  # [B, Hkv]
    else:
        tk = prev_threshold_key(keys, prev[0], prev[1])
    rows = keys.reshape(bsz * hkv, n_max)
    tk_r = tk.reshape(-1)
    n_pad = max(16, 1 << max(0, math.ceil(math.log2(max(1, n_max)))))
    single = n_pad <= SINGLE_MAX
    ng = -(-n_max // GROUP)
    cap_g = guess_capacity(top_k, guess_k, ng)
    narrowed = torch.zeros(bsz * hkv, dtype=torch.bool, device=dev)
    if single:
        c_tau = (rows >= tk_r[:, None]).sum(-1)
        held = c_tau >= top_k
        too_low = torch.zeros_like(held)
    else:
        gkeys = torch.nn.functional.pad(rows, (0, ng * GROUP - n_max), value=INT_MIN).view(-1, ng, GROUP).amax(-1)
        cand_g = (gkeys >= tk_r[:, None]) & (gkeys > INT_MIN)
        narrowed = cand_g.sum(-1) > cap_g
        if bool(narrowed.any()):  # raise a guess too low to gather over the group maxima
            t_n = search(torch.where(cand_g, gkeys, INT_MIN)[narrowed], top_k, cap_g, 0, interp)[0]
            tk_r = tk_r.clone()
            tk_r[narrowed] = t_n
            cand_g = (gkeys >= tk_r[:, None]) & (gkeys > INT_MIN)
        c_tau = (rows >= tk_r[:, None]).sum(-1)
        too_low = cand_g.sum(-1) > cap_g
        held = ~too_low & (c_tau >= top_k)
    # The search's tile: C(τ) when the guess held, else the full search's (the whole row, or the blocks of the
    # top_k best groups by their max, lowest group ids first among ties).
    fallback = rows if single else _best_groups_blocks(rows, gkeys, top_k)
    tile = torch.where(held[:, None], torch.where(rows >= tk_r[:, None], rows, INT_MIN), fallback)
    cap_c = compact_capacity(top_k, guess_k)
    if (n_pad if single else cap_g * GROUP) > cap_c:  # the kernel narrows a C(τ) too long for its list
        wide = held & ((tile > INT_MIN).sum(-1) > cap_c)
        if bool(wide.any()):
            t_w = search(tile[wide], top_k, cap_c, 0, interp)[0]
            tile[wide] = torch.where(tile[wide] >= t_w[:, None], tile[wide], INT_MIN)
    short = (n.reshape(bsz, 1).expand(bsz, hkv).reshape(-1) <= kmax)
    searchable = ~short & ((tile > INT_MIN).sum(-1) >= top_k)
    t_k = torch.zeros_like(tk_r)
    t_p = torch.zeros_like(tk_r)
    c_p = torch.zeros_like(tk_r)
    if bool(searchable.any()):
        a, b, c = search(tile[searchable], top_k, top_k, spec_k, interp)
        t_k[searchable], t_p[searchable], c_p[searchable] = a, b, c
    live = tile > INT_MIN
    lo0 = torch.where(live, tile, 2 ** 31 - 1).min(-1).values
    nxt = next_guess_key(lo0, live.sum(-1), t_k, top_k, guess_k)
    next_guess = torch.where(searchable, key_to_float(nxt), torch.tensor(float("-inf"), device=dev)).view(bsz, hkv)
    # The next P: the blocks at or above T_P (the visited threshold holding the most blocks within P's capacity)
    # when it holds at least S's K dynamic blocks (or any, for a capacity below K), else S's own dynamic blocks.
    s_dyn = _selection_dynamic_mask(indices, counts, n_max, n, n_sink, n_local).reshape(bsz * hkv, n_max)
    use_tp = searchable & ((c_p >= top_k) | ((spec_k < top_k) & (c_p > 0)))
    use_s = ~use_tp & (spec_k >= top_k)
    p_dyn = ((use_tp[:, None] & live & (tile >= t_p[:, None])) | (use_s[:, None] & s_dyn)).view(bsz, hkv, n_max)
    nn = (num_blocks if num_blocks_next is None else num_blocks_next).long().clamp(0, n_max)
    p_idx, p_cnt = _p_selection(p_dyn, nn, n_sink, n_local, n_sink + n_local + spec_k)
    path = torch.where(short, SHORT, torch.where(too_low, TOO_LOW, torch.where(
        held, torch.where(narrowed, NARROWED, HELD), TOO_HIGH)))
    c_stat = torch.where(short, n.reshape(bsz, 1).expand(bsz, hkv).reshape(-1),
                         torch.where(too_low, -1, c_tau))
    stats = torch.stack([c_stat, path]).to(torch.int32).view(2, bsz, hkv)
    return indices, counts, next_guess.float(), p_idx, p_cnt, stats


def _stable_select(scores, n, top_k, n_sink, n_local, kmax):
    """The full selection with ties at the K-th score going to the lowest ids (the kernels' rule)."""
    n_max = scores.shape[-1]
    j = torch.arange(n_max, device=scores.device)
    live = j < n
    forced = (live & ((j < n_sink) | (j >= n - n_local) | (n <= kmax))).expand(scores.shape)
    dyn = scores.masked_fill(forced | ~live, float("-inf"))
    order = torch.sort(dyn, dim=-1, descending=True, stable=True)
    kk = min(top_k, n_max)
    idx, val = order.indices[..., :kk], order.values[..., :kk]
    chosen = torch.zeros_like(forced).scatter_(-1, idx, val > float("-inf"))
    return _mask_to_selection(forced | chosen, kmax)


def _best_groups_blocks(rows, gkeys, top_k):
    """The full search's stage-2 tile: keys of the blocks of the ``top_k`` groups with the largest maxima (ties:
    lowest group ids), INT_MIN elsewhere. ``rows [R, N]``, ``gkeys [R, NG]``."""
    r, n_max = rows.shape
    ng = gkeys.shape[-1]
    order = torch.sort(gkeys, dim=-1, descending=True, stable=True).indices[:, :min(top_k, ng)]
    keep = torch.zeros(r, ng, dtype=torch.bool, device=rows.device).scatter_(-1, order, True)
    keep &= gkeys > INT_MIN
    blk = keep.repeat_interleave(GROUP, dim=-1)[:, :n_max]
    return torch.where(blk, rows, INT_MIN)


def _selection_dynamic_mask(indices, counts, n_max, n, n_sink, n_local):
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
