"""Amortized selection (issue #12) in the evaluation: methods named ``quest_m16c8`` / ``infllm_v2_m16c8`` run
serialized DSA whose selection scans every m = 16 steps and re-scores c·K = 8K candidates in between
(:class:`prr.algo.amortized.AmortizedSelector` attached to every sparse layer's metadata), and their agreement
with the full-scan method of the same budget."""

from __future__ import annotations

import math
import re

from ..algo.amortized import AmortizedSelector
from ..algo.sparse import SparseConfig
from ..model.engine import Engine

_NAME = re.compile(r"^(quest|infllm_v2)_m(\d+)c(\d+(?:\.\d+)?)$")


def method_name(selector: str, every: int, factor: float) -> str:
    return f"{selector}_m{every}c{factor:g}"


def parse_method(method: str) -> tuple[str, int, float] | None:
    """``"quest_m16c4"`` -> ``("quest", 16, 4.0)``; None for a name that is not an amortized method."""
    m = _NAME.match(method)
    return (m.group(1), int(m.group(2)), float(m.group(3))) if m else None


class AmortizedEngine(Engine):
    """Serialized DSA whose sparse layers select through an :class:`AmortizedSelector` each."""

    def __init__(self, model, tok, *, every: int, factor: float, schedule: str = "device", **kw):
        self.every, self.factor, self.schedule = every, factor, schedule
        super().__init__(model, tok, attention="dsa", **kw)

    def _build_sparse_state(self) -> None:
        super()._build_sparse_state()
        for i, meta in enumerate(self.metas):
            if meta is not None:  # built fresh after every prefill: the first decode step scans
                meta.amortized = AmortizedSelector(meta, self.caches[i], self.every, self.factor,
                                                   schedule=self.schedule)

    def scan_share(self) -> float:
        """Share of (layer, sequence) steps that ran a full scan so far."""
        sels = [m.amortized for m in self.metas if m is not None]
        steps = sum(int(s.step.sum()) for s in sels)
        return sum(int(s.scans.sum()) for s in sels) / max(steps, 1)


def make_amortized_engine(model, tok, method: str, budget: int, n_dense_layers: int = 2) -> Engine:
    selector, every, factor = parse_method(method)
    return AmortizedEngine(model, tok, every=every, factor=factor, sparse=SparseConfig.from_budget(selector, budget),
                           n_dense_layers=n_dense_layers)


def agreement(rows: list[dict]) -> list[dict]:
    """Per amortized method and budget: the share of task instances whose output is identical to (and whose
    score equals) the full-scan method's on the same instance."""
    full = {(r["task"], r["length"], r["seed"], r["method"], r["budget"]): r for r in rows}
    acc: dict = {}
    for r in rows:
        p = parse_method(r["method"])
        if p is None:
            continue
        base = full.get((r["task"], r["length"], r["seed"], p[0], r["budget"]))
        if base is None:
            continue
        a = acc.setdefault((r["method"], r["budget"]), [0, 0, 0])
        a[0] += 1
        a[1] += r["output"] == base["output"]
        a[2] += r["score"] == base["score"]
    return [{"method": m, "budget": b, "instances": n, "same_output": round(s / n, 4), "same_score": round(t / n, 4),
             "same_output_count": s, "same_score_count": t}
            for (m, b), (n, s, t) in sorted(acc.items())]


def relative_cost(every: int, factor: float, n_blocks: int, top_k: int, n_forced: int = 3,
                  block_size: int = 16) -> float:
    """Metadata blocks scored per step over a full scan's N (the cost model): ``1/m + (forced + c·K + new) / N``,
    ``new = ceil(m / BS) + 1`` slots for blocks appeared since the scan."""
    listed = n_forced + math.ceil(factor * top_k) + math.ceil(every / block_size) + 1
    return 1 / every + listed / n_blocks


