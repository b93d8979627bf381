"""Where a whole-model step's time goes outside its kernels: the host's graph launch and the idle GPU before it.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_launch.py --out DIR [--model llama-3.1-8b --context 131072]
For DSA, PRR (the engine's defaults) and PRR with its tail's two copies per layer made elementwise kernels
(``prr_kernel_copy``), each step captured in one CUDA graph as ``prr bench e2e`` does: the
host's time in ``graph.replay()`` (no sync), the step timed with a sync after each (as ``bench e2e`` and
generation, which reads each token on the host, see it), and 16 replays back to back (the host enqueues ahead),
per step; with the graph's node counts by type. Writes ``DIR/diag_launch.json``.
"""

import argparse
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

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def graph_nodes(graph) -> dict:
    """Node counts of a captured torch graph by type, where this torch exposes the raw graph (else {})."""
    try:
        from cuda.bindings import runtime as rt  # optional: cuda-python
    except ImportError:
        return {}
    try:
        g = graph.raw_cuda_graph()
        _, _, n = rt.cudaGraphGetNodes(g, None, 0)
        _, nodes, n = rt.cudaGraphGetNodes(g, n)
        counts = {}
        for node in nodes:
            _, t = rt.cudaGraphNodeGetType(node)
            counts[str(t).split(".")[-1]] = counts.get(str(t).split(".")[-1], 0) + 1
        return counts
    except Exception as e:  # diagnostics only
        return {"error": repr(e)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--context", type=int, default=131072 - 64)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    model, _ = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    sparse = SparseConfig.from_budget("quest", 2048)
    out = {"env": environment(), "model": args.model, "context": args.context, "rows": []}
    import prr.runtime.layer as layer_mod

    memcpy = layer_mod._copy_into
    for name in ("dsa", "prr", "prr_kernel_copy", "dsa"):
        attention = name.split("_")[0]
        # prr_kernel_copy: the tail's copies of the next P as elementwise kernels instead of memcpy nodes
        layer_mod._copy_into = memcpy if name != "prr_kernel_copy" else (
            lambda dst, src: torch.add(src, 0, out=dst))
        eng = Engine(model, None, attention=attention, sparse=sparse, ratio=1.0)
        eng.fill_random(1, args.context, 64)
        tok = torch.zeros(1, dtype=torch.long, device="cuda")
        eng.step(tok)
        eng.capture_decode()
        graph = eng._graph.graph
        synced = _time_steps(eng, args.steps)[1:]
        host = []
        for _ in range(args.steps):
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
        events = [e for e in replay_trace(graph, 3, flush_l2=False) if e.get("cat") in GPU_CATS]
        by_cat = {c: sum(1 for e in events if e["cat"] == c) // 3 for c in GPU_CATS}
        row_spans = {c: round(sum(e["dur"] for e in events if e["cat"] == c) / 3, 1) for c in GPU_CATS}
        row = {"gpu_events_per_step": by_cat, "gpu_busy_us_per_step": row_spans}
        row = {"attention": name, **row, "synced_step_us": round(statistics.median(synced), 1),
               "back_to_back_step_us": round(a.elapsed_time(b) * 1e3 / 16, 1),
               "host_replay_us": round(statistics.median(host), 1), "nodes": graph_nodes(graph)}
        print(row, flush=True)
        out["rows"].append(row)
        del eng, graph
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "diag_launch.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
