"""A whole-model step's time outside its kernels: the host's graph launch, before and after the profiler ran.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_launch.py --out DIR [--model llama-3.1-8b]
For DSA, PRR (the engine's defaults) and DSA again, each step captured in one CUDA graph as ``prr bench e2e``
does: the host's time in ``graph.replay()`` (no sync), the step timed with a sync after each (as ``bench e2e``
and generation, which reads each token on the host, see it) and 16 replays back to back (the host enqueues
ahead). Every engine is timed twice: first before the process has run the profiler, then again after a profiled
replay (``torch.profiler``: its CUPTI callbacks stay registered and slow later launches), with the GPU events
of one step by kind. Writes ``DIR/diag_launch.json``.
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch

from prr.algo.sparse import SparseConfig
from prr.bench.common import environment
from prr.bench.e2e import _time_steps
from prr.bench.timeline import replay_trace
from prr.model.engine import Engine
from prr.model.weights import load_model
from prr.timing import capture

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def timings(eng, graph, steps: int) -> dict:
    synced = _time_steps(eng, steps)[1:]
    host = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        host.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(16):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return {"synced_step_us": round(statistics.median(synced), 1),
            "back_to_back_step_us": round(a.elapsed_time(b) * 1e3 / 16, 1),
            "host_replay_us": round(statistics.median(host), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--context", type=int, default=131072 - 256)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    model, _ = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    sparse = SparseConfig.from_budget("quest", 2048)
    out = {"env": environment(), "model": args.model, "context": args.context, "rows": []}
    for phase in ("before the profiler", "after the profiler"):
        if phase == "after the profiler":  # one profiled replay of a one-kernel graph
            x = torch.zeros(1, device="cuda")
            replay_trace(capture(lambda x=x: x.add_(1)), 1, flush_l2=False)
        for attention in ("dsa", "prr", "dsa"):
            eng = Engine(model, None, attention=attention, sparse=sparse, ratio=1.0)
            eng.fill_random(1, args.context, 128)
            tok = torch.zeros(1, dtype=torch.long, device="cuda")
            eng.step(tok)
            eng.capture_decode()
            graph = eng._graph.graph
            row = {"attention": attention, "phase": phase, **timings(eng, graph, args.steps)}
            if phase == "after the profiler":
                events = [e for e in replay_trace(graph, 3, flush_l2=False) if e.get("cat") in GPU_CATS]
                row["gpu_events_per_step"] = {c: sum(1 for e in events if e["cat"] == c) // 3 for c in GPU_CATS}
                row["gpu_busy_us_per_step"] = {c: round(sum(e["dur"] for e in events if e["cat"] == c) / 3, 1)
                                               for c in GPU_CATS}
            print(row, flush=True)
            out["rows"].append(row)
            del eng, graph
            gc.collect()  # the captured graph sits in reference cycles
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "diag_launch.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
