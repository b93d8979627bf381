"""The model-facing subcommands: ``prr generate``, ``prr demo`` (eval and locality: :mod:`prr.eval.commands`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..provenance import environment


def _sparse_cfg(args):
    import prr

    return prr.SparseConfig.from_budget(args.method, args.budget)


def check_model_name(name: str) -> str:
    """`name` as ``--model`` takes it (checked without loading anything): the bundled model, a ``.gguf`` path,
    a checkpoint directory or a preset; anything else fails with the loader's own message."""
    import os

    from .config import MODEL_PRESETS
    from .weights import BUNDLED

    if name in BUNDLED or name.endswith(".gguf") or os.path.isdir(name) or name in MODEL_PRESETS:
        return name
    raise ValueError(f"unknown model {name!r}: expected smollm2, a .gguf file, a checkpoint directory, or "
                     f"one of {', '.join(MODEL_PRESETS)} (random weights)")


def check_args(args) -> None:
    """Every setting of ``prr generate`` / ``prr demo`` that can be judged without the model, checked before it
    loads (a typo costs no model load): the model name, the DSA budget, the dense layers, the token counts."""
    check_model_name(args.model)
    _sparse_cfg(args)
    if args.dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0, got {args.dense_layers}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "tokens", 1) < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if not 0 <= getattr(args, "depth", 0) <= 1:
        raise ValueError(f"--depth must lie in [0, 1], got {args.depth}")


def _load(args):
    from .tp import load_model_tp, setup, world_size_from_env
    from .weights import load_model

    # Tensor parallelism: under torchrun (or with --tp) this process is one rank and loads only its slices.
    if not hasattr(args, "tp") and world_size_from_env() > 1:
        raise ValueError(f"prr {args.command} runs in one process; under torchrun run prr generate or prr bench e2e")
    tp, device = setup(getattr(args, "tp", None), args.device, getattr(args, "tp_backend", None))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    print(f"loading {args.model} on {dev} ..." + (f" (tensor parallel over {tp.world} ranks)" if tp else ""),
          file=sys.stderr)
    if tp is not None:
        return load_model_tp(args.model, tp, dtype=dtype, device=dev)
    return load_model(args.model, dtype=dtype, device=dev)


def _read_prompts(args) -> list[str]:
    """--prompt (repeatable), then --prompt-file (repeatable; a .jsonl file holds one prompt per line: a JSON
    string, or an object with a "prompt" field)."""
    texts = list(args.prompt or [])
    for path in args.prompt_file or []:
        try:
            with open(path, encoding="utf-8") as f:
                body = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file: {e}") from e
        if not path.endswith(".jsonl"):
            texts.append(body)
            continue
        for n, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f'{path}:{n}: expected a JSON string or an object with a "prompt" string')
            texts.append(text)
    if not texts:
        raise ValueError("give --prompt TEXT or --prompt-file FILE (each may be repeated)")
    for j, t in enumerate(texts):
        if not t.strip():
            raise ValueError("the prompt is empty" if len(texts) == 1 else f"prompt {j} of the batch is empty")
    return texts


def _timing_line(st) -> str:
    s = st.summary()
    line = (f"prefill {s['prefill_s']:.2f} s | warm-up {1e3 * s['warmup_s']:.0f} ms"
            + (f", graph capture {1e3 * s['capture_s']:.0f} ms" if s["cuda_graph"] else "")
            + f" | {s['new_tokens']} tokens, steady state {s['ms_per_token']:.2f} ms/token, "
            f"{s['tokens_per_s']:.1f} tokens/s")
    if s["blocks_per_step"] is not None:
        line += f" | blocks per step {s['blocks_per_step']}"
    if s["hit_rate"] is not None:
        line += f" | hit rate {s['hit_rate']:.3f}"
    return line


