"""The Quest scorer, one tile per program (today) against a loop over several tiles per program whose loads the
compiler pipelines (``prr.ops.scoring.triton.QUEST_TILES`` / ``QUEST_STAGES``), over tile sizes and warps: the
scores with the top-K's group maxima (what the selection launches), then the selection and DSA's layer step at
the best configuration per case; outputs compared with today's bit for bit.

Run on the GPU machine: PYTHONPATH=src python3 scripts/scorer_sweep.py --out DIR
Microseconds net of the one-kernel graph overhead, L2 flushed before each replay; the floor is the metadata's
bytes at the measured copy bandwidth.
"""

import argparse
import json
import os

import torch

from prr.algo.sparse import select
from prr.algo.step import StepCounts
from prr.bench.common import copy_bandwidth_tbps, environment, graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.ops.scoring import triton as sc
from prr.runtime import LayerStep
from prr.timing import time_graph, time_op

CASES = ["llama-3.1-8b:1:131072", "glm-4-9b:1:524288", "llama-3.1-8b:1:524288", "llama-3.1-8b:8:131072"]
# (tiles per program, pipeline stages, blocks per tile, warps); the first is today's kernel
CONFIGS = [(1, 1, 64, 2), (2, 2, 64, 2), (4, 2, 64, 2), (4, 3, 64, 2), (8, 3, 64, 2), (16, 3, 64, 2),
           (4, 3, 64, 4), (8, 4, 64, 4), (4, 3, 32, 2), (8, 3, 32, 2), (16, 4, 32, 2), (8, 2, 128, 4)]


def configure(c):
    sc.QUEST_TILES, sc.QUEST_STAGES, sc.QUEST_BLOCK_N, sc.QUEST_WARPS = c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    overhead = graph_overhead_us()
    copy = copy_bandwidth_tbps()
    out = {"env": environment(), "overhead_us": overhead, "copy_tbps": copy, "configs": CONFIGS, "cases": []}
    for case in args.cases.split(","):
        model, b, ctx = case.split(":")
        lay = RandomLayer.make(model, int(b), int(ctx), "quest", budget=2048)
        cache, meta, q = lay.cache, lay.meta, lay.q
        nbytes = 2 * meta.kmin.numel() * meta.kmin.element_size()
        floor = nbytes / (copy * 1e12) * 1e6
        res = {"case": lay.case, "bytes": nbytes, "floor_us": round(floor, 2), "scores": {}}
        ref = None

        def scores(lay=lay):
            return lay.meta.scores(lay.q, lay.cache, with_groups=True)

        for c in CONFIGS:
            configure(c)
            key = "x".join(map(str, c))
            try:
                s, g = scores()
                torch.cuda.synchronize()
                same = None
                if ref is None:
                    ref = (s.clone(), g.clone())
                else:
                    same = bool(torch.equal(s, ref[0]) and torch.equal(g, ref[1]))
                us = [round(time_op(scores) - overhead, 2) for _ in range(2)]
                res["scores"][key] = {"us": us, "equal_to_today": same}
                print(f"{lay.case:>30} tiles {c[0]:2d} stages {c[1]} block_n {c[2]:3d} warps {c[3]}: {min(us):7.2f} us "
                      f"({min(us) / floor:.2f}x floor {floor:.2f})  equal {same}", flush=True)
            except Exception as e:  # a configuration that does not compile or fit is reported, the rest still run
                res["scores"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"{lay.case:>30} {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        ok = {k: min(v["us"]) for k, v in res["scores"].items() if "us" in v}
        best = min(ok, key=ok.get)
        res["best"] = best
        counts = StepCounts.of(cache.seq_lens, lay.cfg, cache.num_kv_heads)
        for tag, cfg in (("today", CONFIGS[0]), ("best", tuple(int(x) for x in best.split("x")))):
            configure(cfg)
            step = LayerStep(cache, meta, q.shape[1], method="dsa", counts=counts)
            step.q.copy_(q)
            step.capture()
            sel = [round(time_op(lambda lay=lay: select(lay.q, lay.cache, lay.meta, nblk=lay.nblk)) - overhead, 2)
                   for _ in range(2)]
            dsa = [round(time_graph(step.graph) - overhead, 2) for _ in range(2)]
            res[tag] = {"config": cfg, "selection_us": sel, "dsa_step_us": dsa}
            print(f"{lay.case:>30} {tag} {cfg}: selection {min(sel):7.2f}  DSA step {min(dsa):7.2f} us", flush=True)
        configure(CONFIGS[0])
        out["cases"].append(res)
        del step
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scorer_sweep.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
