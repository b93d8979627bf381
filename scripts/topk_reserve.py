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
Then, as a diagnostic of why the top-K slows beside the speculation: the full selection alone with a stand-in
started beside its top-K (nothing, a copy: memory traffic only, a spin kernel: SM work only, the speculation
itself), with and without the reservation.

Per variant: graph replay microseconds (net of the one-kernel graph overhead), the top-K kernel's and the
speculation's durations and the top-K's end from the kernel timeline, and whether the output equals the default
variant's bit for bit.
"""

import argparse
import json
import os
import traceback

import torch
import triton
import triton.language as tl

from prr import ops
from prr.algo.sparse import select
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


@triton.jit
def _spin_kernel(x_ptr, n_iter):
    """Work with no memory traffic: a dependent FMA chain per thread, one store at the end."""
    i = tl.program_id(0) * 128 + tl.arange(0, 128)
    a = i.to(tl.float32)
    for _ in range(n_iter):
        a = a * 0.999999 + 0.5
    tl.store(x_ptr + i, a)


def contention(lay, prev, overhead, tag, out):
    """The full selection (scores, then the top-K on a high-priority stream) with a stand-in started beside the
    top-K once the scores are written, as PRR's speculation is: nothing, a copy (memory traffic only), a spin
    kernel (SM work only, no memory) or the speculation itself (PRR exact's block states over P)."""
    cache, meta, q, cfg = lay.cache, lay.meta, lay.q, lay.cfg
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    src = torch.empty(22 << 20, dtype=torch.uint8, device=q.device)
    dst = torch.empty_like(src)
    spin = torch.empty(4 * sms * 128, device=q.device)
    p_idx, p_cnt = prev
    stand_ins = {
        "none": None,
        "copy": lambda: dst.copy_(src),
        "spin": lambda: _spin_kernel[(4 * sms,)](spin, 3000, num_warps=4),
        "spec": lambda: ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size),
    }
    sel_s, side = torch.cuda.Stream(priority=-1), torch.cuda.Stream()
    for name, fn in stand_ins.items():
        def body(fn=fn):
            main = torch.cuda.current_stream()
            sel_s.wait_stream(main)
            side.wait_stream(main)

            def after():
                if fn is not None:
                    side.wait_stream(sel_s)
                    with torch.cuda.stream(side):
                        fn()
            with torch.cuda.stream(sel_s):
                select(q, cache, meta, nblk=lay.nblk, after_scores=after)
            main.wait_stream(sel_s)
            main.wait_stream(side)
        row = {"variant": f"select+{name}_{tag}"}
        try:
            body()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            us = time_graph(g) - overhead
            tl_ = graph_timeline(g)
            top = [r for r in tl_ if any(k in r["name"] for k in TOPK_NAMES)]
            scores_end = max(r["end_us"] for r in tl_ if "scores" in r["name"])
            other = [r for r in tl_ if r not in top and "scores" not in r["name"]]
            row.update(net_us=round(us, 2), scores_end_us=round(scores_end, 2),
                       topk_end_us=kernel_end(tl_, TOPK_NAMES),
                       topk_after_scores_us=round(kernel_end(tl_, TOPK_NAMES) - scores_end, 2),
                       stand_in_us=round(sum(r["dur_us"] for r in other), 2), timeline=tl_)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        print({k: v for k, v in row.items() if k not in ("timeline", "trace")}, flush=True)
        out["rows"].append(row)


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
    contention(lay, prev, overhead, "default", out)
    select_triton.TOPK_WARPS = guessed_triton.TOPK_WARPS = 32
    for name, key, st in steps("w32"):
        record(name, st, key)
    select_triton.TOPK_WARPS = guessed_triton.TOPK_WARPS = None
    out["reserved"] = [reserve_shared(select_triton._topk_kernel, optin),
                       reserve_shared(guessed_triton._guessed_topk_kernel, optin)]
    print("reserved:", out["reserved"], flush=True)
    for name, key, st in steps("reserve"):
        record(name, st, key)
    contention(lay, prev, overhead, "reserve", out)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"topk_reserve_{model}_{ctx}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    for r in out["rows"]:
        if "topk_after_scores_us" in r:
            print(f"{r['variant']:>22}  {r['net_us']:7.2f} us  top-K ends {r['topk_after_scores_us']:6.2f} us after "
                  f"the scores  stand-in {r['stand_in_us']:6.2f}")
        elif "net_us" in r:
            print(f"{r['variant']:>22}  {r['net_us']:7.2f} us  top-K {r['topk_us']:6.2f} (ends {r['topk_end_us']})"
                  f"  spec {r['spec_us']:6.2f}" + (f"  equal {r['equal_to_default']}" if "equal_to_default" in r
                                                   else ""))


if __name__ == "__main__":
    main()
