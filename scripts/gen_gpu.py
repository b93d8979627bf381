"""Generation on a GPU, the way `prr generate` runs it (one CUDA graph per decode step, sampler inside), on a
random-weight model at real shapes. Writes DIR/gen_gpu.json and prints a table.

  (a) a ragged batch of 4 sequences at 32K-128K tokens (default: 32768, 65536, 98304, 131000) on the random
      Llama-3.1-8B preset: dense, DSA and PRR, steady-state ms/token and tokens/s with the warm-up (first step,
      kernel compilation) and the graph capture measured apart. The caches are filled directly with random
      keys and values (``Engine.fill_random``, ``--fill random``, the default: a dense prefill of 4 prompts up
      to 128K tokens takes minutes), or prefilled from random token ids (``--fill prefill``).
  (b) graph == eager: the same generation with and without the CUDA graph, greedy and sampled, at 2.5K-8K
      tokens, must give the same tokens and the same device statistics.
  (c) attention="auto": the profiled crossover context for this GPU and the model's shapes at batch 1 and 4,
      and what auto picks for the batch of (a).

Run on the GPU machine: PYTHONPATH=src python3 scripts/gen_gpu.py --out DIR [--parts a,b,c]
"""

import argparse
import gc
import json
import os
import time

import torch

import prr
from prr.bench.common import environment
from prr.model.engine import Engine
from prr.model.generation import GenerationConfig
from prr.model.sampling import SamplingConfig
from prr.model.weights import load_model

GREEDY = SamplingConfig()
SAMPLED = SamplingConfig(temperature=0.8, top_p=0.95, top_k=50, seed=1)


def generate(model, attention, lens, new_tokens, sparse, *, graphs=True, sampling=GREEDY, fill="random",
             ratio=1.0):
    eng = Engine(model, None, attention=attention, sparse=sparse, ratio=ratio, n_dense_layers=2, graphs=graphs)
    cfg = GenerationConfig(new_tokens, sampling)
    t0 = time.perf_counter()
    if fill == "random":
        eng.fill_random(len(lens), lens, new_tokens)
        gen = eng.stream(None, cfg)
    else:
        gen_ids = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen_ids).tolist() for n in lens]
        gen = eng.stream(prompts, cfg)
    gen.run()
    torch.cuda.synchronize()
    st = gen.stats
    row = {"attention": eng.attention, "requested": attention, "contexts": lens, "batch": len(lens),
           "new_tokens_per_sequence": new_tokens, "fill": fill, "graphs": graphs, "cuda_graph": st.cuda_graph,
           "graph_error": st.graph_error, "sampling": repr(sampling),
           "fill_s" if fill == "random" else "prefill_s": round(time.perf_counter() - t0 - st.warmup_s
                                                                - st.capture_s - st.decode_s, 2),
           **{k: v for k, v in st.summary().items() if k not in ("attention", "prompt_tokens", "prefill_s")},
           "sequences": [{k: v for k, v in s.summary().items() if k != "text"} for s in gen.sequences],
           "auto": eng.auto_decision}
    tokens = [s.tokens for s in gen.sequences]
    del eng, gen
    gc.collect()
    torch.cuda.empty_cache()
    return row, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--contexts", default="32768,65536,98304,131000", help="(a): one per sequence")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fill", default="random", choices=["random", "prefill"])
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    parts = set(args.parts.split(","))
    model, _ = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    sparse = prr.SparseConfig.from_budget("quest", args.budget)
    res = {"env": environment(), "args": vars(args), "rows": [], "graph_vs_eager": [], "auto": {}}
    path = os.path.join(args.out, "gen_gpu.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    lens = [int(x) for x in args.contexts.split(",")]
    if "a" in parts:
        print(f"(a) ragged batch {lens}, {args.new_tokens} new tokens each, caches: {args.fill}")
        print(f"{'attention':>9} {'ms/token':>9} {'tokens/s':>9} {'warm-up s':>9} {'capture s':>9} {'hit rate':>8}")
        for attention in ("dense", "dsa", "prr"):
            row, _ = generate(model, attention, lens, args.new_tokens, sparse, fill=args.fill)
            res["rows"].append(row)
            save()
            print(f"{attention:>9} {row['ms_per_token']:>9.3f} {row['tokens_per_s']:>9.1f} {row['warmup_s']:>9.2f} "
                  f"{row['capture_s']:>9.2f} {row['hit_rate'] if row['hit_rate'] is not None else '-':>8}")
    if "b" in parts:
        small = [4096, 8192, 2500, 6000]
        print(f"(b) graph == eager, ragged batch {small}, 16 tokens")
        for attention in ("dense", "dsa", "prr"):
            for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
                (eager, te), (graph, tg) = (generate(model, attention, small, 16, sparse, graphs=g, sampling=sampling)
                                            for g in (False, True))
                same = te == tg and [s["hit_rate"] for s in eager["sequences"]] == [
                    s["hit_rate"] for s in graph["sequences"]]
                res["graph_vs_eager"].append({"attention": attention, "sampling": name, "equal": same,
                                              "eager_ms_per_token": eager["ms_per_token"],
                                              "graph_ms_per_token": graph["ms_per_token"],
                                              "graph_error": graph["graph_error"]})
                save()
                print(f"  {attention:>5} {name:>7}: tokens and stats equal {same}; eager {eager['ms_per_token']:.2f} "
                      f"vs graph {graph['ms_per_token']:.2f} ms/token")
    if "c" in parts:
        eng = Engine(model, None, attention="auto", sparse=sparse)
        for b in (1, 4):
            t0 = time.perf_counter()
            cross = eng.crossover(b)
            res["auto"][f"b{b}"] = {"crossover": cross, "profile_s": round(time.perf_counter() - t0, 1)}
            print(f"(c) auto crossover at batch {b}: {cross} tokens ({res['auto'][f'b{b}']['profile_s']} s)")
        res["auto"]["batch_a_picks"] = "dense" if max(lens) < res["auto"]["b4"]["crossover"] else eng.auto_sparse
        from prr.model.auto import CrossoverCache

        res["auto"]["cache"] = CrossoverCache()._load()
        save()
    print(f"saved {path}")


if __name__ == "__main__":
    main()
