"""How many of S's slots each repair program should take: the exact and union repair timed at several splits.

Run on the GPU machine: PYTHONPATH=src python3 scripts/sweep_repair.py [--out DIR]
"""

import argparse
import json
import math
import os

import torch

from prr import ops
from prr.algo.sparse import select
from prr.bench.common import environment, graph_overhead_us
from prr.bench.kernels import RandomLayer, _replace_fraction
from prr.ops.merge.triton import merge_partials
from prr.ops.repair.triton import repair_launch
from prr.timing import time_op

CASES = [("llama-3.1-8b", 1, 32768, "quest"), ("llama-3.1-8b", 1, 131072, "infllm_v2"),
         ("llama-3.1-8b", 8, 32768, "quest"), ("llama-3.1-8b", 8, 32768, "infllm_v2"),
         ("glm-4-9b", 8, 131072, "quest"), ("glm-4-9b", 1, 131072, "quest")]


def sweep_case(model, b, ctx, method, overhead) -> list[dict]:
    rows = []
    lay = RandomLayer.make(model, b, ctx, method)
    cfg, cache, q = lay.cfg, lay.cache, lay.q
    sel = select(q, cache, lay.meta)
    gen = torch.Generator().manual_seed(0)
    p_idx, p_cnt = _replace_fraction(sel.indices, sel.counts, lay.nblk.cpu(), 0.2, (cfg.n_sink, cfg.n_local),
                                     gen)
    bo, blse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size)
    so, slse = ops.sparse_decode(q, cache, p_idx, p_cnt, cfg.block_size)
    scale = 1.0 / math.sqrt(q.shape[-1])
    ks = sel.indices.shape[-1]
    att = time_op(lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size)) - overhead
    ref = ops.repair_combine(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts, block_o=bo,
                             block_lse=blse)[0].float()
    for per in (4, 8, 16, 32):
        chunk = max(1, 64 // cfg.block_size)
        if per < chunk:
            continue
        splits = -(-ks // per)

        def exact(s=splits):
            o, lse = repair_launch(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts, bo, blse,
                                   scale, True, splits=s)
            return merge_partials(o, lse, out_dtype=q.dtype)

        def union(s=splits):
            o, lse = repair_launch(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts, None, None,
                                   scale, False, splits=s)
            return merge_partials(o, lse, so[:, :, None], slse[:, :, None], out_dtype=q.dtype)

        err = (exact()[0].float() - ref).abs().max().item()
        row = {"case": lay.case, "per": per, "splits": splits, "attention_us": round(att, 2),
               "repair_exact_us": round(time_op(exact) - overhead, 2),
               "repair_union_us": round(time_op(union) - overhead, 2), "max_abs_diff_vs_default": err}
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overhead = graph_overhead_us()
    rows = []
    for case in CASES:
        rows += sweep_case(*case, overhead)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "sweep_repair.json"), "w") as f:
        json.dump({"env": environment(), "overhead_us": overhead, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
