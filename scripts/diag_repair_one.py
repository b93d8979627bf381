"""The repair as one program per (sequence, KV head) writing the output (no merge launch) against the split
repair + merge kernel, alone and inside PRR's layer step (H200 diagnostic).

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_repair_one.py --out DIR [--cases ...]
Per case (bf16, one layer, block counts shared as in a model) and speculation ratio (K' = K at hit 0.80,
K' = 1.5K at hit 0.94: the real-trace rates), net µs: the repair (exact, union) both ways; serialized DSA; PRR's
critical path (exact, union) both ways; and the largest difference between the two ways' outputs.
"""

import argparse
import json
import os

import torch

from prr import ops
from prr.algo.predictor import HoltPredictor
from prr.algo.sparse import select
from prr.algo.step import StepCounts, speculative_top_k
from prr.bench.common import environment, graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.bench.layer import impose_hit_rate
from prr.ops.repair import triton as rk
from prr.runtime import LayerStep
from prr.timing import time_graph, time_op

CASES = ("llama-3.1-8b:1:131072:2048,llama-3.1-8b:1:32768:2048,llama-3.1-8b:1:524288:2048,"
         "glm-4-9b:1:131072:2048,llama-3.1-8b:1:131072:4096,llama-3.1-8b:1:131072:8192,"
         "llama-3.1-8b:4:131072:2048,llama-3.1-8b:8:131072:2048,glm-4-9b:4:131072:2048")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overhead = graph_overhead_us()
    result = {"env": environment(), "overhead_us": overhead, "cases": {}}
    for spec in args.cases.split(","):
        case, res = run_case(spec, overhead)
        result["cases"][case] = res
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "diag_repair_one.json"), "w") as f:
            json.dump(result, f, indent=1)


def run_case(spec, overhead):
    model, b, ctx, budget = spec.split(":")
    lay = RandomLayer.make(model, int(b), int(ctx), "quest", budget=int(budget))
    cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hq, hkv, bs = q.shape[1], cache.num_kv_heads, cfg.block_size
    counts = StepCounts.of(cache.seq_lens, cfg, hkv)
    sel = select(q, cache, meta)
    nmax = cache.max_blocks(bs)
    res = {}
    dsa = LayerStep(cache, meta, hq, method="dsa", counts=counts)
    dsa.q.copy_(q)
    dsa.capture()
    res["dsa"] = round(time_graph(dsa.graph) - overhead, 2)
    res["attention"] = round(time_op(lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, bs)) - overhead, 2)
    for ratio, hit in ((1.0, 0.80), (1.5, 0.94)):
        spec_k = speculative_top_k(cfg.top_k, ratio)
        pred = HoltPredictor(2, int(b), hkv, nmax, alpha=0.5, device="cuda")
        impose_hit_rate(pred, sel.indices, sel.counts, nblk.cpu(), cfg, spec_k, hit)
        p_idx, p_cnt = ops.select_blocks(pred.predict(0).clone(), nblk, spec_k, cfg.n_sink, cfg.n_local)
        bo, blse = ops.block_states(q, cache, p_idx, p_cnt, bs)
        so, slse = ops.sparse_decode(q, cache, p_idx, p_cnt, bs)
        r = res[f"r{ratio:g}"] = {}
        outs = {}
        for way in ("never", "always"):
            rk.REPAIR_ONE_PROGRAM = way
            specs = (("exact", {"block_o": bo, "block_lse": blse}), ("union", {"spec_o": so, "spec_lse": slse}))
            for mode, kw in specs:
                def fn(kw=kw, mode=mode, p_idx=p_idx, p_cnt=p_cnt):
                    return ops.repair_combine(q, cache, bs, p_idx, p_cnt, sel.indices, sel.counts, mode=mode, **kw)

                outs[(way, mode)] = fn()[0].float()
                r[f"repair_{mode}_{way}"] = round(time_op(fn) - overhead, 2)
                step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=ratio,
                                 mode=mode, tail=False, hold_prediction=True, counts=counts)
                step.q.copy_(q)
                step.capture()
                r[f"prr_{mode}_{way}"] = round(time_graph(step.graph) - overhead, 2)
        rk.REPAIR_ONE_PROGRAM = "never"
        for mode in ("exact", "union"):
            a, c = outs[("never", mode)], outs[("always", mode)]
            r[f"rel_diff_{mode}"] = float((a - c).norm() / a.norm())
            r[f"speedup_{mode}_one"] = round(res["dsa"] / r[f"prr_{mode}_always"], 3)
            r[f"speedup_{mode}_split"] = round(res["dsa"] / r[f"prr_{mode}_never"], 3)
    print(lay.case, json.dumps(res), flush=True)
    return lay.case, res


if __name__ == "__main__":
    main()
