"""Where a top-K program's time goes: SM-clock stamps at its phase boundaries (GPU only).

The full two-stage top-K and the guessed top-K (held from a previous selection; a guess too high) run on the
inputs of ``prr bench topk`` (Quest scores of a random layer, the previous step's query drifted to the real
traces' overlap), each graph-captured with ``prr.ops.select.triton.TRACE`` set, so every program writes
``%clock64`` once the value that ends a phase is computed. Replays run with the L2 flushed first (the
benchmarks' footing) and warm (the scores just written by the scorer, as in a decode step). The stamps are
converted to ns with the SM clock measured in the same run (``%clock64`` against ``%globaltimer`` over a
spin of a few ms). Also a few single-program primitives timed the same way (a compare-and-count, a prefix sum,
a store / barrier / load round trip through global scratch, a dependent gather) at the top-K's tile sizes.

    PYTHONPATH=src python scripts/topk_timeline.py --out out/topk_timeline.json

Slots (stamp after ...): full: 0 start, 1 group maxima loaded, 2 stage 1 done, 3 stage 2 tile loaded, 4 K-th
found, 5 selection written. Guessed: 0 start, 1 τ, 2 group maxima loaded, 3 candidate groups counted,
4 candidate tile gathered, 5 |C(τ)| counted, 6 C(τ) compacted and read back, 7 K-th found, 8 selection
written, 9 next P written.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from prr import ops
from prr.algo.sparse import GuessedTopK
from prr.bench.kernels import RandomLayer
from prr.bench.topk import previous_query
from prr.ops.select import triton as st
from prr.ops.select.triton import _clock
from prr.provenance import environment
from prr.timing import capture

FULL = {0: "start", 1: "group maxima loaded", 2: "stage 1 (top groups)", 3: "stage 2 tile loaded",
        4: "K-th found", 5: "selection written"}
GUESSED = {0: "start", 1: "tau (prev selection's min)", 2: "group maxima loaded", 3: "candidate groups counted",
           4: "candidate tile gathered", 5: "|C| counted", 6: "C compacted, read back", 7: "K-th found",
           8: "selection written", 9: "next P written"}


@triton.jit
def _gtimer(dep):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep.to(tl.int32)], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _calib_kernel(x_ptr, out_ptr, R):
    x = tl.load(x_ptr)
    c0 = _clock(x)
    g0 = _gtimer(x)
    for _ in range(R):
        x = x * 1.0000001 + 1e-7
    c1 = _clock(x)
    g1 = _gtimer(x)
    tl.store(out_ptr, c1 - c0)
    tl.store(out_ptr + 1, g1 - g0)
    tl.store(out_ptr + 2, x.to(tl.int64, bitcast=False))


@triton.jit
def _prim_kernel(x_ptr, scr_ptr, out_ptr, R, N: tl.constexpr, OP: tl.constexpr):
    """R dependent repetitions of one primitive over an N-key tile (each depends on the last: no overlap)."""
    i = tl.arange(0, N)
    v = tl.load(x_ptr + i)
    acc = tl.min(v, axis=0) * 0
    t0 = _clock(acc)
    for _ in range(R):
        if OP == 0:  # compare and count (one bisection pass)
            acc += tl.sum((v >= acc).to(tl.int32), axis=0) & 1
        elif OP == 1:  # prefix sum of a compare (a compaction's positions), then its last value
            c = tl.cumsum((v >= acc).to(tl.int32), axis=0)
            acc += tl.max(c, axis=0) & 1
        elif OP == 2:  # store to global scratch, barrier, load back permuted, count
            tl.store(scr_ptr + i, v + acc)
            tl.debug_barrier()
            w = tl.load(scr_ptr + (i * 7) % N)
            acc += tl.sum((w >= acc).to(tl.int32), axis=0) & 1
        elif OP == 3:  # a gather from global memory through data-dependent addresses, count
            w = tl.load(x_ptr + ((v + acc) & (N - 1)))
            acc += tl.sum((w >= acc).to(tl.int32), axis=0) & 1
        else:  # min and max (a search's preamble)
            acc += (tl.max(v + acc, axis=0) - tl.min(v + acc, axis=0)) & 1
    t1 = _clock(acc)
    tl.store(out_ptr, t1 - t0)
    tl.store(out_ptr + 1, acc.to(tl.int64))


def clock_ghz() -> float:
    x = torch.ones(1, device="cuda")
    out = torch.zeros(3, dtype=torch.int64, device="cuda")
    _calib_kernel[(1,)](x, out, 2_000_000)
    _calib_kernel[(1,)](x, out, 2_000_000)
    torch.cuda.synchronize()
    cyc, ns = out[0].item(), out[1].item()
    return cyc / ns


def primitives(ghz: float) -> list[dict]:
    rows = []
    names = ["count", "cumsum+max", "scratch round trip", "dependent gather", "min+max"]
    for n in (512, 2048, 4096, 8192):
        x = torch.randint(0, 1 << 20, (n,), dtype=torch.int32, device="cuda")
        scr = torch.empty(n, dtype=torch.int32, device="cuda")
        out = torch.zeros(2, dtype=torch.int64, device="cuda")
        for warps in (4, 8, 16):
            for op, name in enumerate(names):
                r = 64
                _prim_kernel[(1,)](x, scr, out, r, N=n, OP=op, num_warps=warps)
                vals = []
                for _ in range(5):
                    _prim_kernel[(1,)](x, scr, out, r, N=n, OP=op, num_warps=warps)
                    torch.cuda.synchronize()
                    vals.append(out[0].item() / r)
                cyc = statistics.median(vals)
                rows.append({"prim": name, "keys": n, "warps": warps, "cycles": round(cyc, 1),
                             "ns": round(cyc / ghz, 1)})
    return rows


def flush_buf():
    return torch.empty(256 << 20, dtype=torch.int8, device="cuda")


def stamps(fn, bh: int, flush: bool, reps: int, ghz: float, names: dict) -> dict:
    """Median ns from slot 0 to each slot reached (over replays, then the mean over programs)."""
    tr = torch.full((bh, st.TRACE_SLOTS), -1, dtype=torch.int64, device="cuda")
    st.TRACE = tr
    try:
        g = capture(fn)
    finally:
        st.TRACE = None
    buf = flush_buf()
    per = []
    for _ in range(reps):
        tr.fill_(-1)
        if flush:
            buf.zero_()
        g.replay()
        torch.cuda.synchronize()
        per.append(tr.cpu())
    t = torch.stack(per)  # [reps, bh, slots]
    out = {}
    for slot, name in names.items():
        if slot == 0 or bool((t[:, :, slot] < 0).any()):
            continue
        d = (t[:, :, slot] - t[:, :, 0]).double() / ghz  # ns
        out[f"{slot} {name}"] = round(float(d.median(dim=0).values.mean()), 1)
    return out


def case(model, batch, ctx, budget, ghz, reps):
    lay = RandomLayer.make(model, batch, ctx, "quest", budget=budget)
    cfg, cache, meta, q, nblk = lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hkv = cache.num_kv_heads
    bh = batch * hkv
    _, prev, _ = previous_query(lay)
    scores, gmax = meta.scores(q, cache, with_groups=True)
    k, ns, nl = cfg.top_k, cfg.n_sink, cfg.n_local
    held = GuessedTopK(batch, hkv, cfg, device=q.device, hold=True)
    held.seed(*prev)
    bufs = held.buffers()
    high = torch.full((batch, hkv), float("inf"), device=q.device)
    ops_ = {
        "full": (lambda: ops.select_blocks(scores, nblk, k, ns, nl, group_max=gmax), FULL),
        "guessed": (lambda: ops.select_blocks_guessed(scores, nblk, k, ns, nl, group_max=gmax, out=bufs,
                                                      prev=held.prev), GUESSED),
        "guessed_too_high": (lambda: ops.select_blocks_guessed(scores, nblk, k, ns, nl, group_max=gmax, out=bufs,
                                                               guess=high), GUESSED),
    }
    res = {"case": lay.case, "blocks": int(meta.kmax.shape[2]), "top_k": k}
    for name, (fn, names) in ops_.items():
        fn()
        for flush in (True, False):
            res[f"{name}/{'flushed' if flush else 'warm'}"] = stamps(fn, bh, flush, reps, ghz, names)
    ops.select_blocks_guessed(scores, nblk, k, ns, nl, group_max=gmax, out=bufs, prev=held.prev)
    paths = held.stats[1].flatten().tolist()
    res["paths"] = {p: paths.count(p) for p in sorted(set(paths))}
    res["c_over_k"] = round(held.stats[0].float().mean().item() / k, 3)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/topk_timeline.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--cases", default="1:131072,1:524288,8:131072")
    ap.add_argument("--no-primitives", action="store_true")
    a = ap.parse_args()
    ghz = clock_ghz()
    print(f"SM clock {ghz:.3f} GHz")
    res = {"env": environment(), "clock_ghz": ghz, "cases": []}
    if not a.no_primitives:
        res["primitives"] = primitives(ghz)
        for r in res["primitives"]:
            print(r)
    for c in a.cases.split(","):
        b, ctx = (int(x) for x in c.split(":"))
        r = case("llama-3.1-8b", b, ctx, 2048, ghz, a.reps)
        res["cases"].append(r)
        print(json.dumps(r, indent=1))
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