def _ratio_arg(text: str):
    from ..cli_args import parse_ratio

    try:
        return parse_ratio(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _speculation_line(d: dict) -> str:
    """What ``ratio="auto"`` chose: K'/K and the modelled gain, or speculation off and why."""
    if d["speculation"] == "off":
        return f"PRR speculation off at {d['context']} tokens (PRR decodes as DSA, its exact twin): {d['reason']}"
    gain = f", modelled gain {d['gain']:+.1%}" if "gain" in d else ""
    return f"PRR speculation on at {d['context']} tokens, ratio {d['ratio']:.3g}{gain}: {d['reason']}"


def _cmd_generate(args) -> int:
    from .auto import describe_crossover
    from .engine import Engine
    from .generation import GenerationConfig
    from .sampling import SamplingConfig

    # Settings first: a bad one fails before the model loads.
    check_args(args)
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)
    gcfg = GenerationConfig(args.max_new_tokens, sampling, tuple(args.stop or ()), not args.ignore_eos)
    texts = _read_prompts(args)
    model, tok = _load(args)
    if tok is None:
        print(f"prr generate: {args.model} has random weights and no tokenizer; use a real model", file=sys.stderr)
        return 2
    prompts = [tok.chat([{"role": "user", "content": t}]) if args.chat else tok.encode(t) for t in texts]
    # On a GPU users get the attention that pays at their context; on the CPU (reference ops) PRR, as before.
    attention = args.attention or ("auto" if model.device.type == "cuda" else "prr")
    eng = Engine(model, tok, attention=attention, sparse=_sparse_cfg(args), ratio=args.ratio, mode=args.mode,
                 n_dense_layers=args.dense_layers, graphs=not args.no_graph)
    print(f"prompts: {len(prompts)} of {', '.join(str(len(p)) for p in prompts)} tokens; attention: {attention}",
          file=sys.stderr)
    gen = eng.stream(prompts, gcfg)
    for ev in gen:  # one prompt streams as it comes; a batch prints each sequence at the end
        if len(prompts) == 1:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    if len(prompts) == 1:
        print()
    else:
        for j, seq in enumerate(gen.sequences):
            print(f"--- [{j}] {seq.finish_reason}, {len(seq.tokens)} tokens\n{seq.text}")
    st = gen.stats
    if eng.auto_decision:
        d = eng.auto_decision
        print(f"auto: {d['attention']} at {d['context']} tokens ({describe_crossover(d['crossover'])})",
              file=sys.stderr)
    if eng.spec_decision:
        print(_speculation_line(eng.spec_decision), file=sys.stderr)
    print(f"[{st.attention}] {_timing_line(st)}", file=sys.stderr)
    if args.json and getattr(model.tp, "rank", 0) == 0:  # tensor parallel: rank 0 writes
        seqs = [q.summary() for q in gen.sequences]
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "stats": st.summary(),
                       "auto": eng.auto_decision, "speculation": eng.spec_decision, "sequences": seqs,
                       "tensor_parallel": getattr(model.tp, "world", None), "env": environment(),
                       "tokens": seqs[0]["tokens"] if len(seqs) == 1 else [q["tokens"] for q in seqs]},
                      f, indent=1)
    return 0


