"""Does the speculation budget profiler leave anything behind that slows the decode after it? (ratio="auto")

Run on the GPU machine: PYTHONPATH=src python3 scripts/diag_auto_ratio.py
SmolLM2-135M shapes with random weights, 4,650 tokens, batch 1, Quest budget 1024: the decode step (one CUDA
graph) of a DSA engine, then of PRR engines whose profiler ran first (forced off and on its own decision), with
and without collecting garbage after it; median microseconds per step, alternating.
"""

import gc
import statistics

import torch

from prr.algo.sparse import SparseConfig
from prr.bench.e2e import _time_steps
from prr.model.engine import Engine
from prr.model.weights import load_model


def engine(model, attention, ratio, profile, collect):
    eng = Engine(model, None, attention=attention, sparse=SparseConfig.from_budget("quest", 1024), ratio=ratio)
    eng.fill_random(1, 4650, 400)
    if profile:  # what a prefill does for ratio="auto": profile one layer on a query, then decide
        c = model.cfg
        eng._calib_q = {i: torch.randn(2, 1, c.num_q_heads, c.head_dim, device="cuda", dtype=model.dtype)
                        for i in range(c.num_layers)}
        eng._build_sparse_state()
        print(f"  decision: {eng.spec_decision}", flush=True)
        if collect:
            gc.collect()
            torch.cuda.empty_cache()
    eng.step(torch.zeros(1, dtype=torch.long, device="cuda"))
    eng.capture_decode()
    return eng


def main():
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16, device="cuda")
    cases = {"dsa": ("dsa", 1.5, False, False), "prr-auto": ("prr", "auto", True, False),
             "prr-auto+gc": ("prr", "auto", True, True), "dsa-again": ("dsa", 1.5, False, False)}
    for name, (att, ratio, prof, coll) in cases.items():
        eng = engine(model, att, ratio, prof, coll)
        times = _time_steps(eng, 60)
        med = statistics.median(times[10:])
        print(f"{name:12s} attention={eng.attention:5s} median {med:7.1f} us/step", flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
