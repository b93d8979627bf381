"""Tensor parallelism (prr.model.tp): sharding rules, the sharded checkpoint loader, and TP=2 decode over
gloo (2 processes on the host) against TP=1 — dense, DSA and PRR exact, float64 and float32."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import prr
from prr.model import MODEL_PRESETS, ModelConfig
from prr.model import tp_check as chk
from prr.model.llama import Llama
from prr.model.tp import TensorParallel, load_model_tp, setup, shard_config, shard_spec, shard_weights
from prr.model.weights import HF_NAMES, random_weights

STEPS = 6
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
SPARSE = prr.SparseConfig(top_k=4)  # 300-token prompt: 19 blocks of 16, 7 selected


def _unshard(parts: list[dict], cfg: ModelConfig) -> dict:
    """The full weights back from every rank's slices (undoing the vocabulary padding)."""
    out = {}
    for k in parts[0]:
        spec = shard_spec(k, cfg, 0, len(parts))
        if spec is None:
            assert all(torch.equal(p[k], parts[0][k]) for p in parts)
            out[k] = parts[0][k]
        else:
            out[k] = torch.cat([p[k] for p in parts], dim=spec[0])
            if k.rsplit(".", 1)[-1] in ("embed", "lm_head"):
                out[k] = out[k][: cfg.vocab_size]
    return out


@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda n: f"tp{n}")
def test_shards_reassemble_the_full_weights(world):
    cfg = chk.small_config()
    w = chk.full_weights(cfg)
    parts = [shard_weights(w, cfg, r, world) for r in range(world)]
    for r, p in enumerate(parts):  # each rank's slices have the shapes its own config implies
        local = shard_config(cfg, r, world)
        Llama(local, p)
        assert {k: tuple(t.shape) for k, t in p.items()} == {k: tuple(t.shape) for k, t in
                                                              random_weights(local, dtype=torch.float64).items()}
    back = _unshard(parts, cfg)
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_presets_and_errors():
    c70 = MODEL_PRESETS["llama-3.1-70b"]
    assert (c70.num_layers, c70.num_q_heads, c70.num_kv_heads, c70.head_dim, c70.hidden, c70.ffn,
            c70.vocab_size) == (80, 64, 8, 128, 8192, 28672, 128256)
    assert shard_config(c70, 1, 8).num_kv_heads == 1 and shard_config(c70, 1, 8).vocab_size == 16032
    with pytest.raises(ValueError, match=r"KV heads \(3\) divisible by 2; this model runs on 1, 3 ranks"):
        shard_config(MODEL_PRESETS["smollm2-135m"], 0, 2)
    with pytest.raises(ValueError, match="need 0 <= rank < world"):
        shard_config(c70, 2, 2)
    with pytest.raises(ValueError, match="no tensor-parallel rule for weight 'layers.0.wx'"):
        shard_spec("layers.0.wx", c70, 0, 2)
    with pytest.raises(ValueError, match=r"--tp 2 needs 2 processes: launch with `torchrun --nproc-per-node 2"):
        setup(2, "cpu")
    tp, dev = setup(1, "cpu")
    assert tp == TensorParallel() and dev == "cpu"


def test_single_process_commands_refuse_torchrun(monkeypatch, capsys):
    from prr.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo"]) == 2
    assert "prr demo runs in one process; under torchrun run prr generate or prr bench e2e" in capsys.readouterr().err


def test_tp1_path_equals_the_plain_model():
    """--tp 1 runs the tensor-parallel code path (its loader, embedding and logits hooks) with no collective:
    the same logits as the plain model, bit for bit."""
    cfg = chk.small_config()
    w = chk.full_weights(cfg)
    ids = chk.prompt(cfg, length=40)
    tp_model = Llama(shard_config(cfg, 0, 1), shard_weights(w, cfg, 0, 1), tp=TensorParallel(vocab_size=301))
    a = tp_model.prefill(ids, lambda *x: None, all_logits=True)
    assert torch.equal(a, Llama(cfg, w).prefill(ids, lambda *x: None, all_logits=True))


def test_preset_loads_random_weights_at_the_rank_shapes(monkeypatch):
    cfg = chk.small_config()
    monkeypatch.setitem(MODEL_PRESETS, "tiny-tp", cfg)
    model, tok = load_model_tp("tiny-tp", TensorParallel(1, 2), dtype=torch.float32)
    assert tok is None and model.cfg == shard_config(cfg, 1, 2) and model.tp.vocab_size == 301
    assert model.w["embed"].shape == (151, 64) and model.w["layers.0.w_down"].shape == (64, 45)
    with pytest.raises(ValueError, match=r"KV heads \(4\) divisible by 3"):
        load_model_tp("tiny-tp", TensorParallel(0, 3))


