"""The evaluation subcommands: ``prr eval`` (tasks and perplexity) and ``prr locality`` (predictability of the
selections), on a real model; registered by :mod:`prr.cli` as :mod:`prr.bench.commands` is."""

from __future__ import annotations

import json
import os
import sys

import torch

from ..cli_args import parse_amortized, parse_contexts


def _load(args):
    from ..model.tp import world_size_from_env
    from ..model.weights import load_model

    if world_size_from_env() > 1:  # tensor parallelism is for generate and bench e2e
        raise ValueError(f"prr {args.command} runs in one process; under torchrun run prr generate or prr bench e2e")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    print(f"loading {args.model} on {dev} ...", file=sys.stderr)
    return load_model(args.model, dtype=dtype, device=dev)


def _check_common(args) -> None:
    from ..model.commands import check_model_name

    check_model_name(args.model)


def _positive(flag: str, v, zero_ok: bool = False) -> None:
    if v < 0 or (v == 0 and not zero_ok):
        raise ValueError(f"{flag} must be {'>= 0' if zero_ok else 'positive'}, got {v}")


def _with_amortized(methods: list[str], settings) -> list[str]:
    """The methods plus, for each full-scan selector among them, its amortized variants."""
    from .amortized import method_name

    extra = [method_name(sel, m, c) for sel in ("quest", "infllm_v2") if sel in methods for m, c in settings]
    return methods + [e for e in extra if e not in methods]


def _cmd_eval(args) -> int:
    from ..algo.sparse import SparseConfig
    from . import run
    from .amortized import agreement, parse_method
    from .tasks import TASKS

    # Every argument is checked before the model loads.
    _check_common(args)
    tasks = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    methods = list(run.METHODS) if args.methods == "all" else args.methods.split(",")
    for flag, bad, known in (("--tasks", [t for t in tasks if t not in TASKS], TASKS),
                             ("--methods", [m for m in methods if m not in run.METHODS and not parse_method(m)],
                              run.METHODS)):
        if bad:
            raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad))}; expected all or some of {', '.join(known)}")
    methods = _with_amortized(methods, parse_amortized(args.amortized))
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ValueError(f"--budgets takes comma-separated token counts, got {args.budgets!r}") from None
    for b in budgets:  # each selector's own block size decides how small a budget may be
        for sel in {"infllm_v2" if m.startswith("infllm_v2") else "quest" for m in methods}:
            SparseConfig.from_budget(sel, b)
    lengths = parse_contexts(args.lengths)
    for flag, v, zero_ok in (("--seeds", args.seeds, False), ("--ratio", args.ratio, False),
                             ("--ppl-length", args.ppl_length, False), ("--ppl-steps", args.ppl_steps, True),
                             *(("--lengths", n, False) for n in lengths)):
        _positive(flag, v, zero_ok)
    model, tok = _load(args)
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}}
    rows = run.run_tasks(model, tok, tasks, lengths, methods, budgets, seeds=range(args.seeds), ratio=args.ratio)
    result.update(tasks=rows, summary=run.summarize(rows))
    if args.amortized:
        result["amortized_agreement"] = agreement(rows)
    if args.ppl_steps > 0:
        ppl = run.run_perplexity(model, tok, args.ppl_length, args.ppl_steps, methods, budgets, ratio=args.ratio)
        full = {(r["method"], r["budget"]): r["perplexity"] for r in ppl}
        for r in ppl:  # amortized against the full scan of the same selector and budget
            p = parse_method(r["method"])
            base = full.get((p[0], r["budget"])) if p else None
            if base:
                r["vs_full_scan_pct"] = round(100 * (r["perplexity"] / base - 1), 3)
        result["perplexity"] = ppl
    run.save(args.out, result, result["summary"])
    print(f"{'length':>6} {'method':>14} {'budget':>6} {'accuracy':>8}")
    for r in result["summary"]:
        print(f"{r['length']:>6} {r['method']:>14} {r['budget'] or '-':>6} {r['accuracy']:>8.1f}")
    for r in result.get("perplexity", []):
        vs = "" if r["vs_dense_pct"] is None else f" ({r['vs_dense_pct']:+.2f}% vs dense)"
        if "vs_full_scan_pct" in r:
            vs += f" ({r['vs_full_scan_pct']:+.3f}% vs the full scan)"
        print(f"perplexity {r['method']:>14} {r['budget'] or '-':>6} {r['perplexity']:.3f}{vs}")
    same = [r["same_tokens_as_quest"] for r in rows if "same_tokens_as_quest" in r]
    if same:
        print(f"PRR exact == Quest DSA, token for token: {sum(same)}/{len(same)} instances")
    for a in result.get("amortized_agreement", []):
        print(f"{a['method']} budget {a['budget']}: same output as the full scan on {a['same_output_count']} of "
              f"{a['instances']} instances ({a['same_output']:.1%}), same score on {a['same_score_count']} "
              f"({a['same_score']:.1%})")
    if args.plot:
        print(f"wrote {run.plot(result, args.plot)}")
    print(f"saved {args.out}")
    return 0


