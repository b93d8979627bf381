"""Plots drawn from saved benchmark JSON only (never from a live run)."""

from __future__ import annotations

import json
import os


def plot_layer(path: str, out_dir: str) -> list[str]:
    """Latency against context per method, and PRR's speedup against the hit rate. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        res = json.load(f)
    rows = res["rows"]
    os.makedirs(out_dir, exist_ok=True)
    rows = [r for r in rows if r["case"].count("/") == 3]  # default-budget cases (budget sweeps: plot_heatmap)
    if not rows:
        return [plot_heatmap(path, out_dir)]
    groups = sorted({r["case"].rsplit("/", 2)[0] + "/" + r["case"].rsplit("/", 1)[1] for r in rows})
    ctx_of = {"32K": 32, "128K": 128, "512K": 512}
    fig, axes = plt.subplots(2, (len(groups) + 1) // 2, figsize=(4.2 * ((len(groups) + 1) // 2), 7), squeeze=False)
    for ax, grp in zip(axes.flat, groups, strict=False):
        model_b, method = grp.rsplit("/", 1)
        series = {"dense SDPA": ("dense", None), "serialized DSA": ("dsa", None),
                  "PRR exact (path)": ("prr_exact_path", None), "PRR exact (with tail)": ("prr_exact", None),
                  "PRR union (path)": ("prr_union_path", None)}
        for label, (op, _) in series.items():
            pts = {}
            for r in rows:
                m_b, c, me = r["case"].rsplit("/", 2)
                if m_b == model_b and me == method and r["op"] == op:
                    pts[ctx_of[c]] = min(pts.get(ctx_of[c], 1e18), r["net_us"])
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([32, 128, 512], ["32K", "128K", "512K"])
        ax.set_title(f"{model_b} {method}", fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("µs per layer step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Decode-attention step per layer, {res['env']['gpu']} (bf16; net of graph-replay overhead)")
    fig.tight_layout()
    p1 = os.path.join(out_dir, "layer_latency.png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    if not any(r["op"] == "prr_exact_path_sweep" for r in rows):  # a --quick run has no hit-rate sweep
        return [p1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dsa = {r["case"]: r["net_us"] for r in rows if r["op"] == "dsa"}
    for case in sorted({r["case"] for r in rows if r["op"] == "prr_exact_path_sweep"}):
        if "/b1/" not in case:
            continue
        pts = sorted((r["extra"]["hit_rate"], dsa[case] / r["net_us"]) for r in rows if r["case"] == case
                     and r["op"] in ("prr_exact_path_sweep", "prr_exact_path") and r["extra"]["ratio"] == 1.0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=case)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("hit rate (K' = K)")
    ax.set_ylabel("speedup over serialized DSA")
    ax.set_title("PRR exact (critical path), batch 1: speedup against the hit rate")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = os.path.join(out_dir, "layer_speedup_vs_hit.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def plot_heatmap(path: str, out_dir: str, name: str = "layer_heatmap.png") -> str:
    """PRR exact (critical path, best K') over serialized DSA, and the runtime's choice (``auto``) over
    serialized DSA, per (context, budget): one panel per model and batch. Reads the summary of a saved
    ``prr bench layer`` JSON (any set of budgets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with open(path) as f:
        res = json.load(f)
    summ = [s for s in res["meta"]["summary"] if "budget" in s]
    panels = sorted({(s["model"], s["method"], s["batch"]) for s in summ})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False,
                             gridspec_kw={"wspace": 0.12})
    for ax, (model, method, batch) in zip(axes.flat, panels, strict=True):
        mine = [s for s in summ if (s["model"], s["method"], s["batch"]) == (model, method, batch)]
        ctxs = sorted({s["context"] for s in mine})
        buds = sorted({s["budget"] for s in mine})
        grid = np.full((len(buds), len(ctxs)), np.nan)
        for s in mine:
            grid[buds.index(s["budget"]), ctxs.index(s["context"])] = s.get("speedup_exact", s["speedup_best"])
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.6, vmax=1.4, origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                auto = next(s["speedup_auto"] for s in mine if s["budget"] == buds[i] and s["context"] == ctxs[j])
                ax.text(j, i, f"{v:.2f}x\nauto {auto:.2f}x", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(ctxs)), [f"{c // 1024}K" for c in ctxs])
        ax.set_yticks(range(len(buds)), [str(b) for b in buds] if ax is axes.flat[0] else [])
        ax.set_xlabel("context (tokens)")
        if ax is axes.flat[0]:
            ax.set_ylabel("budget (tokens)")
        ax.set_title(f"{model} {method} b{batch}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="serialized DSA / PRR exact (path)")
    fig.suptitle(f"PRR exact vs serialized DSA per layer, {res['env']['gpu']} (bf16, hit rate of real traces)",
                 fontsize=10)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_e2e_breakdown(path: str, out_dir: str, name: str | None = None) -> str:
    """A stacked bar per configuration of a ``bench e2e`` JSON: where one decode step's time goes (ms per token,
    the timeline's exclusive parts: they add up to the step's kernel span). Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .timeline import CATEGORIES

    with open(path) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if "breakdown" in r]
    if not rows:
        raise ValueError(f"{path} has no per-token breakdown (run `prr bench e2e` without --no-breakdown)")
    colors = {"rest": "#9e9e9e", "metadata": "#8d6e63", "selection": "#1f77b4", "attention": "#2ca02c",
              "repair": "#d62728", "speculation": "#ff7f0e", "predictor": "#9467bd", "gaps": "#e0e0e0"}

    def label(r):
        ctx = r["context"]
        c = f"{round(ctx / 2**20)}M" if ctx >= 2**20 - 4096 else f"{round(ctx / 1024)}K"
        return f"{c} b{r['batch']} {r['attention']}"

    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.6))
    ys = range(len(rows))
    left = [0.0] * len(rows)
    for cat in CATEGORIES:
        w = [r["breakdown"]["exclusive_us"].get(cat, 0.0) / 1e3 for r in rows]
        if any(w):
            ax.barh(ys, w, left=left, color=colors[cat], label=cat, edgecolor="white", linewidth=0.4)
            left = [a + b for a, b in zip(left, w, strict=True)]
    for y, r in zip(ys, rows, strict=True):
        ax.text(left[y], y, f" {r['ms_per_token']:.2f} ms", va="center", fontsize=7)
    ax.set_yticks(list(ys), [label(r) for r in rows], fontsize=8)
    ax.invert_yaxis()
    meta = res.get("meta", {})
    ax.set_xlabel("ms per decode step (kernel timeline of one graph replay; the number: median step time)")
    ax.set_title(f"{meta.get('model', '')} per-token breakdown ({meta.get('method', '')}, budget "
                 f"{meta.get('budget', '')}; {res.get('env', {}).get('gpu', '')})", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, ncol=8, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out_dir, name or os.path.splitext(os.path.basename(path))[0] + "_breakdown.png")


def _save(fig, out_dir: str, name: str) -> str:
    """Write the figure as ``out_dir/name`` (130 dpi), close it, return the path."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def plot_step_parts(path: str, out_dir: str, name: str | None = None) -> str:
    """One panel per case of a ``scripts/diag_prr.py`` JSON: the parts of serialized DSA's and PRR's layer step
    laid out as each step orders them (DSA: selection, then attention; PRR: selection with the speculation
    beside it, then the repair), each part timed alone, with the whole step's measured time as a tick.
    Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        res = json.load(f)
    cases = res.get("cases") or {}
    if not cases:
        raise ValueError(f"{path} has no cases (a scripts/diag_prr.py JSON holds per-case 'us' parts)")
    need = ("selection", "attention_split", "speculate", "repair_exact", "dsa", "prr_exact")
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 1.9 * len(cases) + 0.6), squeeze=False)
    for ax, (case, res_c) in zip(axes[:, 0], cases.items(), strict=True):
        us = res_c["us"]
        missing = [k for k in need if k not in us]
        if missing:
            raise ValueError(f"{path}: case {case} lacks {missing}")
        sel, att, spec, rep = us["selection"], us["attention_split"], us["speculate"], us["repair_exact"]
        bars = [  # (row, start, width, color, label)
            (2, 0.0, sel, "#1f77b4", "selection"), (2, sel, att, "#2ca02c", "attention (+ merge)"),
            (1, 0.0, sel, "#1f77b4", None), (0.55, 0.0, spec, "#ff7f0e", "speculation (beside)"),
            (1, sel, rep, "#d62728", "repair (+ merge)"),
        ]
        for y, x0, w, c, lab in bars:
            h = 0.35 if y == 0.55 else 0.6
            ax.barh(y, w, left=x0, height=h, color=c, label=lab, edgecolor="white", linewidth=0.5)
        for y, key in ((2, "dsa"), (1, "prr_exact")):
            ax.plot([us[key]] * 2, [y - 0.38, y + 0.38], color="black", linewidth=2)
            ax.text(us[key], y, f" {us[key]:.1f} us", va="center", fontsize=7)
        ax.set_yticks([2, 1], ["serialized DSA", "PRR exact"], fontsize=8)
        ax.set_ylim(0.2, 2.5)
        ax.set_title(f"{case}: PRR / DSA = {us['dsa'] / us['prr_exact']:.2f}x", fontsize=9)
        ax.set_xlim(0, max(us["dsa"], us["prr_exact"], sel + att, sel + rep) * 1.18)
    axes[-1, 0].set_xlabel("us, net of the graph overhead (bars: each part timed alone; black tick: the whole "
                           "step)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=4, loc="lower center", frameon=False)
    fig.suptitle(f"Where a layer step goes ({res.get('env', {}).get('gpu', '')}, commit "
                 f"{res.get('env', {}).get('commit', '')})", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, out_dir, name or os.path.splitext(os.path.basename(path))[0] + ".png")


def _kernel_color(name: str) -> str:
    table = (("score", "#1f77b4"), ("topk", "#9467bd"), ("select_spec", "#17becf"), ("repair", "#d62728"),
             ("merge", "#8c564b"), ("sparse_decode", "#2ca02c"), ("elementwise", "#7f7f7f"))
    return next((c for key, c in table if key in name), "#bcbd22")


def plot_timelines(path: str, out_dir: str, steps: tuple[str, ...] | None = None, name: str | None = None) -> str:
    """Kernel timelines (``prr.bench.timeline.graph_timeline`` rows) of the layer steps a diagnostic JSON recorded
    (``cases[case]["timelines"][step]``: ``scripts/diag_prr.py --timelines N`` and the like, or a ``prr bench
    layer --timelines`` JSON's summaries): one panel per case,
    one lane per (step, stream), a bar per kernel from its mean start to its mean end (µs from the step's first
    kernel). Shows what runs beside what: a side stream's speculation under the selection, or not.
    ``steps``: which steps to draw (default: all recorded). Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        res = json.load(f)
    cases = {c: r["timelines"] for c, r in (res.get("cases") or {}).items() if r.get("timelines")}
    # a `prr bench layer --timelines` JSON keeps them in its cases' summaries
    cases.update({s["case"]: s["timelines"] for s in (res.get("meta") or {}).get("summary", []) if s.get("timelines")})
    if not cases:
        raise ValueError(f"{path} records no kernel timelines (run its script with --timelines N)")
    lanes_of = {}
    for case, tls in cases.items():
        lanes = []
        for step, rows in tls.items():
            if steps is not None and step not in steps:
                continue
            streams = sorted({r["stream"] for r in rows}, key=lambda s: min(r["start_us"] for r in rows
                                                                              if r["stream"] == s))
            for i, s in enumerate(streams):
                lanes.append((step if i == 0 else f"{step} (side stream)", [r for r in rows if r["stream"] == s]))
        lanes_of[case] = lanes
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, 0.55 * sum(len(v) for v in lanes_of.values()) + 1.2),
                             squeeze=False, gridspec_kw={"height_ratios": [len(v) for v in lanes_of.values()]})
    seen = {}
    for ax, (case, lanes) in zip(axes[:, 0], lanes_of.items(), strict=True):
        for y, (_, rows) in enumerate(reversed(lanes)):
            for r in rows:
                short = r["name"].lstrip("_").replace("_kernel", "").replace("at::native::", "")
                c = _kernel_color(short)
                bar = ax.barh(y, r["end_us"] - r["start_us"], left=r["start_us"], height=0.7, color=c,
                              edgecolor="white", linewidth=0.5)
                seen.setdefault(short[:28], bar)
            end = max(r["end_us"] for r in rows)
            ax.text(end, y, f" {end:.1f}", va="center", fontsize=7)
        ax.set_yticks(range(len(lanes)), [lab for lab, _ in reversed(lanes)], fontsize=7)
        ax.set_title(case, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("µs from the step's first kernel (mean over replays)", fontsize=8)
    fig.legend(list(seen.values()), list(seen), fontsize=7, ncol=4, loc="lower center", frameon=False)
    env = res.get("env", {})
    fig.suptitle(f"Kernel timelines of one layer step ({env.get('gpu', '')})", fontsize=9)
    fig.tight_layout(rect=(0, 0.07 + 0.01 * (len(seen) // 4), 1, 0.97))
    return _save(fig, out_dir, name or os.path.splitext(os.path.basename(path))[0] + "_timelines.png")
