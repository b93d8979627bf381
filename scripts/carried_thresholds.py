"""How often a threshold carried from the previous decode step still has at least K blocks above it, on the
bundled model's real score traces (CPU): the collected top-K's guess (`prr.select_blocks_collected`).

Per (step, layer, KV head) row from step 1 on: the threshold is the previous step's G-th largest dynamic score
(G = m x K), the count is how many dynamic blocks reach it at this step; held = count >= K. For comparison the
guessed top-K's threshold (the smallest current score among the previous selection's blocks) holds by
construction. SmolLM2-135M, the 5K-token pydoc prompt, 200 teacher-forced steps, Quest blocks of 16, K = 61.

    PYTHONPATH=src python scripts/carried_thresholds.py --out results/carried_thresholds_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def replay(history: dict, k: int, n_sink: int, n_local: int, mults=(1, 1.5, 2, 3, 4, 6)) -> dict:
    out = {"previous_selection": {"rows": 0, "held": 0, "c_over_k": []}}
    for m in mults:
        out[f"carried_{m}k"] = {"rows": 0, "held": 0, "c_over_k": []}
    for scores, nblk in history.values():
        t_steps, b, h, n = scores.shape
        j = torch.arange(n)
        for t in range(1, t_steps):
            for i in range(b):
                d0 = (j >= n_sink) & (j < int(nblk[t - 1, i]) - n_local)
                d1 = (j >= n_sink) & (j < int(nblk[t, i]) - n_local)
                if int(d1.sum()) <= k:
                    continue
                s0 = scores[t - 1, i].masked_fill(~d0, float("-inf"))  # [H, N]
                s1 = scores[t, i].masked_fill(~d1, float("-inf"))
                srt = s0.sort(-1, descending=True).values
                top0 = s0.topk(k, -1).indices
                tau = s1.gather(-1, top0).min(-1).values
                cnt = (s1 >= tau[:, None]).sum(-1)
                r = out["previous_selection"]
                r["rows"] += h
                r["held"] += int((cnt >= k).sum())
                r["c_over_k"] += (cnt / k).tolist()
                for m in mults:
                    g = min(round(m * k), int(d0.sum())) - 1
                    cnt = (s1 >= srt[:, g:g + 1]).sum(-1)
                    r = out[f"carried_{m}k"]
                    r["rows"] += h
                    r["held"] += int((cnt >= k).sum())
                    r["c_over_k"] += (cnt / k).tolist()
    res = {}
    for name, r in out.items():
        c = torch.tensor(r["c_over_k"])
        res[name] = {"rows": r["rows"], "held": round(r["held"] / r["rows"], 4),
                     "c_over_k_mean": round(float(c.mean()), 3), "c_over_k_p99": round(float(c.quantile(0.99)), 3)}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/carried_thresholds_smollm2.json")
    ap.add_argument("--history", default="", help="a saved score history (torch.save of record_scores' dict)")
    a = ap.parse_args()
    from prr.algo.sparse import SparseConfig
    from prr.provenance import environment

    cfg = SparseConfig(method="quest", block_size=16, top_k=61)
    if a.history and os.path.exists(a.history):
        hist = torch.load(a.history)
    else:
        from prr.eval.locality import record_scores
        from prr.model.weights import load_model

        model, tok = load_model("smollm2", dtype=torch.float32, device="cpu")
        hist = record_scores(model, tok, 5000, 200, cfg)
    res = replay(hist, cfg.top_k, cfg.n_sink, cfg.n_local)
    for name, r in res.items():
        print(f"{name:20s} held {r['held']:.4f}  |C|/K mean {r['c_over_k_mean']:.2f}  p99 {r['c_over_k_p99']:.2f}"
              f"  ({r['rows']} rows)")
    with open(a.out, "w") as f:
        json.dump({"env": environment(), "model": "smollm2-135m", "prompt_tokens": 5000, "steps": 200,
                   "block_size": 16, "top_k": cfg.top_k, "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