def _cmd_locality(args) -> int:
    from ..algo.sparse import SparseConfig
    from . import locality

    _check_common(args)
    cfg = SparseConfig(method=args.method, block_size=16 if args.method == "quest" else 64, top_k=args.k)
    settings = parse_amortized(args.amortized)
    for flag, v in (("--length", args.length), ("--steps", args.steps)):
        _positive(flag, v)
    model, tok = _load(args)
    hist = locality.record_scores(model, tok, args.length, args.steps, cfg)
    res = locality.study(hist, cfg.top_k, cfg.n_sink, cfg.n_local, amortized=settings)
    res["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("mean hit rate over layers:")
    for key, v in res["hit_rate_mean"].items():
        print(f"  {key:14s} {v:.3f}")
    print("mean overlap against lag: " + ", ".join(f"{k}: {v:.3f}" for k, v in res["overlap_mean"].items()))
    for key, v in res.get("amortized_mean", {}).items():
        print(f"  amortized {key:14s} hit {v:.4f} (worst layer {res['amortized_min'][key]:.4f})")
    g = res["guess"]
    print(f"guessed top-K over {g['rows']} rows: held {g['held']:.4f} (worst layer {g['min_layer_held']:.4f}; "
          f"too high {g['too_high']:.4f}, too low {g['too_low']:.4f}), |C|/K {g['candidates_over_k']:.2f}, "
          f"hit rate of its P (K' = 1.5K) {g['p_hit_rate']:.3f}")
    if args.plot:
        print(f"wrote {locality.plot(res, args.plot)}")
    print(f"saved {args.out}")
    return 0


def register(sub) -> None:
    amortized_help = ("amortized selection settings MxC, comma separated (e.g. 8x3,16x4: a full scan every m steps "
                      "keeps c*K candidates)")
    s = sub.add_parser("eval", help="offline long-context tasks and perplexity: dense vs DSA vs PRR")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--device", default=None)
    s.add_argument("--tasks", default="all", help="comma list or all: passkey, niah_single, niah_multikey, "
                                                  "niah_multivalue, variable_tracking, common_words")
    s.add_argument("--lengths", default="2K,4K,8K", help="prompt lengths (fitted within 2%%)")
    s.add_argument("--methods", default="all", help="dense, quest, infllm_v2, prr_exact, prr_union, predicted")
    s.add_argument("--budgets", default="512,1024,2048")
    s.add_argument("--seeds", type=int, default=1, help="instances per task and length")
    s.add_argument("--ratio", type=float, default=1.0, help="PRR speculation ratio")
    s.add_argument("--ppl-length", type=int, default=4096, help="prefix before the teacher-forced tokens")
    s.add_argument("--ppl-steps", type=int, default=64, help="teacher-forced tokens (0: no perplexity)")
    s.add_argument("--amortized", default="", help=amortized_help + "; adds quest_mMcC / infllm_v2_mMcC methods")
    s.add_argument("--out", default="results/eval.json")
    s.add_argument("--plot", default=None, help="write a PNG here")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("locality", help="temporal locality of DSA selections and predictor hit rates")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--device", default=None)
    s.add_argument("--method", default="quest", choices=["quest", "infllm_v2"])
    s.add_argument("--k", type=int, default=64, help="dynamic blocks per selection")
    s.add_argument("--length", type=int, default=4096, help="text prefix before the recorded steps")
    s.add_argument("--steps", type=int, default=128, help="teacher-forced decode steps recorded")
    s.add_argument("--amortized", default="", help=amortized_help + "; hit against the full scan per layer")
    s.add_argument("--out", default="results/locality.json")
    s.add_argument("--plot", default=None)
    s.set_defaults(func=_cmd_locality)
