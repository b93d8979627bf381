"""The ``prr bench`` subcommands (GPU benchmarks; results saved as JSON, plots drawn from the JSON)."""

from __future__ import annotations

import json
import sys

import torch


def _no_cuda(name: str, why: str = "") -> bool:
    """True (after saying so on stderr) when there is no CUDA GPU to run benchmark `name` on."""
    if torch.cuda.is_available():
        return False
    print(f"prr bench {name}: needs a CUDA GPU{why}", file=sys.stderr)
    return True


def _ints(flag: str, text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``: positive integers, comma separated (`flag` names the option in errors)."""
    try:
        out = [int(b) for b in filter(None, (p.strip() for p in text.split(",")))]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not out or any(b <= 0 for b in out):
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return out


def _choices(flag: str, text: str, allowed) -> list[str]:
    """A comma-separated list whose every item is one of `allowed`."""
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if not out or bad:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad)) or '(nothing given)'}; expected some of "
                         f"{', '.join(allowed)}")
    return out


def _models(flag: str, text: str) -> list[str]:
    from ..model.config import MODEL_PRESETS

    return _choices(flag, text, list(MODEL_PRESETS))


def _shapes(args) -> tuple[list[str], list[int], list[int], list[str]]:
    """Models, batches, contexts and methods of the shape-sweeping benchmarks, checked (no GPU needed)."""
    return (_models("--models", args.models), _ints("--batches", args.batches), _contexts(args.contexts),
            _choices("--methods", args.methods, ("quest", "infllm_v2")))


def _contexts(text: str) -> list[int]:
    from ..cli_args import parse_contexts

    out = parse_contexts(text)
    if any(c <= 0 for c in out):
        raise ValueError(f"--contexts must be positive lengths, got {text!r}")
    return out


def _budgets(args) -> list[int] | None:
    """``--budgets`` (tokens, comma separated; None: each method's default)."""
    return _ints("--budgets", args.budgets) if args.budgets else None


def _cmd_bench_kernels(args) -> int:
    shapes, budgets = _shapes(args), _budgets(args)  # bad arguments are named before the GPU is looked for
    if _no_cuda("kernels", " (the kernels' CPU path is Triton's interpreter, not timed)"):
        return 2
    from . import kernels

    kernels.run(*shapes, args.out, torch_path=not args.no_torch, budgets=budgets)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_layer(args) -> int:
    shapes, budgets = _shapes(args), _budgets(args)
    if _no_cuda("layer"):
        return 2
    from . import layer

    layer.run(*shapes, args.out, budgets=budgets, sweep=not args.quick, timelines=args.timelines)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_e2e(args) -> int:
    from ..cli_args import parse_amortized
    from ..model.commands import check_model_name

    check_model_name(args.model)
    contexts, batches = _contexts(args.contexts), _ints("--batches", args.batches)
    attentions = _choices("--attentions", args.attentions, ("dense", "dsa", "dsa_guessed", "prr", "prr_auto",
                                                                 "prr_previous"))
    amortized = parse_amortized(args.amortized) if args.amortized else ()
    pdl = _choices("--pdl", args.pdl, ("auto", "on", "off"))
    overlaps = _choices("--overlap", args.overlap, ("selection", "topk"))
    for flag, v in (("--budget", args.budget), ("--steps", args.steps)):
        if v <= 0:
            raise ValueError(f"{flag} must be positive, got {v}")
    if args.dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0, got {args.dense_layers}")
    if not args.ratio > 0:
        raise ValueError(f"--ratio must be positive, got {args.ratio}")
    if _no_cuda("e2e"):
        return 2
    from ..model.tp import setup
    from . import e2e

    # Tensor parallelism: under torchrun every rank runs this; rank 0 alone prints and writes.
    tp, _ = setup(args.tp, None, args.tp_backend)
    if tp is not None and tp.world > 1 and tp.backend != "nccl":
        raise ValueError("bench e2e under tensor parallelism captures the step in a CUDA graph: use the nccl "
                         "backend (one GPU per rank)")
    e2e.run(args.model, contexts, batches, args.out, method=args.method, budget=args.budget, steps=args.steps,
            n_dense_layers=args.dense_layers, ratio=args.ratio, prr_mode=args.mode, tp=tp, fuse=not args.no_fuse,
            attentions=attentions, breakdown=not args.no_breakdown, amortized=amortized, pdl=pdl, overlaps=overlaps)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_select(args) -> int:
    from ..cli_args import parse_amortized

    shapes, settings = _shapes(args), parse_amortized(args.amortized)
    if not settings:
        raise ValueError("--amortized needs at least one MxC setting (e.g. 32x6)")
    if _no_cuda("select"):
        return 2
    from . import amortized

    amortized.run(*shapes, settings, args.out)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_topk(args) -> int:
    models, batches = _models("--models", args.models), _ints("--batches", args.batches)
    contexts, budgets = _contexts(args.contexts), _ints("--budgets", args.budgets)
    warps = [None] + (_ints("--warps", args.warps) if args.warps else [])
    if _no_cuda("topk"):
        return 2
    from . import topk

    topk.run(models, batches, contexts, budgets, args.out, warps=warps)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_serve(args) -> int:
    from ..cli_args import parse_contexts
    from ..model.commands import _ratio_arg
    from . import serve

    try:
        lo, _, hi = args.output.partition("-")
        out_range = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"--output takes LO-HI tokens, e.g. 64-512; got {args.output!r}") from None
    if not 0 < out_range[0] <= out_range[1]:
        raise ValueError(f"--output takes 0 < LO <= HI, got {args.output!r}")
    serve.run(args.model, args.out, attentions=args.attentions.split(","), requests=args.requests,
              concurrency=args.concurrency, prompt_lens=parse_contexts(args.prompt_mix), out_range=out_range,
              arrival=args.arrival, rate=args.rate, max_batch=args.max_batch,
              max_tokens_in_cache=args.max_tokens_in_cache, method=args.method, budget=args.budget,
              ratio=_ratio_arg(args.ratio), n_dense_layers=args.dense_layers, max_queue=args.max_queue,
              static=not args.no_static, http=args.http, memory_probe=args.memory_probe, seed=args.seed)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_plot(args) -> int:
    import json

    from .plots import plot_e2e_breakdown, plot_heatmap, plot_layer, plot_step_parts, plot_timelines

    with open(args.file) as f:
        res = json.load(f)
    if res.get("bench") == "e2e":
        print(plot_e2e_breakdown(args.file, args.out_dir))
        return 0
    steps = tuple(args.steps.split(",")) if args.steps else None
    if args.timelines:  # a diagnostic JSON's or a `bench layer --timelines` JSON's kernel timelines
        print(plot_timelines(args.file, args.out_dir, steps))
        return 0
    if "cases" in res:  # scripts/diag_prr.py: the parts of DSA's and PRR's layer step
        print(plot_step_parts(args.file, args.out_dir))
        return 0

    paths = plot_heatmap(args.file, args.out_dir) if args.heatmap else plot_layer(args.file, args.out_dir)
    for p in [paths] if isinstance(paths, str) else paths:
        print(f"wrote {p}")
    return 0


def _cmd_bench_show(args) -> int:
    from .common import table

    with open(args.file) as f:
        res = json.load(f)
    env = res["env"]
    print(f"{res['bench']} on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit'][:10]})")
    print(table(res["rows"]))
    for t in res.get("meta", {}).get("targets", []):
        print(f"{'MET ' if t['met'] else 'MISS'} {t['case']:36s} {t['op']:14s} {t['value']:8.2f} {t['target']}")
    return 0


def register(sub) -> None:
    from ..model.commands import tp_args

    bench = sub.add_parser("bench", help="GPU benchmarks (results saved as JSON)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    s = bsub.add_parser("kernels", help="every kernel at real attention shapes vs dense SDPA and plain PyTorch")
    s.add_argument("--models", default="llama-3.1-8b,glm-4-9b")
    s.add_argument("--batches", default="1,8")
    s.add_argument("--contexts", default="32K,128K,512K")
    s.add_argument("--methods", default="quest,infllm_v2")
    s.add_argument("--no-torch", action="store_true", help="skip the plain-PyTorch path")
    s.add_argument("--budgets", default="", help="selection budgets in tokens, e.g. 2048,4096,8192 "
                   "(default: 2048 for Quest, 4096 for InfLLM-v2)")
    s.add_argument("--out", default="results/bench_kernels.json")
    s.set_defaults(func=_cmd_bench_kernels)
    s = bsub.add_parser("layer", help="per-layer step: dense vs serialized DSA vs PRR (graphs, two streams)")
    s.add_argument("--models", default="llama-3.1-8b,glm-4-9b")
    s.add_argument("--batches", default="1,8")
    s.add_argument("--contexts", default="32K,128K,512K")
    s.add_argument("--methods", default="quest,infllm_v2")
    s.add_argument("--budgets", default="", help="selection budgets in tokens, e.g. 2048,4096,8192 "
                   "(default: 2048 for Quest, 4096 for InfLLM-v2)")
    s.add_argument("--quick", action="store_true", help="no paper's PRR, hit-rate sweep, drift rows or whole-step "
                   "timings")
    s.add_argument("--timelines", action="store_true", help="record kernel timelines of DSA, DSA on the guessed "
                   "top-K and PRR (in the JSON's summary; draw them with `prr bench plot --timelines`)")
    s.add_argument("--out", default="results/bench_layer.json")
    s.set_defaults(func=_cmd_bench_layer)
    s = bsub.add_parser("e2e", help="whole-model decode latency: dense vs DSA vs PRR, one CUDA graph per step")
    s.add_argument("--model", default="llama-3.1-8b", help="a preset (random weights at real shapes)")
    s.add_argument("--contexts", default="32K,128K")
    s.add_argument("--batches", default="1,4")
    s.add_argument("--method", default="quest", choices=["quest", "infllm_v2"])
    s.add_argument("--budget", type=int, default=2048)
    s.add_argument("--ratio", type=float, default=1.0)
    s.add_argument("--mode", default="exact", choices=["exact", "union"],
                   help="PRR's exact (DSA's output) or union (attention over P and S) mode")
    s.add_argument("--dense-layers", type=int, default=2)
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--attentions", default="dense,dsa,dsa_guessed,prr",
                   help="which of dense, dsa, dsa_guessed (PRR's engine without speculation: DSA on the guessed "
                        "top-K), prr, prr_auto (ratio auto), prr_previous (K' = K on the full top-K, P the previous "
                        "S) to time")
    s.add_argument("--amortized", default="", help="amortized DSA settings MxC (host schedule), e.g. 16x8: a "
                   "dsa_mMcC row each")
    s.add_argument("--pdl", default="auto", help="programmatic dependent launch modes to time each configuration "
                   "under, comma separated (auto, on, off; e.g. off,on for an A/B in one run)")
    s.add_argument("--overlap", default="topk", help="what PRR's speculation runs beside, comma separated: topk "
                   "(the top-K alone, after the scores: the engine's default), selection (scores and top-K); one prr "
                   "row each")
    s.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up products (the baseline)")
    s.add_argument("--no-breakdown", action="store_true", help="skip the per-token breakdown (a kernel timeline of "
                   "one replay per configuration: selection, speculation, repair, attention vs the rest)")
    s.add_argument("--out", default="results/bench_e2e.json")
    tp_args(s)
    s.set_defaults(func=_cmd_bench_e2e)
    s = bsub.add_parser("select", help="full-scan selection vs amortized selection (scan every m steps, c*K "
                                       "candidates re-scored between) and the DSA step with it")
    s.add_argument("--models", default="llama-3.1-8b")
    s.add_argument("--batches", default="1,8")
    s.add_argument("--contexts", default="32K,128K,512K")
    s.add_argument("--methods", default="quest")
    s.add_argument("--amortized", default="16x4,16x8,32x4,32x6", help="MxC settings, comma separated")
    s.add_argument("--out", default="results/bench_select.json")
    s.set_defaults(func=_cmd_bench_select)
    s = bsub.add_parser("topk", help="the guessed top-K against the full one, alone and in the selection")
    s.add_argument("--models", default="llama-3.1-8b")
    s.add_argument("--batches", default="1,8")
    s.add_argument("--contexts", default="128K,512K")
    s.add_argument("--budgets", default="2048", help="selection budgets in tokens (Quest blocks of 16)")
    s.add_argument("--warps", default="", help="also time the guessed top-K at these program widths, e.g. 4,8,16")
    s.add_argument("--out", default="results/bench_topk.json")
    s.set_defaults(func=_cmd_bench_topk)
    s = bsub.add_parser("serve", help="continuous batching under load (N clients, a prompt-length mix) against "
                                      "static batches of the same requests; throughput, TTFT, TPOT p50/p99")
    s.add_argument("--model", default="llama-3.1-8b",
                   help="a preset (random weights; random keys and values instead of a prefill) or a real model")
    s.add_argument("--attentions", default="dense,dsa,prr")
    s.add_argument("--requests", type=int, default=24)
    s.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    s.add_argument("--prompt-mix", default="4K", help="prompt lengths drawn uniformly, e.g. 4K,16K,64K,128K")
    s.add_argument("--output", default="64-512", help="output tokens per request, drawn uniformly from LO-HI")
    s.add_argument("--arrival", default="closed", choices=["closed", "poisson"],
                   help="closed loop (each client sends its next request when one ends) or Poisson at --rate")
    s.add_argument("--rate", type=float, default=None, help="requests per second (Poisson arrivals)")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-tokens-in-cache", type=int, default=None,
                   help="KV pool in tokens (default: every slot holds the longest request, or what 60%% of free "
                        "GPU memory holds); the static baseline gets the same budget")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this are refused (429)")
    s.add_argument("--method", default="quest", choices=["quest", "infllm_v2"])
    s.add_argument("--budget", type=int, default=2048)
    s.add_argument("--ratio", default="auto")
    s.add_argument("--dense-layers", type=int, default=2)
    s.add_argument("--no-static", action="store_true", help="skip the static-batch baseline")
    s.add_argument("--http", action="store_true", help="go through the HTTP server (needs the serve extra and httpx; "
                                                       "default: the engine loop in process)")
    s.add_argument("--memory-probe", action="store_true", help="host RSS and CUDA memory every 100 requests")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/bench_serve.json")
    s.set_defaults(func=_cmd_bench_serve)
    s = bsub.add_parser("plot", help="PNG plots from a saved `bench layer` JSON (or the "
                                     "per-token breakdown from a `bench e2e` JSON)")
    s.add_argument("file")
    s.add_argument("--heatmap", action="store_true", help="PRR / DSA over (context, budget), a panel per batch")
    s.add_argument("--timelines", action="store_true",
                   help="kernel timelines from a diagnostic JSON with recorded timelines (scripts/diag_prr.py)")
    s.add_argument("--steps", default="", help="with --timelines: the steps to draw, comma separated")
    s.add_argument("--out-dir", default="results")
    s.set_defaults(func=_cmd_bench_plot)
    s = bsub.add_parser("show", help="print a saved benchmark result")
    s.add_argument("file")
    s.set_defaults(func=_cmd_bench_show)
    bench.set_defaults(func=lambda a: bench.print_help() or 0)
