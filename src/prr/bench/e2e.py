"""``prr bench e2e``: whole-model decode latency with dense, serialized-DSA and PRR attention on one GPU.

A random-weight model at real shapes (default ``llama-3.1-8b``, bf16) with its caches filled directly
(random keys and values, no prefill), one eager step to compile, then the whole decode step (every layer)
captured in one CUDA graph and replayed; the median replay (CUDA events) is the per-token latency. The byte
floor of a token is the weights plus, per layer, what its attention must read (all KV for dense layers; block
metadata plus the selected KV for sparse ones). PRR starts from an empty predictor (no prompt to calibrate
on; random KV gives no temporal locality anyway), so its hit rate here is not a real-model number.
"""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from ..algo.sparse import SparseConfig
from ..model.engine import Engine
from ..model.weights import load_model
from .common import copy_bandwidth_tbps, environment
from .kernels import _label, _metadata_bytes

BF16 = 2


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


def run(model_name: str, contexts, batches, out: str, method: str = "quest", budget: int = 2048,
        steps: int = 12, n_dense_layers: int = 2, ratio: float = 1.0) -> dict:
    import json
    import os

    copy = copy_bandwidth_tbps()
    model, _ = load_model(model_name, dtype=torch.bfloat16, device="cuda")
    c = model.cfg
    weights_b = sum(t.numel() * t.element_size() for t in model.w.values())
    cfg = SparseConfig.from_budget(method, budget)
    rows = []
    for ctx_asked in contexts:
        # "128K" is the whole window of a 128K model: leave room for the decoded tokens.
        ctx = min(ctx_asked, c.max_context - steps - 2)
        for b in batches:
            res = {}
            for attention in tqdm(("dense", "dsa", "prr"), desc=f"e2e {_label(ctx)} b{b}", leave=False):
                eng = Engine(model, None, attention=attention, sparse=cfg, ratio=ratio,
                             n_dense_layers=n_dense_layers)
                eng.fill_random(b, ctx, steps + 2)
                eng.step(torch.zeros(b, dtype=torch.long, device="cuda"))  # compile, eagerly
                eng.capture_decode()
                times = _time_steps(eng, steps)
                sparse_layers = 0 if attention == "dense" else c.num_layers - n_dense_layers
                kv_tok = 2 * c.num_kv_heads * c.head_dim * BF16
                att_b = (c.num_layers - sparse_layers) * b * ctx * kv_tok + sparse_layers * (
                    _metadata_bytes(cfg, b, c.num_kv_heads, c.head_dim, ctx) + b * cfg.budget_tokens * kv_tok)
                floor_us = (weights_b + att_b) / (copy * 1e12) * 1e6
                med = statistics.median(times)
                row = {"model": model_name, "context": ctx, "batch": b, "attention": attention,
                       "median_us": round(med, 1), "ms_per_token": round(med / 1e3, 3),
                       "tokens_per_s": round(b * 1e6 / med, 1), "floor_us": round(floor_us, 1),
                       "x_floor": round(med / floor_us, 2), "tbps": round((weights_b + att_b) / med / 1e6, 3),
                       "steps_us": [round(t, 1) for t in times]}
                if attention == "prr":
                    row["hit_rate"] = round(sum(s.hit_rate() for s in eng._step_stats) / len(eng._step_stats), 3)
                res[attention] = row
                rows.append(row)
                del eng
                torch.cuda.empty_cache()
            for r in res.values():
                r["speedup_vs_dense"] = round(res["dense"]["median_us"] / r["median_us"], 3)
                r["speedup_vs_dsa"] = round(res["dsa"]["median_us"] / r["median_us"], 3)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"schema": "prr-bench/1", "bench": "e2e", "env": environment(),
                   "meta": {"copy_tbps": copy, "model": model_name, "method": method, "budget": budget,
                            "n_dense_layers": n_dense_layers, "ratio": ratio, "weights_bytes": weights_b},
                   "rows": rows}, f, indent=1)
    print(f"{'context':>8} {'batch':>5} {'attention':>9} {'ms/token':>9} {'tok/s':>8} {'x floor':>8} {'vs dense':>9} "
          f"{'vs DSA':>7}")
    for r in rows:
        print(f"{_label(r['context']):>8} {r['batch']:>5} {r['attention']:>9} {r['ms_per_token']:>9.3f} "
              f"{r['tokens_per_s']:>8.1f} {r['x_floor']:>8.2f} {r['speedup_vs_dense']:>9.2f} "
              f"{r['speedup_vs_dsa']:>7.2f}")
    return {"rows": rows}
