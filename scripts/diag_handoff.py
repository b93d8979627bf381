"""How long a kernel waits for the one before it: dependent launch against a device flag (GPU only).

A producer grid of R programs (one per row, as the top-K's) works for ``--work-ns`` (a spin on
``%globaltimer``), writes its row and stamps the time; a consumer grid of R x S programs (as the attention's
splits) stamps the time it may read the row, then reads it. Three ways for the consumer to wait:

- ``launch``: an ordinary launch after the producer (no programmatic dependent launch);
- ``pdl``: launched early as a programmatic dependent, ``griddepcontrol.wait`` (the whole producer grid done);
- ``flag``: launched early as a programmatic dependent, no ``griddepcontrol.wait``: it polls its row's flag,
  which the row's producer program raises (a release) after writing the row.

All three run as one CUDA graph [epoch tick, producer, consumer], replayed; the flags count up with the tick, so
they are never reset. Reported per mode: the handoff (consumer program's stamp minus the end of the producer
program it waits for: the row's own for ``flag``, the grid's last for the others; median and p90 over programs
and replays), the row read after it (one dependent load), and the whole graph's replay time.

    PYTHONPATH=src python scripts/diag_handoff.py --out out/diag_handoff.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from prr.provenance import environment
from prr.timing import capture, time_graph


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _tick(epoch_ptr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)


@triton.jit
def _produce(row_ptr, flag_ptr, epoch_ptr, tr_ptr, WORK_NS, PDL: tl.constexpr, FLAG: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.program_id(0)
    t0 = _now()
    t = t0
    while t - t0 < WORK_NS:
        t = _now()
    e = tl.load(epoch_ptr)
    tl.store(row_ptr + r, e)
    if FLAG:
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr + r, e, sem="release")
    tl.store(tr_ptr + r, _now())


@triton.jit
def _consume(row_ptr, flag_ptr, epoch_ptr, out_ptr, tr_ptr, S, MODE: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    if MODE == 1:  # pdl
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if MODE == 2:  # flag (the epoch was written before the producer started, so it is visible here)
        tl.extra.cuda.gdc_launch_dependents()
        e = tl.load(epoch_ptr)
        seen = tl.atomic_add(flag_ptr + r, 0, sem="acquire")
        while seen < e:
            seen = tl.atomic_add(flag_ptr + r, 0, sem="acquire")
    t_go = _now()
    v = tl.load(row_ptr + r)
    tl.store(out_ptr + r * S + s, v)
    t_read = _now()
    base = tr_ptr + (r * S + s) * 2
    tl.store(base, t_go)
    tl.store(base + 1, t_read + v * 0)


MODES = {"launch": 0, "pdl": 1, "flag": 2}


def run_mode(mode: str, rows: int, splits: int, work_ns: int, replays: int) -> dict:
    dev = "cuda"
    epoch = torch.zeros(1, dtype=torch.int64, device=dev)
    row = torch.zeros(rows, dtype=torch.int64, device=dev)
    flag = torch.zeros(rows, dtype=torch.int64, device=dev)
    out = torch.zeros(rows * splits, dtype=torch.int64, device=dev)
    tp = torch.zeros(rows, dtype=torch.int64, device=dev)
    tc = torch.zeros(rows * splits * 2, dtype=torch.int64, device=dev)
    pdl = mode != "launch"
    kw = {"launch_pdl": True} if pdl else {}

    def step():
        _tick[(1,)](epoch, PDL=pdl, **kw)
        _produce[(rows,)](row, flag, epoch, tp, work_ns, PDL=pdl, FLAG=mode == "flag", **kw)
        _consume[(rows, splits)](row, flag, epoch, out, tc, splits, MODE=MODES[mode], **kw)

    g = capture(step)
    hand, read = [], []
    for _ in range(replays):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(rows, splits), row[:, None].expand(rows, splits)), "a consumer read a stale row"
        ends = tp.tolist()
        st = tc.view(rows, splits, 2).tolist()
        last = max(ends)
        for r in range(rows):
            for s in range(splits):
                go, rd = st[r][s]
                hand.append((go - (ends[r] if mode == "flag" else last)) / 1e3)
                read.append((rd - go) / 1e3)
    hand.sort()
    return {"mode": mode, "handoff_us_median": round(statistics.median(hand), 3),
            "handoff_us_p90": round(hand[int(0.9 * len(hand))], 3), "handoff_us_min": round(hand[0], 3),
            "row_read_us_median": round(statistics.median(read), 3), "graph_us": round(time_graph(g), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--splits", type=int, default=17)
    ap.add_argument("--work-ns", type=int, default=5000)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--out", default="out/diag_handoff.json")
    a = ap.parse_args()
    res = []
    for rows, splits in ((a.rows, a.splits), (64, 5)):
        for mode in MODES:
            r = run_mode(mode, rows, splits, a.work_ns, a.replays)
            r.update(rows=rows, splits=splits, work_ns=a.work_ns)
            print(r, flush=True)
            res.append(r)
    with open(a.out, "w") as f:
        json.dump({"env": environment(), "results": res}, f, indent=1)
    print("saved", a.out)


if __name__ == "__main__":
    main()
