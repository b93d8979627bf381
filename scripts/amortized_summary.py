"""Issue #12's three targets per amortized setting (m, c), from saved results only: identical answers to the
full-scan Quest per instance (k of n, per length and in all), hit against the full scan (mean over layers and
worst layer, `prr locality`), perplexity against the full scan (`prr eval --ppl-steps`), and the modelled
metadata read at 512K. Writes a CSV and a JSON and prints the Markdown table of docs/RESULTS.md.

    PYTHONPATH=src python3 scripts/amortized_summary.py results/locality_amortized_quest.json \\
        results/eval_amortized_ppl.json results/eval_amortized_2k.json results/eval_amortized_4k.json \\
        results/eval_amortized_8k.json --out results/eval_amortized_summary
"""

import argparse
import csv
import json

from prr.eval.amortized import agreement, parse_method, relative_cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("locality")
    ap.add_argument("ppl")
    ap.add_argument("evals", nargs="+", help="prr eval results (an instance in several counts once)")
    ap.add_argument("--methods", default="", help="comma list: report only these amortized methods")
    ap.add_argument("--out", required=True, help="path without extension (.csv and .json are written)")
    args = ap.parse_args()
    load = [json.load(open(p)) for p in [args.locality, args.ppl, *args.evals]]
    loc, ppl, evals = load[0], load[1], load[2:]
    rows = {(r["task"], r["length"], r["seed"], r["method"], r["budget"]): r for e in evals for r in e["tasks"]}
    rows = list(rows.values())
    lengths = sorted({r["length"] for r in rows})
    per_len = {n: {a["method"]: a for a in agreement([r for r in rows if r["length"] == n])} for n in lengths}
    total = {a["method"]: a for a in agreement(rows)}
    if args.methods:
        total = {m: a for m, a in total.items() if m in args.methods.split(",")}
    vs_full = {r["method"]: r.get("vs_full_scan_pct") for r in ppl.get("perplexity", [])}
    out = []
    for method in sorted(total, key=lambda m: relative_cost(*parse_method(m)[1:], 32768, 125)):
        _, m, c = parse_method(method)
        key = f"scan m{m} c{c:g}"
        a = total[method]
        hit, worst = loc["amortized_mean"].get(key), loc["amortized_min"].get(key)
        row = {"method": method, "m": m, "c": c, "metadata_512k_pct": round(100 * relative_cost(m, c, 32768, 125), 1),
               "hit_mean": hit, "hit_worst_layer": worst, "ppl_vs_full_scan_pct": vs_full.get(method),
               "same_output": a["same_output_count"], "instances": a["instances"],
               "same_output_share": a["same_output"], "same_score": a["same_score_count"]}
        for n in lengths:  # "-": not run at this length
            b = per_len[n].get(method)
            row[f"same_output_{n}"] = f"{b['same_output_count']}/{b['instances']}" if b else "-"
        row["meets_all"] = bool(hit is not None and hit >= 0.98 and row["ppl_vs_full_scan_pct"] is not None
                                and abs(row["ppl_vs_full_scan_pct"]) <= 0.3 and a["same_output"] >= 0.95)
        out.append(row)
    with open(args.out + ".json", "w") as f:
        json.dump({"inputs": [args.locality, args.ppl, *args.evals], "settings": out}, f, indent=1)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    head = ["m", "c", "metadata read at 512K (model)", "hit mean / worst layer", "perplexity vs full scan",
            *[f"same output @{n}" for n in lengths], "same output, all", "all three targets"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in out:
        hit = "-" if r["hit_mean"] is None else f"{r['hit_mean']:.3f} / {r['hit_worst_layer']:.3f}"
        pp = "-" if r["ppl_vs_full_scan_pct"] is None else f"{r['ppl_vs_full_scan_pct']:+.3f}%"
        cells = [r["m"], f"{r['c']:g}", f"{r['metadata_512k_pct']}%", hit, pp,
                 *[r[f"same_output_{n}"] for n in lengths],
                 f"{r['same_output']}/{r['instances']} ({100 * r['same_output_share']:.1f}%)",
                 "**met**" if r["meets_all"] else "missed"]
        print("| " + " | ".join(str(x) for x in cells) + " |")


if __name__ == "__main__":
    main()
