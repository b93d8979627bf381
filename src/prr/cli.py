"""The ``prr`` command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cmd_info(args) -> int:
    import prr

    info = {
        "prr": prr.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for k, v in info.items():
        print(f"{k:8s} {v}")
    return 0


def _cmd_simulate(args) -> int:
    """Decode steps on a synthetic cache with a slowly drifting query: PRR against serialized DSA."""
    from tqdm import tqdm

    import prr

    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    b, hkv, hq, d = args.batch, args.kv_heads, args.q_heads, args.head_dim
    cfg = prr.SparseConfig.from_budget(args.method, args.budget)
    cap = args.context + args.steps
    cache = prr.KVCache.allocate(b, cap, hkv, d, dtype=dtype, device=dev)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    cache.write(rnd(b, hkv, args.context, d), rnd(b, hkv, args.context, d),
                torch.full((b,), args.context, dtype=torch.int32, device=dev))
    meta = prr.BlockMetadata(cfg, cache)
    nmax = -(-cache.capacity // cfg.block_size)
    pred = prr.HoltPredictor(1, b, hkv, nmax, device=dev)
    q = rnd(b, hq, d) * args.q_scale

    def drift(q):
        return q + args.drift * args.q_scale * rnd(*q.shape)

    # Calibrate on a history of drifting queries over the prompt (as the engine does with the last W prompt
    # positions), then decode.
    hist, nb = [], prr.num_blocks(cache.seq_lens, cfg.block_size)
    for _ in range(args.calibrate_steps):
        q = drift(q)
        hist.append(prr.select(q, cache, meta).scores)
    cal = None
    if len(hist) >= 2:
        cal = pred.calibrate(0, torch.stack(hist), nb.expand(len(hist), b), cfg.top_k, cfg.n_sink, cfg.n_local,
                             spec_k=prr.speculative_top_k(cfg.top_k, args.ratio))
        print(f"calibrated: alpha={cal.alpha} beta={cal.beta} gamma={cal.gamma} hit rate={cal.hit_rate:.3f}")

    rows, t_dsa, t_prr = [], 0.0, 0.0
    for _ in tqdm(range(args.steps), desc=f"{args.method} decode", unit="step", disable=args.quiet):
        cache.append(rnd(b, hkv, d), rnd(b, hkv, d))
        meta.append(cache)
        q = drift(q)
        t0 = time.perf_counter()
        dsa = prr.dsa_step(q, cache, meta)
        t1 = time.perf_counter()
        out = prr.prr_step(q, cache, meta, pred, 0, ratio=args.ratio, mode=args.mode)
        t2 = time.perf_counter()
        t_dsa, t_prr = t_dsa + t1 - t0, t_prr + t2 - t1
        err = float((out.o.double() - dsa.o.double()).abs().max())
        rows.append({**out.stats.summary(), "max_abs_diff_vs_dsa": err})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    worst = max(r["max_abs_diff_vs_dsa"] for r in rows)
    print(f"method={args.method} budget={args.budget} tokens ({cfg.k_max} blocks of {cfg.block_size}) "
          f"context={args.context} steps={args.steps} ratio={args.ratio} mode={args.mode} dtype={args.dtype}")
    print(f"hit rate {mean['hit_rate']:.3f} | per (seq, head): |S| {mean['selected']:.1f} |P| {mean['predicted']:.1f} "
          f"misses {mean['misses']:.1f} false positives {mean['false_positives']:.1f}")
    print(f"max |PRR - DSA| {worst:.3g} | reference time per step: DSA {1e3 * t_dsa / args.steps:.2f} ms, "
          f"PRR {1e3 * t_prr / args.steps:.2f} ms (CPU reference ops, not a latency claim)")
    if args.json:
        with open(args.json, "w") as f:
            kept = {k: v for k, v in vars(args).items() if k != "func"}
            json.dump({"args": kept, "mean": mean, "max_abs_diff_vs_dsa": worst, "steps": rows,
                       "calibration": None if cal is None else cal.__dict__}, f, indent=1)
    return 0


def _cmd_bench_kernels(args) -> int:
    if not torch.cuda.is_available():
        print("prr bench kernels: needs a CUDA GPU (the kernels' CPU path is Triton's interpreter, not timed)",
              file=sys.stderr)
        return 2
    from .bench import kernels

    kernels.run(args.models.split(","), [int(b) for b in args.batches.split(",")],
                kernels.parse_contexts(args.contexts), args.methods.split(","), args.out,
                torch_path=not args.no_torch)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_layer(args) -> int:
    if not torch.cuda.is_available():
        print("prr bench layer: needs a CUDA GPU", file=sys.stderr)
        return 2
    from .bench import kernels, layer

    layer.run(args.models.split(","), [int(b) for b in args.batches.split(",")],
              kernels.parse_contexts(args.contexts), args.methods.split(","), args.out)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_e2e(args) -> int:
    if not torch.cuda.is_available():
        print("prr bench e2e: needs a CUDA GPU", file=sys.stderr)
        return 2
    from .bench import e2e, kernels

    e2e.run(args.model, kernels.parse_contexts(args.contexts), [int(b) for b in args.batches.split(",")], args.out,
            method=args.method, budget=args.budget, steps=args.steps, n_dense_layers=args.dense_layers,
            ratio=args.ratio)
    print(f"saved {args.out}")
    return 0


def _cmd_bench_plot(args) -> int:
    from .bench.plots import plot_layer

    for p in plot_layer(args.file, args.out_dir):
        print(f"wrote {p}")
    return 0


def _cmd_bench_show(args) -> int:
    from .bench.common import table

    with open(args.file) as f:
        res = json.load(f)
    env = res["env"]
    print(f"{res['bench']} on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit'][:10]})")
    print(table(res["rows"]))
    for t in res.get("meta", {}).get("targets", []):
        print(f"{'MET ' if t['met'] else 'MISS'} {t['case']:36s} {t['op']:14s} {t['value']:8.2f} {t['target']}")
    return 0


def _sparse_cfg(args):
    import prr

    return prr.SparseConfig.from_budget(args.method, args.budget)


def _load(args):
    from .model.weights import load_model

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    print(f"loading {args.model} on {dev} ...", file=sys.stderr)
    return load_model(args.model, dtype=dtype, device=dev)


def _cmd_generate(args) -> int:
    from .model.engine import Engine

    model, tok = _load(args)
    if tok is None:
        print(f"prr generate: {args.model} has random weights and no tokenizer; use a real model", file=sys.stderr)
        return 2
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file: {e}") from e
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise ValueError("give --prompt TEXT or --prompt-file FILE")
    ids = tok.chat([{"role": "user", "content": text}]) if args.chat else tok.encode(text)
    eng = Engine(model, tok, attention=args.attention, sparse=_sparse_cfg(args), ratio=args.ratio, mode=args.mode,
                 n_dense_layers=args.dense_layers)
    print(f"prompt: {len(ids)} tokens; attention: {args.attention}", file=sys.stderr)

    def show(t):
        sys.stdout.write(tok.decode([t]))
        sys.stdout.flush()

    _, st = eng.generate(ids, args.max_new_tokens, on_token=show)
    print()
    s = st.summary()
    line = (f"[{args.attention}] prefill {s['prefill_s']:.2f} s | {s['new_tokens']} tokens, {s['ms_per_token']:.1f} "
            f"ms/token, {s['tokens_per_s']:.1f} tokens/s")
    if args.attention != "dense":
        line += f" | blocks per step {s['blocks_per_step']}"
    if args.attention == "prr":
        line += f" | hit rate {s['hit_rate']:.3f}"
    print(line, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "stats": s}, f, indent=1)
    return 0


def _cmd_demo(args) -> int:
    """The main job: one long real prompt, three attentions, the same answer?"""
    from tqdm import tqdm

    from .model.engine import Engine
    from .model.prompts import passkey_prompt

    model, tok = _load(args)
    ids, key = passkey_prompt(tok, args.tokens, args.depth, seed=args.seed)
    cfg = _sparse_cfg(args)
    print(f"prompt: {len(ids)} tokens of Python's documentation with a pass key ({key}) at depth {args.depth}; "
          f"DSA = {cfg.method}, {cfg.budget_tokens}-token budget ({cfg.k_max} blocks of {cfg.block_size}); "
          f"PRR ratio {args.ratio}, {args.mode} mode; first {args.dense_layers} layers dense")
    dense = Engine(model, tok, attention="dense", sparse=cfg, n_dense_layers=args.dense_layers)
    results = {}
    for name in ("dense", "dsa", "prr"):
        eng = dense if name == "dense" else Engine(model, tok, attention=name, sparse=cfg, ratio=args.ratio,
                                                   mode=args.mode, n_dense_layers=args.dense_layers)
        bar = tqdm(total=args.max_new_tokens, desc=f"{name:5s} decode", unit="tok", leave=False)
        pre = None
        if name == "dense":
            pre = tqdm(total=model.cfg.num_layers, desc="prefill (dense)", unit="layer", leave=False)
        out, st = eng.generate(ids, args.max_new_tokens, on_token=lambda _t, b=bar: b.update(1),
                               prefill_progress=(lambda _i, p=pre: p.update(1)) if pre else None,
                               prefilled_from=None if name == "dense" else dense)
        bar.close()
        if pre:
            pre.close()
        results[name] = (tok.decode(out).strip(), st)
    print()
    for name, (text, st) in results.items():
        extra = f", hit rate {st.hit_rate:.3f}" if st.hit_rate is not None else ""
        print(f"{name:5s} {st.ms_per_token:7.1f} ms/token{extra}: {text!r}")
    same = results["dsa"][0] == results["prr"][0]
    print(f"\nDSA and PRR ({args.mode}) answers identical: {same}; dense agrees with DSA: "
          f"{results['dense'][0] == results['dsa'][0]}; pass key found by dense/DSA/PRR: "
          + "/".join("yes" if key in results[n][0] else "no" for n in ("dense", "dsa", "prr")))
    print("(latency: PyTorch reference ops on this device, not the GPU kernels' speed)" if
          not torch.cuda.is_available() else "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"key": key, "prompt_tokens": len(ids), "answers": {n: r[0] for n, r in results.items()},
                       "stats": {n: r[1].summary() for n, r in results.items()}, "dsa_equals_prr": same}, f,
                      indent=1)
    return 0 if (same or args.mode == "union") else 1


def _cmd_eval(args) -> int:
    from .bench.kernels import parse_contexts
    from .eval import run
    from .eval.tasks import TASKS

    model, tok = _load(args)
    tasks = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    methods = list(run.METHODS) if args.methods == "all" else args.methods.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    lengths = parse_contexts(args.lengths)
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}}
    rows = run.run_tasks(model, tok, tasks, lengths, methods, budgets, seeds=range(args.seeds), ratio=args.ratio)
    result.update(tasks=rows, summary=run.summarize(rows))
    if args.ppl_steps > 0:
        result["perplexity"] = run.run_perplexity(model, tok, args.ppl_length, args.ppl_steps, methods, budgets,
                                                  ratio=args.ratio)
    run.save(args.out, result, result["summary"])
    print(f"{'length':>6} {'method':>10} {'budget':>6} {'accuracy':>8}")
    for r in result["summary"]:
        print(f"{r['length']:>6} {r['method']:>10} {r['budget'] or '-':>6} {r['accuracy']:>8.1f}")
    for r in result.get("perplexity", []):
        print(f"perplexity {r['method']:>10} {r['budget'] or '-':>6} {r['perplexity']:.3f} ({r['vs_dense_pct']:+.2f}%)")
    same = [r["same_tokens_as_quest"] for r in rows if "same_tokens_as_quest" in r]
    if same:
        print(f"PRR exact == Quest DSA, token for token: {sum(same)}/{len(same)} instances")
    if args.plot:
        print(f"wrote {run.plot(result, args.plot)}")
    print(f"saved {args.out}")
    return 0


def _cmd_locality(args) -> int:
    import prr

    from .eval import locality

    model, tok = _load(args)
    cfg = prr.SparseConfig(method=args.method, block_size=16 if args.method == "quest" else 64, top_k=args.k)
    hist = locality.record_scores(model, tok, args.length, args.steps, cfg)
    res = locality.study(hist, cfg.top_k, cfg.n_sink, cfg.n_local)
    res["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("mean hit rate over layers:")
    for key, v in res["hit_rate_mean"].items():
        print(f"  {key:14s} {v:.3f}")
    print("mean overlap against lag: " + ", ".join(f"{k}: {v:.3f}" for k, v in res["overlap_mean"].items()))
    if args.plot:
        print(f"wrote {locality.plot(res, args.plot)}")
    print(f"saved {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prr",
        description="Predict, Reuse, and Repair: long-context decoding with dynamic sparse attention.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="versions and the device prr would use")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("simulate", help="PRR vs serialized DSA over decode steps on a synthetic cache "
                                        "(reference ops; checks exactness, reports hit rates)")
    s.add_argument("--method", default="quest", choices=["quest", "infllm_v2", "oracle"])
    s.add_argument("--budget", type=int, default=1024, help="tokens selected per step, forced blocks included")
    s.add_argument("--context", type=int, default=8192, help="tokens in the cache before decoding")
    s.add_argument("--steps", type=int, default=32, help="decode steps")
    s.add_argument("--ratio", type=float, default=1.5, help="speculation ratio r (K' = ceil(r K))")
    s.add_argument("--mode", default="exact", choices=["exact", "union"])
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--q-heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=2)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--q-scale", type=float, default=2.0, help="query norm multiplier (peakier attention)")
    s.add_argument("--drift", type=float, default=0.1, help="per-step query change, relative to --q-scale")
    s.add_argument("--calibrate-steps", type=int, default=32, help="history W for the predictor's grid search")
    s.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", help="write per-step stats here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_simulate)

    def model_args(s, budget):
        s.add_argument("--model", default="smollm2", help="smollm2 (bundled), a .gguf file, a Hugging Face "
                                                           "checkpoint directory, or a preset (random weights)")
        s.add_argument("--method", default="quest", choices=["quest", "infllm_v2", "oracle"])
        s.add_argument("--budget", type=int, default=budget, help="DSA tokens per step, forced blocks included")
        s.add_argument("--ratio", type=float, default=1.5, help="PRR speculation ratio (K' = ceil(r K))")
        s.add_argument("--mode", default="exact", choices=["exact", "union"])
        s.add_argument("--dense-layers", type=int, default=2, help="first layers kept dense")
        s.add_argument("--max-new-tokens", type=int, default=32)
        s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        s.add_argument("--json", help="write the stats here")

    s = sub.add_parser("generate", help="generate from a prompt with dense, DSA or PRR attention")
    model_args(s, 1024)
    s.add_argument("--prompt", help="prompt text")
    s.add_argument("--prompt-file", help="read the prompt from this file")
    s.add_argument("--attention", default="prr", choices=["dense", "dsa", "prr"])
    s.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on)")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("demo", help="the main job: a long offline prompt answered by dense, DSA and PRR")
    model_args(s, 1024)
    s.add_argument("--tokens", type=int, default=6000, help="prompt length")
    s.add_argument("--depth", type=float, default=0.75, help="where the pass key sits (0 start, 1 end)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo, max_new_tokens=16, budget=2048)

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
    s.add_argument("--out", default="results/locality.json")
    s.add_argument("--plot", default=None)
    s.set_defaults(func=_cmd_locality)

    bench = sub.add_parser("bench", help="GPU benchmarks (results saved as JSON)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    s = bsub.add_parser("kernels", help="every kernel at real attention shapes vs dense SDPA and plain PyTorch")
    s.add_argument("--models", default="llama-3.1-8b,glm-4-9b")
    s.add_argument("--batches", default="1,8")
    s.add_argument("--contexts", default="32K,128K,512K")
    s.add_argument("--methods", default="quest,infllm_v2")
    s.add_argument("--no-torch", action="store_true", help="skip the plain-PyTorch path")
    s.add_argument("--out", default="results/bench_kernels.json")
    s.set_defaults(func=_cmd_bench_kernels)
    s = bsub.add_parser("layer", help="per-layer step: dense vs serialized DSA vs PRR (graphs, two streams)")
    s.add_argument("--models", default="llama-3.1-8b,glm-4-9b")
    s.add_argument("--batches", default="1,8")
    s.add_argument("--contexts", default="32K,128K,512K")
    s.add_argument("--methods", default="quest,infllm_v2")
    s.add_argument("--out", default="results/bench_layer.json")
    s.set_defaults(func=_cmd_bench_layer)
    s = bsub.add_parser("e2e", help="whole-model decode latency: dense vs DSA vs PRR, one CUDA graph per step")
    s.add_argument("--model", default="llama-3.1-8b", help="a preset (random weights at real shapes)")
    s.add_argument("--contexts", default="32K,128K")
    s.add_argument("--batches", default="1,4")
    s.add_argument("--method", default="quest", choices=["quest", "infllm_v2"])
    s.add_argument("--budget", type=int, default=2048)
    s.add_argument("--ratio", type=float, default=1.0)
    s.add_argument("--dense-layers", type=int, default=2)
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--out", default="results/bench_e2e.json")
    s.set_defaults(func=_cmd_bench_e2e)
    s = bsub.add_parser("plot", help="PNG plots from a saved `bench layer` JSON")
    s.add_argument("file")
    s.add_argument("--out-dir", default="results")
    s.set_defaults(func=_cmd_bench_plot)
    s = bsub.add_parser("show", help="print a saved benchmark result")
    s.add_argument("file")
    s.set_defaults(func=_cmd_bench_show)
    bench.set_defaults(func=lambda a: bench.print_help() or 0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"prr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
