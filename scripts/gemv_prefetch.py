"""The GEMV kernels asking L2 for their weight rows before the dependent-launch wait
(``prr.ops.gemv.triton.PREFETCH``) against waiting first: a chain of Llama-3.1-8B's decode projections over
``--layers`` layers (each its own weights, so nothing is in L2 between replays), one CUDA graph, at 1 and 4 rows.

Run on the GPU machine: PYTHONPATH=src python3 scripts/gemv_prefetch.py --out DIR
Microseconds per replay (L2 flushed before each), alternated off/on ``--repeats`` times; the outputs of the two
are compared bit for bit; the floor is the weights' bytes at the measured copy bandwidth.
"""

import argparse
import json
import os

import torch

from prr.bench.common import copy_bandwidth_tbps, environment
from prr.ops import gemv
from prr.ops.gemv import triton as gt
from prr.timing import time_graph

# (N, K) of Llama-3.1-8B's decode projections: fused q/k/v, o, fused gate/up, down
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy = copy_bandwidth_tbps()
    ws = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for n, k in SHAPES] for _ in range(args.layers)]
    nbytes = sum(w.numel() * 2 for layer in ws for w in layer)
    out = {"env": environment(), "copy_tbps": copy, "layers": args.layers, "weight_bytes": nbytes,
           "floor_us": nbytes / (copy * 1e12) * 1e6, "rows": {}}
    for m in (int(r) for r in args.rows.split(",")):
        x0 = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)

        def chain(x0=x0):
            x = x0
            for wq, wo, wgu, wd in ws:
                h = gemv.linear(x, wq)[:, :4096].contiguous()
                h = gemv.linear(h, wo)
                g = gemv.linear(h, wgu)[:, :14336].contiguous()
                x = gemv.linear(g, wd)
            return x

        graphs, res = {}, {}
        for pf in (False, True):
            gt.PREFETCH = pf
            y = chain()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = chain()
            g.replay()
            torch.cuda.synchronize()
            graphs[pf] = (g, y.clone())
        same = bool(torch.equal(graphs[False][1], graphs[True][1]))
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for pf in (False, True):
                times[pf].append(round(time_graph(graphs[pf][0]), 2))
        res = {"prefetch_off_us": times[False], "prefetch_on_us": times[True], "equal": same,
               "speedup": round(min(times[False]) / min(times[True]), 4)}
        out["rows"][m] = res
        print(f"rows {m}: off {times[False]}  on {times[True]}  ({res['speedup']}x; floor {out['floor_us']:.1f} us)"
              f"  equal {same}", flush=True)
    gt.PREFETCH = True
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv_prefetch.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
