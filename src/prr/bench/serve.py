"""``prr bench serve``: continuous batching under load, against static batches of the same requests.

For each attention (dense, DSA, PRR): a server's engine loop (:mod:`prr.serve`) on the model, loaded by
:func:`prr.bench.load.run_load` (in process, or over HTTP with ``http=True``), then (``static=True``) the same
requests as static batches through :meth:`prr.model.engine.Engine.generate_batch`, the way ``prr generate``
runs a batch: in arrival order, as many per batch as the slots and the same KV-cache budget allow (a static
batch reserves its longest sequence's room for every row), each batch decoded until its longest output is
done. Outputs ignore EOS, so both do the same useful work; throughput counts each request's own tokens.

A random-weight preset (no tokenizer) is admitted without a prefill: its prompt's keys and values are random
(``fill="random"``, as ``prr bench e2e`` fills its caches), in both the server and the static baseline; a real
model prefills real text. ``memory_probe``: host RSS and CUDA allocated memory after the first request and every
100 more, so a leak shows as growth from the 100th to the last.
"""

from __future__ import annotations

import gc
import json
import os
import time

import torch

from ..algo.sparse import SparseConfig
from ..model.engine import Engine
from ..model.generation import GenerationConfig
from ..model.weights import load_model
from .common import environment
from .load import arrivals, run_load, summarize, workload

