"""``prr bench layer``: the per-layer decode-attention step, dense vs serialized DSA vs PRR, on one GPU.

Per case (model shape, batch, context, method, budget), bf16, one layer, every variant one CUDA graph timed by
:mod:`prr.bench.common`: dense SDPA over the context; serialized DSA (selection with the full top-K, then
attention: the paper's baseline) and its parts; DSA on the guessed top-K (``dsa_guessed``: the same S,
found from the previous step's selection); PRR on the guessed top-K, exact and union, at K' = K and 1.5K
(``prr_*_path``: speculation over P beside the selection, then the repair; the tail that puts the next P in
place runs beside the rest of the layer in a model). The previous step is a drifted query whose selections
overlap the case's about as real text's do (:func:`prr.bench.topk.previous_query`): its selection starts the
guessed top-K, its top-K' is P, so the hit rate and ``|C(τ)|`` are measured, not imposed. The speculation
budget (:func:`prr.runtime.profile_budget`) decides ``prr_auto`` in the same run (PRR at its K', DSA on the
guessed top-K, or serialized DSA). The full mode adds the paper's PRR (Holt predictor, full top-K) at imposed
hit rates, the whole-step timings with the tail, and a drifting-query run of the Holt predictor.
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
from ..ops.guessed import PATHS
from ..runtime import BudgetCache, LayerStep, StepProbe, choose_budget, profile_budget
from ..runtime.layer import OVERLAPS
from ..timing import time_graph, time_op
from .common import Row, copy_bandwidth_tbps, graph_overhead_us, save, table
from .kernels import METHOD_BUDGET, RandomLayer, _label, _metadata_bytes
from .timeline import graph_timeline
from .topk import previous_query
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
               sweep: bool = True, timelines: bool = False) -> tuple[list[Row], dict]:
    """One case. ``budget``: selection budget in tokens (default per method); ``sweep=False`` leaves out the
    paper's PRR (Holt predictor, full top-K) at imposed hit rates, the hit-rate sweep, the drift rows and the
    whole-step (with tail) timings; ``timelines``: record the kernel timelines of DSA, DSA on the guessed top-K
    and PRR exact (in the summary)."""
    lay = RandomLayer.make(model, batch, ctx, method, budget=budget)
    case, cfg, cache, meta, q, nblk = lay.case, lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hq, hkv, d = q.shape[1], cache.num_kv_heads, cache.head_dim
    dev = cache.device
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
    t_dense = add("dense", "sdpa", time_op(lambda k=kd, v=vd: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, enable_gqa=True)), batch * ctx * 2 * hkv * d * BF16)
    del kd, vd

    # The block counts, once, as a model counts them once per token for all its layers (a step counting
    # itself adds three small kernels, ~5 us at batch 1, to DSA and PRR alike)
    counts = StepCounts.of(cache.seq_lens, cfg, hkv)
    tl = {}

    def timed(name, step):
        step.capture()
        if timelines:
            tl[name] = graph_timeline(step.graph)
        return time_graph(step.graph)

    dsa = LayerStep(cache, meta, hq, method="dsa", counts=counts)
    dsa.q.copy_(q)
    t_dsa = add("dsa", "graph", timed("dsa", dsa))
    t_sel = add("selection", "graph", time_op(lambda: select(q, cache, meta, nblk=counts.nblk)))
    t_att = add("attention", "graph", time_op(lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts,
                                                                          cfg.block_size)))
    # The step before: a drifted query whose selection starts the guessed top-K and whose top-K' is P, as the
    # guessed top-K of that step would have left them (consecutive selections overlapping as on real text)
    q_prev, prev, sigma = previous_query(lay)
    s_prev = meta.scores(q_prev, cache)
    held = StepProbe(tail=False, hold_prediction=True)
    gdsa = LayerStep(cache, meta, hq, method="dsa", topk="guessed", counts=counts, probe=held, collect_stats=True)
    gdsa.seed(prev)
    gdsa.q.copy_(q)
    t_gdsa = add("dsa_guessed", "graph", timed("dsa_guessed", gdsa))
    gdsa.replay()
    paths = gdsa.guessed.stats[1].flatten().tolist()
    cand = [c for c, p in zip(gdsa.guessed.stats[0].flatten().tolist(), paths, strict=True) if p in (0, 4)]
    guess = {"paths": {PATHS[p]: paths.count(p) for p in sorted(set(paths))}, "sigma": round(sigma, 4),
             "candidates_over_k": round(sum(cand) / len(cand) / cfg.top_k, 3) if cand else None}
    g = gdsa.guessed
    t_gsel = add("selection_guessed", "graph", time_op(lambda: g.select(q, cache, meta, counts.nblk)), **guess)

    def prr_new(ratio, mode, tail=False, overlap="selection", topk="guessed", spec_programs=None):
        """The PRR step on the guessed top-K, P the previous step's top-K' (on the full top-K, K' = K: the
        previous step's S); its measured hit rate."""
        spec_k = speculative_top_k(cfg.top_k, ratio)
        step = LayerStep(cache, meta, hq, method="prr", ratio=ratio, mode=mode, counts=counts, overlap=overlap,
                         topk=topk, probe=StepProbe(tail=tail, hold_prediction=True, spec_programs=spec_programs))
        step.seed(prev, ops.select_blocks(s_prev, nblk, spec_k, cfg.n_sink, cfg.n_local))
        step.q.copy_(q)
        us = timed(f"prr_{mode}_r{ratio}" + ("" if overlap == "selection" else f"_{overlap}")
                   + ("" if topk == "guessed" else f"_{topk}")
                   + ("" if spec_programs is None else f"_cap{spec_programs}"), step)
        step.replay()
        got = ops.selection_contains(step.last["s_idx"], step.last["s_cnt"], step.p_idx, step.p_cnt).sum().item()
        forced = (cfg.n_sink + cfg.n_local) * batch * hkv
        measured = (got - forced) / max(int(sel.counts.sum().item()) - forced, 1)
        return us, measured, step

    best, best_exact, t_spec, t_rep = None, float("inf"), {}, {}
    # one program per SM the top-K (one program per row) leaves idle
    spare_sms = max(1, torch.cuda.get_device_properties(q.device).multi_processor_count - batch * hkv)
    by_overlap = {}
    for ratio in (1.0, 1.5):
        for mode in ("exact", "union"):
            # the speculation beside the whole selection, or beside its top-K alone; at K' = K also on the full
            # top-K (P: the previous step's S), and beside the top-K with its grid leaving the top-K's SMs free
            variants = [(ov, tk, None) for ov, tk in itertools.product(
                OVERLAPS, ("guessed", "full") if ratio == 1.0 else ("guessed",))]
            variants += [("topk", "full", spare_sms)] if ratio == 1.0 else []
            for overlap, topk, cap in variants:
                us, measured, step = prr_new(ratio, mode, overlap=overlap, topk=topk, spec_programs=cap)
                extra = {} if cap is None else {"spec_programs": cap}
                net = add(f"prr_{mode}_path", "graph", us, ratio=ratio, hit_rate=round(measured, 3), tail=False,
                          overlap=overlap, topk=topk, **extra)
                for key in ((f"overlap_{overlap}", f"topk_{topk}") if cap is None else ("spec_capped",)):
                    by_overlap[key] = min(by_overlap.get(key, float("inf")), net)
                if best is None or net < best[0]:
                    best = (net, f"{mode} r={ratio} overlap={overlap} topk={topk}"
                            + ("" if cap is None else f" spec_programs={cap}"), measured)
                if mode == "exact":
                    best_exact = min(best_exact, net)
            if mode == "exact":
                k = step.spec_k
                p_idx, p_cnt = step.p_idx.clone(), step.p_cnt.clone()
                t_spec[k] = add("speculate", "graph", time_op(lambda p=p_idx, c=p_cnt: ops.block_states(
                    q, cache, p, c, cfg.block_size)), ratio=ratio)
                bo, blse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size)
                t_rep[k] = add("repair", "graph", time_op(lambda p=p_idx, c=p_cnt, o=bo, lse=blse: ops.repair_combine(
                    q, cache, cfg.block_size, p, c, sel.indices, sel.counts, block_o=o, block_lse=lse)),
                    ratio=ratio, hit_rate=round(measured, 3))
            if sweep:
                us, measured, _ = prr_new(ratio, mode, tail=True)
                add(f"prr_{mode}", "graph", us, ratio=ratio, hit_rate=round(measured, 3), tail=True)
    if sweep:
        paper_rows(add, cache, meta, q, sel, hq, counts)
    drift_summary = {}
    try:  # PRR on a drifting query, the hit rate produced by the predictor itself (calibrated to traces)
        if sweep:
            drift_summary = add_drift_rows(add, cache, meta, q, hq, dsa)
    except Exception as e:  # a failure here must not lose the case's other numbers
        print(f"drift workload failed for {case}: {e!r}")
    # The speculation budget as the runtime decides it (not cached here): the guessed top-K against the full
    # one, then a sweep of K' timed on this GPU.
    scratch = BudgetCache(os.path.join(tempfile.gettempdir(), "prr_bench_budget.json"))
    dec = profile_budget(cache, meta, q, q_prev=q_prev, budget_cache=scratch, refresh=True)
    auto = t_gdsa if dec.topk == "guessed" else t_dsa
    if dec.enabled:
        us, measured, _ = prr_new(dec.spec_k / cfg.top_k, "exact")
        auto = add("prr_auto_path", "graph", us, ratio=dec.spec_k / cfg.top_k, hit_rate=round(measured, 3),
                   tail=False)
    two_points = choose_budget(t_gsel, t_att, t_spec, t_rep)  # the same rule on the two K' timed above
    summary = {"case": case, "model": model, "batch": batch, "context": ctx, "method": method,
               "budget": cfg.budget_tokens, "budget_decision": dec.reason, "dsa_us": round(t_dsa, 2),
               "selection_us": round(t_sel, 2), "selection_guessed_us": round(t_gsel, 2),
               "attention_us": round(t_att, 2), "dsa_guessed_us": round(t_gdsa, 2),
               "speedup_guessed_dsa": round(t_dsa / t_gdsa, 3), "prr_best_us": round(best[0], 2),
               "prr_best_ratio": best[1], "prr_best_hit": round(best[2], 3),
               "speedup_best": round(t_dsa / best[0], 3), "speedup_exact": round(t_dsa / best_exact, 3),
               **{f"speedup_best_{k}": round(t_dsa / v, 3) for k, v in by_overlap.items()},
               "prr_auto_us": round(auto, 2), "speedup_auto": round(t_dsa / auto, 3), "spec_k": dec.spec_k,
               "auto_topk": dec.topk, "budget_two_points": two_points.reason,
               "floor_us": round(floor_us, 2), "prr_x_floor": round(best[0] / floor_us, 2),
               "dense_us": round(t_dense, 2), "prr_vs_dense": round(t_dense / best[0], 2), **guess,
               **drift_summary}
    if timelines:
        summary["timelines"] = tl
    return rows, summary


