"""Keeping PRR's speculation off the top-K's SMs, at one layer step (PRR on the full top-K, K' = K, P the
previous step's S, speculation beside the top-K): as it runs today (``overlap="topk"``); with the speculation's
grid capped to the SMs the top-K leaves idle; with the speculation's stream in a PyTorch green context (the
speculation confined, the top-K free to land anywhere); and with ``overlap="partition"`` (the top-K and the
speculation on disjoint SM groups, :mod:`prr.runtime.partition`) at two group sizes.

Run on the GPU machine: PYTHONPATH=src python3 scripts/sm_partition.py --out DIR [--case model:b:ctx:budget]
Per variant, exact and union: graph replay microseconds (net of the one-kernel graph overhead), the top-K
kernel's and the speculation's durations from the kernel timeline, and whether the output equals the default
placement's bit for bit (the same kernels and grid on other SMs must give the same bits). DSA is timed in the
same run. A variant whose green context or graph capture fails is reported with its error, not dropped.
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
from prr.runtime import LayerStep, StepProbe
from prr.runtime.layer import StepStreams
from prr.runtime.partition import PartitionUnavailable, partition_streams
from prr.timing import time_graph


def green_stream(num_sms: int):
    """A stream whose kernels run on a green context of ``num_sms`` SMs, and what the torch build offered."""
    from torch.cuda.green_contexts import GreenContext

    dev = torch.cuda.current_device()
    try:
        gc = GreenContext.create(num_sms=num_sms, device_id=dev)
    except TypeError:
        gc = GreenContext.create(num_sms, dev)
    if hasattr(gc, "Stream"):
        return gc, gc.Stream(), "GreenContext.Stream()"
    gc.set_context()
    try:
        s = torch.cuda.Stream()
    finally:
        gc.pop_context()
    return gc, s, "torch.cuda.Stream() inside set_context()"


def kernel_us(tl, *keys):
    return round(sum(r["dur_us"] for r in tl if any(k in r["name"] for k in keys)), 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--case", default="llama-3.1-8b:1:131072:2048")
    ap.add_argument("--green", default="auto", help="SM counts of the speculation's green context (auto: a few)")
    args = ap.parse_args()
    model, b, ctx, budget = args.case.split(":")
    lay = RandomLayer.make(model, int(b), int(ctx), "quest", budget=int(budget))
    cache, meta, q, cfg = lay.cache, lay.meta, lay.q, lay.cfg
    hq, hkv = q.shape[1], cache.num_kv_heads
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    rows_ = int(b) * hkv
    overhead = graph_overhead_us()
    counts = StepCounts.of(cache.seq_lens, cfg, hkv)
    _, prev, sigma = previous_query(lay)
    out = {"env": environment(), "case": args.case, "sms": sms, "topk_programs": rows_, "sigma": sigma,
           "overhead_us": overhead, "rows": []}
    print(f"{args.case}: {sms} SMs, top-K programs {rows_}, graph overhead {overhead:.2f} us", flush=True)

    def record(name, step, **extra):
        row = {"variant": name, **extra}
        try:
            step.q.copy_(q)
            step.capture()
            us = time_graph(step.graph) - overhead
            tl = graph_timeline(step.graph)
            step.replay()
            torch.cuda.synchronize()
            row.update(net_us=round(us, 2), topk_us=kernel_us(tl, "_topk_kernel"),
                       spec_us=kernel_us(tl, "_sparse_decode_kernel"), timeline=tl)
            row["out"] = step.out[0].clone() if step.out is not None else None
        except Exception as e:  # a variant that cannot run is reported, the others still run
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        print({k: v for k, v in row.items() if k not in ("timeline", "out", "trace")}, flush=True)
        out["rows"].append(row)
        return row

    record("dsa", LayerStep(cache, meta, hq, method="dsa", counts=counts))
    greens = ([n for n in (8 * ((sms - rows_) // 8) - 8 * i for i in range(3)) if n >= 8]  # Hopper: multiples of 8
              if args.green == "auto" else [int(x) for x in args.green.split(",")])
    keep = []  # green contexts live as long as their streams
    for mode in ("union", "exact"):
        variants = [("default", None, None), (f"cap{sms - rows_}", None, sms - rows_)]
        for n in greens:
            try:
                gc, s, how = green_stream(n)
                keep.append(gc)
                variants.append((f"green{n}", StepStreams(side=s), None))
                out.setdefault("green_api", how)
            except Exception as e:
                out["rows"].append({"variant": f"{mode}_green{n}", "error": f"{type(e).__name__}: {e}"})
                print(f"green context of {n} SMs: {e!r}", flush=True)
        for n in (rows_, 8 * -(-rows_ // 8) + 8):  # the top-K on a group of SMs, the speculation on the rest
            try:
                ts, ss, g, r = partition_streams(torch.cuda.current_device(), n)
                variants.append((f"partition{g}+{r}", StepStreams(side=ss, topk=ts), "partition"))
            except PartitionUnavailable as e:
                out["rows"].append({"variant": f"{mode}_partition{n}", "error": str(e)})
                print(f"partition of {n} SMs: {e}", flush=True)
        base = None
        for name, streams, cap in variants:
            overlap = "partition" if cap == "partition" else "topk"
            cap = None if cap == "partition" else cap
            step = LayerStep(cache, meta, hq, method="prr", ratio=1.0, mode=mode, counts=counts, overlap=overlap,
                             topk="full", streams=streams if streams is not None else True,
                             probe=StepProbe(tail=False, hold_prediction=True, spec_programs=cap))
            step.seed(prev)
            row = record(f"{mode}_{name}", step, spec_programs=cap)
            if row.get("out") is not None:
                if base is None:
                    base = row["out"]
                else:
                    row["equal_to_default"] = bool(torch.equal(row["out"], base))
                    print(f"  {mode}_{name} equal to default: {row['equal_to_default']}", flush=True)
    for r in out["rows"]:
        r.pop("out", None)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sm_partition_{model}_{ctx}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    ok = [r for r in out["rows"] if "net_us" in r]
    for r in ok:
        print(f"{r['variant']:>20}  {r['net_us']:7.2f} us  top-K {r['topk_us']:6.2f}  spec {r['spec_us']:6.2f}"
              + (f"  equal {r['equal_to_default']}" if "equal_to_default" in r else ""))


if __name__ == "__main__":
    main()
