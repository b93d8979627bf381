"""``prr bench topk``: the guessed top-K against the full one, alone and inside the selection, on one layer.

Per case (model shape, batch, context, budget), Quest scores of a random bf16 layer; the guess comes from a
*previous* query (the case's query drifted back so that consecutive selections overlap about as on real
text, :func:`prr.bench.workload.calibrate_drift`), its selection held fixed across replays, as PRR's step
reads it. Each op graph-captured and timed by :mod:`prr.bench.common` (L2 flushed before each replay):

- ``score``: the Quest scorer (writing the full top-K's stage-1 group maxima, as the selection does);
- ``topk_full``: today's two-stage top-K given those maxima (serialized DSA's, the paper's baseline);
- ``topk_guessed``: the guessed top-K from the previous selection (its default, bisection; ``_interp``: with
  interpolation steps), with the path its rows took and ``|C(τ)| / K``;
- ``topk_guessed_too_high``: a guess above every score (every row falls back to the full search in the
  same program: the price of a failed guess); ``topk_guessed_too_low``: a guess below every score with a
  small gather (every row narrows over the group maxima first);
- ``selection_full`` / ``selection_guessed``: score + top-K, each in one graph.

Targets (issue #25): the guessed top-K >= 2x faster than the full one at 8,192 and 32,768 blocks per row, b1
and b8, when the guess holds; the fallback <= 1.15x the full one; the selection at Llama-3.1-8B b1 128K /
2048 <= 15 us.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .. import ops
from ..algo.sparse import GuessedTopK, select
from ..ops.guessed import PATHS
from ..ops.guessed import triton as gk
from .common import Row, copy_bandwidth_tbps, graph_overhead_us, save, table
from .kernels import RandomLayer, _label, _metadata_bytes
from .workload import drifted_query


def previous_query(lay: RandomLayer, target: float = 0.80, seed: int = 1):
    """A query one decode step before the case's: drifted so the predictor's hit rate at K' = K is about
    ``target`` (the real traces' overlap), and its selection."""
    q_prev, sigma = drifted_query(lay.cache, lay.meta, lay.q, target, seed)
    s = select(q_prev, lay.cache, lay.meta, nblk=lay.nblk)
    return q_prev, (s.indices.clone(), s.counts.clone()), sigma


def bench_case(model: str, batch: int, ctx: int, budget: int, copy_tbps: float, overhead: float,
               timer=None, device="cuda", dtype=torch.bfloat16, warps=(None,)) -> tuple[list[Row], dict]:
    """Rows and a summary of one case. ``timer(fn) -> median us`` (tests pass a stand-in); ``warps``: program
    widths of the guessed top-K to time (None: its own rule)."""
    from ..timing import time_op

    timer = timer or time_op
    lay = RandomLayer.make(model, batch, ctx, "quest", device=device, dtype=dtype, budget=budget)
    case, cfg, cache, meta, q, nblk = lay.case, lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hkv = cache.num_kv_heads
    rows: list[Row] = []
    meta_b = _metadata_bytes(cfg, batch, hkv, cache.head_dim, ctx)
    row_b = batch * hkv * meta.kmax.shape[2] * 4  # one float32 score per block

    def add(op, fn, nbytes, **extra):
        us = timer(fn)
        rows.append(Row("topk", case, op, "triton", us, int(nbytes), nbytes / (copy_tbps * 1e12) * 1e6, overhead,
                        extra))
        return us - overhead

    _, prev, sigma = previous_query(lay)
    scores, gmax = meta.scores(q, cache, with_groups=True)
    k, ns, nl = cfg.top_k, cfg.n_sink, cfg.n_local
    add("score", lambda: meta.scores(q, cache, with_groups=True), meta_b)
    t_full = add("topk_full", lambda: ops.select_blocks(scores, nblk, k, ns, nl, group_max=gmax), row_b)
    held = GuessedTopK(batch, hkv, cfg, device=q.device, hold=True)
    held.seed(*prev)
    bufs = held.buffers()

    def guessed(**kw):
        return lambda: ops.select_blocks_guessed(scores, nblk, k, ns, nl, group_max=gmax, out=bufs, **kw)

    guessed(prev=held.prev)()
    paths = held.stats[1].flatten().tolist()
    ok = [c for c, p in zip(held.stats[0].flatten().tolist(), paths, strict=True) if PATHS[p] in ("held", "narrowed")]
    info = {"paths": {PATHS[p]: paths.count(p) for p in sorted(set(paths))},
            "candidates_over_k": round(sum(ok) / len(ok) / k, 3) if ok else None, "sigma": round(sigma, 4)}
    assert torch.equal(held.s_idx, ops.select_blocks(scores, nblk, k, ns, nl, group_max=gmax)[0])
    t_guess = {}
    for w in warps:
        gk.TOPK_WARPS = w
        try:
            t_guess[w] = add("topk_guessed" + (f"_w{w}" if w else ""), guessed(prev=held.prev), row_b, warps=w,
                             **info)
        finally:
            gk.TOPK_WARPS = None
    add("topk_guessed_interp", guessed(prev=held.prev, interp=True), row_b, **info)
    high = torch.full((batch, hkv), float("inf"), device=q.device)
    low = torch.full((batch, hkv), float("-inf"), device=q.device)
    t_high = add("topk_guessed_too_high", guessed(guess=high), row_b)
    add("topk_guessed_too_low", guessed(guess=low, guess_k=k), row_b)

    def sel_guessed():
        s, g = meta.scores(q, cache, with_groups=True)
        return ops.select_blocks_guessed(s, nblk, k, ns, nl, prev=held.prev, group_max=g, out=bufs)

    t_sel_full = add("selection_full", lambda: select(q, cache, meta, nblk=nblk), meta_b)
    t_sel_guess = add("selection_guessed", sel_guessed, meta_b)
    best = min(t_guess.values())
    summary = {"case": case, "blocks": int(meta.kmax.shape[2]), "top_k": k, "topk_full_us": round(t_full, 2),
               "topk_guessed_us": round(best, 2), "topk_speedup": round(t_full / best, 3),
               "fallback_vs_full": round(t_high / t_full, 3), "selection_full_us": round(t_sel_full, 2),
               "selection_guessed_us": round(t_sel_guess, 2), **info}
    return rows, summary


def run(models, batches, contexts, budgets, out: str, warps=(None,)) -> dict:
    copy = copy_bandwidth_tbps()
    overhead = graph_overhead_us()
    print(f"copy bandwidth {copy:.2f} TB/s; graph replay overhead {overhead:.1f} us")
    rows, summaries, failed = [], [], []
    cases = [(m, b, c, bu) for m in models for b in batches for c in contexts for bu in budgets]
    for m, b, c, bu in tqdm(cases, desc="bench topk", unit="case"):
        try:
            r, s = bench_case(m, b, c, bu, copy, overhead, warps=warps)
            rows += r
            summaries.append(s)
        except Exception as e:  # one broken case must not lose the others' numbers
            failed.append({"case": f"{m}/b{b}/{_label(c)}/{bu}", "error": repr(e)[:500]})
            print(f"FAILED {failed[-1]}")
        torch.cuda.empty_cache()
        save(out, "topk", rows, {"copy_tbps": copy, "overhead_us": overhead, "summary": summaries,
                                 "failed": failed, "complete": len(summaries) + len(failed) == len(cases)})
    print(table([r.to_dict() for r in rows]))
    cols = ("case", "blocks", "topk_full_us", "topk_guessed_us", "topk_speedup", "fallback_vs_full",
            "selection_full_us", "selection_guessed_us", "candidates_over_k", "paths")
    print("  ".join(cols))
    for s in summaries:
        print("  ".join(str(s.get(c, "")) for c in cols))
    return {"rows": rows, "summary": summaries}
