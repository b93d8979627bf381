"""``prr bench layer``: the per-layer decode-attention step, dense vs serialized DSA vs PRR, on one GPU.

Per case (model shape, batch, context, method), bf16, one layer, every variant one CUDA graph timed by
:mod:`prr.bench.common`: dense SDPA over the context; serialized DSA (selection then attention, the same
kernels); PRR exact and union at the hit rates measured on real-model traces (DESIGN.md: about 0.80 with
K' = K and 0.94 with K' = 1.5K) and a sweep of hit rates for exact mode. The hit rate is *imposed*: the
predictor's state is set so that its top-K' holds the wanted share of the true selection, and the step folds
its scores into a spare predictor slot so the prediction stays fixed across replays. Each PRR variant is
timed twice: the whole step (``prr_*``: with the tail that updates the predictor and predicts the next P,
joined at the end of the graph) and its critical path (``prr_*_path``: speculation beside selection, then
repair; in a model the tail runs beside the rest of the layer). The speculation budget
(:func:`prr.runtime.choose_budget`) is decided from the parts timed in the same run; ``prr_auto`` is what it
picks (PRR's critical path at its K', or serialized DSA).
"""

from __future__ import annotations

import csv
import itertools
import os
import tempfile

import torch
from tqdm import tqdm

from .. import ops
from ..algo.predictor import HoltPredictor
from ..algo.sparse import SparseConfig, select
from ..algo.step import StepCounts, speculative_top_k
from ..runtime import BudgetCache, LayerStep, choose_budget, profile_budget, trace_hit_rate
from ..timing import time_graph, time_op
from .common import Row, copy_bandwidth_tbps, graph_overhead_us, save, table
from .kernels import METHOD_BUDGET, RandomLayer, _label, _metadata_bytes
from .workload import calibrate_drift, drift

BF16 = 2
REAL_TRACE = ((1.0, 0.80), (1.5, 0.94))  # (K'/K, hit rate) measured on SmolLM2 traces (DESIGN.md section 3)
SWEEP = (0.5, 0.7, 0.9, 1.0)


def impose_hit_rate(pred: HoltPredictor, s_idx, s_cnt, nblk, cfg: SparseConfig, spec_k: int, hit: float,
                    seed: int = 0) -> None:
    """Set slot 0 of `pred` so its top-K' dynamic blocks hold round(hit * K_dyn) of S's dynamic blocks, the
    rest filled with blocks outside S (host side, before timing)."""
    gen = torch.Generator().manual_seed(seed)
    bsz, hkv, nmax = pred.level.shape[1:]
    level = torch.full((bsz, hkv, nmax), -10.0)
    in_s = ops.selection_mask(s_idx.cpu(), s_cnt.cpu(), nmax)
    for b in range(bsz):
        n = int(nblk[b])
        dyn = torch.arange(cfg.n_sink, max(cfg.n_sink, n - cfg.n_local))
        for h in range(hkv):
            s_dyn = dyn[in_s[b, h, dyn]]
            keep = s_dyn[torch.randperm(len(s_dyn), generator=gen)[: round(hit * len(s_dyn))]]
            others = dyn[~in_s[b, h, dyn]]
            fill = others[torch.randperm(len(others), generator=gen)[: max(0, spec_k - len(keep))]]
            level[b, h, keep] = 10.0
            level[b, h, fill] = 5.0
    pred.level[0].copy_(level)
    pred.trend[0].zero_()
    pred.known[0].copy_(nblk)


