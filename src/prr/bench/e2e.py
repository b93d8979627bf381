"""``prr bench e2e``: whole-model decode latency with dense, serialized-DSA and PRR attention on one GPU.

A random-weight model at real shapes (default ``llama-3.1-8b``, bf16) with its caches filled directly
(random keys and values, no prefill), one eager step to compile, then the whole decode step (every layer)
captured in one CUDA graph and replayed; the median replay (CUDA events) is the per-token latency. The byte
floor of a token is the weights plus, per layer, what its attention must read (all KV for dense layers; block
metadata plus the selected KV for sparse ones). PRR starts from an empty predictor (no prompt to calibrate
on; random KV gives no temporal locality anyway), so its hit rate here is not a real-model number.

Under tensor parallelism (``torchrun --nproc-per-node N -m prr bench e2e``, NCCL) each rank holds its slices and
captures its whole step, collectives included, in one CUDA graph; rank 0's times are reported, its floor counts
its own bytes, and two more numbers give the collectives' share of the step: the step recaptured without them
(same kernels, wrong numbers) and the step's collectives alone in one graph.
"""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from ..algo.sparse import SparseConfig
from ..eval.amortized import AmortizedEngine
from ..model.engine import Engine
from ..model.tp import TensorParallel, is_main, load_model_tp
from ..model.weights import load_model
from ..ops.backend import use_pdl
from ..ops.guessed import PATHS
from .common import copy_bandwidth_tbps, environment
from .kernels import _label, _metadata_bytes
from .timeline import graph_timeline, step_breakdown

BF16 = 2


TIMELINE_REPLAYS = 5  # replays averaged into the breakdown's timeline (graph_timeline adds one warm-up)


def _time_steps(eng: Engine, steps: int) -> list[float]:
    tok = torch.zeros(eng.caches[0].batch, dtype=torch.long, device="cuda")
    out = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        eng.step(tok)
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3)  # us
    return out


def _collectives_us(tp: TensorParallel, eng: Engine, steps: int) -> float:
    """The collectives of one decode step alone, captured in one graph: the embedding's all-reduce, two
    all-reduces of ``[B, 1, hidden]`` per layer, the logits' all-gather."""
    c, b = eng.model.cfg, eng.caches[0].batch
    x = torch.zeros(b, 1, c.hidden, dtype=eng.model.dtype, device="cuda")
    lg = torch.zeros(b, c.vocab_size, dtype=torch.float32, device="cuda")

    def body():
        for _ in range(1 + 2 * c.num_layers):
            tp.all_reduce(x)
        tp.gather_logits(lg)

    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    out = []
    for _ in range(steps):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(e) * 1e3)
    return statistics.median(out)


def _tp_columns(eng: Engine, steps: int, med: float) -> dict:
    tp = eng.model.tp
    tp.comm = False  # the same step without its collectives: every rank runs alone
    try:
        eng.capture_decode()
        bare = statistics.median(_time_steps(eng, steps))
    finally:
        tp.comm = True
        eng._graph = None
    alone = _collectives_us(tp, eng, steps)
    return {"step_without_collectives_us": round(bare, 1), "collectives_share": round(1 - bare / med, 3),
            "collectives_alone_us": round(alone, 1), "collectives_alone_share": round(alone / med, 3)}


def _name(row: dict) -> str:
    return row["attention"] + (f" pdl {row['pdl']}" if "pdl" in row else "") + (
        f" {row['overlap']}" if "overlap" in row else "")


def _drifted_queries(eng, layer: int, target: float = 0.80) -> dict:
    """``{layer: [q_prev, q]}`` for :meth:`Engine.calibrate`: a random query and one drifted from it so that
    consecutive selections over the layer's random cache overlap as real text's do (hit rate ~``target`` at
    K' = K), as the layer bench's previous step."""
    from .workload import drifted_query

    c, cache, meta = eng.cfg, eng.caches[layer], eng.metas[layer]
    gen = torch.Generator(device=cache.device).manual_seed(0)
    q = torch.randn(cache.batch, c.num_q_heads, c.head_dim, device=cache.device, generator=gen).to(cache.dtype)
    q_prev, _ = drifted_query(cache, meta, q, target)
    return {layer: torch.stack([q_prev, q])}


