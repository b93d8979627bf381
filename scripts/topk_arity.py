"""The full top-K's search by bisection against searches counting several thresholds per pass
(``prr.ops.select.triton.TOPK_ARITY``): the top-K alone, the selection (scores + top-K) and DSA's layer step,
Llama-3.1-8B and GLM-4-9B shapes, budget 2048; every arity's ids compared with bisection's.

Run on the GPU machine: PYTHONPATH=src python3 scripts/topk_arity.py --out DIR [--arities 2,4,8,16]
Microseconds net of the one-kernel graph overhead, L2 flushed before each replay; arities alternate within a
case (A, B, C, A, B, C, ...) so drift hits them alike.
"""

import argparse
import json
import os

import torch

from prr import ops
from prr.algo.sparse import select
from prr.algo.step import StepCounts
from prr.bench.common import environment, graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.ops.select import triton as sel_triton
from prr.runtime import LayerStep
from prr.timing import time_graph, time_op

CASES = ["llama-3.1-8b:1:131072", "llama-3.1-8b:1:524288", "llama-3.1-8b:8:131072", "glm-4-9b:1:524288"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--arities", default="2,4,8,16")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    arities = [int(a) for a in args.arities.split(",")]
    overhead = graph_overhead_us()
    out = {"env": environment(), "overhead_us": overhead, "arities": arities, "cases": []}
    for case in args.cases.split(","):
        model, b, ctx = case.split(":")
        lay = RandomLayer.make(model, int(b), int(ctx), "quest", budget=2048)
        cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
        scores, gmax = meta.scores(q, cache, with_groups=True)
        counts = StepCounts.of(cache.seq_lens, cfg, cache.num_kv_heads)
        res = {"case": lay.case, "top_k": cfg.top_k, "blocks": scores.shape[-1], "by_arity": {}}
        ref = None
        graphs = {}
        for a in arities:  # capture every arity first (each graph keeps the kernel it was captured with)
            sel_triton.TOPK_ARITY = a
            idx, cnt = ops.select_blocks(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gmax)
            torch.cuda.synchronize()
            same = None
            if ref is None:
                ref = (idx.clone(), cnt.clone())
            else:
                same = bool(torch.equal(idx, ref[0]) and torch.equal(cnt, ref[1]))
            step = LayerStep(cache, meta, q.shape[1], method="dsa", counts=counts)
            step.q.copy_(q)
            step.capture()
            graphs[a] = step
            res["by_arity"][a] = {"equal_to_bisection": same, "topk": [], "selection": [], "dsa_step": []}
        def topk(lay=lay, scores=scores, gmax=gmax):
            return ops.select_blocks(scores, lay.nblk, lay.cfg.top_k, lay.cfg.n_sink, lay.cfg.n_local, group_max=gmax)

        def selection(lay=lay):
            return select(lay.q, lay.cache, lay.meta, nblk=lay.nblk)

        for _ in range(args.repeats):
            for a in arities:  # (time_op captures its graph now, with this arity)
                sel_triton.TOPK_ARITY = a
                r = res["by_arity"][a]
                r["topk"].append(round(time_op(topk) - overhead, 2))
                r["selection"].append(round(time_op(selection) - overhead, 2))
                r["dsa_step"].append(round(time_graph(graphs[a].graph) - overhead, 2))
        for a in arities:
            r = res["by_arity"][a]
            print(f"{lay.case:>34} arity {a:2d}: top-K {min(r['topk']):6.2f}  selection {min(r['selection']):6.2f}  "
                  f"DSA step {min(r['dsa_step']):6.2f} us  (runs {r['topk']} / {r['selection']} / {r['dsa_step']})"
                  f"  equal {r['equal_to_bisection']}", flush=True)
        out["cases"].append(res)
        graphs.clear()
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "topk_arity.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
