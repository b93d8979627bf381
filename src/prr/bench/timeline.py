"""Kernel timelines of captured CUDA graphs: which kernel ran when, on which stream, in one replay.

The profiler (CUPTI through ``torch.profiler``) records every kernel a graph launch ran, tagged with the
launch's correlation id; :func:`graph_timeline` replays a graph a number of times (L2 flushed before each, as
the benchmarks do), groups the kernels by launch, and averages each kernel's start and end relative to the
first kernel of its launch. That shows whether two streams' kernels really overlap inside a graph, and where
the gaps are, without hardware counters.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import torch


def _short(name: str) -> str:
    name = name.split("(")[0].split("<")[0]
    return name.removeprefix("void ").strip()[:40]


def replay_trace(graph: torch.cuda.CUDAGraph, replays: int, flush_l2: bool = True) -> list[dict]:
    """The profiler's trace events (Chrome trace format) of ``replays`` replays of ``graph`` after one
    unprofiled replay, the L2 flushed before each (``flush_l2``)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            if flush is not None:
                flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        return json.load(f)["traceEvents"]


def graph_timeline(graph: torch.cuda.CUDAGraph, replays: int = 20) -> list[dict]:
    """Mean per-kernel timeline of one replay of ``graph``: ``[{name, stream, start_us, end_us, dur_us}]``
    sorted by start, times relative to the first kernel's start (launch overhead before it excluded)."""
    events = replay_trace(graph, replays)
    launches = {e["args"]["correlation"] for e in events
                if e.get("name") == "cudaGraphLaunch" and "correlation" in e.get("args", {})}
    per_launch = defaultdict(list)
    for e in events:
        if e.get("cat") == "kernel" and e.get("args", {}).get("correlation") in launches:
            per_launch[e["args"]["correlation"]].append(e)
    runs = []
    for ks in per_launch.values():
        ks.sort(key=lambda e: (e["ts"], e["args"].get("stream", 0)))
        t0 = ks[0]["ts"]
        runs.append([(_short(e["name"]), e["args"].get("stream", -1), e["ts"] - t0, e["ts"] - t0 + e["dur"])
                     for e in ks])
    if not runs:
        return []
    n = min(len(r) for r in runs)
    out = []
    for i in range(n):
        items = [r[i] for r in runs if len(r) == n]
        out.append({"name": items[0][0], "stream": items[0][1],
                    "start_us": round(sum(x[2] for x in items) / len(items), 2),
                    "end_us": round(sum(x[3] for x in items) / len(items), 2)})
        out[-1]["dur_us"] = round(out[-1]["end_us"] - out[-1]["start_us"], 2)
    return out


def format_timeline(rows: list[dict], title: str = "") -> str:
    """A text table and a bar per kernel (one character per microsecond, up to 100)."""
    if not rows:
        return f"{title}: no kernels recorded"
    span = max(r["end_us"] for r in rows)
    streams = {s: i for i, s in enumerate(dict.fromkeys(r["stream"] for r in rows))}
    lines = [f"{title}  (span {span:.1f} us; streams {list(streams)})"]
    scale = min(1.0, 100 / max(span, 1e-9))
    for r in rows:
        a, b = int(r["start_us"] * scale), max(int(r["end_us"] * scale), int(r["start_us"] * scale) + 1)
        bar = " " * a + "#" * (b - a)
        lines.append(f"  s{streams[r['stream']]} {r['name']:<40} {r['start_us']:7.1f} {r['end_us']:7.1f} "
                     f"{r['dur_us']:6.1f} |{bar}")
    return "\n".join(lines)


# ---- per-token breakdown of a whole decode step ----------------------------------------------------------------
CATEGORIES = ("rest", "metadata", "selection", "attention", "repair", "speculation", "predictor", "gaps")
"""Breakdown categories, in the order a stacked bar draws them. "rest": projections, MLP, norms, RoPE, the cache
append, the LM head (every kernel no other category claims); "gaps": no kernel running (launch latency and
dependency bubbles inside the graph)."""

_SCORING = ("quest_scores", "infllm_scores")
_SELECTION = (*_SCORING, "candidate", "_plan_kernel", "_commit_kernel")
# The model's own kernels outside attention (cuBLAS GEMVs and the fused small ops): "rest" on whatever stream a
# graph replay runs them (after a fork-join the driver may continue the chain on the selection's stream).
_MODEL = ("nvjet", "gemv", "gemm", "cublas", "cutlass", "splitkreduce", "_rms_norm_kernel", "_rope_qkv_kernel",
          "_swiglu_kernel", "_append_kernel", "embedding")
