"""The fused projections (one q/k/v matrix and one gate/up matrix per layer) compute the unfused model and
add no memory: the weight dict keeps every name, as views into the fused matrices."""

import pytest
import torch

from prr.model.config import ModelConfig
from prr.model.llama import Llama
from prr.model.weights import random_weights


@pytest.mark.parametrize("biases", [False, True], ids=["llama", "qwen2-biases"])
def test_fused_projections_equal_the_separate_ones(biases):
    cfg = ModelConfig(vocab_size=97, hidden=64, ffn=88, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                      max_context=256)
    w = random_weights(cfg, seed=3, dtype=torch.float64)
    if biases:
        gen = torch.Generator().manual_seed(4)
        for i in range(cfg.num_layers):
            for b, n in (("bq", cfg.num_q_heads), ("bk", cfg.num_kv_heads), ("bv", cfg.num_kv_heads)):
                w[f"layers.{i}.{b}"] = torch.randn(n * cfg.head_dim, generator=gen, dtype=torch.float64)
    plain = Llama(cfg, {k: t.clone() for k, t in w.items()}, fuse=False)
    fused = Llama(cfg, {k: t.clone() for k, t in w.items()})
    assert len(fused._qkv) == len(fused._gate_up) == cfg.num_layers and not plain._qkv
    for i in range(cfg.num_layers):  # every name still there, now views into the fused matrices
        big = fused._qkv[i][0]
        for n in ("wq", "wk", "wv"):
            t = fused.w[f"layers.{i}.{n}"]
            assert t.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
            assert torch.equal(t, w[f"layers.{i}.{n}"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    got, want = fused.prefill(tokens, lambda *a: None, all_logits=True), plain.prefill(tokens, lambda *a: None,
                                                                                       all_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # float32 logits of a float64 model


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_decode_step_equals_the_unfused_one(backend, interleaved, batch):
    """The fused decode (residual adds inside RMSNorm, RoPE from the fused q/k/v, SwiGLU and the KV append as
    one op each; at batch 1 the projections and the LM head as Triton GEMVs) gives the unfused step's logits and
    caches, on the reference ops and on the Triton kernels (interpreter, float32), over several steps of a dense
    engine."""
    from prr.model.engine import Engine
    from prr.ops.backend import use_backend

    cfg = ModelConfig(vocab_size=97, hidden=64, ffn=88, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                      max_context=256, rope_interleaved=interleaved)
    # the kernels run natively on a GPU, in Triton's interpreter on the CPU
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    w = {k: t.to(dev) for k, t in random_weights(cfg, seed=5, dtype=torch.float32).items()}
    models = {f: Llama(cfg, {k: t.clone() for k, t in w.items()}, fuse=f) for f in (False, True)}
    prompt = torch.randint(0, cfg.vocab_size, (batch, 37), generator=torch.Generator().manual_seed(1)).to(dev)
    logits, caches = {}, {}
    for f, m in models.items():
        eng = Engine(m, None, attention="dense", graphs=False)
        with use_backend(backend if f else "reference"):
            eng.prefill(prompt, 8)
            tok = eng._last_logits.argmax(-1)
            outs = []
            for _ in range(5):
                out = eng.step(tok)
                outs.append(out)
                tok = out.argmax(-1)
        logits[f], caches[f] = torch.stack(outs), eng.caches
    tol = 2e-5 if dev == "cpu" else 2e-3  # (CUDA: TF32-free float32, but other GEMM and reduction orders)
    torch.testing.assert_close(logits[True], logits[False], rtol=tol, atol=tol)
    for a, b in zip(caches[True], caches[False], strict=True):
        assert torch.equal(a.seq_lens, b.seq_lens)
        torch.testing.assert_close(a.k, b.k, rtol=tol / 2, atol=tol / 2)
        torch.testing.assert_close(a.v, b.v, rtol=tol / 2, atol=tol / 2)  # (2-D vs 3-D products: another GEMM order)


@pytest.mark.parametrize("attention,method", [("dsa", "quest"), ("prr", "quest"), ("dsa", "infllm_v2")])
def test_fused_sparse_step_equals_the_unfused_one(attention, method):
    """The fused step of a sparse engine (every layer's length advanced by one add up front, Quest's metadata
    folded into the KV append, the step's block counts shared by the layers) gives the unfused step's logits,
    caches, metadata and block statistics, past block boundaries (float32, interpreter kernels)."""
    from prr import SparseConfig
    from prr.model.engine import Engine
    from prr.ops.backend import use_backend

    cfg = ModelConfig(vocab_size=97, hidden=64, ffn=88, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                      max_context=256)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # natively on a GPU, the interpreter on a CPU
    w = {k: t.to(dev) for k, t in random_weights(cfg, seed=6, dtype=torch.float32).items()}
    sparse = SparseConfig.from_budget(method, 80) if method == "quest" else \
        SparseConfig.from_budget(method, 128, block_size=32)  # 2 dynamic blocks of 16 / 1 of 32
    prompt = torch.randint(0, cfg.vocab_size, (2, 120), generator=torch.Generator().manual_seed(2)).to(dev)
    got = {}
    for f in (False, True):
        eng = Engine(Llama(cfg, {k: t.clone() for k, t in w.items()}, fuse=f), None, attention=attention,
                     sparse=sparse, n_dense_layers=1, graphs=False,
                     calibrate_window=3)  # a short calibration (the interpreter is slow)
        with use_backend("triton" if f else "reference"):
            eng.prefill(prompt, 24)
            tok = eng._last_logits.argmax(-1)
            outs, stats = [], []
            for _ in range(10):  # 120 -> 130 tokens: a block opened
                out = eng.step(tok)
                outs.append(out)
                stats.append(torch.stack([torch.stack([s.selected, s.hits, s.misses, s.forced])
                                          for s in eng._step_stats]).cpu())
                tok = out.argmax(-1)
        meta = [(m.kmin, m.kmax) if method == "quest" else (m.ckeys,) for m in eng.metas if m is not None]
        got[f] = (torch.stack(outs), eng.caches, meta, torch.stack(stats))
    (lf, cf, mf, sf), (lu, cu, mu, su) = got[True], got[False]
    tol = 2e-5 if dev == "cpu" else 2e-3  # (CUDA: other GEMM and reduction orders)
    torch.testing.assert_close(lf, lu, rtol=tol, atol=tol)
    assert torch.equal(sf, su)
    for a, b in zip(cf, cu, strict=True):
        assert torch.equal(a.seq_lens, b.seq_lens) and a.seq_lens.tolist() == [130, 130]
        torch.testing.assert_close(a.k, b.k, rtol=tol / 2, atol=tol / 2)
    for a, b in zip(mf, mu, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=tol / 2, atol=tol / 2)
