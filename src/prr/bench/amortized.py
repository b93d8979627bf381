"""``prr bench select``: the full selection against amortized selection (issue #12), on one layer, bf16.

Per case (model shape, batch, context, method) and per (m, c) setting, each op graph-captured and timed by
:mod:`prr.bench.common` (L2 flushed before each replay):

- ``selection``: the full scan (score every block + top-K); ``dsa_step``: it, then the sparse attention;
- ``gated_scan_idle``: the full scorer and top-K launched for sequences of length 0, as a re-score step runs
  them (the price of one graph for both step kinds: their grids launch, nothing is read);
- ``amortized_scan_cC`` / ``amortized_rescore_cC``: one amortized step of each kind (a selector that scans at
  every step, and one whose candidates were kept by a scan during warm-up and never rescans), with
  ``candidate_score_cC`` / ``candidate_topk_cC`` the re-score step's two kernels alone;
- ``selection_mMcC`` / ``dsa_step_mMcC``: m consecutive steps of the real schedule (one scan, m - 1 re-scores)
  in one graph, time / m: what a decode step costs on average (the L2 is flushed once per m steps here, not
  per step: the candidates' few rows may stay cached across the m steps, a small optimism);
- ``..._host``: the same on the host schedule (``AmortizedSelector(schedule="host")``: a graph per step kind;
  a re-score step is the candidate scorer with the bookkeeping fused in and the candidate top-K, 2 launches
  instead of 7, no gated full scorer, top-K or commit). Its m steps are captured in one graph too: the
  kernels of one scan-kind and m - 1 re-score-kind replays, without the m - 1 extra graph launches (a model
  replays one whole-step graph per token either way).

Targets (issue #12): the amortized selection >= 5x cheaper than the full scan at 512K (batch 1 and 8), and the
DSA step at Llama-3.1-8B b8 512K <= 120 us, at some (m, c).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .. import ops
from ..algo.amortized import AmortizedSelector
from ..algo.sparse import select
from ..cache import KVCache
from ..ops import candidates as cops
from .common import Row, copy_bandwidth_tbps, graph_overhead_us, save, table, time_op
from .kernels import METHOD_BUDGET, RandomLayer, _label, _metadata_bytes

BF16 = 2
NEVER = 1 << 62  # a scan period the bench never reaches: every step after the warm-up's scan re-scores
CAND_WARPS = (4, 8, 16)  # the candidate top-K's warps swept on a GPU


def _candidate_bytes(lay: RandomLayer, slots: int) -> int:
    cfg, b, hkv, d = lay.cfg, lay.q.shape[0], lay.cache.num_kv_heads, lay.cache.head_dim
    if cfg.method == "quest":
        return 2 * b * hkv * slots * d * BF16
    inside = (cfg.block_size - cfg.window) // cfg.stride + 1
    return b * hkv * slots * inside * d * 4  # float32 compressed keys


def bench_case(model: str, batch: int, ctx: int, method: str, settings, copy_tbps: float, overhead: float,
               timer=time_op, device="cuda", dtype=torch.bfloat16) -> list[Row]:
    """Rows of one case. `timer(fn) -> median us` (tests pass a stand-in to run the code on a CPU)."""
    lay = RandomLayer.make(model, batch, ctx, method, device=device, dtype=dtype)
    case, cfg, cache, meta, q = lay.case, lay.cfg, lay.cache, lay.meta, lay.q
    rows: list[Row] = []

    def add(op, fn, nbytes, steps=1, **extra):
        us = timer(fn) / steps
        rows.append(Row("select", case, op, "triton", us, int(nbytes), nbytes / (copy_tbps * 1e12) * 1e6,
                        overhead / steps, extra))

    ck = None
    if q.is_cuda:
        from ..ops.candidates import triton as ck

        ck.CAND_TOPK_WARPS = None  # (a case that failed midway may have left its sweep's value)
    kv_tok = 2 * cache.num_kv_heads * cache.head_dim * BF16
    att_b = batch * cfg.budget_tokens * kv_tok + 2 * q.numel() * BF16
    meta_b = _metadata_bytes(cfg, batch, cache.num_kv_heads, cache.head_dim, ctx)

    def dsa(sel_fn):
        def step():
            s = sel_fn()
            return ops.sparse_decode(q, cache, s.indices, s.counts, cfg.block_size)
        return step

    add("selection", lambda: select(q, cache, meta), meta_b)
    add("dsa_step", dsa(lambda: select(q, cache, meta)), meta_b + att_b)
    # What one graph for every step costs: the full scorer and top-K launched with length 0 (nothing to read).
    idle = KVCache(cache.k, cache.v, cache.page_table, torch.zeros_like(cache.seq_lens))
    zero = torch.zeros_like(lay.nblk)
    add("gated_scan_idle", lambda: ops.select_blocks(meta.scores(q, idle), zero, cfg.top_k, cfg.n_sink, cfg.n_local),
        0)
    nblk = lay.nblk
    for c in sorted({c for _, c in settings}):
        scan = AmortizedSelector(meta, cache, every=1, factor=c, new_slots=2, schedule="device")
        rescore = AmortizedSelector(meta, cache, every=NEVER, factor=c, new_slots=2, schedule="device")  # as m = 16
        slots = rescore.cand.shape[-1]
        cand_b = _candidate_bytes(lay, slots)
        tag = f"c{c:g}"
        add(f"amortized_scan_{tag}", lambda s=scan: s.select(q, cache), meta_b + cand_b, slots=slots)
        add(f"amortized_rescore_{tag}", lambda s=rescore: s.select(q, cache), cand_b, slots=slots)
        scores = rescore._scores(q, cache, rescore.cand)
        add(f"candidate_score_{tag}", lambda r=rescore: r._scores(q, cache, r.cand), cand_b, slots=slots)
        add(f"candidate_topk_{tag}", lambda r=rescore, s=scores: cops.select_candidates(
            r.cand, s, nblk, cfg.top_k, cfg.n_sink, cfg.n_local), slots * batch * cache.num_kv_heads * 8)
        if ck is not None:  # the same kernel at other warp counts (its time grows with the candidates per thread)
            for w in CAND_WARPS:
                add(f"candidate_topk_{tag}_w{w}", lambda r=rescore, s=scores, w=w: ck.select_candidates(
                    r.cand, s, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, num_warps=w),
                    slots * batch * cache.num_kv_heads * 8, warps=w)
        add(f"dsa_step_rescore_{tag}", dsa(lambda s=rescore: s.select(q, cache)), cand_b + att_b)
        host = AmortizedSelector(meta, cache, every=NEVER, factor=c, new_slots=2, schedule="host")
        host.select(q, cache)  # its scan: the candidates

        def host_rescore(h=host):
            with h.forced(False):
                return h.select(q, cache)
        add(f"amortized_rescore_{tag}_host", host_rescore, cand_b, slots=slots)
        add(f"dsa_step_rescore_{tag}_host", dsa(host_rescore), cand_b + att_b)
    for (m, c), schedule, w in ((mc, sch, w) for mc in settings for sch in ("device", "host")
                                for w in ((None,) + (CAND_WARPS if sch == "host" and ck is not None else ()))):
        tag = f"m{m}c{c:g}" + (f"_w{w}" if w else "") + ("_host" if schedule == "host" else "")
        if ck is not None:  # the host schedule's m steps again with the candidate top-K at w warps
            ck.CAND_TOPK_WARPS = w
        sel = AmortizedSelector(meta, cache, every=m, factor=c, schedule=schedule)
        cand_b = _candidate_bytes(lay, sel.cand.shape[-1])
        mean_b = math.ceil(meta_b / m) + cand_b

        def steps(fn, s=sel, m=m):
            def run():
                s.reset()  # every replay: one scan, then m - 1 re-scores (the host clock too, at capture)
                for _ in range(m):
                    fn()
            return run
        extra = {"every": m, "factor": c, "schedule": schedule, **({"cand_topk_warps": w} if w else {})}
        add(f"selection_{tag}", steps(lambda s=sel: s.select(q, cache)), mean_b, steps=m, **extra)
        add(f"dsa_step_{tag}", steps(dsa(lambda s=sel: s.select(q, cache))), mean_b + att_b, steps=m, **extra)
    if ck is not None:
        ck.CAND_TOPK_WARPS = None
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """Per 512K Quest case and schedule (device: one graph; host: a graph per step kind): the best (m, c)'s
    speed-up of the selection over the full scan (target >= 5x), and for Llama-3.1-8B b8 the best amortized
    DSA step (target <= 120 us)."""
    out = []
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["op"]] = r["net_us"]
    for case, ops_ in by_case.items():
        model, b, ctx, method = case.split("/")
        if ctx != "512K" or method != "quest":
            continue
        for host in (False, True):
            def mine(k, host=host):
                return k.endswith("_host") == host
            sel = {k: v for k, v in ops_.items() if k.startswith("selection_m") and mine(k)}
            if sel:
                best = min(sel, key=sel.get)
                x = ops_["selection"] / sel[best]
                out.append({"case": case, "op": best, "target": ">= 5x cheaper than the full scan",
                            "value": round(x, 2), "met": x >= 5})
            dsa = {k: v for k, v in ops_.items() if k.startswith("dsa_step_m") and mine(k)}
            if dsa and model == "llama-3.1-8b" and b == "b8":
                best = min(dsa, key=dsa.get)
                out.append({"case": case, "op": best, "target": "<= 120 us", "value": round(dsa[best], 2),
                            "met": dsa[best] <= 120})
    return out


def run(models, batches, contexts, methods, settings, out: str) -> dict:
    copy = copy_bandwidth_tbps()
    overhead = graph_overhead_us()
    print(f"copy bandwidth {copy:.2f} TB/s; graph replay overhead {overhead:.1f} us")
    rows: list[Row] = []
    failed = []
    cases = [(m, b, c, me) for m in models for b in batches for c in contexts for me in methods]
    for m, b, c, me in tqdm(cases, desc="bench select", unit="case"):
        try:
            rows += bench_case(m, b, c, me, settings, copy, overhead)
        except Exception as e:  # one broken case must not lose the others' numbers
            failed.append({"case": f"{m}/b{b}/{_label(c)}/{me}", "error": repr(e)[:500]})
            print(f"FAILED {failed[-1]}")
        torch.cuda.empty_cache()
    dicts = [r.to_dict() for r in rows]
    targets = check_targets(dicts)
    save(out, "select", rows, {"copy_tbps": copy, "overhead_us": overhead, "targets": targets, "failed": failed,
                               "budgets": METHOD_BUDGET, "settings": settings, "dtype": "bfloat16"})
    print(table(dicts))
    print()
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['case']:36s} {t['op']:22s} {t['value']:8.2f} {t['target']}")
    return {"rows": dicts, "targets": targets}


__all__ = ["bench_case", "check_targets", "run"]
