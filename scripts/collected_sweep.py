"""The collected top-K's held path across its knobs (GPU): threshold aim G x K, list capacity, ranking chunk,
warps; Llama-3.1-8B budget 2048 at 128K and 512K, batch 1 and 8, against the full top-K in the same run.

    PYTHONPATH=src python scripts/collected_sweep.py --out out/collected_sweep.json
"""

from __future__ import annotations

import argparse
import json

import torch

from prr import ops
from prr.bench.common import graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.algo.sparse import select
from prr.bench.topk import previous_query
from prr.ops.guessed import triton as gt
from prr.provenance import environment
from prr.timing import time_op


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/collected_sweep.json")
    ap.add_argument("--cases", default="1:131072,1:524288,8:131072")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, a small model: checks the script")
    a = ap.parse_args()
    global time_op
    if a.smoke:  # each op run once, timed as 1 us
        time_op = lambda fn: (fn(), 1.0)[1]  # noqa: E731
        over, model, dev, dtype = 0.0, "smollm2-135m", "cpu", torch.float32
    else:
        over, model, dev, dtype = graph_overhead_us(), "llama-3.1-8b", "cuda", torch.bfloat16
    res = {"env": environment(), "overhead_us": over, "rows": []}
    for c in a.cases.split(","):
        b, ctx = (int(x) for x in c.split(":"))
        lay = RandomLayer.make(model, b, ctx, "quest", budget=2048, device=dev, dtype=dtype)
        cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
        k, ns, nl = cfg.top_k, cfg.n_sink, cfg.n_local
        q_prev, _, _ = previous_query(lay)
        srt_prev = meta.scores(q_prev, cache).sort(-1, descending=True).values
        scores, gmax = meta.scores(q, cache, with_groups=True)
        t_full = time_op(lambda: ops.select_blocks(scores, nblk, k, ns, nl, group_max=gmax)) - over
        res["rows"].append({"case": lay.case, "op": "full", "net_us": round(t_full, 2)})
        t_score = time_op(lambda: meta.scores(q, cache, with_groups=True)) - over
        t_sel_full = time_op(lambda: select(q, cache, meta, nblk=nblk)) - over
        res["rows"].append({"case": lay.case, "op": "score", "net_us": round(t_score, 2)})
        res["rows"].append({"case": lay.case, "op": "selection_full", "net_us": round(t_sel_full, 2)})
        print(lay.case, "full", round(t_full, 2), "score", round(t_score, 2), "selection", round(t_sel_full, 2))
        for mult, cap in ((2, 512), (3, 512), (3, 1024)):
            tau = srt_prev[..., mult * k - 1].contiguous()
            col = torch.empty(*tau.shape, cap, dtype=torch.int64, device=dev)
            cnt = torch.zeros(tau.shape, dtype=torch.int32, device=dev)
            s2, g2 = meta.scores(q, cache, with_groups=True, collect=(tau, col, cnt))
            st = ops.select_blocks_collected(s2, nblk, k, ns, nl, tau=tau.clone(), collected=(col, cnt),
                                             guess_k=mult * k, group_max=g2, reset=False)[3]
            counted = cnt.flatten().tolist()
            extra = {}
            for name, c_fake in (("too_high", torch.zeros_like(cnt)), ("too_low", torch.full_like(cnt, cap + 1))):
                extra[name] = round(time_op(lambda c_fake=c_fake: ops.select_blocks_collected(
                    s2, nblk, k, ns, nl, tau=tau.clone(), collected=(col, c_fake), guess_k=mult * k, group_max=g2,
                    reset=False)) - over, 2)
            t_col, c_sel = tau.clone(), torch.zeros_like(cnt)

            def sel(t_col=t_col, c_sel=c_sel, mult=mult, col=col):
                s3, g3 = meta.scores(q, cache, with_groups=True, collect=(t_col, col, c_sel))
                return ops.select_blocks_collected(s3, nblk, k, ns, nl, tau=t_col, collected=(col, c_sel),
                                                   guess_k=mult * k, group_max=g3)

            extra["selection"] = round(time_op(sel) - over, 2)
            extra["selection_paths"] = sel()[3][1].flatten().tolist()  # (the threshold fed back by the replays)
            res["rows"].append({"case": lay.case, "op": "collected_paths", "g": mult, "cap": cap, **extra})
            print(lay.case, mult, cap, json.dumps(extra))
            for search, ch, warps in ((False, 16, 8), (False, 64, 8), (False, 16, 16), (True, 16, 8),
                                      (True, 16, 16)):
                gt.COLLECT_CHUNK, gt.COLLECT_WARPS, gt.COLLECT_SEARCH = ch, warps, search
                try:
                    us = time_op(lambda: ops.select_blocks_collected(
                        s2, nblk, k, ns, nl, tau=tau, collected=(col, cnt), guess_k=mult * k, group_max=g2,
                        reset=False)) - over
                finally:
                    gt.COLLECT_CHUNK, gt.COLLECT_WARPS, gt.COLLECT_SEARCH = 16, None, False
                row = {"case": lay.case, "op": "collected", "g": mult, "cap": cap, "search": search, "chunk": ch,
                       "warps": warps, "net_us": round(us, 2), "speedup": round(t_full / us, 3),
                       "paths": st[1].flatten().tolist(), "counted": counted}
                res["rows"].append(row)
                print(json.dumps({x: row[x] for x in ("case", "g", "cap", "search", "chunk", "warps", "net_us",
                                                      "speedup")}), "held", row["paths"].count(0), "/",
                      len(row["paths"]))
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        del lay, cache, meta
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
