"""Where PRR's critical path goes on the GPU: kernel timelines of DSA and PRR graphs, and variants.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_overlap.py [--out DIR]
"""

import argparse
import json
import os

import torch

import prr.ops.attention.triton as attn_triton
from prr.algo.predictor import HoltPredictor
from prr.algo.sparse import select
from prr.bench.common import graph_overhead_us, time_graph
from prr.bench.kernels import RandomLayer
from prr.bench.layer import impose_hit_rate
from prr.bench.timeline import format_timeline, graph_timeline
from prr.runtime import LayerStep


def capture(step):
    snap = step._snapshot()
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(2):
            step._step()
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step.out = step._step()
    torch.cuda.synchronize()
    step._restore(snap)
    step.graph = g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default="llama-3.1-8b:1:131072:quest,llama-3.1-8b:8:32768:quest")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overhead = graph_overhead_us()
    print(f"graph overhead {overhead:.1f} us")
    result = {}
    orig_splits = attn_triton.num_splits
    for spec in args.cases.split(","):
        model, b, ctx, method = spec.split(":")
        lay = RandomLayer.make(model, int(b), int(ctx), method)
        cfg, cache, meta, q = lay.cfg, lay.cache, lay.meta, lay.q
        hq, hkv = q.shape[1], cache.num_kv_heads
        sel = select(q, cache, meta)
        nmax = -(-cache.capacity // cfg.block_size)
        res = result[lay.case] = {}

        def record(name, step, res=res, case=lay.case):
            med = time_graph(step.graph) - overhead
            tl = graph_timeline(step.graph)
            res[name] = {"net_us": round(med, 2), "timeline": tl}
            print(format_timeline(tl, f"{case} {name}: net {med:.1f} us"))

        dsa = LayerStep(cache, meta, hq, method="dsa")
        dsa.q.copy_(q)
        capture(dsa)
        record("dsa", dsa)
        pred = HoltPredictor(2, int(b), hkv, nmax, alpha=0.5, device="cuda")
        impose_hit_rate(pred, sel.indices, sel.counts, lay.nblk.cpu(), cfg, cfg.top_k, 0.8)
        variants = [("prr_path", None, None, True), ("prr_path_sel_normal_prio", 0, None, True)]
        for name, prio, cap, streams in variants:
            if cap is not None:
                attn_triton.num_splits = lambda bkv, slots, dev, chunk=4, c=cap: min(orig_splits(bkv, slots, dev,
                                                                                              chunk), c)
            try:
                step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=1.0,
                                 mode="exact", tail=False, hold_prediction=True, streams=streams)
                step.q.copy_(q)
                if prio is not None:  # the selection's stream at another priority
                    step.sel_stream = torch.cuda.Stream(priority=prio)
                capture(step)
                record(name, step)
            finally:
                attn_triton.num_splits = orig_splits
        step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=1.0,
                         mode="exact", tail=True, hold_prediction=True)
        step.q.copy_(q)
        capture(step)
        record("prr_with_tail", step)
        del cache, meta, step, dsa
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "diag_overlap.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
