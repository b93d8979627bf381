"""Where an amortized selection step goes (issue #12): kernel timelines of the host schedule's two step kinds.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_amortized.py --out DIR [--batches 1,8] [--setting 16x8]
Per batch (Llama-3.1-8B Quest, budget 2048, 512K, bf16): net microseconds of the full selection, of a scan
step and a re-score step of ``AmortizedSelector(schedule="host")`` (each captured in its own graph, as
``LayerStep`` captures them), of the scan's parts (full scores with and without the fused group maxima, the
top c·K with and without them), and the kernel timelines of both step kinds.
"""

import argparse
import json
import math
import os

import torch

from prr import ops
from prr.algo.amortized import AmortizedSelector
from prr.algo.sparse import select
from prr.bench.common import environment, graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.bench.timeline import format_timeline, graph_timeline
from prr.ops.select import triton as sk
from prr.runtime import LayerStep
from prr.timing import time_graph, time_op


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=524288)
    ap.add_argument("--setting", default="16x8", help="m x c")
    ap.add_argument("--parts-contexts", default="", help="extra contexts (tokens) timed for the top-K parts only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    m, c = args.setting.split("x")
    overhead = graph_overhead_us()
    res = {"env": environment(), "overhead_us": overhead, "setting": args.setting, "cases": {}}
    for b in map(int, args.batches.split(",")):
        for ctx in [args.context] + [int(x) for x in args.parts_contexts.split(",") if x]:
            res["cases"][f"b{b}/{ctx // 1024}K"] = run_case(b, ctx, int(m), float(c), overhead,
                                                            steps=ctx == args.context)
            torch.cuda.empty_cache()
            with open(os.path.join(args.out, "diag_amortized.json"), "w") as f:
                json.dump(res, f, indent=1)


def run_case(b: int, context: int, m: int, c: float, overhead: float, steps: bool = True) -> dict:
    lay = RandomLayer.make("llama-3.1-8b", b, context, "quest")
    cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    us, tls = {}, {}

    def t(name, fn):
        us[name] = round(time_op(fn) - overhead, 2)

    scan_k = math.ceil(c * cfg.top_k)
    t("selection", lambda: select(q, cache, meta))
    t("score", lambda: meta.scores(q, cache))
    t("score_groups", lambda: meta.scores(q, cache, with_groups=True))
    sc, gm = meta.scores(q, cache, with_groups=True)
    t("topk_K", lambda: ops.select_blocks(sc, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gm))
    t("topk_cK", lambda: ops.select_blocks(sc, nblk, scan_k, cfg.n_sink, cfg.n_local))
    t("topk_cK_groups", lambda: ops.select_blocks(sc, nblk, scan_k, cfg.n_sink, cfg.n_local, group_max=gm))
    for w in (4, 16, 32):  # the top-K program's warps (default: 4 up to 2048 keys a search, else 8)
        sk.TOPK_WARPS = w
        t(f"topk_K_w{w}", lambda: ops.select_blocks(sc, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gm))
        t(f"topk_cK_groups_w{w}", lambda: ops.select_blocks(sc, nblk, scan_k, cfg.n_sink, cfg.n_local,
                                                            group_max=gm))
    sk.TOPK_WARPS = None
    tag = f"b{b} {context // 1024}K"
    if not steps:
        print(tag, "  ".join(f"{k}={v}" for k, v in us.items()), flush=True)
        return {"us": us}
    sel = AmortizedSelector(meta, cache, every=m, factor=c, schedule="host")
    step = LayerStep(cache, meta, q.shape[1], method="dsa", amortized=sel)
    step.q.copy_(q)
    step.capture()
    sel.reset()
    for kind, (g, _out, _last) in step.kind_graphs.items():
        name = "scan_step" if kind else "rescore_step"
        us[name] = round(time_graph(g) - overhead, 2)
        tls[name] = graph_timeline(g)
        print(format_timeline(tls[name], f"{tag} {name} (DSA step with attention): net {us[name]:.1f} us"),
              flush=True)
    # The mean selection step of the host schedule (one scan, m - 1 re-scores), attention excluded
    s = select(q, cache, meta)
    att = us["attention"] = round(time_op(lambda: ops.sparse_decode(q, cache, s.indices, s.counts,
                                                                    cfg.block_size)) - overhead, 2)
    us["mean_selection_host"] = round((us["scan_step"] + (m - 1) * us["rescore_step"]) / m - att, 2)
    us["x_cheaper"] = round(us["selection"] / us["mean_selection_host"], 2)
    print(tag, "  ".join(f"{k}={v}" for k, v in us.items()), flush=True)
    return {"us": us, "timelines": tls}

if __name__ == "__main__":
    main()