def _write_hf_dir(path, cfg: ModelConfig, w: dict) -> None:
    """A Qwen2-style checkpoint directory (biases included) split over two safetensors files, with a
    word-level tokenizer (``w0`` ... ``w300``)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"], "lm_head.weight": w["lm_head"]}
    names = dict(HF_NAMES, bq="self_attn.q_proj", bk="self_attn.k_proj", bv="self_attn.v_proj")
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            suffix = "bias" if ours.startswith("b") else "weight"
            hf[f"model.layers.{i}.{theirs}.{suffix}"] = w[f"layers.{i}.{ours}"].float().contiguous()
    items = sorted(hf.items())
    save_file(dict(items[: len(items) // 2]), str(path / "model-00001.safetensors"))
    save_file(dict(items[len(items) // 2 :]), str(path / "model-00002.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 301, "hidden_size": 64, "intermediate_size": 90, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "max_position_embeddings": 512,
        "rms_norm_eps": cfg.rms_eps}))
    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(301)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(path / "tokenizer.json"))


def _with_biases(cfg: ModelConfig) -> dict:
    w = chk.full_weights(cfg)
    gen = torch.Generator().manual_seed(5)
    for i in range(cfg.num_layers):
        for b, n in (("bq", cfg.num_q_heads), ("bk", cfg.num_kv_heads), ("bv", cfg.num_kv_heads)):
            w[f"layers.{i}.{b}"] = torch.randn(n * cfg.head_dim, generator=gen, dtype=torch.float64)
    return w


def test_sharded_hf_checkpoint_reads_only_the_rank_slices(tmp_path):
    """A Hugging Face directory loads per rank through safe_open's get_slice: the slices equal the in-memory
    sharding of the full weights (Qwen2 biases included)."""
    cfg = chk.small_config()
    w = _with_biases(cfg)
    _write_hf_dir(tmp_path, cfg, w)
    for rank in range(2):
        model, tok = load_model_tp(str(tmp_path), TensorParallel(rank, 2), dtype=torch.float32)
        want = shard_weights({k: t.float() for k, t in w.items()}, cfg, rank, 2)
        assert model.cfg == shard_config(cfg.replace(rope_base=model.cfg.rope_base), rank, 2)
        assert set(model.w) == set(want) and all(torch.equal(model.w[k], want[k]) for k in want)
        assert model.tp.vocab_size == 301 and tok.encode("w3 w5") == [3, 5]


def test_torchrun_generate_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m prr generate` (gloo on the host): the same greedy tokens as one process;
    only rank 0 prints and writes the JSON."""
    from prr.cli import main

    cfg = chk.small_config()
    _write_hf_dir(tmp_path, cfg, _with_biases(cfg))
    words = " ".join(f"w{int(i)}" for i in chk.prompt(cfg, batch=1, length=200)[0])
    args = ["generate", "--model", str(tmp_path), "--prompt", words, "--no-chat", "--attention", "dsa", "--budget",
            "112", "--dense-layers", "1", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "prr", *args,
                          "--tp", "2", "--json", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["tensor_parallel"] == 2 and one["tensor_parallel"] is None
    assert one["tokens"] == two["tokens"] and len(one["tokens"]) == 6
    assert run.stderr.count("tokens/s") == 1  # the summary line of rank 0 alone


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory):
    """TP=2 runs of both ranks (gloo, two spawned processes), float64 and float32."""
    d = tmp_path_factory.mktemp("tp2")
    cfg = chk.small_config()
    mp.spawn(chk.spawn_worker, args=(2, str(d / "rdzv"), str(d), cfg, STEPS, SPARSE,
                                     (torch.float64, torch.float32)), nprocs=2, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_tp2_decode_equals_tp1(tp2_runs, dtype):
    """Two ranks over gloo: the same greedy tokens as TP=1 for dense, DSA and PRR exact, logits within the
    rule's tolerance (see prr.model.tp_check), both ranks holding identical logits, PRR exact == DSA."""
    cfg = chk.small_config()
    w, ids = chk.full_weights(cfg), chk.prompt(cfg)
    ref = chk.reference_runs(cfg, w, ids, STEPS, SPARSE, dtype)
    ref64 = None if dtype == torch.float64 else chk.reference_runs(cfg, w, ids, STEPS, SPARSE, torch.float64)
    r0, r1 = (r[str(dtype)] for r in tp2_runs)
    for att in chk.ATTENTIONS:
        assert torch.equal(r0[att]["logits"], r1[att]["logits"]), att  # all-gathered: the same on every rank
    for rank, runs in enumerate((r0, r1)):
        report = chk.compare(cfg, runs, ref, ref64, rank=rank, world=2)
        assert chk.passed(report), report
    # the reference's own sparse runs really are sparse, and PRR exact == DSA there too
    assert torch.equal(ref["prr"]["tokens"], ref["dsa"]["tokens"])
    assert not torch.equal(ref["dsa"]["logits"], ref["dense"]["logits"])


def test_tp2_ranks_take_rank_0s_decision(tp2_runs):
    """A setup-time decision (the speculation budget's) broadcast from rank 0 over gloo reaches every rank."""
    assert [r["rank0_ints"] for r in tp2_runs] == [[10, 0], [10, 0]]
