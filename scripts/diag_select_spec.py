"""Issue #10's one-launch selection + speculation, measured against the split kernels (H200 diagnostic).

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_select_spec.py --out DIR [--cases ...] [--timelines N]
Per case (bf16, one layer, P with 80% of S's dynamic blocks, K' = K), net microseconds (graph replay minus the
one-kernel graph overhead):
- parts: the scorer, the top-K, both (DSA's selection), the one-launch selection (score + top-K tail), the
  speculation alone, the one-launch selection + speculation (speculation programs first or last), DSA's
  attention, PRR's repair;
- steps, each one CUDA graph: DSA as today (score, top-K, attention + merge); DSA with the one-launch selection;
  PRR exact as today (selection and speculation on two streams, then repair + merge); PRR exact with the one-launch
  selection + speculation (one stream: launch, repair, merge), speculation first and last;
- checks: the one-launch S equals the split S; PRR's one-launch output equals its split output bit for bit.
With ``--timelines N`` the kernel timelines of the steps of the first N cases.
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
from prr.ops.select_spec import triton as ss
from prr.runtime import LayerStep
from prr.timing import capture, time_graph, time_op

CASES = ("llama-3.1-8b:1:131072:2048,llama-3.1-8b:1:32768:8192,llama-3.1-8b:1:131072:8192,"
         "glm-4-9b:1:32768:8192,glm-4-9b:1:131072:2048,llama-3.1-8b:4:131072:2048,llama-3.1-8b:1:524288:2048")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--timelines", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also sweep BLOCK_N x warps of the one-launch kernel")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overhead = graph_overhead_us()
    print(f"graph overhead {overhead:.1f} us", flush=True)
    result = {"env": environment(), "overhead_us": overhead, "cases": {}}
    for i, spec in enumerate(args.cases.split(",")):
        case, res = run_case(spec, overhead, i < args.timelines, args.sweep and i == 0)
        result["cases"][case] = res
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "diag_select_spec.json"), "w") as f:
            json.dump(result, f, indent=1)


def run_case(spec, overhead, timelines, sweep):
    model, b, ctx, budget = spec.split(":")
    lay = RandomLayer.make(model, int(b), int(ctx), "quest", budget=int(budget))
    cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hq, hkv, bs = q.shape[1], cache.num_kv_heads, cfg.block_size
    rows = q.shape[0] * hkv
    sel = select(q, cache, meta)
    nmax = cache.max_blocks(bs)
    pred = HoltPredictor(2, int(b), hkv, nmax, alpha=0.5, device="cuda")
    impose_hit_rate(pred, sel.indices, sel.counts, nblk.cpu(), cfg, cfg.top_k, 0.8)
    p_idx, p_cnt = ops.select_blocks(pred.predict(0).clone(), nblk, cfg.top_k, cfg.n_sink, cfg.n_local)
    bo, blse = ops.block_states(q, cache, p_idx, p_cnt, bs)
    buf = ss.SelectSpecBuffers(rows, cfg.top_k, nmax, q.device)
    res = {"us": {}, "checks": {}}
    us = res["us"]

    def fused(spec_first=None):
        p = {} if spec_first is None else {"p_idx": p_idx, "p_cnt": p_cnt, "spec_first": spec_first}
        return ss.select_speculate(q, meta.kmin, meta.kmax, cache, bs, cfg.top_k, cfg.n_sink, cfg.n_local, nblk,
                                   aggregate=cfg.aggregate, buffers=buf, **p)

    def t(name, fn):
        us[name] = round(time_op(fn) - overhead, 2)

    def tg(name, graph):
        us[name] = round(time_graph(graph) - overhead, 2)
        if timelines:
            tl = graph_timeline(graph)
            res.setdefault("timelines", {})[name] = tl
            print(format_timeline(tl, f"{lay.case} {name}: net {us[name]:.1f} us"), flush=True)

    # checks
    f0 = fused()
    res["checks"]["select_equal"] = bool(torch.equal(f0[1], sel.indices) and torch.equal(f0[2], sel.counts))
    f1 = fused(True)
    res["checks"]["states_equal"] = bool(torch.equal(f1[4], blse) and torch.equal(
        torch.nan_to_num(f1[3]), torch.nan_to_num(bo)))
    o_split = ops.repair_combine(q, cache, bs, p_idx, p_cnt, sel.indices, sel.counts, block_o=bo, block_lse=blse)[0]
    o_fused = ops.repair_combine(q, cache, bs, p_idx, p_cnt, f1[1], f1[2], block_o=f1[3], block_lse=f1[4])[0]
    res["checks"]["prr_output_equal"] = bool(torch.equal(o_split, o_fused))
    o_dsa = ops.sparse_decode(q, cache, sel.indices, sel.counts, bs)[0]
    res["checks"]["prr_vs_dsa_rel"] = float((o_fused.float() - o_dsa.float()).norm() / o_dsa.float().norm())
    print(lay.case, res["checks"], flush=True)

    # parts
    t("score", lambda: meta.scores(q, cache, with_groups=True))
    sc, gm = meta.scores(q, cache, with_groups=True)
    t("topk", lambda: ops.select_blocks(sc, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gm))
    t("selection", lambda: select(q, cache, meta, nblk=nblk))
    t("fused_select", lambda: fused())
    t("speculate", lambda: ops.block_states(q, cache, p_idx, p_cnt, bs))
    t("fused_select_spec_first", lambda: fused(True))
    t("fused_select_spec_last", lambda: fused(False))
    t("attention", lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, bs))
    t("repair_exact", lambda: ops.repair_combine(q, cache, bs, p_idx, p_cnt, sel.indices, sel.counts, block_o=bo,
                                                  block_lse=blse))
    if sweep:
        for bn in (64, 128, 256):
            for w in (4, 8):
                ss.SELECT_SPEC_BLOCK_N, ss.SELECT_SPEC_WARPS = bn, w
                try:
                    t(f"fused_select_bn{bn}_w{w}", lambda: fused())
                    t(f"fused_select_spec_first_bn{bn}_w{w}", lambda: fused(True))
                except Exception as e:  # a tile too large for the SM: record and go on
                    us[f"fused_select_bn{bn}_w{w}"] = repr(e)[:120]
        ss.SELECT_SPEC_BLOCK_N, ss.SELECT_SPEC_WARPS = 64, None

    # steps
    def dsa_fused():
        _, idx, cnt, _, _ = fused()
        return ops.sparse_decode(q, cache, idx, cnt, bs)

    def prr_fused(first):
        def fn():
            _, idx, cnt, o_b, l_b = fused(first)
            return ops.repair_combine(q, cache, bs, p_idx, p_cnt, idx, cnt, block_o=o_b, block_lse=l_b)
        return fn

    dsa = LayerStep(cache, meta, hq, method="dsa")
    dsa.q.copy_(q)
    dsa.capture()
    tg("dsa", dsa.graph)
    tg("dsa_fused", capture(dsa_fused))
    step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=1.0, mode="exact",
                     tail=False, hold_prediction=True)
    step.q.copy_(q)
    step.capture()
    tg("prr_exact", step.graph)
    tg("prr_fused_first", capture(prr_fused(True)))
    tg("prr_fused_last", capture(prr_fused(False)))
    best_prr = min(us["prr_fused_first"], us["prr_fused_last"])
    res["ratios"] = {"prr_exact/dsa": round(us["dsa"] / us["prr_exact"], 3),
                     "prr_fused/dsa": round(us["dsa"] / best_prr, 3),
                     "prr_fused/dsa_fused": round(us["dsa_fused"] / best_prr, 3)}
    print("  " + "  ".join(f"{k}={v}" for k, v in us.items()), flush=True)
    print("  ", res["ratios"], flush=True)
    return lay.case, res


if __name__ == "__main__":
    main()