TARGET_SPEEDUP = 1.5


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cuda_mb() -> float | None:
    return torch.cuda.memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def _free() -> None:
    gc.collect()  # captured graphs sit in reference cycles: free their pools now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_pool_tokens(model, max_batch: int, max_seq: int, attention: str, sparse: SparseConfig) -> int:
    """Every slot can hold the longest request, or what 60% of the free device memory holds after the slots'
    block metadata, whichever is less (and never less than one longest request)."""
    c = model.cfg
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize
    want = max_batch * max_seq
    if model.device.type != "cuda":
        return want
    free, _ = torch.cuda.mem_get_info()
    meta = 0 if attention == "dense" else max_batch * max_seq * per_token * 2 // (2 * sparse.block_size)
    return max(max_seq, min(want, int((0.6 * free - meta) // per_token)))


def _continuous(model, tok, attention, specs, cfg, *, concurrency, send_times, http, probe) -> dict:
    from ..serve.config import ServeConfig, build_scheduler

    t0 = time.perf_counter()
    sched = build_scheduler(model, tok, ServeConfig(**cfg, attention=attention))
    setup_s = time.perf_counter() - t0
    memory = []

    def on_done(k):
        if probe and (k == 1 or k % 100 == 0 or k == len(specs)):
            memory.append({"requests_done": k, "rss_mb": _rss_mb(), "cuda_allocated_mb": _cuda_mb()})

    sched.start()
    try:
        if http:  # needs the serve extra (starlette, uvicorn) and httpx
            from ..serve.server import ServerThread, build_app

            with ServerThread(build_app(sched, "bench", ServeConfig(**cfg, attention=attention)), sched) as srv:
                recs, wall = run_load(specs, concurrency, url=srv.url, model="bench", send_times=send_times,
                                      on_done=on_done)
        else:
            recs, wall = run_load(specs, concurrency, scheduler=sched, send_times=send_times, on_done=on_done)
    finally:
        sched.stop(timeout=60)
    row = {"attention": attention, "batching": "continuous", "transport": "http" if http else "in-process",
           **summarize(recs, wall), "setup_s": round(setup_s, 2), "decode_steps": sched.steps,
           "peak_running": sched.peak_running, "cuda_graphs": bool(sched.runner._captured),
           "decoded_as": sched.runner.attention, "spec_decision": sched.runner.spec_decision}
    if sched.runner.attention == "prr":
        hr = sched.metrics.hit_rate()
        row["hit_rate"] = None if hr != hr else round(hr, 4)
    if probe:
        row["memory"] = memory
        at100 = next((m for m in memory if m["requests_done"] == 100), None)
        if at100 is not None:
            last = memory[-1]
            row["memory_growth_100_to_last_mb"] = {
                k: None if last[k] is None else round(last[k] - at100[k], 1) for k in ("rss_mb", "cuda_allocated_mb")}
    del sched
    _free()
    return row


def _static_batches(specs, max_batch: int, pool_tokens: int) -> list[list]:
    batches, cur, room = [], [], 0
    for s in specs:
        need = len(s.prompt) + s.max_tokens
        if cur and (len(cur) == max_batch or (len(cur) + 1) * max(room, need) > pool_tokens):
            batches.append(cur)
            cur, room = [], 0
        cur.append(s)
        room = max(room, need)
    return [*batches, cur] if cur else batches


def _static(model, tok, attention, specs, cfg, fill) -> dict:
    batches = _static_batches(specs, cfg["max_batch"], cfg["max_tokens_in_cache"])
    tokens, capture_s, steps = 0, 0.0, 0
    t0 = time.perf_counter()
    for b in batches:
        eng = Engine(model, tok, attention=attention, sparse=cfg["sparse"], ratio=cfg["ratio"],
                     n_dense_layers=cfg["n_dense_layers"])
        gen = GenerationConfig(max(s.max_tokens for s in b), stop_at_eos=False)
        if fill == "random":
            eng.fill_random(len(b), [len(s.prompt) for s in b], gen.max_new_tokens)
            seqs, st = eng.generate_batch(None, gen)
        else:
            seqs, st = eng.generate_batch([s.prompt for s in b], gen)
        tokens += sum(min(s.max_tokens, len(q.tokens)) for s, q in zip(b, seqs, strict=True))
        capture_s += st.capture_s
        steps += st.warmup_steps + st.steady_steps
        del eng
        _free()
    wall = time.perf_counter() - t0
    return {"attention": attention, "batching": "static", "requests": len(specs), "batches": len(batches),
            "output_tokens": tokens, "wall_s": round(wall, 3), "throughput_tok_s": round(tokens / wall, 2),
            "capture_s": round(capture_s, 2), "decode_steps": steps,
            "throughput_without_capture_tok_s": round(tokens / max(wall - capture_s, 1e-9), 2)}


def run(model_name: str, out: str, *, attentions=("dense", "dsa", "prr"), requests: int = 24, concurrency: int = 8,
        prompt_lens=(4096,), out_range=(64, 512), arrival: str = "closed", rate: float | None = None,
        max_batch: int = 8, max_tokens_in_cache: int | None = None, method: str = "quest", budget: int = 2048,
        ratio="auto", n_dense_layers: int = 2, max_queue: int = 256, static: bool = True, http: bool = False,
        memory_probe: bool = False, seed: int = 0) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(model_name, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev)
    c = model.cfg
    fill = "random" if tok is None else "prefill"
    text_ids = None
    if tok is not None:
        from ..model.prompts import pydoc_text

        text_ids = tok.encode(pydoc_text())
    lens = [min(n, c.max_context - out_range[1]) for n in prompt_lens]
    specs = workload(requests, lens, out_range, c.vocab_size, seed, text_ids)
    send_times = arrivals(requests, arrival, rate, seed)
    sparse = SparseConfig.from_budget(method, budget)
    max_seq = max(len(s.prompt) + s.max_tokens for s in specs)
    # one pool for every attention (sized with the sparse layers' metadata beside it): the same KV budget
    sized = "dense" if all(a == "dense" for a in attentions) else "dsa"
    pool = max_tokens_in_cache or default_pool_tokens(model, max_batch, max_seq, sized, sparse)
    rows = []
    for attention in attentions:
        cfg = {"sparse": sparse, "ratio": ratio, "n_dense_layers": n_dense_layers, "max_batch": max_batch,
               "max_tokens_in_cache": pool, "max_seq_len": max_seq, "max_queue": max_queue, "fill": fill}
        print(f"serve {attention}: {requests} requests, {concurrency} clients, pool {pool} tokens", flush=True)
        row = _continuous(model, tok, attention, specs, cfg, concurrency=concurrency, send_times=send_times,
                          http=http, probe=memory_probe)
        row["pool_tokens"] = pool
        rows.append(row)
        if static:  # the same requests as static batches, decoded as the server decoded them
            srow = _static(model, tok, row["decoded_as"], specs, cfg, fill)
            srow["pool_tokens"] = pool
            rows.append(srow)
            row["speedup_vs_static"] = round(row["throughput_tok_s"] / srow["throughput_tok_s"], 3)
            row["speedup_vs_static_without_capture"] = round(
                row["throughput_tok_s"] / srow["throughput_without_capture_tok_s"], 3)
    cont = {r["attention"]: r for r in rows if r["batching"] == "continuous"}
    for r in cont.values():
        if "dense" in cont:
            r["speedup_vs_dense"] = round(r["throughput_tok_s"] / cont["dense"]["throughput_tok_s"], 3)
    targets = _targets(cont, requests, memory_probe)
    meta = {"model": model_name, "requests": requests, "concurrency": concurrency, "prompt_lens": lens,
            "out_range": list(out_range), "arrival": arrival, "rate": rate, "max_batch": max_batch,
            "method": method, "budget": budget, "ratio": ratio, "n_dense_layers": n_dense_layers,
            "max_queue": max_queue, "fill": fill, "seed": seed, "targets": targets}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"schema": "prr-bench/1", "bench": "serve", "env": environment(), "meta": meta, "rows": rows},
                  f, indent=1)
    _print(rows, targets)
    return {"rows": rows, "targets": targets}


def _targets(cont: dict, requests: int, probe: bool) -> list[dict]:
    out = []
    for a, r in cont.items():
        if "speedup_vs_static" in r:
            out.append({"case": f"{a} continuous vs static", "op": "throughput", "value": r["speedup_vs_static"],
                        "target": f">= {TARGET_SPEEDUP}x", "met": r["speedup_vs_static"] >= TARGET_SPEEDUP})
        if a != "dense" and "speedup_vs_dense" in r:
            out.append({"case": f"{a} vs dense (continuous)", "op": "throughput", "value": r["speedup_vs_dense"],
                        "target": f">= {TARGET_SPEEDUP}x", "met": r["speedup_vs_dense"] >= TARGET_SPEEDUP})
        answered = sum(n for s, n in r["outcomes"].items() if s == "ok" or s.startswith("4"))
        out.append({"case": f"{a} every request answered", "op": "ok or 4xx", "value": answered,
                    "target": f"== {requests}", "met": answered == requests})
        growth = r.get("memory_growth_100_to_last_mb")
        if probe and growth is not None:
            for k, v in growth.items():
                if v is not None:
                    out.append({"case": f"{a} memory flat (100th to last)", "op": k, "value": v,
                                "target": "<= 64 MB", "met": v <= 64})
    return out


def _print(rows: list[dict], targets: list[dict]) -> None:
    print(f"{'attention':>9} {'batching':>10} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9} outcomes")
    for r in rows:
        def ms(k, r=r):
            return f"{1e3 * r[k]:9.1f}" if r.get(k) is not None else f"{'-':>9}"

        print(f"{r['attention']:>9} {r['batching']:>10} {r['throughput_tok_s']:9.1f} {ms('ttft_p50_s')} "
              f"{ms('ttft_p99_s')} {ms('tpot_p50_s')} {ms('tpot_p99_s')} {r.get('outcomes', '')}")
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['case']:36s} {t['op']:18s} {t['value']} {t['target']}")
