"""``prr locality``: how predictable DSA's selections are, per layer and KV head, on real text.

From a score history (each step's true block scores, ``[T, B, Hkv, N]`` per layer) the selections are
recomputed, and measured:

- overlap against lag: ``|S_t ∩ S_{t-lag}| / K`` over the dynamic blocks;
- hit rate ``|P ∩ S| / K`` (dynamic blocks) and false positives ``|P \\ S|`` of predictors at K' = K, 1.25K,
  1.5K: the previous step; an EMA (Holt with alpha 0.3, no trend); Holt calibrated by grid search on the first
  half of the steps (scored on the second half); and re-ranking (DESIGN.md): the EMA's top ``M = 3K``
  candidates re-scored with the live query (their true scores at that step) and the best K' kept;
- the guessed top-K (:func:`guess_replay`) replayed as PRR runs it: the share of (step, layer, KV head) rows
  whose guess held, ``|C(τ)| / K``, and the hit rate of the P it leaves (K' = 1.5K);
- amortized selection (issue #12), per (m, c): a scan every m steps keeps c·K candidates, the steps between
  keep the top K of the candidates plus the blocks that appeared since (their true scores at that step); hit =
  ``|S_amortized ∩ S_full| / K``. Candidates from the scan's scores ("scan") or from an EMA (alpha 0.3) of the
  z-scored scores folded in at the scan steps only ("ema": what a selector that scans every m steps can keep).
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..algo.predictor import calibrate
from ..ops.holt import holt_predict, holt_step, normalize_scores


def selections(scores: torch.Tensor, nblk: torch.Tensor, k: int, n_sink: int, n_local: int) -> torch.Tensor:
    """Selection masks ``[T, B, Hkv, N]`` of a score history (dynamic blocks only: forced ones removed)."""
    t, b, h, n = scores.shape
    idx, cnt = ops.select_blocks(scores.reshape(t * b, h, n), nblk.reshape(-1), k, n_sink, n_local)
    mask = ops.selection_mask(idx, cnt, n).view(t, b, h, n)
    j = torch.arange(n)
    nb = nblk.view(t, b, 1, 1).long()
    forced = (j < n_sink) | (j >= nb - n_local)
    return mask & ~forced


def overlap_vs_lag(masks: torch.Tensor, lags) -> dict[int, float]:
    """Mean ``|S_t ∩ S_{t-lag}| / |S_t|`` (dynamic blocks) for each lag."""
    out = {}
    for lag in lags:
        if lag >= masks.shape[0]:
            continue
        inter = (masks[lag:] & masks[:-lag]).sum(-1).float()
        size = masks[lag:].sum(-1).float().clamp(min=1)
        out[lag] = float((inter / size).mean())
    return out


def _hits(pred_masks: torch.Tensor, true_masks: torch.Tensor) -> tuple[float, float]:
    """(hit rate |P ∩ S| / |S|, false positives per row |P \\ S|) over dynamic blocks."""
    hits = (pred_masks & true_masks).sum(-1).float().sum()
    fp = (pred_masks & ~true_masks).sum(-1).float().mean()
    return float(hits / true_masks.sum(-1).float().sum().clamp(min=1)), float(fp)


def holt_predictions(scores, nblk, alpha, beta=0.0, gamma=0.0) -> torch.Tensor:
    """Predicted scores for steps 1..T-1 from steps 0..T-2 (``[T-1, B, Hkv, N]``)."""
    level = torch.zeros_like(scores[0], dtype=torch.float32)
    trend = torch.zeros_like(level)
    known = torch.zeros(scores.shape[1], dtype=torch.int32)
    preds = []
    for t in range(scores.shape[0] - 1):
        z = normalize_scores(scores[t], nblk[t])
        level, trend = holt_step(level, trend, z, known, nblk[t], alpha, beta)
        known = torch.maximum(known, nblk[t].to(torch.int32))
        preds.append(holt_predict(level, trend, known, gamma))
    return torch.stack(preds)


def predictor_hit_rates(scores, nblk, k, n_sink, n_local, ratios=(1.0, 1.25, 1.5), rerank_m=3) -> dict:
    """Hit rate and false positives of each predictor at each K'/K, on steps 1..T-1 (calibrated Holt: on the
    second half, after a grid search on the first)."""
    true = selections(scores, nblk, k, n_sink, n_local)[1:]
    t = scores.shape[0]
    half = max(2, t // 2)
    cal = calibrate(scores[:half], nblk[:half], k, n_sink, n_local)
    out: dict = {"holt_params": (cal.alpha, cal.beta, cal.gamma)}
    preds = {"previous": holt_predictions(scores, nblk, 1.0), "ema": holt_predictions(scores, nblk, 0.3),
             "holt": holt_predictions(scores, nblk, cal.alpha, cal.beta, cal.gamma)}
    nb = nblk[1:]
    for r in ratios:
        kk = max(1, round(r * k))
        for name, p in preds.items():
            sl = slice(half - 1, None) if name == "holt" else slice(None)
            out[(name, r)] = _hits(selections(p[sl], nb[sl], kk, n_sink, n_local), true[sl])
        # Re-ranking: the EMA's top M = rerank_m * K candidates, re-scored with this step's true scores.
        cand = selections(preds["ema"], nb, rerank_m * k, n_sink, n_local)
        live = torch.where(cand, scores[1:], float("-inf"))
        out[("rerank", r)] = _hits(selections(live, nb, kk, n_sink, n_local), true)
    return out


def amortized_selections(scores, nblk, k, n_sink, n_local, every: int, factor: float, source: str = "scan"):
    """Dynamic selection masks ``[T, B, Hkv, N]`` of amortized selection over a score history (offline twin of
    :class:`prr.algo.amortized.AmortizedSelector`: same candidate lists, the true scores of the step)."""
    if source not in ("scan", "ema"):
        raise ValueError(f"unknown candidate source {source!r}; expected scan or ema")
    t_steps, n = scores.shape[0], scores.shape[-1]
    scan_k = math.ceil(factor * k)
    j = torch.arange(n)
    level = torch.zeros_like(scores[0], dtype=torch.float32)
    trend = torch.zeros_like(level)
    known = torch.zeros(scores.shape[1], dtype=torch.int32)
    allowed = []
    for t in range(t_steps):
        if t % every == 0:
            basis = scores[t]
            if source == "ema":  # fold this scan's scores into the EMA, then rank by the EMA
                z = normalize_scores(scores[t], nblk[t])
                level, trend = holt_step(level, trend, z, known, nblk[t], 0.3, 0.0)
                known = torch.maximum(known, nblk[t].to(torch.int32))
                basis = holt_predict(level, trend, known, 0.0)
            idx, cnt = ops.select_blocks(basis, nblk[t], scan_k, n_sink, n_local)
            listed = ops.selection_mask(idx, cnt, n)
            n_scan = nblk[t].long()[:, None, None]
        allowed.append(listed | (j >= n_scan))
    live = torch.where(torch.stack(allowed), scores, float("-inf"))
    return selections(live, nblk, k, n_sink, n_local)


def amortized_hit_rates(scores, nblk, k, n_sink, n_local, settings, sources=("scan", "ema")) -> dict:
    """``{"scan m16 c4": hit rate, ...}``: ``|S_amortized ∩ S_full| / K`` over all steps (scan steps count 1)."""
    true = selections(scores, nblk, k, n_sink, n_local)
    return {f"{src} m{m} c{c:g}": _hits(amortized_selections(scores, nblk, k, n_sink, n_local, m, c, src), true)[0]
            for src in sources for m, c in settings}


@torch.inference_mode()
def record_scores(model, tok, length: int, steps: int, cfg, text_offset: int = 0) -> dict:
    """Teacher-force `steps` tokens of real text after a `length`-token prefix through serialized DSA and keep
    every sparse layer's true block scores: ``{layer: (scores [T, B, Hkv, N], num_blocks [T, B])}``."""
    from ..model.engine import Engine
    from ..model.prompts import pydoc_text

    ids = tok.encode(pydoc_text())[text_offset: text_offset + length + steps]
    eng = Engine(model, tok, attention="dsa", sparse=cfg)
    eng.prefill(ids[:length], steps + 1)
    eng.record = {}
    for t in range(length, length + steps):
        eng.step(torch.tensor([ids[t]], device=model.device))
    return {i: (torch.stack([s for s, _ in v]).cpu(), torch.stack([n for _, n in v]).cpu())
            for i, v in eng.record.items()}


