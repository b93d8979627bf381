"""Where PRR's critical path goes on the GPU: kernel timelines of DSA and PRR graphs, and variants.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_overlap.py [--out DIR]
"""

import argparse
import json
import os

import torch

from prr.algo.predictor import HoltPredictor
from prr.algo.sparse import select
from prr.bench.common import graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.bench.layer import impose_hit_rate
from prr.bench.timeline import format_timeline, graph_timeline
from prr.runtime import LayerStep
from prr.timing import time_graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default="llama-3.1-8b:1:131072:quest,llama-3.1-8b:8:32768:quest")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overhead = graph_overhead_us()
    print(f"graph overhead {overhead:.1f} us")
    result = {}
    for spec in args.cases.split(","):
        model, b, ctx, method = spec.split(":")
        lay = RandomLayer.make(model, int(b), int(ctx), method)
        cfg, cache, meta, q = lay.cfg, lay.cache, lay.meta, lay.q
        hq, hkv = q.shape[1], cache.num_kv_heads
        sel = select(q, cache, meta)
        nmax = cache.max_blocks(cfg.block_size)
        res = result[lay.case] = {}

        def record(name, step, res=res, case=lay.case):
            med = time_graph(step.graph) - overhead
            tl = graph_timeline(step.graph)
            res[name] = {"net_us": round(med, 2), "timeline": tl}
            print(format_timeline(tl, f"{case} {name}: net {med:.1f} us"))

        dsa = LayerStep(cache, meta, hq, method="dsa")
        dsa.q.copy_(q)
        dsa.capture()
        record("dsa", dsa)
        pred = HoltPredictor(2, int(b), hkv, nmax, alpha=0.5, device="cuda")
        impose_hit_rate(pred, sel.indices, sel.counts, lay.nblk.cpu(), cfg, cfg.top_k, 0.8)
        # PRR's critical path with the selection's stream at high priority (the runtime's choice) and at normal.
        for name, prio in (("prr_path", None), ("prr_path_sel_normal_prio", 0)):
            step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=1.0,
                             mode="exact", tail=False, hold_prediction=True)
            step.q.copy_(q)
            if prio is not None:
                step.sel_stream = torch.cuda.Stream(priority=prio)
            step.capture()
            record(name, step)
        step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=1.0,
                         mode="exact", tail=True, hold_prediction=True)
        step.q.copy_(q)
        step.capture()
        record("prr_with_tail", step)
        del cache, meta, step, dsa
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "diag_overlap.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
