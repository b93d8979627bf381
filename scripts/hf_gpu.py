"""prr.hf on a GPU: bf16 equality and a 32K decode-latency comparison. Writes DIR/hf_gpu.json.

Run on the GPU machine (torch 2.11 / triton 3.6 / transformers 5.17):

    PYTHONPATH=src python3 scripts/hf_gpu.py --out results/hf_gpu

1. Equality, bf16, tiny random Llama / Qwen2 / Mistral / GLM-4 models (head_dim 64, 2048-token prompt, 32 greedy
   steps, batch 1 and 2): transformers' own SDPA tokens against transformers + prr dense and DSA with a budget
   covering the context (different kernels round differently in bf16, so agreement is measured, not assumed),
   and PRR exact against DSA at a 512-token budget (the claim: the same tokens).
2. Latency at 32K, batch 1, Llama-3.1-8B shapes with random weights (or ``--model PATH``, a local checkpoint):
   per-token decode time of transformers' SDPA with its DynamicCache, transformers + prr (DSA and PRR through
   the attention registry; eager, as transformers runs), and prr's own engine (the same attention with the
   whole decode step as one CUDA graph; caches filled with random keys, as ``prr bench e2e`` does). Each
   transformers step is timed from launch to synchronize (host overhead included: that is what a user waits).

``--smoke`` runs both parts at toy sizes (also on a CPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import transformers

import prr.hf as ph
from prr.algo.sparse import SparseConfig
from prr.bench.common import environment
from prr.model.config import MODEL_PRESETS
from prr.model.engine import Engine
from prr.model.llama import Llama
from prr.model.weights import load_model, random_weights

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
            "glm4": ("Glm4Config", "Glm4ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1})}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def tiny_model(family: str, device, dtype, smoke: bool):
    cfg_name, model_name, extra = FAMILIES[family]
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2) if smoke else dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
    cfg = getattr(transformers, cfg_name)(vocab_size=512, num_attention_heads=size["hidden_size"] // 64,
                                          num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                                          initializer_range=0.08, **size, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def greedy(model, ids, steps, attn, settings=None):
    args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if attn == "sdpa":
            model.set_attn_implementation("sdpa")
            out = model.generate(ids, **args)
        else:
            ph.enable(model)
            out = ph.generate(model, ids, settings, **args)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits).float()


def agreement(a, b) -> dict:
    same = (a == b).all(0)  # [steps]: every sequence of the batch agrees
    first = int((~same).nonzero()[0]) if not bool(same.all()) else None
    return {"equal": bool(same.all()), "first_mismatch_step": first}


def equality(device, smoke: bool) -> list[dict]:
    rows = []
    prompt, steps = (300, 8) if smoke else (2048, 32)
    full = ph.PrrSettings(method="dsa", budget=4096 if not smoke else 512, dense_layers=1)
    sparse = dict(budget=512 if not smoke else 128, dense_layers=1)
    for family in FAMILIES:
        if not hasattr(transformers, FAMILIES[family][1]):
            rows.append({"family": family, "skipped": "not in this transformers"})
            continue
        model = tiny_model(family, device, torch.bfloat16 if device.type == "cuda" else torch.float32, smoke)
        for batch in (1, 2):
            ids = torch.randint(0, 512, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
            ref, ref_logits = greedy(model, ids, steps, "sdpa")
            row = {"family": family, "batch": batch, "prompt": prompt, "steps": steps}
            for name, settings in (("prr_dense", ph.PrrSettings(method="dense")), ("dsa_full_budget", full)):
                tok, logits = greedy(model, ids, steps, "prr", settings)
                row[name] = {**agreement(tok, ref), "logits_rel_err_step0": rel_err(logits[0], ref_logits[0])}
            dsa, dsa_logits = greedy(model, ids, steps, "prr", ph.PrrSettings(method="dsa", **sparse))
            prr_tok, prr_logits = greedy(model, ids, steps, "prr", ph.PrrSettings(method="prr", **sparse))
            row["prr_exact_vs_dsa"] = {**agreement(prr_tok, dsa), "logits_rel_err": rel_err(prr_logits, dsa_logits)}
            row["dsa_vs_sdpa"] = {**agreement(dsa, ref), "logits_rel_err_step0": rel_err(dsa_logits[0], ref_logits[0])}
            rows.append(row)
            print(f"{family:8} b{batch}: dense==sdpa {row['prr_dense']['equal']}, DSA(full)==sdpa "
                  f"{row['dsa_full_budget']['equal']}, PRR exact==DSA {row['prr_exact_vs_dsa']['equal']} "
                  f"(logits {row['prr_exact_vs_dsa']['logits_rel_err']:.1e})", flush=True)
        del model
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_hf(model, ids, steps, warmup, cache, device) -> dict:
    """Prefill once, then time `steps` single-token forwards (after `warmup`): ms per token."""
    key = ph.cache_kwarg(model)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits[:, -1]
        _sync(device)
        prefill = time.perf_counter() - t0
        times = []
        for i in range(warmup + steps):
            nxt = logits.argmax(-1)[:, None]
            _sync(device)
            t0 = time.perf_counter()
            logits = model(nxt, use_cache=True, **{key: cache}).logits[:, -1]
            _sync(device)
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
    return {"prefill_s": round(prefill, 3), "ms_per_token": round(statistics.median(times), 3),
            "steps_ms": [round(t, 3) for t in times]}


def time_engine(model, attention, sparse, context, steps, warmup, device) -> dict:
    eng = Engine(model, None, attention=attention, sparse=sparse, ratio=1.0, n_dense_layers=2)
    eng.fill_random(1, context, warmup + steps + 4)
    tok = torch.zeros(1, dtype=torch.long, device=device)
    eng.step(tok)  # compiles the kernels
    graph = device.type == "cuda"
    if graph:
        eng.capture_decode()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        eng.step(tok)
        _sync(device)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return {"cuda_graph": graph, "ms_per_token": round(statistics.median(times), 3),
            "steps_ms": [round(t, 3) for t in times]}


def latency(device, args) -> list[dict]:
    smoke = args.smoke
    context = 600 if smoke else args.context
    steps, warmup = (4, 1) if smoke else (args.steps, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    else:
        c = MODEL_PRESETS["llama-3.1-8b"]
        cfg = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.ffn, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_q_heads, num_key_value_heads=c.num_kv_heads, max_position_embeddings=131072,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        if smoke:
            cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=64)
        with torch.device(device):  # built in bf16 on the GPU directly (no 32 GB fp32 detour)
            hf = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    budget = 256 if smoke else args.budget
    ids = torch.randint(0, hf.config.vocab_size, (1, context - steps - warmup - 2),
                        generator=torch.Generator().manual_seed(0)).to(device)
    cap = ids.shape[1] + steps + warmup + 2
    rows = []
    hf.set_attn_implementation("sdpa")
    rows.append({"path": "transformers SDPA (DynamicCache)",
                 **time_hf(hf, ids, steps, warmup, transformers.DynamicCache(config=hf.config), device)})
    ph.enable(hf)
    for method in ("dsa", "prr"):
        settings = ph.PrrSettings(method=method, budget=budget, ratio=1.0)
        rows.append({"path": f"transformers + prr {method}",
                     **time_hf(hf, ids, steps, warmup, ph.PrrCache(hf, settings, max_cache_len=cap), device)})
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.model:
        model, _ = load_model(args.model, dtype=dtype, device=device)
    else:
        c = MODEL_PRESETS["llama-3.1-8b"] if not smoke else MODEL_PRESETS["llama-3.1-8b"].replace(
            vocab_size=512, hidden=128, ffn=256, num_layers=3, num_q_heads=2, num_kv_heads=1, head_dim=64)
        model = Llama(c, random_weights(c, dtype=dtype, device=device))
    sparse = SparseConfig.from_budget("quest", budget)
    for attention in ("dense", "dsa", "prr"):
        rows.append({"path": f"prr engine {attention}",
                     **time_engine(model, attention, sparse, ids.shape[1], steps, warmup, device)})
    for r in rows:
        print(f"{r['path']:36} {r['ms_per_token']:9.3f} ms/token", flush=True)
    return [{"context": ids.shape[1], "batch": 1, "budget": budget, **r} for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for hf_gpu.json")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--model", help="a local Llama-family checkpoint directory instead of random 8B weights")
    p.add_argument("--skip-equality", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--smoke", action="store_true", help="toy sizes (a CPU is enough): checks the script")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        p.error("needs a CUDA GPU (or --smoke)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"env": {**environment(), "transformers": transformers.__version__}, "args": vars(args)}
    if not args.skip_equality:
        result["equality_bf16" if device.type == "cuda" else "equality_fp32"] = equality(device, args.smoke)
    if not args.skip_latency:
        result["latency"] = latency(device, args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "hf_gpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
