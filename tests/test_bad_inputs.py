"""Every bad input the public API and the CLI reject, with the exact error each gives.

The table of cases below is the source of docs/ERRORS.md: ``test_errors_doc_is_current`` fails when the doc
differs from :func:`render_doc` (regenerate with ``PYTHONPATH=src python tests/test_bad_inputs.py >
docs/ERRORS.md``). Each case runs a call and must raise the given exception type with exactly the given text
(``{tmp}`` stands for the test's temporary directory). CLI cases run ``prr.cli.main`` and raise
:class:`CLIError` with the line it printed to stderr (the command exits with status 2).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass

import pytest
import torch

import prr
import prr.cli
from prr import memory
from prr.model.config import ModelConfig
from prr.model.engine import CacheFull, Engine
from prr.model.llama import Llama
from prr.model.weights import load_gguf, load_hf_dir, load_model, random_weights

sys.path.insert(0, os.path.dirname(__file__))
from conftest import all_blocks, make_cache, make_query


class CLIError(Exception):
    """What ``prr ...`` printed to stderr when it exited with status 2."""


@dataclass
class Case:
    id: str
    what: str  # the bad input, in words
    api: str  # the entry point that rejects it
    exc: type
    message: str
    fn: object


CASES: list[Case] = []


def case(id, what, api, exc, message):
    def deco(fn):
        CASES.append(Case(id, what, api, exc, message, fn))
        return fn

    return deco


def cli(*argv) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = prr.cli.main(list(argv))
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert rc == 2, f"exit status {rc}, stderr: {err.getvalue()}"
    raise CLIError(lines[-1])


def setup():
    """A float64 cache of two sequences (100 and 50 tokens, capacity 128, 2 KV heads, d 64), 8 query heads,
    and a selection of every live block (16-token blocks: 7 and 4 blocks, K_max = 8)."""
    cache = make_cache([100, 50], hkv=2, d=64, capacity=128)
    q = make_query(cache, 4)
    idx, cnt = all_blocks(cache, 16)
    return cache, q, idx, cnt


TINY = ModelConfig(vocab_size=64, hidden=32, ffn=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
                   max_context=64)


def tiny_model():
    return Llama(TINY, random_weights(TINY, dtype=torch.float32))


# ---- queries ------------------------------------------------------------------------------------------------
@case("q-shape", "q with the wrong head dimension", "prr.sparse_decode (every op taking q)", ValueError,
      "q must have shape [2, *, 64], got [2, 8, 32]")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q[..., :32], cache, idx, cnt, 16)


@case("q-ndim", "q without the batch dimension", "prr.dense_decode", ValueError,
      "q must have 3 dimensions, got shape (8, 64)")
def _(tmp):
    cache, q, _, _ = setup()
    prr.dense_decode(q[0], cache)


@case("q-dtype", "q in another dtype than the cache", "prr.dense_decode", TypeError,
      "q has dtype torch.float32 but the cache has torch.float64; they must match")
def _(tmp):
    cache, q, _, _ = setup()
    prr.dense_decode(q.float(), cache)


@case("q-device", "q on another device than the cache", "prr.dense_decode", ValueError,
      "q is on meta but must be on cpu (same device as the cache)")
def _(tmp):
    cache, q, _, _ = setup()
    prr.dense_decode(q.to("meta"), cache)


@case("q-nan", "NaN in q", "prr.sparse_decode", ValueError, "q contains NaN (first at [1, 3, 5])")
def _(tmp):
    cache, q, idx, cnt = setup()
    q[1, 3, 5] = float("nan")
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("q-inf", "inf in q", "prr.quest_scores (every op taking q)", ValueError, "q contains inf (first at [0, 2, 7])")
def _(tmp):
    cache, q, _, _ = setup()
    q[0, 2, 7] = float("-inf")
    kmin, kmax = prr.quest_metadata(cache, 16)
    prr.quest_scores(q, kmin, kmax, cache, 16)


@case("gqa-ratio", "query heads not a multiple of the KV heads", "prr.sparse_decode", ValueError,
      "the number of query heads (Hq=5) must be a multiple of the number of KV heads (Hkv=2)")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q[:, :5], cache, idx, cnt, 16)


@case("model-gqa", "a model config whose query heads do not divide into the KV heads", "prr.model.ModelConfig",
      ValueError, "the number of query heads (Hq=6) must be a multiple of the number of KV heads (Hkv=4)")
def _(tmp):
    TINY.replace(num_q_heads=6, num_kv_heads=4)


# ---- selections and other indices ------------------------------------------------------------------------------
@case("indices-dtype", "float block indices", "prr.sparse_decode", TypeError,
      "indices must have dtype in (int32, int64), got float32")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q, cache, idx.float(), cnt, 16)


@case("indices-shape", "a selection for the wrong number of KV heads", "prr.sparse_decode", ValueError,
      "indices must have shape [2, 2, *], got [2, 1, 8]")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q, cache, idx[:, :1], cnt, 16)


@case("block-id-past-end", "a block id past the sequence's end (300 tokens = 19 blocks, id 999)",
      "prr.sparse_decode (every op taking a selection)", ValueError,
      "indices[0, 0, 1] = 999 is out of range: sequence 0 has 19 blocks, so a block id must lie in [0, 18] "
      "(or be -1, padding)")
def _(tmp):
    cache = make_cache([300], hkv=1, d=64)
    q = make_query(cache, 2)
    idx = torch.tensor([[[0, 999, 18]]], dtype=torch.int32)
    prr.sparse_decode(q, cache, idx, torch.tensor([[3]], dtype=torch.int32), 16)


@case("block-id-negative", "a negative block id other than the padding -1", "prr.block_states", ValueError,
      "indices[1, 0, 0] = -7 is out of range: sequence 1 has 4 blocks, so a block id must lie in [0, 3] "
      "(or be -1, padding)")
def _(tmp):
    cache, q, idx, cnt = setup()
    idx[1, 0, 0] = -7
    prr.ops.block_states(q, cache, idx, cnt, 16)


@case("counts-over-capacity", "a count larger than the selection's capacity", "prr.sparse_decode", ValueError,
      "counts[0, 1] = 9 is out of range: it must lie in [0, 8] (the selection's capacity K_max = 8)")
def _(tmp):
    cache, q, idx, cnt = setup()
    cnt[0, 1] = 9
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("counts-negative", "a negative count", "prr.sparse_decode", ValueError,
      "counts[1, 0] = -1 is out of range: it must lie in [0, 8] (the selection's capacity K_max = 8)")
def _(tmp):
    cache, q, idx, cnt = setup()
    cnt[1, 0] = -1
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("duplicate-block", "a block twice in one selection row", "prr.sparse_decode", ValueError,
      "indices[0, 1] holds block 3 twice: a selection must not repeat a block (it would be attended and weighted "
      "twice)")
def _(tmp):
    cache, q, idx, cnt = setup()
    idx[0, 1, 5] = 3
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("duplicate-in-p", "a repeated block in PRR's speculated set P", "prr.ops.repair_combine", ValueError,
      "p_idx[0, 0] holds block 2 twice: a selection must not repeat a block (it would be attended and weighted "
      "twice)")
def _(tmp):
    cache, q, idx, cnt = setup()
    bo, blse = prr.ops.block_states(q, cache, idx, cnt, 16)
    p = idx.clone()
    p[0, 0, 4] = 2
    prr.ops.repair_combine(q, cache, 16, p, cnt, idx, cnt, block_o=bo, block_lse=blse)


@case("repair-states-shape", "speculation states of the wrong shape", "prr.ops.repair_combine", ValueError,
      "block_o must have shape [2, 8, 8, 64], got [2, 8, 4, 64]")
def _(tmp):
    cache, q, idx, cnt = setup()
    bo, blse = prr.ops.block_states(q, cache, idx, cnt, 16)
    prr.ops.repair_combine(q, cache, 16, idx, cnt, idx, cnt, block_o=bo[:, :, :4], block_lse=blse)


@case("repair-mode-states", "union mode without the speculation's merged state", "prr.ops.repair_combine",
      ValueError, "union mode needs spec_o and spec_lse (the merged state of P)")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.ops.repair_combine(q, cache, 16, idx, cnt, idx, cnt, mode="union")


@case("page-table-range", "a page-table entry outside the page pool", "prr.KVCache (and every op on it)", ValueError,
      "cache.page_table[0, 1] = 99 is out of range: sequence 0 uses 2 pages, each must lie in [0, 3] (the pool "
      "holds 4 pages)")
def _(tmp):
    z = torch.zeros(4, 1, 16, 8)
    prr.KVCache(z, z.clone(), torch.tensor([[0, 99]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32))


@case("page-table-edited", "a page table corrupted after the cache was built", "prr.dense_decode", ValueError,
      "cache.page_table[1, 2] = -1 is out of range: sequence 1 uses 4 pages, each must lie in [0, 15] (the pool "
      "holds 16 pages)")
def _(tmp):
    cache, q, _, _ = setup()
    cache.page_table[1, 2] = -1
    prr.dense_decode(q, cache)


@case("seq-len-capacity", "a sequence length beyond the cache's capacity", "prr.KVCache", ValueError,
      "seq_lens must lie in [0, capacity=32] (max_pages=2 x page_size=16); got up to 40")
def _(tmp):
    z = torch.zeros(2, 1, 16, 8)
    prr.KVCache(z, z.clone(), torch.tensor([[0, 1]]), torch.tensor([40]))


@case("append-full", "appending to a full cache", "prr.KVCache.append", ValueError,
      "seq_lens must lie in [0, capacity=32] (max_pages=2 x page_size=16); got up to 33")
def _(tmp):
    cache = prr.KVCache.allocate(1, 32, 1, 8)
    cache.write(torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8), torch.tensor([32], dtype=torch.int32))
    cache.append(torch.randn(1, 1, 8), torch.randn(1, 1, 8))


@case("metadata-empty", "a metadata append on an empty sequence", "prr.quest_metadata_append", ValueError,
      "cache.seq_lens[0] = 0 is out of range: it must lie in [1, 32] (metadata appends run after KVCache.append: "
      "every sequence needs a newest token)")
def _(tmp):
    cache = prr.KVCache.allocate(1, 32, 1, 8)
    kmin, kmax = prr.quest_metadata(cache, 16)
    prr.quest_metadata_append(kmin, kmax, cache, 16)


@case("num-blocks-range", "more blocks than the scores cover", "prr.select_blocks", ValueError,
      "num_blocks[0] = 9 is out of range: it must lie in [0, 8] (scores cover N_max = 8 blocks)")
def _(tmp):
    prr.select_blocks(torch.zeros(1, 1, 8), torch.tensor([9]), top_k=2)


@case("scores-nan", "NaN in block scores", "prr.select_blocks", ValueError, "scores contains NaN (first at [0, 0, 3])")
def _(tmp):
    s = torch.zeros(1, 2, 8)
    s[0, 0, 3] = float("nan")
    prr.select_blocks(s, torch.tensor([8]), top_k=2)


@case("ckeys-shape", "compressed keys not covering the cache", "prr.infllm_scores", ValueError,
      "ckeys must have shape [2, 2, 7, 64], got [2, 2, 3, 64]")
def _(tmp):
    cache, q, _, _ = setup()
    ck = prr.infllm_metadata(cache)
    prr.infllm_scores(q, ck[:, :, :3], cache)


@case("lse-nan", "NaN in a partial state's log-sum-exp", "prr.merge_states", ValueError,
      "lse contains NaN (first at [1, 0])")
def _(tmp):
    lse = torch.zeros(2, 3)
    lse[1, 0] = float("nan")
    prr.merge_states(torch.zeros(2, 3, 8), lse)


@case("merge-shape", "partial outputs and log-sum-exps that do not match", "prr.merge_states", ValueError,
      "o must be [..., N, D] and lse [..., N]; got o [2, 3, 8], lse [2, 4]")
def _(tmp):
    prr.merge_states(torch.zeros(2, 3, 8), torch.zeros(2, 4))


# ---- budgets, ratios, names ------------------------------------------------------------------------------------
@case("block-size-pow2", "a block size that is not a power of two", "prr.sparse_decode, prr.SparseConfig",
      ValueError, "block_size must be a power of two, got 24")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q, cache, idx, cnt, 24)


@case("block-size-page", "a block smaller than a page", "prr.quest_metadata (every op taking block_size)",
      ValueError, "block_size=8 must be a multiple of the page size (16)")
def _(tmp):
    cache, _, _, _ = setup()
    prr.quest_metadata(cache, 8)


@case("top-k-zero", "a budget of no dynamic block", "prr.SparseConfig, prr.select_blocks", ValueError,
      "top_k must be > 0, got 0")
def _(tmp):
    prr.SparseConfig(top_k=0)


@case("budget-too-small", "a token budget that the forced blocks use up", "prr.SparseConfig.from_budget, --budget",
      ValueError, "budget_tokens=32 leaves no dynamic block (block_size=16, n_sink=1, n_local=2)")
def _(tmp):
    prr.SparseConfig.from_budget("quest", 32)


@case("ratio-zero", "a speculation ratio of 0", "prr.prr_step, prr.speculative_top_k, --ratio", ValueError,
      "ratio must be a positive number, got 0.0")
def _(tmp):
    prr.speculative_top_k(8, 0.0)


@case("ratio-nan", "a NaN speculation ratio", "prr.model.Engine", ValueError,
      "ratio must be a positive number, got nan")
def _(tmp):
    Engine(tiny_model(), attention="prr", ratio=float("nan"))


@case("unknown-method", "an unknown DSA method", "prr.SparseConfig", ValueError,
      "unknown method 'qwest'; expected one of 'quest', 'infllm_v2', 'oracle'")
def _(tmp):
    prr.SparseConfig(method="qwest")


@case("unknown-attention", "an unknown attention for the engine", "prr.model.Engine", ValueError,
      "unknown attention 'sparse'; expected one of 'dense', 'dsa', 'prr'")
def _(tmp):
    Engine(tiny_model(), attention="sparse")


@case("unknown-preset", "an unknown model preset", "prr.model.ModelConfig.from_name", ValueError,
      "unknown model 'llama-9'; expected one of smollm2-135m, llama-3.1-8b, glm-4-9b, qwen3-8b")
def _(tmp):
    ModelConfig.from_name("llama-9")


@case("unknown-model", "a --model that is no file, directory or preset", "prr.model.load_model, --model",
      ValueError, "unknown model 'llama-9': expected smollm2, a .gguf file, a checkpoint directory, or one of "
      "smollm2-135m, llama-3.1-8b, glm-4-9b, qwen3-8b (random weights)")
def _(tmp):
    load_model("llama-9")


@case("unknown-backend", "an unknown kernel backend", "prr.ops.backend.use_backend, PRR_BACKEND", ValueError,
      "unknown backend 'cuda'; expected one of auto, triton, reference")
def _(tmp):
    with prr.ops.backend.use_backend("cuda"):
        pass


# ---- prompts and generation ------------------------------------------------------------------------------------
@case("prompt-over-window", "a prompt plus new tokens longer than the model's context", "prr.model.Engine.generate",
      ValueError, "prompt (60 tokens) + max_new_tokens (8) exceeds the model's context of 64 tokens")
def _(tmp):
    Engine(tiny_model()).generate(list(range(60)), 8)


@case("prompt-empty", "an empty prompt", "prr.model.Engine.generate", ValueError, "the prompt is empty")
def _(tmp):
    Engine(tiny_model()).generate([], 4)


@case("cache-full", "a generation that outgrows the cache it was given (prefilled for 2 new tokens, asked for 10)",
      "prr.model.Engine.generate (raises CacheFull, a ValueError, with .tokens)", CacheFull,
      "the KV cache is full (32 tokens: a 30-token prompt and 3 generated tokens); the tokens generated so far are "
      "returned with this error (CacheFull.tokens)")
def _(tmp):
    # The caches hold whole 16-token pages: 30 + 2 tokens fill two pages exactly.
    model, prompt = tiny_model(), list(range(1, 31))
    base = Engine(model)
    base.prefill(prompt, 2)
    Engine(model).generate(prompt, 10, prefilled_from=base)


# ---- files ---------------------------------------------------------------------------------------------------
def write_gguf(path, arch="llama", keys=True):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    if keys:
        w.add_block_count(1)
        w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@case("gguf-missing", "a .gguf path that does not exist", "prr.model.load_model, --model", FileNotFoundError,
      "model file not found: {tmp}/nope.gguf")
def _(tmp):
    load_model(f"{tmp}/nope.gguf")


@case("gguf-truncated", "a truncated GGUF file", "prr.model.load_gguf, --model", ValueError,
      "{tmp}/cut.gguf is not a readable GGUF file (ValueError: When changing to a larger dtype, its size must be a "
      "divisor of the total size in bytes of the last axis of the array.)")
def _(tmp):
    write_gguf(f"{tmp}/whole.gguf")
    with open(f"{tmp}/whole.gguf", "rb") as f, open(f"{tmp}/cut.gguf", "wb") as g:
        g.write(f.read()[:100])
    load_gguf(f"{tmp}/cut.gguf")


@case("gguf-corrupt", "a file that is not GGUF at all", "prr.model.load_gguf, --model", ValueError,
      "{tmp}/junk.gguf is not a readable GGUF file (ValueError: GGUF magic invalid)")
def _(tmp):
    with open(f"{tmp}/junk.gguf", "wb") as f:
        f.write(b"not a model " * 64)
    load_gguf(f"{tmp}/junk.gguf")


@case("gguf-metadata", "a GGUF file without a required metadata key", "prr.model.load_gguf", ValueError,
      "{tmp}/bare.gguf: GGUF metadata key 'llama.attention.head_count' is missing")
def _(tmp):
    write_gguf(f"{tmp}/bare.gguf", keys=False)
    load_gguf(f"{tmp}/bare.gguf")


@case("gguf-arch", "a GGUF file of another architecture", "prr.model.load_gguf", ValueError,
      "{tmp}/gpt2.gguf: architecture 'gpt2' is not supported (llama only)")
def _(tmp):
    write_gguf(f"{tmp}/gpt2.gguf", arch="gpt2")
    load_gguf(f"{tmp}/gpt2.gguf")


def write_hf_dir(tmp, model_type="llama"):
    os.makedirs(f"{tmp}/hf", exist_ok=True)
    hc = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    with open(f"{tmp}/hf/config.json", "w") as f:
        json.dump(hc, f)
    return f"{tmp}/hf"


@case("hf-no-config", "a checkpoint directory without config.json", "prr.model.load_hf_dir, --model",
      FileNotFoundError, "{tmp} has no config.json")
def _(tmp):
    load_hf_dir(str(tmp))


@case("hf-no-weights", "a checkpoint directory without .safetensors files", "prr.model.load_hf_dir, --model",
      FileNotFoundError, "{tmp}/hf has no .safetensors files (pickled checkpoints are not loaded)")
def _(tmp):
    load_hf_dir(write_hf_dir(tmp))


@case("hf-model-type", "a checkpoint of an unsupported architecture", "prr.model.load_hf_dir", ValueError,
      "{tmp}/hf: model_type 'gpt2' is not supported (llama, qwen2, mistral)")
def _(tmp):
    load_hf_dir(write_hf_dir(tmp, "gpt2"))


@case("safetensors-truncated", "a truncated .safetensors file", "prr.model.load_hf_dir, --model", ValueError,
      "{tmp}/hf/model.safetensors is not a readable safetensors file (Error while deserializing header: "
      "incomplete metadata, file not fully covered)")
def _(tmp):
    from safetensors.torch import save_file

    d = write_hf_dir(tmp)
    save_file({"model.norm.weight": torch.ones(32)}, f"{d}/model.safetensors")
    with open(f"{d}/model.safetensors", "rb") as f:
        data = f.read()
    with open(f"{d}/model.safetensors", "wb") as f:
        f.write(data[:-8])
    load_hf_dir(d)


@case("safetensors-corrupt", "a .safetensors file of garbage", "prr.model.load_hf_dir, --model", ValueError,
      "{tmp}/hf/model.safetensors is not a readable safetensors file (Error while deserializing header: "
      "header too large)")
def _(tmp):
    d = write_hf_dir(tmp)
    with open(f"{d}/model.safetensors", "wb") as f:
        f.write(b"\xff" * 64)
    load_hf_dir(d)


# ---- memory ----------------------------------------------------------------------------------------------------
@case("memory-weights", "weights larger than free memory (here: 4 GiB free)", "prr.model.load_model", ValueError,
      "not enough memory for random weights of 8.03B parameters (torch.float32) on cpu: it needs 31.9 GiB "
      "(34222391296 bytes) and 4.0 GiB is free (host RAM available (MemAvailable in /proc/meminfo)); prr plans at "
      "most 90% of it. Use a smaller model, context or batch, a lower-precision dtype, or another device")
def _(tmp):
    with pinned_free(4 << 30):
        load_model("llama-3.1-8b", dtype=torch.float32)


@case("memory-cache", "KV caches larger than free memory (here: 1 MiB free)", "prr.model.Engine.generate",
      ValueError, "not enough memory for the KV caches (2 layers x 1 x 60 tokens) on cpu: it needs 16.0 KiB "
      "(16384 bytes) and 7.8 KiB is free (host RAM available (MemAvailable in /proc/meminfo)); prr plans at most 90% "
      "of it. Use a smaller model, context or batch, a lower-precision dtype, or another device")
def _(tmp):
    model = tiny_model()
    with pinned_free(8000):
        Engine(model).generate(list(range(1, 21)), 40)


# ---- the command line ------------------------------------------------------------------------------------------
@case("cli-memory", "prr generate --model llama-3.1-8b --device cpu on a machine with 20 GiB free", "prr generate",
      CLIError, "prr generate: error: not enough memory for random weights of 8.03B parameters (torch.float32) on "
      "cpu: it needs 31.9 GiB (34222391296 bytes) and 20.0 GiB is free (host RAM available (MemAvailable in "
      "/proc/meminfo)); prr plans at most 90% of it. Use a smaller model, context or batch, a lower-precision "
      "dtype, or another device")
def _(tmp):
    with pinned_free(20 << 30):
        cli("generate", "--model", "llama-3.1-8b", "--device", "cpu", "--prompt", "hi")


@case("cli-budget", "a --budget below the forced blocks", "prr simulate", CLIError,
      "prr simulate: error: budget_tokens=16 leaves no dynamic block (block_size=16, n_sink=1, n_local=2)")
def _(tmp):
    cli("simulate", "--budget", "16", "--quiet")


@case("cli-model", "an unknown --model", "prr generate", CLIError,
      "prr generate: error: unknown model 'llama-9': expected smollm2, a .gguf file, a checkpoint directory, or one "
      "of smollm2-135m, llama-3.1-8b, glm-4-9b, qwen3-8b (random weights)")
def _(tmp):
    cli("generate", "--model", "llama-9", "--device", "cpu", "--prompt", "hi")


@case("cli-gguf-corrupt", "a corrupt GGUF file as --model", "prr generate", CLIError,
      "prr generate: error: {tmp}/junk.gguf is not a readable GGUF file (ValueError: GGUF magic invalid)")
def _(tmp):
    with open(f"{tmp}/junk.gguf", "wb") as f:
        f.write(b"not a model " * 64)
    cli("generate", "--model", f"{tmp}/junk.gguf", "--device", "cpu", "--prompt", "hi")


# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def pinned_free(nbytes: int):
    """Pretend `nbytes` of host RAM are free (MemAvailable), whatever the machine has."""
    real = memory._meminfo_available
    memory._meminfo_available = lambda: nbytes
    try:
        yield
    finally:
        memory._meminfo_available = real


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_with_its_documented_error(c: Case, tmp_path):
    with pytest.raises(c.exc) as ei:
        c.fn(tmp_path)
    assert str(ei.value) == c.message.format(tmp=tmp_path)


def test_cache_full_returns_the_tokens_generated_so_far():
    # The caches hold whole 16-token pages: 30 + 2 tokens fill two pages exactly.
    model, prompt = tiny_model(), list(range(1, 31))
    base = Engine(model)
    base.prefill(prompt, 2)
    with pytest.raises(CacheFull) as ei:
        Engine(model).generate(prompt, 10, prefilled_from=base)
    full, _ = Engine(model).generate(prompt, 3)  # its own prefill has room for them
    assert ei.value.tokens == full and ei.value.stats.new_tokens == 3


def test_validation_also_guards_the_kernel_path():
    """The Triton wrappers check values before a launch (here on the CPU through the interpreter's dispatch)."""
    cache, q, idx, cnt = setup()
    cache, q = make_cache([100, 50], hkv=2, d=64, capacity=128, dtype=torch.float32), q.float()
    idx[0, 0, 0] = 64
    with prr.ops.backend.use_backend("triton"), pytest.raises(ValueError, match=r"indices\[0, 0, 0\] = 64"):
        prr.sparse_decode(q, cache, idx, cnt, 16)


def test_generate_on_a_real_24gb_host_refuses_llama_8b_in_fp32():
    """The issue's command, unpatched: where the fp32 weights (31.9 GiB) cannot fit it must refuse, not be killed."""
    free, _ = memory.free_bytes("cpu")
    if free is None or free * memory.HEADROOM >= memory.weight_bytes(ModelConfig.from_name("llama-3.1-8b"),
                                                                      torch.float32):
        pytest.skip("this host has room for the weights: the refusal is tested with a pinned figure above")
    with pytest.raises(CLIError, match="not enough memory for random weights of 8.03B parameters"):
        cli("generate", "--model", "llama-3.1-8b", "--device", "cpu", "--prompt", "hi")


def render_doc() -> str:
    lines = [
        "# Bad inputs and the errors they give",
        "",
        "Every row is a test: `tests/test_bad_inputs.py::test_bad_input_is_rejected_with_its_documented_error[<id>]`",
        "runs the call and requires exactly this error text (`{tmp}` is a temporary directory). This file is",
        "generated from the test's table (`PYTHONPATH=src python tests/test_bad_inputs.py > docs/ERRORS.md`) and a",
        "test fails when it is out of date. The CLI prints `prr <command>: error: <text>` and exits with status 2.",
        "",
        "Value checks (index ranges, duplicates, NaN/inf, lengths) read tensor data: they always run on CPU tensors;",
        "on CUDA they would cost a host sync inside the decode step, so there they run only in debug mode",
        "(`prr.set_debug(True)` or `PRR_DEBUG=1`) and never during CUDA-graph capture. Shape, dtype and device checks",
        "run everywhere.",
        "",
        f"{len(CASES)} cases.",
        "",
        "| id | bad input | rejected by | exception | error text |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in CASES:
        msg = c.message.replace("|", "\\|")
        lines.append(f"| `{c.id}` | {c.what} | `{c.api}` | {c.exc.__name__} | `{msg}` |")
    lines += ["", "Not applicable: prr has no tensor parallelism, so there is no TP size to validate.", ""]
    return "\n".join(lines)


def test_errors_doc_is_current():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "ERRORS.md")
    with open(path, encoding="utf-8") as f:
        assert f.read() == render_doc(), "docs/ERRORS.md is stale: regenerate it (see this module's docstring)"
    assert len(CASES) >= 25


if __name__ == "__main__":
    sys.stdout.write(render_doc())
