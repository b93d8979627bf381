"""Merge `prr bench layer` JSONs measured in separate device calls (one sweep split to fit the per-call limit)
into one file with one summary CSV; each part's environment (GPU, versions, commit, date) is kept.

    python3 scripts/merge_layer_runs.py PART.json... --out results/bench_layer_h100.json
"""

import argparse
import csv
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parts = [json.load(open(p)) for p in args.parts]
    for p, path in zip(parts, args.parts, strict=True):
        if p.get("bench") != "layer":
            raise SystemExit(f"{path}: not a `prr bench layer` result")
    merged = dict(parts[0])
    merged["rows"] = [r for p in parts for r in p["rows"]]
    meta = dict(parts[0]["meta"])
    meta["summary"] = [s for p in parts for s in p["meta"]["summary"]]
    meta["failed"] = [f for p in parts for f in p["meta"]["failed"]]
    meta["complete"] = all(p["meta"]["complete"] for p in parts)
    meta["parts"] = [{"file": os.path.basename(path), "env": p["env"], "copy_tbps": p["meta"]["copy_tbps"],
                      "overhead_us": p["meta"]["overhead_us"], "cases": len(p["meta"]["summary"])}
                     for p, path in zip(parts, args.parts, strict=True)]
    merged["meta"] = meta
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    summ = meta["summary"]
    with open(os.path.splitext(args.out)[0] + "_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for s in summ for k in s)), restval="")
        w.writeheader()
        w.writerows(summ)
    print(f"{args.out}: {len(merged['rows'])} rows, {len(summ)} cases from {len(parts)} parts")


if __name__ == "__main__":
    main()
