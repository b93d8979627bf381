"""The ``prr`` command line."""

from __future__ import annotations

import argparse
import json
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
    nmax = cache.max_blocks(cfg.block_size)
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

    from .bench.commands import register as register_bench
    from .eval.commands import register as register_eval
    from .model.commands import register as register_model
    from .serve.commands import register as register_serve

    register_model(sub)
    register_eval(sub)
    register_bench(sub)
    register_serve(sub)
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
        name = " ".join(filter(None, (args.command, getattr(args, "bench_command", None))))
        print(f"prr {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