def add_drift_rows(add, cache, meta, q0, hq, dsa: LayerStep, target: float = 0.80, steps: int = 16) -> dict:
    """Serialized DSA and PRR exact (K' = K) stepping through drifting queries (drift calibrated so the
    predictor's hit rate is about `target`), the hit rate produced by the predictor itself and measured on the
    way. PRR is captured as two graphs, its critical path and its tail (predictor update + next P), timed
    apart: ``prr_exact_drift_path`` is what a token waits for when the tail runs beside the rest of the layer,
    ``prr_exact_drift`` is path + tail back to back. Each is a median of single replays with the L2 flushed
    (a PRR step changes the predictor, so it must not be replayed twice on one query as do_bench would):
    noisier than do_bench's medians. The cache does not grow (no appends)."""
    import statistics

    sigma, calibrated = calibrate_drift(cache, meta, q0, target)
    pred = HoltPredictor(1, cache.batch, cache.num_kv_heads, cache.max_blocks(meta.cfg.block_size),
                         alpha=0.5, device=q0.device)
    step = LayerStep(cache, meta, hq, method="prr", predictor=pred, ratio=1.0, mode="exact", counts=dsa.fixed_counts)
    step.q.copy_(q0)
    step.capture(split_tail=True)
    gen = torch.Generator(device=q0.device).manual_seed(1)
    q, hit, tot = q0, 0.0, 0.0
    times = {"dsa": [], "path": [], "tail": []}
    forced = (meta.cfg.n_sink + meta.cfg.n_local) * cache.batch * cache.num_kv_heads
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=q0.device)

    def once(*graphs) -> list[float]:
        flush.zero_()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(graphs) + 1)]
        ev[0].record()
        for g, e in zip(graphs, ev[1:], strict=True):
            g.replay()
            e.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) * 1e3 for a, b in itertools.pairwise(ev)]

    for t in range(steps + 4):
        q = drift(q, sigma, gen)
        dsa.q.copy_(q)
        times["dsa"] += once(dsa.graph)
        step.q.copy_(q)
        p_idx, p_cnt = step.p_idx.clone(), step.p_cnt.clone()  # the P this step uses (the tail overwrites it)
        path, tail = once(step.graph, step.tail_graph)
        times["path"].append(path)
        times["tail"].append(tail)
        if t >= 4:  # the predictor warms up on the first steps
            got = ops.selection_contains(step.last["s_idx"], step.last["s_cnt"], p_idx, p_cnt).sum().item()
            hit += got - forced
            tot += step.last["s_cnt"].sum().item() - forced
    med = {k: statistics.median(v[4:]) for k, v in times.items()}
    info = dict(ratio=1.0, sigma=round(sigma, 4), hit_rate=round(hit / max(tot, 1.0), 3),
                calibrated_hit_rate=round(calibrated, 3))
    net = {"dsa": add("dsa_drift", "graph", med["dsa"], **info),
           "path": add("prr_exact_drift_path", "graph", med["path"], **info),
           "tail": add("prr_exact_drift_tail", "graph", med["tail"], **info)}
    add("prr_exact_drift", "graph", med["path"] + med["tail"], **info)
    return {"drift_hit": info["hit_rate"], "dsa_drift_us": round(net["dsa"], 2),
            "prr_drift_path_us": round(net["path"], 2), "prr_drift_tail_us": round(net["tail"], 2),
            "speedup_drift_path": round(net["dsa"] / net["path"], 3)}


