"""The table of bad inputs (part 2: model files, memory, the command line); see tests/bad_inputs_cases.py."""

from __future__ import annotations

import contextlib
import json
import os

import torch

from bad_inputs_cases import CLIError, case, cli, tiny_model
from prr import memory
from prr.model.engine import Engine
from prr.model.weights import load_gguf, load_hf_dir, load_model


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
    with open(f"{tmp}/hf/tokenizer.json", "w") as f:  # present (read last): the weights' errors come first
        f.write("{}")
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
      "{tmp}/hf/config.json: model_type 'gpt2' is not supported (llama, qwen2, mistral)")
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
      "of smollm2-135m, llama-3.1-8b, llama-3.1-70b, glm-4-9b, glm-4-9b-1m, qwen3-8b (random weights)")
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