_TAIL = ("_overlap_kernel",)  # PRR's statistics, in its tail


def kernel_categories(rows: list[dict], method: str) -> list[str]:
    """The category of each kernel of a decode-step timeline (``graph_timeline`` rows, sorted by start).

    By name first: the model's GEMVs and fused small ops are "rest" wherever they run, metadata appends,
    scoring, the predictor's update and PRR's statistics, the repair. Streams are not trusted to keep roles: a
    replayed graph maps its nodes to the driver's streams, and after a join the main chain may continue on
    what was the selection's stream. So the rest is told apart by what ran beside or before it: a sparse
    attention kernel of PRR that overlaps a scoring kernel in time is the speculation (it runs beside the
    selection), otherwise attention; a top-K (or its group pass) is the predictor's next-P selection when the
    last tagged kernel on its stream was the predictor's (PRR's tail), otherwise the selection; a merge
    belongs to the attention, speculation or repair launched last on its stream; any other kernel is "rest"."""
    if not rows:
        return []
    scoring = [(r["start_us"], r["end_us"]) for r in rows if any(k in r["name"].lower() for k in _SCORING)]
    role: dict = {}  # stream -> "selection" | "predictor": the last scoring or tail kernel there
    owner: dict = {}  # stream -> what a merge there belongs to
    cats = []
    for r in rows:
        n, s = r["name"].lower(), r["stream"]
        if "append" in n and ("quest" in n or "infllm" in n):
            c = "metadata"
        elif any(k in n for k in _MODEL):
            c = "rest"
        elif "holt" in n or "_known_kernel" in n or any(k in n for k in _TAIL):
            c = role[s] = "predictor"
        elif "repair" in n:
            c = owner[s] = "repair"
        elif any(k in n for k in _SELECTION):
            c = role[s] = "selection"
        elif "topk" in n or "group_max" in n:
            c = role.get(s, "selection") if method == "prr" else "selection"
        elif "sparse_decode" in n:
            spec = method == "prr" and any(a < r["end_us"] and r["start_us"] < b for a, b in scoring)
            c = owner[s] = "speculation" if spec else "attention"
        elif "merge" in n:
            c = owner.get(s, "attention")
        else:
            c = "rest"
        cats.append(c)
    return cats


def step_breakdown(rows: list[dict], method: str) -> dict:
    """Where one replay's wall time goes: ``{"wall_us", "exclusive_us": {category: us}, "busy_us": {...}}``.

    ``exclusive_us`` splits the wall time (first kernel's start to last kernel's end) into disjoint segments,
    each given to the highest-priority category running then, in :data:`CATEGORIES` order ("rest" first): so
    the parts add up to the wall time, and work hidden under other work (a speculation under the selection, a
    deferred tail under the next layer's projections) costs nothing there. ``busy_us`` sums each category's
    kernel durations (overlaps counted twice); ``top_kernels`` the 25 kernels (by name and category) that ran
    longest in all, with their counts."""
    cats = kernel_categories(rows, method)
    busy = dict.fromkeys(CATEGORIES, 0.0)
    excl = dict.fromkeys(CATEGORIES, 0.0)
    if not rows:
        return {"wall_us": 0.0, "exclusive_us": excl, "busy_us": busy}
    prio = {c: i for i, c in enumerate(CATEGORIES)}
    events = []
    for r, c in zip(rows, cats, strict=True):
        busy[c] += r["dur_us"]
        events += [(r["start_us"], 1, c), (r["end_us"], -1, c)]
    events.sort(key=lambda e: (e[0], e[1]))
    active = dict.fromkeys(CATEGORIES, 0)
    t_prev = events[0][0]
    for t, kind, c in events:
        if t > t_prev:
            live = [k for k in CATEGORIES if active[k] > 0]
            excl[min(live, key=prio.get) if live else "gaps"] += t - t_prev
            t_prev = t
        active[c] += kind
    wall = events[-1][0] - events[0][0]
    r2 = lambda d: {k: round(v, 1) for k, v in d.items()}  # noqa: E731
    kinds = defaultdict(lambda: [0, 0.0])
    for r, c in zip(rows, cats, strict=True):
        kinds[(r["name"], c)][0] += 1
        kinds[(r["name"], c)][1] += r["dur_us"]
    top = sorted(kinds.items(), key=lambda kv: -kv[1][1])[:25]
    return {"wall_us": round(wall, 1), "exclusive_us": r2(excl), "busy_us": r2(busy),
            "top_kernels": [{"name": n, "category": c, "count": k, "busy_us": round(t, 1)} for (n, c), (k, t) in top]}