def study(history: dict, k: int, n_sink: int, n_local: int, lags=(1, 2, 4, 8, 16, 32, 64), amortized=()) -> dict:
    """Every metric, per layer (KV heads pooled) and overall; ``amortized``: (m, c) settings to replay."""
    per_layer = {}
    for layer, (scores, nblk) in sorted(history.items()):
        masks = selections(scores, nblk, k, n_sink, n_local)
        hr = predictor_hit_rates(scores, nblk, k, n_sink, n_local)
        per_layer[layer] = {"overlap": overlap_vs_lag(masks, lags), "holt_params": hr.pop("holt_params"),
                            "predictors": {f"{n}@{r}": {"hit_rate": h, "false_positives": fp}
                                           for (n, r), (h, fp) in hr.items()}}
        if amortized:
            per_layer[layer]["amortized"] = amortized_hit_rates(scores, nblk, k, n_sink, n_local, amortized)
        per_layer[layer]["guess"] = guess_replay(scores, nblk, k, n_sink, n_local, spec_k=math.ceil(1.5 * k))
    keys = next(iter(per_layer.values()))["predictors"].keys()
    overall = {key: sum(v["predictors"][key]["hit_rate"] for v in per_layer.values()) / len(per_layer)
               for key in keys}
    lag_keys = next(iter(per_layer.values()))["overlap"].keys()
    overlap = {lag: sum(v["overlap"][lag] for v in per_layer.values()) / len(per_layer) for lag in lag_keys}
    res = {"per_layer": per_layer, "hit_rate_mean": overall, "overlap_mean": overlap, "k": k}
    # the guessed top-K replayed as PRR runs it (its guess from the previous selection, P its top-1.5K)
    guesses = [v["guess"] for v in per_layer.values()]
    rows = sum(g["rows"] for g in guesses)
    res["guess"] = {key: sum(g[key] * g["rows"] for g in guesses) / rows if rows else None
                    for key in ("held", "narrowed", "too_high", "too_low", "candidates_over_k", "p_hit_rate")}
    res["guess"].update(rows=rows, min_layer_held=min(g["held"] for g in guesses))
    if amortized:
        res["amortized_mean"] = {key: sum(v["amortized"][key] for v in per_layer.values()) / len(per_layer)
                                 for key in next(iter(per_layer.values()))["amortized"]}
        res["amortized_min"] = {key: min(v["amortized"][key] for v in per_layer.values())
                                for key in res["amortized_mean"]}
        res["num_blocks"] = int(next(iter(history.values()))[1].max())
    return res


def plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["per_layer"]
    layers = sorted(per, key=int)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for key in ("previous@1.0", "ema@1.0", "holt@1.0", "rerank@1.0", "holt@1.5", "rerank@1.5"):
        axes[0].plot([int(x) for x in layers], [per[x]["predictors"][key]["hit_rate"] for x in layers], marker=".",
                     label=key.replace("@", " K'/K="))
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("hit rate |P ∩ S| / K")
    axes[0].set_title(f"predictor hit rate per layer (K = {result['k']} blocks)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    for x in layers[:: max(1, len(layers) // 6)]:
        lags = sorted(per[x]["overlap"], key=int)
        axes[1].plot([int(g) for g in lags], [per[x]["overlap"][g] for g in lags], marker=".", label=f"layer {x}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("lag (decode steps)")
    axes[1].set_ylabel("|S_t ∩ S_t-lag| / K")
    axes[1].set_title("selection overlap against lag")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def guess_replay(scores, nblk, k, n_sink, n_local, spec_k: int, source: str = "previous",
                 guess_k: int | None = None) -> dict:
    """Replay the guessed top-K (:func:`prr.ops.guessed.select_blocks_guessed`) over a score history as PRR's
    step runs it: each step's guess from the previous step (``source="previous"``: the smallest current score
    among the previous selection's blocks; ``"carried"``: the threshold the previous step's search left for a
    count of ``guess_k``), and its predicted set P for the next. From step 1 on: the share of rows where the
    guess held (narrowed included), fell back as too high or too low, the mean ``|C(τ)| / K`` where it held,
    and the hit rate ``|P ∩ S| / K`` of the predicted set (dynamic blocks)."""
    from ..ops.guessed import HELD, NARROWED, SHORT, TOO_HIGH, TOO_LOW, reference

    t_steps, b, h, n = scores.shape
    guess = torch.full((b, h), float("-inf"))
    prev = p_idx = p_cnt = None
    paths, ratios, hits, total = [], [], 0.0, 0.0
    for t in range(t_steps):
        nxt = nblk[t + 1] if t + 1 < t_steps else nblk[t]
        kw = {"prev": prev} if source == "previous" and prev is not None else {"guess": guess}
        idx, cnt, guess, pi, pc, st = reference.select_blocks_guessed(
            scores[t], nblk[t], k, n_sink, n_local, guess_k=guess_k, spec_k=spec_k, num_blocks_next=nxt, **kw)
        if t > 0:
            paths.append(st[1].flatten())
            ok = (st[1] == HELD) | (st[1] == NARROWED)
            ratios.append(st[0][ok].float() / k)
            dyn_s = selections(scores[t:t + 1], nblk[t:t + 1], k, n_sink, n_local)[0]
            dyn_p = ops.selection_mask(p_idx, p_cnt, n)
            hits += float((dyn_p & dyn_s).sum())
            total += float(dyn_s.sum())
        prev, p_idx, p_cnt = (idx, cnt), pi, pc
    p = torch.cat(paths) if paths else torch.zeros(0, dtype=torch.int32)
    r = torch.cat(ratios) if ratios else torch.zeros(0)
    live = p[p != SHORT]

    def share(*codes):
        return float(sum((live == c).float().sum() for c in codes) / live.numel()) if live.numel() else float("nan")

    return {"held": share(HELD, NARROWED), "narrowed": share(NARROWED), "too_high": share(TOO_HIGH),
            "too_low": share(TOO_LOW), "candidates_over_k": float(r.mean()) if r.numel() else float("nan"),
            "p_hit_rate": hits / total if total else float("nan"), "rows": int(live.numel())}