def _cmd_demo(args) -> int:
    """The main job: one long real prompt, three attentions, the same answer?"""
    from tqdm import tqdm

    from .engine import Engine
    from .prompts import passkey_prompt

    check_args(args)
    model, tok = _load(args)
    ids, key = passkey_prompt(tok, args.tokens, args.depth, seed=args.seed)
    cfg = _sparse_cfg(args)
    print(f"prompt: {len(ids)} tokens of Python's documentation with a pass key ({key}) at depth {args.depth}; "
          f"DSA = {cfg.method}, {cfg.budget_tokens}-token budget ({cfg.k_max} blocks of {cfg.block_size}); "
          f"PRR ratio {args.ratio}, {args.mode} mode; first {args.dense_layers} layers dense")
    dense = Engine(model, tok, attention="dense", sparse=cfg, n_dense_layers=args.dense_layers)
    results, spec = {}, None
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
        if name == "prr" and eng.spec_decision:
            spec = eng.spec_decision
            tqdm.write(_speculation_line(spec))
    print()
    for name, (text, st) in results.items():
        extra = f", hit rate {st.hit_rate:.3f}" if st.hit_rate is not None else ""
        warm = f"warm-up {1e3 * st.warmup_s:.0f} ms" + (f", capture {1e3 * st.capture_s:.0f} ms" if st.cuda_graph
                                                         else "")
        print(f"{name:5s} {st.ms_per_token:7.1f} ms/token ({warm}){extra}: {text!r}")
    # What attention="auto" (the default of `prr generate` on a GPU) picks at this context.
    from .auto import describe_crossover, resolve

    cross = dense.crossover(1)
    auto_pick = resolve(len(ids), cross, dense.auto_sparse)
    print(f"auto would use {auto_pick} here ({len(ids)} tokens; {describe_crossover(cross, 1)})")
    same = results["dsa"][0] == results["prr"][0]
    print(f"\nDSA and PRR ({args.mode}) answers identical: {same}; dense agrees with DSA: "
          f"{results['dense'][0] == results['dsa'][0]}; pass key found by dense/DSA/PRR: "
          + "/".join("yes" if key in results[n][0] else "no" for n in ("dense", "dsa", "prr")))
    print("(latency: PyTorch reference ops on this device, not the GPU kernels' speed)" if
          not torch.cuda.is_available() else "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"key": key, "prompt_tokens": len(ids), "answers": {n: r[0] for n, r in results.items()},
                       "stats": {n: r[1].summary() for n, r in results.items()}, "dsa_equals_prr": same,
                       "auto": {"attention": auto_pick, "crossover": cross}, "speculation": spec}, f,
                      indent=1)
    return 0 if (same or args.mode == "union") else 1


def tp_args(s) -> None:
    """Tensor parallelism: launch with `torchrun --nproc-per-node N -m prr ...` (the world size decides)."""
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks; must equal torchrun's "
                   "--nproc-per-node (1: the tensor-parallel code path on one device)")
    s.add_argument("--tp-backend", default=None, choices=["nccl", "gloo"],
                   help="default: nccl on CUDA (one GPU per rank), gloo on the CPU or several ranks on one GPU")


def register(sub) -> None:
    def model_args(s, budget):
        s.add_argument("--model", default="smollm2", help="smollm2 (bundled), a .gguf file, a Hugging Face "
                                                           "checkpoint directory, or a preset (random weights)")
        s.add_argument("--method", default="quest", choices=["quest", "infllm_v2", "oracle"])
        s.add_argument("--budget", type=int, default=budget, help="DSA tokens per step, forced blocks included")
        s.add_argument("--ratio", type=_ratio_arg, default="auto",
                       help="PRR speculation ratio (K' = ceil(r K)), or auto (default): on a GPU the speculation "
                            "budget profiler picks K' at the prompt's context, or turns speculation off where it "
                            "does not pay (PRR then decodes as DSA); on a CPU PRR decodes as DSA (nothing runs "
                            "beside the selection there)")
        s.add_argument("--mode", default="exact", choices=["exact", "union"])
        s.add_argument("--dense-layers", type=int, default=2, help="first layers kept dense")
        s.add_argument("--max-new-tokens", type=int, default=32)
        s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        s.add_argument("--json", help="write the stats here")

    s = sub.add_parser("generate", help="generate from one prompt or a batch with dense, DSA or PRR attention")
    model_args(s, 1024)
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    s.add_argument("--prompt-file", action="append", help="read a prompt from this file (repeat for a batch; "
                                                          "a .jsonl file holds one prompt per line)")
    s.add_argument("--attention", default=None, choices=["auto", "dense", "dsa", "prr"],
                   help="default: auto on a GPU (dense below the profiled crossover context), prr on a CPU")
    s.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on)")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    s.add_argument("--stop", action="append", help="stop a sequence at this string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    s.add_argument("--no-graph", action="store_true", help="decode eagerly on a GPU (no CUDA graph)")
    tp_args(s)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("demo", help="the main job: a long offline prompt answered by dense, DSA and PRR")
    model_args(s, 1024)
    s.add_argument("--tokens", type=int, default=6000, help="prompt length")
    s.add_argument("--depth", type=float, default=0.75, help="where the pass key sits (0 start, 1 end)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo, max_new_tokens=16, budget=2048)
