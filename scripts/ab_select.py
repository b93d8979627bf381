"""Selection kernels of whichever ``prr`` is on PYTHONPATH, timed on a GPU (CUDA graph per op, L2 flushed):
score, top-K, the whole selection, the sparse attention and the DSA layer step, for the layer shapes of the
issues' targets. Run it once per source tree in one device call for a side-by-side A/B; with
``--sweep all`` it also times the Quest scoring tile (blocks per program x warps) and the top-K's warps.

    PYTHONPATH=src python3 scripts/ab_select.py --label new --sweep topk --out $OUT/ab_select_new.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import triton

from prr import ops
from prr.algo.sparse import select
from prr.bench.kernels import RandomLayer
from prr.timing import time_op

CASES = [("llama-3.1-8b", 1, 131072), ("llama-3.1-8b", 1, 524288), ("llama-3.1-8b", 8, 524288),
         ("glm-4-9b", 1, 1048576), ("glm-4-9b", 4, 524288)]


def _scores_and_groups(meta, q, cache):
    try:
        return meta.scores(q, cache, with_groups=True)
    except TypeError:  # a tree without the fused group maxima
        return meta.scores(q, cache), None


def bench_case(model: str, batch: int, ctx: int, label: str, sweep: str, rows: list) -> None:
    lay = RandomLayer.make(model, batch, ctx, "quest")
    cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    scores, gmax = _scores_and_groups(meta, q, cache)
    sel = select(q, cache, meta)
    case = f"{model}/b{batch}/{ctx // 1024}K"

    def add(op, fn, **knobs):
        us = time_op(fn)
        rows.append({"case": case, "op": op, "us": round(us, 2), **knobs})
        print(f"{label:5s} {case:24s} {op:22s} {us:8.2f} us {knobs if knobs else ''}", flush=True)

    def topk(**kw):
        return ops.select_blocks(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, **kw)

    def dsa():
        s = select(q, cache, meta, nblk=nblk)
        return ops.sparse_decode(q, cache, s.indices, s.counts, cfg.block_size)

    add("score", lambda: meta.scores(q, cache))
    add("topk_with_group_pass", topk)
    if gmax is not None:
        add("topk_given_groups", lambda: topk(group_max=gmax))
    add("selection", lambda: select(q, cache, meta, nblk=nblk))
    add("sparse_decode", lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size))
    add("dsa_step", dsa)
    if sweep == "none":
        return
    from prr.ops.scoring import triton as sc
    from prr.ops.select import triton as st

    keep = (sc.QUEST_BLOCK_N, sc.QUEST_WARPS, st.TOPK_WARPS)
    try:
        for bn in (32, 64, 128) if sweep == "all" else ():
            for w in (2, 4, 8):
                sc.QUEST_BLOCK_N, sc.QUEST_WARPS = bn, w
                add("score", lambda: meta.scores(q, cache, with_groups=True), block_n=bn, warps=w)
        sc.QUEST_BLOCK_N, sc.QUEST_WARPS = keep[0], keep[1]
        for w in (2, 4, 8, 16):
            st.TOPK_WARPS = w
            add("topk_given_groups", lambda: topk(group_max=gmax), warps=w)
    finally:
        sc.QUEST_BLOCK_N, sc.QUEST_WARPS, st.TOPK_WARPS = keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", choices=("none", "topk", "all"), default="none",
                    help="also time the top-K's warps (topk) and the Quest scoring tile (all)")
    args = ap.parse_args()
    rows: list = []
    for model, batch, ctx in CASES:
        bench_case(model, batch, ctx, args.label, args.sweep, rows)
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "commit": os.environ.get("PRR_COMMIT", "unknown"),
           "label": args.label}
    with open(args.out, "w") as f:
        json.dump({"bench": "ab_select", "env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
