"""Where a whole-model decode step's idle time (no kernel running) sits: gaps by the kernel pair around them.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_gaps.py --out DIR [--cases model:ctx:b:attention,...]
(attention: dense, dsa, prr, or dsa_mMcC: amortized DSA on the host schedule, its re-score step's graph)
For each case the captured step of ``prr bench e2e`` (random weights, bf16) is replayed under the profiler; the
gap before every kernel (its start minus the latest end before it) is summed by (previous kernel, kernel), and
one middle layer's kernels are printed as a timeline.
"""

import argparse
import json
import os
from collections import defaultdict

import torch

from prr.algo.sparse import SparseConfig
from prr.bench.common import environment
from prr.bench.timeline import format_timeline, graph_timeline, replay_trace
from prr.eval.amortized import AmortizedEngine, parse_method
from prr.model.engine import Engine
from prr.model.weights import load_model

CASES = "llama-3.1-8b:4096:1:dense,llama-3.1-8b:4096:1:dsa,llama-3.1-8b:131072:1:dense,llama-3.1-8b:131072:1:dsa"


def gaps_by_pair(rows):
    out = defaultdict(lambda: [0, 0.0])
    end = None
    prev = None
    for r in rows:
        if end is not None and r["start_us"] > end:
            k = (prev, r["name"])
            out[k][0] += 1
            out[k][1] += r["start_us"] - end
        if end is None or r["end_us"] > end:
            end, prev = r["end_us"], r["name"]
    return sorted(((a, b, n, round(t, 1)) for (a, b), (n, t) in out.items()), key=lambda x: -x[3])


def non_kernel_activities(graph, replays: int = 3) -> dict:
    """GPU activities of a replay other than kernels (memcpy, memset, ...) by category: a gap in the kernel
    timeline may be one of them."""
    events = replay_trace(graph, replays, flush_l2=False)
    out = defaultdict(lambda: [0, 0.0])
    for e in events:
        cat = e.get("cat", "")
        if cat.startswith("gpu_"):
            out[(cat, e.get("name", "")[:40])][0] += 1
            out[(cat, e.get("name", "")[:40])][1] += e.get("dur", 0.0)
    return {f"{c}:{n}": [k / replays, round(t / replays, 1)] for (c, n), (k, t) in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {"env": environment(), "cases": {}}
    models = {}
    for spec in args.cases.split(","):
        name, ctx, b, attention = spec.split(":")
        if name not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[name] = load_model(name, dtype=torch.bfloat16, device="cuda", fuse=True)[0]
        model = models[name]
        sparse = SparseConfig.from_budget("quest", args.budget)
        am = parse_method(attention.replace("dsa_", "quest_")) if attention.startswith("dsa_m") else None
        if am is None:
            eng = Engine(model, None, attention=attention, sparse=sparse, n_dense_layers=2)
        else:  # amortized DSA (host schedule): the re-score step's graph
            eng = AmortizedEngine(model, None, every=am[1], factor=am[2], schedule="host", sparse=sparse,
                                  n_dense_layers=2)
        ctx = min(int(ctx), model.cfg.max_context - 16)
        eng.fill_random(int(b), ctx, 12)
        eng.step(torch.zeros(int(b), dtype=torch.long, device="cuda"))
        eng.capture_decode()
        graph = eng._graph.graph if am is None else eng._graph.kinds[False][0]
        tl = graph_timeline(graph, replays=5)
        pairs = gaps_by_pair(tl)
        total = sum(p[3] for p in pairs)
        norms = [i for i, r in enumerate(tl) if "rms_norm" in r["name"]]
        mid = len(norms) // 2
        lo, hi = norms[mid - (mid % 2)], norms[min(mid - (mid % 2) + 2, len(norms) - 1)]
        layer = [dict(r) for r in tl[lo:hi + 1]]
        t0 = layer[0]["start_us"]
        for r in layer:
            r["start_us"] = round(r["start_us"] - t0, 2)
            r["end_us"] = round(r["end_us"] - t0, 2)
        print(f"== {spec}: {len(tl)} kernels, span {tl[-1]['end_us']:.0f} us, gaps {total:.1f} us", flush=True)
        for a, bb, n, t in pairs[:12]:
            print(f"   {t:8.1f} us  x{n:<4} {a} -> {bb}")
        print(format_timeline(layer, f"one layer of {spec}"), flush=True)
        other = non_kernel_activities(graph)
        print(f"   other GPU activities per replay (count, us): {other}", flush=True)
        result["cases"][spec] = {"kernels": len(tl), "gaps_us": round(total, 1), "pairs": pairs[:40],
                                 "layer": layer, "non_kernel": other}
        del eng
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "diag_gaps.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
