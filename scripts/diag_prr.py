"""Where the DSA and PRR steps go: parts and kernel timelines, side by side, at any budget.

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_prr.py --out DIR [--cases model:b:ctx:method:budget,...]
Per case (bf16, one layer): net microseconds (graph replay minus the one-kernel graph overhead) of scoring,
top-K, selection, attention, speculation, the repair at a hit rate of 0.8 (exact and union), serialized DSA
and PRR's critical path (exact, union); with ``--timelines`` the kernel timelines of the DSA and PRR graphs.
(docs/experiments/diag_prr_onelaunch_h200.json is this script's output at commit 6e0f22e, whose one-launch repair with
the merge by the last split measured 2-4x slower than the split kernel + merge kernel and was reverted.)
"""

import argparse
import json
import os

import torch

from prr import ops
from prr.algo.predictor import HoltPredictor
from prr.algo.sparse import select
from prr.bench.common import environment, graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.bench.layer import impose_hit_rate
from prr.bench.timeline import format_timeline, graph_timeline
from prr.runtime import LayerStep, StepProbe
from prr.timing import time_graph, time_op

CASES = ("llama-3.1-8b:1:131072:quest:2048,llama-3.1-8b:1:32768:quest:8192,llama-3.1-8b:1:131072:quest:8192,"
         "llama-3.1-8b:4:131072:quest:8192,glm-4-9b:1:131072:quest:8192,llama-3.1-8b:8:32768:quest:2048")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--timelines", type=int, default=0, help="kernel timelines for the first N cases")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overhead = graph_overhead_us()
    print(f"graph overhead {overhead:.1f} us", flush=True)
    result = {"env": environment(), "overhead_us": overhead, "cases": {}}
    for i, spec in enumerate(args.cases.split(",")):
        case, res = run_case(spec, overhead, i < args.timelines)
        result["cases"][case] = res
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "diag_prr.json"), "w") as f:
            json.dump(result, f, indent=1)


def run_case(spec: str, overhead: float, timelines: bool):
    model, b, ctx, method, budget = spec.split(":")
    lay = RandomLayer.make(model, int(b), int(ctx), method, budget=int(budget))
    cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hq, hkv, bs = q.shape[1], cache.num_kv_heads, cfg.block_size
    sel = select(q, cache, meta)
    res = {"us": {}}
    us = res["us"]

    def t(name, fn):
        us[name] = round(time_op(fn) - overhead, 2)

    def tg(name, step):
        step.capture()
        us[name] = round(time_graph(step.graph) - overhead, 2)
        if timelines:
            tl = graph_timeline(step.graph)
            res.setdefault("timelines", {})[name] = tl
            print(format_timeline(tl, f"{lay.case} {name}: net {us[name]:.1f} us"), flush=True)

    # P with 80% of S's dynamic blocks (K' = K).
    nmax = cache.max_blocks(bs)
    pred = HoltPredictor(2, int(b), hkv, nmax, alpha=0.5, device="cuda")
    impose_hit_rate(pred, sel.indices, sel.counts, nblk.cpu(), cfg, cfg.top_k, 0.8)
    p_idx, p_cnt = ops.select_blocks(pred.predict(0).clone(), nblk, cfg.top_k, cfg.n_sink, cfg.n_local)
    bo, blse = ops.block_states(q, cache, p_idx, p_cnt, bs)
    so, slse = ops.sparse_decode(q, cache, p_idx, p_cnt, bs)
    s_idx, s_cnt = sel.indices, sel.counts
    # parts
    t("score", lambda: meta.scores(q, cache))
    sc = meta.scores(q, cache)
    t("topk", lambda: ops.select_blocks(sc, nblk, cfg.top_k, cfg.n_sink, cfg.n_local))
    t("selection", lambda: select(q, cache, meta))
    t("attention_split", lambda: ops.sparse_decode(q, cache, s_idx, s_cnt, bs))
    t("speculate", lambda: ops.block_states(q, cache, p_idx, p_cnt, bs))
    t("repair_exact", lambda: ops.repair_combine(q, cache, bs, p_idx, p_cnt, s_idx, s_cnt, block_o=bo,
                                                  block_lse=blse))
    t("repair_union", lambda: ops.repair_combine(q, cache, bs, p_idx, p_cnt, s_idx, s_cnt, spec_o=so,
                                                  spec_lse=slse, mode="union"))
    from prr.ops.attention.triton import sparse_decode_launch
    from prr.ops.repair.triton import repair_launch

    (a_so, a_slse), _ = sparse_decode_launch(q, cache, s_idx, s_cnt, bs, q.shape[-1] ** -0.5)
    t("merge_of_attention_splits", lambda: ops.merge.triton.merge_partials(a_so, a_slse, out_dtype=q.dtype))
    us["attention_splits"] = a_so.shape[2]
    from prr.ops.merge import triton as merge_kernels

    if hasattr(merge_kernels, "MERGE_BLOCK_N"):  # parts per pass of the merge (16: the old rule)
        default_n = merge_kernels.MERGE_BLOCK_N
        for n in (16, 32, 64, 128):
            merge_kernels.MERGE_BLOCK_N = n
            t(f"merge_block{n}", lambda: ops.merge.triton.merge_partials(a_so, a_slse, out_dtype=q.dtype))
        merge_kernels.MERGE_BLOCK_N = default_n
    t("attention_splits_only", lambda: sparse_decode_launch(q, cache, s_idx, s_cnt, bs, q.shape[-1] ** -0.5))

    ks = s_idx.shape[-1]
    for per in (4, 8, 16, 32):  # S slots per repair program (the default rule picks one of these)
        splits = -(-ks // per)
        t(f"repair_exact_per{per}", lambda sp=splits: ops.merge.triton.merge_partials(*repair_launch(
            q, cache, bs, p_idx, p_cnt, s_idx, s_cnt, bo, blse, q.shape[-1] ** -0.5, True, splits=sp),
            out_dtype=q.dtype))
    dsa = LayerStep(cache, meta, hq, method="dsa")
    dsa.q.copy_(q)
    tg("dsa", dsa)
    for mode in ("exact", "union"):
        step = LayerStep(cache, meta, hq, method="prr", predictor=pred, ratio=1.0, mode=mode, topk="full",
                         probe=StepProbe(update_layer=1, tail=False, hold_prediction=True))
        step.q.copy_(q)
        tg(f"prr_{mode}", step)
    best_dsa, best_prr = us["dsa"], us["prr_exact"]
    res["speedup_exact"] = round(best_dsa / best_prr, 3)
    print(lay.case, flush=True)
    print("  " + "  ".join(f"{k}={v}" for k, v in us.items()), flush=True)
    print(f"  best DSA {best_dsa}  best PRR exact {best_prr}  -> {res['speedup_exact']}x", flush=True)
    return lay.case, res


if __name__ == "__main__":
    main()