def plot_tradeoff(locality: dict, evaluation: dict | None, path: str, n_blocks: int = 32768, top_k: int = 125) -> str:
    """Hit against the full scan (mean and worst layer) and, from `prr eval`, perplexity and answer agreement,
    each against the modelled selection cost at N = `n_blocks` (Llama-3.1-8B at 512K: 32768 pages of 16) and
    K = `top_k`. Drawn from saved JSON only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = 2 if evaluation else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    # One line per c across m (scan candidates: solid; EMA candidates: dashed; worst layer: small dots).
    parsed = [(k.split()[0], int(k.split()[1][1:]), float(k.split()[2][1:]), k) for k in locality["amortized_mean"]]
    for i, c in enumerate(sorted({p[2] for p in parsed})):
        for src, style in (("scan", "o-"), ("ema", "x--")):
            pts = sorted((relative_cost(m, c, n_blocks, top_k), locality["amortized_mean"][k],
                          locality["amortized_min"][k], m) for s_, m, c_, k in parsed if s_ == src and c_ == c)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", alpha=1 if src == "scan" else 0.6,
                    label=f"c={c:g}, {src} candidates")
            if src == "scan":
                ax.plot([p[0] for p in pts], [p[2] for p in pts], ".", color=f"C{i}", alpha=0.5)
                for x, y, _, m in pts:
                    ax.annotate(f"m{m}", (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
    ax.axhline(0.98, ls="--", lw=0.8, color="k")
    ax.set_xscale("log")
    ax.set_xlabel(f"metadata read per step / full scan (cost model at N={n_blocks}, K={top_k})")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("|S_amortized ∩ S_full| / K")
    ax.set_title(f"hit vs the full scan, mean over layers (dots: worst layer); SmolLM2, K={locality['k']}, "
                 f"N={locality.get('num_blocks', '?')}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if evaluation:
        ax = axes[0][1]
        agree = {a["method"]: a["same_output"] for a in evaluation.get("amortized_agreement", [])}
        score = {a["method"]: a["same_score"] for a in evaluation.get("amortized_agreement", [])}
        ppl = {r["method"]: r["vs_full_scan_pct"] for r in evaluation.get("perplexity", []) if "vs_full_scan_pct" in r}
        pts = sorted((relative_cost(p[1], p[2], n_blocks, top_k), m) for m in agree if (p := parse_method(m)))
        ax.plot([x for x, _ in pts], [100 * agree[m] for _, m in pts], "o-", label="same output as the full scan (%)")
        ax.plot([x for x, _ in pts], [100 * score[m] for _, m in pts], "^:", color="C2",
                label="same task score as the full scan (%)")
        for x, m in pts:
            ax.annotate(m.split("_")[-1], (x, 100 * agree[m]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("metadata read per step / full scan (model)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        ax.set_ylabel("task instances (%)")
        ax2 = ax.twinx()
        ax2.plot([x for x, m in pts if m in ppl], [ppl[m] for _, m in pts if m in ppl], "s--", color="C3",
                 label="perplexity vs the full scan (%)")
        ax2.set_ylabel("perplexity change (%)", color="C3")
        ax.set_title("prr eval: answers and perplexity against the full-scan Quest", fontsize=9)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge_evals(results: list[dict]) -> dict:
    """One `prr eval` result from several runs (e.g. lengths run in parallel): task rows (an instance run twice
    counted once) and perplexity rows concatenated, the agreement recomputed over all rows."""
    unique = {(r["task"], r["length"], r["seed"], r["method"], r["budget"]): r
              for res in results for r in res.get("tasks", [])}
    rows = list(unique.values())
    return {"tasks": rows, "amortized_agreement": agreement(rows),
            "perplexity": [r for res in results for r in res.get("perplexity", [])]}


if __name__ == "__main__":  # python -m prr.eval.amortized LOCALITY_JSON [EVAL_JSON ...] OUT_PNG
    import json
    import sys

    *inputs, out = sys.argv[1:]
    loaded = []
    for path in inputs:
        with open(path) as f:
            loaded.append(json.load(f))
    print(plot_tradeoff(loaded[0], merge_evals(loaded[1:]) if len(loaded) > 1 else None, out))