def paper_rows(add, cache, meta, q, sel, hq, counts) -> None:
    """The paper's PRR (a Holt predictor, the full top-K) at imposed hit rates: the real-trace points for both
    modes and a sweep for exact mode, critical path alone."""
    cfg, batch, hkv = meta.cfg, q.shape[0], cache.num_kv_heads
    nblk = ops.num_blocks(cache.seq_lens, cfg.block_size)
    pred = HoltPredictor(2, batch, hkv, cache.max_blocks(cfg.block_size), alpha=0.5, device=q.device)

    def prr_time(ratio, hit, mode):
        spec_k = speculative_top_k(cfg.top_k, ratio)
        impose_hit_rate(pred, sel.indices, sel.counts, nblk.cpu(), cfg, spec_k, hit)
        step = LayerStep(cache, meta, hq, method="prr", topk="full", predictor=pred, ratio=ratio, mode=mode,
                         counts=counts, probe=StepProbe(tail=False, hold_prediction=True, update_layer=1))
        step.q.copy_(q)
        step.capture()
        return time_graph(step.graph)

    for ratio, hit in REAL_TRACE:
        for mode in ("exact", "union"):
            add(f"prr_paper_{mode}_path", "graph", prr_time(ratio, hit, mode), ratio=ratio, hit_rate=hit)
    for hit in SWEEP:
        add("prr_paper_exact_path_sweep", "graph", prr_time(1.0, hit, "exact"), ratio=1.0, hit_rate=hit)


def run(models, batches, contexts, methods, out: str, budgets=None, sweep: bool = True,
        timelines: bool = False) -> dict:
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
            r, s = bench_case(m, b, c, me, copy, overhead, budget=bu, sweep=sweep, timelines=timelines)
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
    cols = ("case", "dsa_us", "selection_us", "selection_guessed_us", "dsa_guessed_us", "speedup_guessed_dsa",
            "prr_best_us", "prr_best_ratio", "prr_best_hit", "speedup_best", "speedup_exact", "prr_auto_us",
            "speedup_auto", "candidates_over_k", "prr_vs_dense", "drift_hit", "speedup_drift_path")
    lines = ["  ".join(cols)]
    for s in summaries:
        lines.append("  ".join(str(s.get(c, "")) for c in cols))
    return "\n".join(lines)