def run(model_name: str, contexts, batches, out: str, method: str = "quest", budget: int = 2048,
        steps: int = 12, n_dense_layers: int = 2, ratio: float = 1.0, tp: TensorParallel | None = None,
        fuse: bool = True, attentions=("dense", "dsa", "dsa_guessed", "prr"), breakdown: bool = True,
        amortized=(), pdl=("auto",), overlaps=("topk",), prr_mode: str = "exact") -> dict:
    """Whole-model decode: per context and batch, one engine per attention (``dsa_guessed``: PRR's engine with
    speculation off, DSA on the guessed top-K; ``prr_auto``: PRR with ``ratio="auto"``, the speculation budget
    profiled on this GPU from a drifted random query pair, its decision in the row's ``auto``;
    ``prr_previous``: PRR at K' = K on DSA's full top-K, P the previous step's S; ``amortized``:
    ``[(m, c)]``, each adds a ``dsa_mMcC`` row: serialized DSA whose sparse layers select through a host-scheduled
    :class:`prr.algo.amortized.AmortizedSelector`, timed over whole periods of m steps, its breakdown from the
    re-score step's graph; ``pdl``: the programmatic-dependent-launch modes to time each configuration under,
    rows tagged ``pdl`` and compared within their mode; ``overlaps``: what PRR's speculation runs beside
    (:class:`prr.runtime.StepSettings`), one ``prr`` row each, tagged ``overlap`` when there are several);
    ``prr_mode``: PRR's ``"exact"`` (DSA's output) or ``"union"`` (attention over P ∪ S)."""
    import gc
    import json
    import os

    copy = copy_bandwidth_tbps()
    if tp is None:
        model, _ = load_model(model_name, dtype=torch.bfloat16, device="cuda", fuse=fuse)
    else:  # this rank's slices (random weights at the rank's shapes)
        model, _ = load_model_tp(model_name, tp, dtype=torch.bfloat16, device=torch.cuda.current_device())
    split = tp is not None and tp.world > 1
    c = model.cfg
    weights_b = sum(t.numel() * t.element_size() for t in model.w.values())
    cfg = SparseConfig.from_budget(method, budget)
    rows, timed = [], []  # timed: what each row needs to be built again for its breakdown
    for ctx_asked in contexts:
        # "128K" is the whole window of a 128K model: leave room for the decoded tokens.
        # tensor parallel (--tp 1 too, so TP=1 and TP=N run the same context): a second run, without collectives
        # (the breakdown's timeline replays the step 1 + TIMELINE_REPLAYS more times: each appends a token)
        spare = (steps + 2 + (1 + TIMELINE_REPLAYS if breakdown else 0)) * (1 if tp is None else 2)
        spare += 2 * max([m for m, _ in amortized], default=0)  # whole periods, started at a scan
        ctx = min(ctx_asked, c.max_context - spare)
        for b, mode in [(b, mode) for b in batches for mode in pdl]:
            res = {}
            configs = [(a, None, ov) for a in attentions
                       for ov in (overlaps if a in ("prr", "prr_previous") else (None,))]
            configs += [(f"dsa_m{m}c{f:g}", (m, f), None) for m, f in amortized]
            def build(attention, setting, overlap, b=b, ctx=ctx, spare=spare):
                """The configuration's engine, filled, compiled and captured."""
                if setting is None:
                    eng = Engine(model, None, attention="dsa" if attention == "dsa" else (
                                     "dense" if attention == "dense" else "prr"), sparse=cfg,
                                 ratio="auto" if attention == "prr_auto" else (
                                     1.0 if attention == "prr_previous" else ratio),
                                 n_dense_layers=n_dense_layers, speculate=attention != "dsa_guessed",
                                 predictor="previous" if attention == "prr_previous" else "selection",
                                 mode=prr_mode,
                                 **({"overlap": overlap} if overlap else {}))
                else:  # whole periods: every timed window holds its share of scans
                    eng = AmortizedEngine(model, None, every=setting[0], factor=setting[1], schedule="host",
                                          sparse=cfg, n_dense_layers=n_dense_layers)
                eng.fill_random(b, ctx, spare)
                if attention == "prr_auto":  # the profiler decides from a drifted query pair
                    eng.calibrate(_drifted_queries(eng, n_dense_layers))
                eng.step(torch.zeros(b, dtype=torch.long, device="cuda"))  # compile, eagerly
                eng.capture_decode()
                if setting is not None:  # the eager step above was a scan: start the timed periods at a scan
                    while not eng._graph.selectors[0].next_is_scan():
                        eng.step(torch.zeros(b, dtype=torch.long, device="cuda"))
                return eng

            for attention, setting, overlap in tqdm(configs, desc=f"e2e {_label(ctx)} b{b}", leave=False):
                with use_pdl(mode):
                    n_steps = steps if setting is None else setting[0] * -(-steps // setting[0])
                    auto = attention == "prr_auto"
                    eng = build(attention, setting, overlap)
                    times = _time_steps(eng, n_steps)
                    speculating = setting is None and eng.attention == "prr" and eng.speculate
                    sparse_layers = 0 if attention == "dense" else c.num_layers - n_dense_layers
                    kv_tok = 2 * c.num_kv_heads * c.head_dim * BF16
                    att_b = (c.num_layers - sparse_layers) * b * ctx * kv_tok + sparse_layers * (
                        _metadata_bytes(cfg, b, c.num_kv_heads, c.head_dim, ctx) + b * cfg.budget_tokens * kv_tok)
                    floor_us = (weights_b + att_b) / (copy * 1e12) * 1e6
                    # amortized: the mean over whole periods (a scan and m - 1 re-scores), not the re-score's median
                    med = statistics.median(times) if setting is None else statistics.fmean(times)
                    row = {"model": model_name, "context": ctx, "batch": b, "attention": attention,
                           "median_us": round(med, 1), "ms_per_token": round(med / 1e3, 3),
                           "tokens_per_s": round(b * 1e6 / med, 1), "floor_us": round(floor_us, 1),
                           "x_floor": round(med / floor_us, 2), "tbps": round((weights_b + att_b) / med / 1e6, 3),
                           "steps_us": [round(t, 1) for t in times]}
                    timed.append((row, build, (attention, setting, overlap), mode, speculating))
                    if setting is not None:
                        row.update(every=setting[0], factor=setting[1], scan_step_us=round(times[0], 1),
                                   rescore_median_us=round(statistics.median(times[1:]), 1))
                    if auto:
                        row["auto"] = eng.spec_decision
                    if speculating:
                        row["hit_rate"] = round(sum(s.hit_rate() for s in eng._step_stats) / len(eng._step_stats), 3)
                    if setting is None and eng._step_stats and eng._step_stats[0].guess is not None:
                        paths = torch.stack([s.guess[1] for s in eng._step_stats]).flatten().tolist()
                        row["guess_paths"] = {p: paths.count(i) for i, p in enumerate(PATHS) if paths.count(i)}
                    if len(pdl) > 1:
                        row["pdl"] = mode
                    if attention in ("prr", "prr_previous") and len(overlaps) > 1:
                        row["overlap"] = overlap
                    if tp is not None:
                        row["tp"] = tp.world
                    if split:
                        row.update(_tp_columns(eng, steps, med))
                    res[attention if "overlap" not in row else f"{attention} {overlap}"] = row
                    rows.append(row)
                    del eng
                gc.collect()  # the engine's captured graph sits in reference cycles: free its pool now
                torch.cuda.empty_cache()
            for r in res.values():
                r["fused_projections"] = fuse
                for base in ("dense", "dsa"):
                    if base in res:
                        r[f"speedup_vs_{base}"] = round(res[base]["median_us"] / r["median_us"], 3)
    # Where each step's time goes: one kernel timeline of the captured step, from the same configuration built
    # again once every configuration of every context and batch is timed. The profiler's callbacks stay
    # registered after it stops and slow every later graph launch (~0.1 ms per step on an H100): no step is timed
    # after one.
    for row, build, config, mode, speculating in (timed if breakdown else ()):
        with use_pdl(mode):
            eng = build(*config)
            graph = eng._graph.graph if config[1] is None else eng._graph.kinds[False][0]
            tl = graph_timeline(graph, replays=TIMELINE_REPLAYS)
            row["breakdown"] = step_breakdown(tl, "prr" if speculating else "dsa")
            row["breakdown"]["kernels"] = len(tl)
            del eng, graph
        gc.collect()
        torch.cuda.empty_cache()
    if not is_main(tp):
        return {"rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"schema": "prr-bench/1", "bench": "e2e", "env": environment(),
                   "meta": {"copy_tbps": copy, "model": model_name, "method": method, "budget": budget,
                            "n_dense_layers": n_dense_layers, "ratio": ratio, "mode": prr_mode,
                            "weights_bytes": weights_b,
                            "fused_projections": fuse,
                            "tensor_parallel": None if tp is None else tp.world},
                   "rows": rows}, f, indent=1)
    print(f"{'context':>8} {'batch':>5} {'attention':>9} {'ms/token':>9} {'tok/s':>8} {'x floor':>8} {'vs dense':>9} "
          f"{'vs DSA':>7}")
    for r in rows:
        print(f"{_label(r['context']):>8} {r['batch']:>5} {_name(r):>9} {r['ms_per_token']:>9.3f} "
              f"{r['tokens_per_s']:>8.1f} {r['x_floor']:>8.2f} {r.get('speedup_vs_dense', float('nan')):>9.2f} "
              f"{r.get('speedup_vs_dsa', float('nan')):>7.2f}" + (f" collectives {100 * r['collectives_share']:.0f}%"
                                                 if "collectives_share" in r else ""))
    if any("breakdown" in r for r in rows):
        print("per-token breakdown, ms (exclusive: parts add up to the step's kernel span; hidden work costs 0)")
        for r in rows:
            if "breakdown" in r:
                ex = r["breakdown"]["exclusive_us"]
                print(f"{_label(r['context']):>8} {r['batch']:>5} {_name(r):>9} " + " ".join(
                    f"{k} {v / 1e3:.2f}" for k, v in ex.items() if v > 0))
    return {"rows": rows}
