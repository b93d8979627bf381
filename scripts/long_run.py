"""A long greedy run of the real model: PRR (exact) against serialized DSA, token for token, memory sampled.

Both engines share one dense prefill, then decode in lockstep, each feeding back its own greedy token: PRR exact
must produce DSA's token at every step (its output is DSA's attention up to float rounding). Memory (host RSS,
and on CUDA the allocator's allocated/reserved bytes) is sampled every ``--sample-every`` steps; it must stay
flat once the run has warmed up (the caches are allocated for the whole run at prefill).

    PYTHONPATH=src python3 scripts/long_run.py --steps 4096 --out results/long_run_gpu

writes ``DIR/long_run.json`` (every token of both engines, the first divergence if any, memory samples, hit
rates, versions, git commit) and ``DIR/long_run.log`` (the same progress lines as the console).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

PROMPT = "Write a long story about a lighthouse keeper and the ships she guides through the storm."


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_sample(step: int, device: torch.device) -> dict:
    s = {"step": step, "rss_mb": round(rss_bytes() / 2**20, 2)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        s["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 3)
        s["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(device) / 2**20, 3)
    return s


def growth(samples: list[dict], key: str) -> float | None:
    """Growth of `key` from the first sample at or after a quarter of the run (warm-up done) to the last."""
    if not samples or key not in samples[-1]:
        return None
    quarter = samples[-1]["step"] // 4
    start = next(s for s in samples if s["step"] >= quarter)
    return round(samples[-1][key] - start[key], 3)


@torch.inference_mode()
def run(model, tok, steps: int, *, prompt: str = PROMPT, budget: int = 256, ratio: float = 1.5,
        graph: bool = False, sample_every: int = 128, time_limit: float | None = None, forced: bool = False,
        log=print) -> dict:
    """Decode `steps` tokens with DSA and PRR (exact) in lockstep; returns the result dict (see module doc).

    ``forced``: feed DSA's token to both engines (teacher forcing), so one near-tie flipped by low-precision
    rounding does not send the two texts apart for the rest of the run; every step where PRR's greedy token
    differs from DSA's is recorded with DSA's top-2 margin in units of the bf16 spacing at its top logit."""
    from prr import SparseConfig
    from prr.model.engine import Engine

    dev = model.device
    ids = tok.chat([{"role": "user", "content": prompt}])
    cfg = SparseConfig.from_budget("quest", budget)
    engines = {a: Engine(model, tok, attention=a, sparse=cfg, ratio=ratio) for a in ("dsa", "prr")}
    engines["dsa"].prefill(ids, steps + 1)
    engines["prr"].adopt_prefill(engines["dsa"])
    nxt = {a: int(e._last_logits[0].argmax()) for a, e in engines.items()}
    tokens: dict[str, list[int]] = {a: [] for a in engines}
    secs = dict.fromkeys(engines, 0.0)
    logits = {}
    samples, hits, first_diff, flips, max_diff = [memory_sample(0, dev)], [], None, [], 0.0
    log(f"prompt {len(ids)} tokens, {steps} steps, Quest budget {budget} ({cfg.k_max} blocks of {cfg.block_size}), "
        f"PRR ratio {ratio}, exact mode, device {dev}, graph {graph}")
    start, done = time.perf_counter(), 0
    for step in range(1, steps + 1):
        if time_limit and time.perf_counter() - start > time_limit:
            log(f"time limit of {time_limit} s reached after {done} steps: stopping, results cover those")
            if samples[-1]["step"] != done:
                samples.append(memory_sample(done, dev))
            break
        done = step
        for a, eng in engines.items():
            tokens[a].append(nxt[a])
            eng._step_stats = []  # the engine keeps one step's stats (generate() resets them the same way)
            t0 = time.perf_counter()
            logits[a] = eng.step(torch.tensor([nxt[a]], device=dev))
            nxt[a] = int(logits[a][0].argmax())
            secs[a] += time.perf_counter() - t0
            if graph and step == 1:  # the first step ran eagerly (kernels compiled); replay a graph from now on
                eng.capture_decode()
        step_diff = float((logits["dsa"].float() - logits["prr"].float()).abs().max())
        max_diff = max(max_diff, step_diff)
        if forced and nxt["dsa"] != nxt["prr"]:
            top2 = logits["dsa"][0].float().topk(2).values
            ulp = 2.0 ** (math.floor(math.log2(max(abs(float(top2[0])), 1e-30))) - 7)  # bf16: 8 significant bits
            margin = float(top2[0] - top2[1])
            flips.append({"step": step, "dsa": nxt["dsa"], "prr": nxt["prr"], "dsa_top2_margin": margin,
                          "margin_bf16_ulps": margin / ulp, "max_abs_logit_diff": step_diff})
        if forced:
            nxt["prr"] = nxt["dsa"]  # both engines take DSA's token
        if first_diff is None and (flips or nxt["dsa"] != nxt["prr"]):
            if flips:
                first_diff = dict(flips[0])
            else:
                # A near-tie of DSA's two best logits points at float rounding; a wide margin at a real difference.
                top2 = logits["dsa"][0].float().topk(2).values
                margin = float(top2[0] - top2[1])
                first_diff = {"step": step, "dsa": nxt["dsa"], "prr": nxt["prr"], "dsa_top2_margin": margin,
                              "max_abs_logit_diff": step_diff}
            log(f"step {step}: first token difference {first_diff}")
        stats = engines["prr"]._step_stats
        if stats:
            hits.append(sum(s.hit_rate() for s in stats) / len(stats))
        if step % sample_every == 0 or step == steps:
            samples.append(memory_sample(step, dev))
            s, recent = samples[-1], hits[-sample_every:]
            ndiff = len(flips) if forced else sum(x != y for x, y in zip(tokens["dsa"], tokens["prr"], strict=True))
            log(f"step {step}: rss {s['rss_mb']} MB" + (f", cuda allocated {s['cuda_allocated_mb']} MB"
                                                         if "cuda_allocated_mb" in s else "")
                + f", PRR hit rate {sum(recent) / max(len(recent), 1):.3f}, token differences so far {ndiff}")
    for a in engines:
        tokens[a].append(nxt[a])
    diffs = len(flips) if forced else sum(x != y for x, y in zip(tokens["dsa"], tokens["prr"], strict=True))
    near_tie = all(f["margin_bf16_ulps"] <= 2 for f in flips)
    return {
        "forced": forced, "flips": flips, "flips_all_near_ties": near_tie, "max_abs_logit_diff": max_diff,
        "steps": steps, "steps_done": done, "prompt": prompt, "prompt_tokens": len(ids), "budget": budget,
        "ratio": ratio,
        "graph": graph, "device": str(dev), "token_differences": diffs, "first_difference": first_diff,
        "tokens_equal": diffs == 0, "hit_rate_mean": sum(hits) / len(hits) if hits else None,
        "ms_per_step": {a: round(1e3 * secs[a] / max(done, 1), 3) for a in engines},
        "memory": samples, "rss_growth_mb": growth(samples, "rss_mb"),
        "cuda_allocated_growth_mb": growth(samples, "cuda_allocated_mb"),
        "cuda_reserved_growth_mb": growth(samples, "cuda_reserved_mb"),
        "text": {a: tok.decode(t) for a, t in tokens.items()}, "tokens": tokens,
    }


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "git_commit": commit,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4096)
    p.add_argument("--out", required=True, help="directory for long_run.json and long_run.log")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--budget", type=int, default=256, help="Quest tokens per step (forced blocks included)")
    p.add_argument("--ratio", type=float, default=1.5)
    p.add_argument("--graph", action="store_true", help="replay each engine's decode step as one CUDA graph")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="model and cache dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--sample-every", type=int, default=128)
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds of decoding and "
                   "save what was run (a device call has a hard limit)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--forced", action="store_true", help="teacher forcing: both engines take DSA's token; PRR's "
                   "greedy token is compared with DSA's at every step (passes when every flip is a near-tie of at "
                   "most 2 bf16 spacings)")
    args = p.parse_args(argv)
    from prr.model import load_model

    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "long_run.log"), "w")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    model, tok = load_model("smollm2", dtype=dtype, device=dev)
    t0 = time.perf_counter()
    res = run(model, tok, args.steps, prompt=args.prompt, budget=args.budget, ratio=args.ratio, graph=args.graph,
              sample_every=args.sample_every, time_limit=args.time_limit, forced=args.forced, log=log)
    res.update(args=vars(args), environment=environment(), dtype=str(dtype), seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(args.out, "long_run.json"), "w") as f:
        json.dump(res, f, indent=1)
    log(f"done in {res['seconds']} s: token differences {res['token_differences']} (first: "
        f"{res['first_difference']}), PRR hit rate {res['hit_rate_mean']}, rss growth {res['rss_growth_mb']} MB, "
        f"cuda allocated growth {res['cuda_allocated_growth_mb']} MB; ms/step {res['ms_per_step']}")
    logf.close()
    ok = res["flips_all_near_ties"] if args.forced else res["tokens_equal"]
    return 0 if ok and res["steps_done"] == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
