"""The top-K program holding its SM alone, at one layer step: PRR's speculation beside the top-K
(``overlap="topk"``) shares the top-K's SMs today, and the latency-bound search stretches with every warp beside
it. Here the top-K kernels (full and guessed) ask for all the shared memory an SM has, so no other program can
be resident on the SMs they run on, while they stay on the selection's stream (dependent launch kept).

Variants, each on DSA and on PRR (exact and union, on the full and on the guessed top-K, K' = K):
``default`` (today), ``w32`` (the top-K at 32 warps: its registers alone may fill the SM), ``reserve`` (the
top-K's launch asks for the device's whole opt-in shared memory). The reservation patches Triton's compiled
kernels (their launch metadata), so the reserve variants are captured last; graphs keep the launch parameters
they were captured with.

Run on the GPU machine: PYTHONPATH=src python3 scripts/topk_reserve.py --out DIR [--case model:b:ctx:budget]
Per variant: graph replay microseconds (net of the one-kernel graph overhead), the top-K kernel's and the
speculation's durations and the top-K's end from the kernel timeline, and whether the output equals the default
variant's bit for bit.
"""

import argparse
import json
import os
import traceback

import torch

from prr.algo.step import StepCounts
from prr.bench.common import environment, graph_overhead_us
from prr.bench.kernels import RandomLayer
from prr.bench.timeline import graph_timeline
from prr.bench.topk import previous_query
from prr.ops.guessed import triton as guessed_triton
from prr.ops.select import triton as select_triton
from prr.runtime import LayerStep, StepProbe
from prr.timing import time_graph

TOPK_NAMES = ("_topk_kernel", "_guessed_topk_kernel")
SPEC_NAMES = ("_sparse_decode_kernel", "_block_states_kernel")


def compiled(jit_fn):
    """Every compiled specialization of a Triton JIT function, on every device."""
    for entry in jit_fn.device_caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        yield from cache.values()


def reserve_shared(jit_fn, nbytes: int) -> list:
    """Make every compiled specialization of ``jit_fn`` launch with ``nbytes`` of dynamic shared memory (reloaded,
    so the driver lets it ask for more than 48 KB). Returns ``[(name, shared before)]``."""
    done = []
    for ck in list(compiled(jit_fn)):
        before = ck.metadata.shared
        if before >= nbytes:
            continue
        ck.metadata = ck.metadata._replace(shared=nbytes)
        packed = list(ck.packed_metadata)
        packed[2] = nbytes  # (num_warps, num_ctas, shared, ...)
        ck.packed_metadata = tuple(packed)
        ck.module = None  # (the old module stays loaded: an experiment's leak)
        for attr in ("_run", "run", "function"):
            if attr in ck.__dict__:
                setattr(ck, attr, None)
        ck._init_handles()
        done.append((ck.metadata.name, before))
    return done


def kernel_us(tl, keys):
    return round(sum(r["dur_us"] for r in tl if any(k in r["name"] for k in keys)), 2)


def kernel_end(tl, keys):
    ends = [r["end_us"] for r in tl if any(k in r["name"] for k in keys)]
    return round(max(ends), 2) if ends else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--case", default="llama-3.1-8b:1:131072:2048")
    args = ap.parse_args()
    model, b, ctx, budget = args.case.split(":")
    lay = RandomLayer.make(model, int(b), int(ctx), "quest", budget=int(budget))
    cache, meta, q, cfg = lay.cache, lay.meta, lay.q, lay.cfg
    hq, hkv = q.shape[1], cache.num_kv_heads
    props = torch.cuda.get_device_properties(q.device)
    optin = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    overhead = graph_overhead_us()
    counts = StepCounts.of(cache.seq_lens, cfg, hkv)
    _, prev, sigma = previous_query(lay)
    out = {"env": environment(), "case": args.case, "sms": props.multi_processor_count, "topk_programs": int(b) * hkv,
           "smem_optin": optin, "sigma": sigma, "overhead_us": overhead, "rows": []}
    print(f"{args.case}: top-K programs {int(b) * hkv}, opt-in shared memory {optin} B, graph overhead "
          f"{overhead:.2f} us", flush=True)
    base = {}

    def record(name, step, key):
        row = {"variant": name}
        try:
            step.q.copy_(q)
            step.capture()
            us = time_graph(step.graph) - overhead
            tl = graph_timeline(step.graph)
            step.replay()
            torch.cuda.synchronize()
            row.update(net_us=round(us, 2), topk_us=kernel_us(tl, TOPK_NAMES), topk_end_us=kernel_end(tl, TOPK_NAMES),
                       spec_us=kernel_us(tl, SPEC_NAMES), end_us=round(max(r["end_us"] for r in tl), 2), timeline=tl)
            o = step.out[0].clone()
            if key in base:
                row["equal_to_default"] = bool(torch.equal(o, base[key]))
            else:
                base[key] = o
        except Exception as e:  # a variant that cannot run is reported, the others still run
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        print({k: v for k, v in row.items() if k not in ("timeline", "trace")}, flush=True)
        out["rows"].append(row)

    def steps(tag):
        yield f"dsa_{tag}", "dsa", LayerStep(cache, meta, hq, method="dsa", counts=counts)
        for topk in ("full", "guessed"):
            for mode in ("union", "exact"):
                st = LayerStep(cache, meta, hq, method="prr", ratio=1.0, mode=mode, counts=counts, overlap="topk",
                               topk=topk, probe=StepProbe(tail=False, hold_prediction=True))
                st.seed(prev)
                yield f"{mode}_{topk}_{tag}", f"{mode}_{topk}", st

    for name, key, st in steps("default"):
        record(name, st, key)
    select_triton.TOPK_WARPS = guessed_triton.TOPK_WARPS = 32
    for name, key, st in steps("w32"):
        record(name, st, key)
    select_triton.TOPK_WARPS = guessed_triton.TOPK_WARPS = None
    out["reserved"] = [reserve_shared(select_triton._topk_kernel, optin),
                       reserve_shared(guessed_triton._guessed_topk_kernel, optin)]
    print("reserved:", out["reserved"], flush=True)
    for name, key, st in steps("reserve"):
        record(name, st, key)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"topk_reserve_{model}_{ctx}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    for r in out["rows"]:
        if "net_us" in r:
            print(f"{r['variant']:>22}  {r['net_us']:7.2f} us  top-K {r['topk_us']:6.2f} (ends {r['topk_end_us']})"
                  f"  spec {r['spec_us']:6.2f}" + (f"  equal {r['equal_to_default']}" if "equal_to_default" in r
                                                   else ""))


if __name__ == "__main__":
    main()
