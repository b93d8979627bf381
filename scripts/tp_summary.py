"""The tensor-parallelism targets from the JSON that ``scripts/tp_gpu.sh`` saved: prints a table and writes
``DIR/tp_summary.json``. Usage: ``python3 scripts/tp_summary.py DIR``. Missing files are reported as not run."""

from __future__ import annotations

import json
import os
import sys


def _load(d: str, name: str):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def _rows(res) -> dict:
    return {} if res is None else {(r["context"], r["batch"], r["attention"]): r for r in res["rows"]}


def main(d: str) -> int:
    out = {"not_run": []}
    rows70 = {}
    for name in ("bench_e2e_70b_tp2_32k.json", "bench_e2e_70b_tp2_128k.json"):
        res = _load(d, name)
        if res is None:
            out["not_run"].append(name)
        rows70.update(_rows(res))
    print("Llama-3.1-70B, TP=2 (random weights), ms/token; DSA and PRR vs dense in tokens/s; collectives' share")
    table = []
    for (ctx, b, att), r in sorted(rows70.items()):
        table.append({"context": ctx, "batch": b, "attention": att, "ms_per_token": r["ms_per_token"],
                      "tokens_per_s": r["tokens_per_s"], "vs_dense": r["speedup_vs_dense"],
                      "vs_dsa": r["speedup_vs_dsa"], "collectives_share": r.get("collectives_share"),
                      "collectives_alone_share": r.get("collectives_alone_share")})
        print(f"  {ctx:>7} b{b} {att:5s} {r['ms_per_token']:8.2f} ms/token  {r['speedup_vs_dense']:5.2f}x dense  "
              f"{r['speedup_vs_dsa']:5.2f}x DSA  collectives {r.get('collectives_share')}")
    out["llama_70b_tp2"] = table
    at128 = [r for (ctx, b, att), r in rows70.items() if ctx > 100_000 and b == 1 and att == "dsa"]
    if at128:
        out["target_dsa_2x_dense_128k_b1"] = {"value": at128[0]["speedup_vs_dense"],
                                              "met": at128[0]["speedup_vs_dense"] >= 2.0}
    tp2, tp1 = (_load(d, f"bench_e2e_8b_tp{n}_128k.json") for n in (2, 1))
    for name, res in (("bench_e2e_8b_tp2_128k.json", tp2), ("bench_e2e_8b_tp1_128k.json", tp1)):
        if res is None:
            out["not_run"].append(name)
    if tp2 and tp1:
        # both files hold one context (128K): match on batch and attention
        r2, r1 = ({(b, att): r for (_, b, att), r in _rows(res).items()} for res in (tp2, tp1))
        out["llama_8b_tp2_vs_tp1"] = []
        print("Llama-3.1-8B at 128K: TP=2 vs TP=1 (per-token latency)")
        for key in sorted(r2):
            if key in r1:
                a, b = r2[key], r1[key]
                row = {"context": a["context"], "batch": key[0], "attention": key[1], "tp1_ms": b["ms_per_token"],
                       "tp2_ms": a["ms_per_token"], "speedup": round(b["median_us"] / a["median_us"], 3),
                       "collectives_share": a.get("collectives_share"),
                       "collectives_alone_share": a.get("collectives_alone_share")}
                out["llama_8b_tp2_vs_tp1"].append(row)
                print(f"  b{key[0]} {key[1]:5s} TP=1 {row['tp1_ms']:.2f} ms, TP=2 {row['tp2_ms']:.2f} ms: "
                      f"{row['speedup']:.2f}x; collectives {row['collectives_share']} of the step "
                      f"(alone: {row['collectives_alone_share']})")
    chk = _load(d, "tp_check_nccl_tp2_graph.json")
    if chk is None:
        out["not_run"].append("tp_check_nccl_tp2_graph.json")
    else:
        eq = {dt: rep["prr_exact_tokens_equal_dsa"] for dt, rep in chk["dtypes"].items()}
        out["target_tp2_prr_exact_tokens_equal_dsa"] = {"by_dtype": eq, "met": all(eq.values()),
                                                        "check_passed": chk["passed"]}
        print(f"TP=2 PRR exact tokens == DSA (GPU, NCCL, graphs): {eq}; whole check passed: {chk['passed']}")
    for k in ("target_dsa_2x_dense_128k_b1",):
        if k in out:
            print(f"{k}: {out[k]}")
    if out["not_run"]:
        print("not run: " + ", ".join(out["not_run"]))
    with open(os.path.join(d, "tp_summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out"))
