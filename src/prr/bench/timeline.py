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


def graph_timeline(graph: torch.cuda.CUDAGraph, replays: int = 20) -> list[dict]:
    """Mean per-kernel timeline of one replay of ``graph``: ``[{name, stream, start_us, end_us, dur_us}]``
    sorted by start, times relative to the first kernel's start (launch overhead before it excluded)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
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
