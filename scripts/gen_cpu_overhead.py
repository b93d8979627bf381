"""The generation loop's per-token work outside the model step, new against old, on the CPU (bundled SmolLM2).

"old" is what the greedy loop of commit 749e702 did per token (argmax read on the host, a new token tensor,
per-layer statistics reduced and read on the host every step); "new" is the device-side bookkeeping of
``prr.model.generation`` (sampler, statistics accumulated into device tensors, the freeze of finished sequences,
one read of the ids, the stop checks). Both are timed alternately in one process (the machine is shared), with
one decode step for scale.

  PYTHONPATH=src python3 scripts/gen_cpu_overhead.py
"""

import statistics
import time

import torch

import prr
from prr.model import load_model
from prr.model.engine import Engine
from prr.model.generation import DecodeState, Generation, GenerationConfig
from prr.model.prompts import pydoc_text


def measure(model, tok, ids, sparse, att: str) -> str:
    eng = Engine(model, tok, attention=att, sparse=sparse)
    logits = eng.prefill(ids, 400)
    t = time.perf_counter()
    logits = eng.step(torch.tensor([int(logits[0].argmax())]))
    step_ms = 1e3 * (time.perf_counter() - t)
    layer_stats = eng._step_stats
    cfg = GenerationConfig(400)
    gen = Generation(eng, cfg, [ids], [len(ids)], lambda: logits)
    state = DecodeState(eng, cfg, [ids], logits.shape[-1])
    texts = [""]

    def old():
        torch.tensor([int(logits[0].argmax())])
        float(torch.stack([s.selected.float().mean() for s in layer_stats]).mean())
        if att == "prr":
            sum(s.hit_rate() for s in layer_stats) / len(layer_stats)
            float(torch.stack([s.misses.float().mean() for s in layer_stats]).mean())

    def new():
        nxt = state.pick(logits)
        state.stats.add(layer_stats, state.active)
        eng._lens.add_(0)  # the freeze's one op (lengths kept: the step is not replayed here)
        gen.sequences[0].tokens = gen.sequences[0].tokens[:8]
        gen._accept(0, nxt.tolist()[0], texts, set())

    t_old, t_new = [], []
    for _ in range(100):
        state.stats.step.zero_()
        t = time.perf_counter()
        old()
        t_old.append(time.perf_counter() - t)
        t = time.perf_counter()
        new()
        t_new.append(time.perf_counter() - t)
    return (f"{att}: one decode step {step_ms:.1f} ms; per-token bookkeeping: old "
            f"{1e3 * statistics.median(t_old):.3f} ms, new {1e3 * statistics.median(t_new):.3f} ms")


def main():
    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    ids = tok.encode(pydoc_text())[5000:7000]
    sparse = prr.SparseConfig.from_budget("quest", 512)
    for att in ("dsa", "prr"):
        print(measure(model, tok, ids, sparse, att))


if __name__ == "__main__":
    main()