def bench_case(model, batch, ctx, method, copy_tbps, overhead, budget: int | None = None,
               sweep: bool = True) -> tuple[list[Row], dict]:
    """One case. ``budget``: selection budget in tokens (default per method); ``sweep=False`` leaves out the
    hit-rate sweep, the drift rows and the whole-step (with tail) timings: the parts, serialized DSA, PRR's
    critical path at the real-trace hit rates and the runtime's own choice (``auto``) remain."""
    lay = RandomLayer.make(model, batch, ctx, method, budget=budget)
    case, cfg, cache, meta, q, nblk = lay.case, lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hq, hkv, d = q.shape[1], cache.num_kv_heads, cache.head_dim
    dev = cache.device
    nmax = cache.max_blocks(cfg.block_size)
    sel = select(q, cache, meta)
    floor_b = _metadata_bytes(cfg, batch, hkv, d, ctx) + batch * cfg.budget_tokens * 2 * hkv * d * BF16
    floor_us = floor_b / (copy_tbps * 1e12) * 1e6
    rows: list[Row] = []

    def add(op, impl, us, nbytes=floor_b, **extra):
        rows.append(Row("layer", case, op, impl, us, int(nbytes), nbytes / (copy_tbps * 1e12) * 1e6, overhead,
                        extra))
        return us - overhead

    kd = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
    vd = torch.randn_like(kd)
    add("dense", "sdpa", time_op(lambda k=kd, v=vd: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, enable_gqa=True)), batch * ctx * 2 * hkv * d * BF16)
    del kd, vd

    # The block counts, once, as a model counts them once per token for all its layers (a step counting
    # itself adds three small kernels, ~5 us at batch 1, to DSA and PRR alike)
    counts = StepCounts.of(cache.seq_lens, cfg, hkv)
    dsa = LayerStep(cache, meta, hq, method="dsa", counts=counts)
    dsa.q.copy_(q)
    dsa.capture()
    t_dsa = add("dsa", "graph", time_graph(dsa.graph))
    t_sel = add("selection", "graph", time_op(lambda: select(q, cache, meta, nblk=counts.nblk)))
    t_att = add("attention", "graph", time_op(lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts,
                                                                          cfg.block_size)))

    pred = HoltPredictor(2, batch, hkv, nmax, alpha=0.5, device=dev)  # slot 0 read, slot 1 written

    def prr_time(ratio, hit, mode, tail=True, spec_programs=None):
        spec_k = speculative_top_k(cfg.top_k, ratio)
        impose_hit_rate(pred, sel.indices, sel.counts, nblk.cpu(), cfg, spec_k, hit)
        step = LayerStep(cache, meta, hq, method="prr", predictor=pred, update_layer=1, ratio=ratio, mode=mode,
                         tail=tail, hold_prediction=True, spec_programs=spec_programs, counts=counts)
        step.q.copy_(q)
        step.capture()
        step.replay()
        got = ops.selection_contains(step.last["s_idx"], step.last["s_cnt"], step.last["p_idx"],
                                     step.last["p_cnt"]).sum().item()
        forced = (cfg.n_sink + cfg.n_local) * batch * hkv
        measured = (got - forced) / max(int(sel.counts.sum().item()) - forced, 1)
        return time_graph(step.graph), measured, step

    t_spec, t_rep, best, best_exact = {}, {}, None, float("inf")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for ratio, hit in REAL_TRACE:
        for mode in ("exact", "union"):
            if sweep:
                us, measured, step = prr_time(ratio, hit, mode)
                add(f"prr_{mode}", "graph", us, ratio=ratio, hit_rate=round(measured, 3), tail=True)
            us, measured, step = prr_time(ratio, hit, mode, tail=False)
            net = add(f"prr_{mode}_path", "graph", us, ratio=ratio, hit_rate=round(measured, 3), tail=False)
            if best is None or net < best[0]:
                best = (net, f"{mode} r={ratio}", measured)
            if mode == "exact":
                best_exact = min(best_exact, net)
                # the speculation's grid capped so the selection's CTAs find free SMs (batch 4 and up)
                cap = max(sms - batch * hkv, batch * hkv)
                us, measured, _ = prr_time(ratio, hit, mode, tail=False, spec_programs=cap)
                net = add("prr_exact_path_capped", "graph", us, ratio=ratio, hit_rate=round(measured, 3),
                          tail=False, spec_programs=cap)
                best_exact = min(best_exact, net)
                if net < best[0]:
                    best = (net, f"exact capped r={ratio}", measured)
                k = step.spec_k
                p_idx, p_cnt = step.p_idx.clone(), step.p_cnt.clone()
                t_spec[k] = add("speculate", "graph", time_op(lambda p=p_idx, c=p_cnt: ops.block_states(
                    q, cache, p, c, cfg.block_size)), ratio=ratio)
                bo, blse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size)
                t_rep[k] = add("repair", "graph", time_op(lambda p=p_idx, c=p_cnt, o=bo, lse=blse: ops.repair_combine(
                    q, cache, cfg.block_size, p, c, sel.indices, sel.counts, block_o=o, block_lse=lse)),
                    ratio=ratio, hit_rate=round(measured, 3))
                scratch = torch.empty_like(step.pred_scores)
                add("predictor_tail", "graph", time_op(lambda k=k, out=scratch: (
                    pred.update(1, sel.scores, nblk, pred=out),
                    ops.select_blocks(out, nblk, k, cfg.n_sink, cfg.n_local))), ratio=ratio)
    for hit in SWEEP if sweep else ():
        us, measured, _ = prr_time(1.0, hit, "exact", tail=False)
        add("prr_exact_path_sweep", "graph", us, ratio=1.0, hit_rate=round(measured, 3), tail=False)
    drift_summary = {}
    try:  # PRR on a drifting query, the hit rate produced by the predictor itself (calibrated to traces)
        if sweep:
            drift_summary = add_drift_rows(add, cache, meta, q, hq, dsa)
    except Exception as e:  # a failure here must not lose the case's other numbers
        print(f"drift workload failed for {case}: {e!r}")
    # The speculation budget as the runtime decides it: a sweep of K' timed on this GPU (not cached here).
    scratch = BudgetCache(os.path.join(tempfile.gettempdir(), "prr_bench_budget.json"))
    dec = profile_budget(cache, meta, q, budget_cache=scratch, refresh=True)
    auto = t_dsa
    if dec.enabled:
        ratio = dec.spec_k / cfg.top_k
        us, measured, _ = prr_time(ratio, trace_hit_rate(ratio), "exact", tail=False)
        auto = add("prr_auto_path", "graph", us, ratio=ratio, hit_rate=round(measured, 3), tail=False)
    two_points = choose_budget(t_sel, t_att, t_spec, t_rep)  # the same rule on the two K' timed above
    summary = {"case": case, "model": model, "batch": batch, "context": ctx, "method": method,
               "budget": cfg.budget_tokens, "budget_decision": dec.reason,
               "dsa_us": round(t_dsa, 2), "prr_best_us": round(best[0], 2),
               "prr_best_ratio": best[1], "prr_best_hit": round(best[2], 3),
               "speedup_best": round(t_dsa / best[0], 3), "speedup_exact": round(t_dsa / best_exact, 3),
               "prr_auto_us": round(auto, 2),
               "speedup_auto": round(t_dsa / auto, 3), "spec_k": dec.spec_k,
               "budget_two_points": two_points.reason,
               "floor_us": round(floor_us, 2), "prr_x_floor": round(best[0] / floor_us, 2),
               "dense_us": round(rows[0].net_us, 2), "prr_vs_dense": round(rows[0].net_us / best[0], 2),
               **drift_summary}
    return rows, summary


