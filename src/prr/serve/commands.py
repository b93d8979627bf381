"""``prr serve``: the command line of the server."""

from __future__ import annotations

import argparse
import os


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _cmd_serve(args) -> int:
    import torch

    from ..algo.sparse import SparseConfig
    from ..model.weights import load_model
    from .server import ServeConfig, serve

    sparse = SparseConfig.from_budget(args.method, args.budget)
    key = args.api_key or os.environ.get("PRR_API_KEY") or None
    cfg = ServeConfig(attention=args.attention, sparse=sparse, ratio=args.ratio, mode=args.mode,
                      n_dense_layers=args.dense_layers, max_batch=args.max_batch,
                      max_tokens_in_cache=args.max_tokens_in_cache, max_seq_len=args.max_seq_len,
                      max_queue=args.max_queue, max_tokens_cap=args.max_new_tokens, api_key=key,
                      graphs=not args.no_graph)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    model, tok = load_model(args.model, dtype=dtype, device=dev)
    model_id = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    serve(model, tok, model_id, cfg, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(sub) -> None:
    from ..model.commands import _ratio_arg

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("--model", default="smollm2", help="smollm2 (bundled), a .gguf file, a Hugging Face checkpoint "
                                                       "directory, or a preset (random weights, token-id prompts)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the --model name)")
    s.add_argument("--attention", default="prr", choices=["dense", "dsa", "prr"])
    s.add_argument("--method", default="quest", choices=["quest", "infllm_v2", "oracle"])
    s.add_argument("--budget", type=_positive, default=1024, help="DSA tokens per step, forced blocks included")
    s.add_argument("--ratio", type=_ratio_arg, default="auto",
                   help="PRR speculation ratio (K' = ceil(r K)); auto (default): PRR decodes as serialized DSA "
                        "(one server, many contexts: nothing to profile the speculation at)")
    s.add_argument("--mode", default="exact", choices=["exact", "union"])
    s.add_argument("--dense-layers", type=int, default=2, help="first layers kept dense")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=_positive, default=8, help="batch slots (sequences decoded together)")
    s.add_argument("--max-tokens-in-cache", type=_positive, default=65536,
                   help="KV cache pool shared by all sequences, in tokens")
    s.add_argument("--max-seq-len", type=_positive, default=None,
                   help="longest prompt + output per request (default: the model's context)")
    s.add_argument("--max-new-tokens", type=_positive, default=4096, help="largest max_tokens a request may ask")
    s.add_argument("--max-queue", type=_positive, default=256, help="requests waiting beyond this get 429")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: "
                                                   "$PRR_API_KEY if set)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--no-graph", action="store_true", help="decode eagerly on a GPU (no CUDA graphs)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=_cmd_serve)