def run(models, batches, contexts, methods, out: str, budgets=None, sweep: bool = True) -> dict:
    """Every (model, batch, context, method, budget) case; ``budgets`` in tokens (None: each method's
    default). Saved after every case."""
    copy = copy_bandwidth_tbps()
    overhead = graph_overhead_us()
    print(f"copy bandwidth {copy:.2f} TB/s; graph replay overhead {overhead:.1f} us")
    rows, summaries, failed = [], [], []
    cases = [(m, b, c, me, bu) for m in models for b in batches for c in contexts for me in methods
             for bu in (budgets or [None])]
    for m, b, c, me, bu in tqdm(cases, desc="bench layer", unit="case"):
        try:
            r, s = bench_case(m, b, c, me, copy, overhead, budget=bu, sweep=sweep)
            rows += r
            summaries.append(s)
        except Exception as e:  # one broken case must not lose the others' numbers
            failed.append({"case": f"{m}/b{b}/{_label(c)}/{me}/{bu or METHOD_BUDGET[me]}", "error": repr(e)[:500]})
            print(f"FAILED {failed[-1]}")
        torch.cuda.empty_cache()
        # Saved after every case: a run cut short keeps what it measured.
        save(out, "layer", rows, {"copy_tbps": copy, "overhead_us": overhead, "summary": summaries,
                                  "failed": failed, "real_trace": REAL_TRACE, "budgets": METHOD_BUDGET,
                                  "complete": len(summaries) + len(failed) == len(cases)})
    if summaries:
        with open(os.path.splitext(out)[0] + "_summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for s in summaries for k in s)), restval="")
            w.writeheader()
            w.writerows(summaries)
    print(table([r.to_dict() for r in rows]))
    print(summary_table(summaries))
    return {"rows": rows, "summary": summaries}


def summary_table(summaries: list[dict]) -> str:
    cols = ("case", "dense_us", "dsa_us", "prr_best_us", "prr_best_ratio", "speedup_best", "speedup_exact",
            "prr_auto_us",
            "speedup_auto", "prr_x_floor", "prr_vs_dense", "drift_hit", "dsa_drift_us", "prr_drift_path_us",
            "speedup_drift_path")
    lines = ["  ".join(cols)]
    for s in summaries:
        lines.append("  ".join(str(s.get(c, "")) for c in cols))
    return "\n".join(lines)
