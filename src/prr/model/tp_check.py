"""Tensor-parallel correctness: TP=N decode (dense, DSA, PRR exact) against TP=1 on a small random model.

One prompt batch is prefilled densely, then every attention decodes greedily from that prefill. The TP=N runs
(one per rank, :func:`rank_runs`) and the TP=1 runs (:func:`decode_runs` on the full model) are compared by
:func:`compare` under two rules:

- float64: ``rel_err(TP=N, TP=1) <= eps64 · (hidden + ffn) · layers + eps32`` — TP changes only the order of
  the sums (row-parallel partial products, the all-reduce), and a dot product of n terms reassociated moves by
  at most about ``n · eps`` relative; the layers add up; the logits leave the model as float32 (one ulp).
- lower precision: the TP=N error against the float64 TP=1 logits at most 2x TP=1's own error in that dtype
  (the project's rule for kernels, applied to the model).

Greedy tokens must be equal (TP=N vs TP=1, and PRR exact vs DSA within TP=N). Used by ``tests/test_tp.py``
(gloo, CPU) and ``scripts/tp_check.py`` (torchrun, GPU).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..algo.sparse import SparseConfig
from .config import ModelConfig
from .engine import Engine
from .llama import Llama
from .tp import TensorParallel, shard_config, shard_weights
from .weights import random_weights

ATTENTIONS = ("dsa", "prr", "dense")  # dense last: the sparse engines adopt its prefill before it decodes


def small_config(head_dim: int = 16, kv_heads: int = 4) -> ModelConfig:
    """A small model whose vocabulary (301) and FFN (90) do not split evenly over 2 or 4 ranks."""
    return ModelConfig(vocab_size=301, hidden=64, ffn=90, num_layers=3, num_q_heads=2 * kv_heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, max_context=512)


def full_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float64 host weights (norms randomized too, so a wrongly replicated or sliced norm shows)."""
    w = random_weights(cfg, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    for k, t in w.items():
        if k.endswith("norm"):
            t.add_(0.2 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
    return w


def prompt(cfg: ModelConfig, batch: int = 2, length: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_runs(model: Llama, ids: torch.Tensor, steps: int, sparse: SparseConfig, *, n_dense_layers: int = 1,
                graph: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Per attention: ``logits [steps + 1, B, V]`` (float32, host), greedy ``tokens [steps + 1, B]`` and every
    layer's cached ``keys [L, B, Hkv, T, D]`` (in the model's dtype: they carry the residual stream at full
    precision, where the logits are rounded to float32). `graph`: after one eager step, the rest replay a
    captured CUDA graph."""
    dense = Engine(model, None, attention="dense", sparse=sparse, n_dense_layers=n_dense_layers)
    dense.prefill(ids.to(model.device), steps + 1)
    out = {}
    for attention in ATTENTIONS:
        eng = dense
        if attention != "dense":
            eng = Engine(model, None, attention=attention, sparse=sparse, ratio=1.5, n_dense_layers=n_dense_layers)
            eng.adopt_prefill(dense)
        logits = [eng._last_logits.clone()]
        for s in range(steps):
            if graph and s == 1:
                eng.capture_decode()
            logits.append(eng.step(logits[-1].argmax(-1)).clone())
        lg = torch.stack(logits).cpu()
        t = int(eng.caches[0].seq_lens[0])  # equal-length prompts: every sequence holds t tokens
        keys = torch.stack([c.logical("k")[:, :, :t] for c in eng.caches]).cpu()
        out[attention] = {"logits": lg, "tokens": lg.argmax(-1), "keys": keys}
    return out


def rank_runs(tp: TensorParallel, cfg: ModelConfig, w: dict, ids: torch.Tensor, steps: int, sparse: SparseConfig,
              dtype: torch.dtype, device="cpu", graph: bool = False) -> dict:
    """This rank's TP=N runs: its slices of the full weights `w`, in `dtype` on `device`."""
    local = {k: t.to(device=device, dtype=dtype) for k, t in shard_weights(w, cfg, tp.rank, tp.world).items()}
    model = Llama(shard_config(cfg, tp.rank, tp.world), local, tp=replace(tp, vocab_size=cfg.vocab_size))
    return decode_runs(model, ids, steps, sparse, graph=graph)


def reference_runs(cfg: ModelConfig, w: dict, ids: torch.Tensor, steps: int, sparse: SparseConfig,
                   dtype: torch.dtype, device="cpu", graph: bool = False) -> dict:
    """TP=1 runs of the full model (no collectives, the plain single-device path)."""
    model = Llama(cfg, {k: t.to(device=device, dtype=dtype) for k, t in w.items()})
    return decode_runs(model, ids, steps, sparse, graph=graph)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def fp64_tolerance(cfg: ModelConfig) -> float:
    return torch.finfo(torch.float64).eps * (cfg.hidden + cfg.ffn) * cfg.num_layers + torch.finfo(torch.float32).eps


def compare(cfg: ModelConfig, tp_runs: dict, ref_runs: dict, ref64: dict | None = None, rank: int = 0,
            world: int = 1) -> dict:
    """Per attention: the errors, the tolerance the rule gives, and the verdicts. `ref64` (the float64 TP=1
    runs) is given when the runs are not float64 (then the lower-precision rule applies). Logits are compared
    while the TP=1 tokens are followed: at the first differing token the comparison stops (the token check
    fails). The cached keys of rank `rank` of `world` are compared with the same rule (float64: no float32
    rounding term)."""
    hkv = cfg.num_kv_heads // world
    heads = slice(rank * hkv, (rank + 1) * hkv)
    out = {}
    for att, r in tp_runs.items():
        ref = ref_runs[att]
        same = (r["tokens"] == ref["tokens"]).all(dim=-1)  # per step
        row = {"steps": len(same) - 1, "tokens_equal": bool(same.all())}
        if ref64 is not None:
            same = same & (ref["tokens"] == ref64[att]["tokens"]).all(dim=-1)
        # logits of step i read the tokens up to i - 1: comparable through the first differing token
        n = min(len(same), int(same.long().cumprod(0).sum()) + 1)
        # keys of position p are written at step p - T0 + 1: the same prefix of positions is comparable
        k = r["keys"].shape[3] - r["tokens"].shape[0] + n
        keys, ref_keys = r["keys"][:, :, :, :k], ref["keys"][:, :, heads, :k]
        if ref64 is None:
            row.update(rel_err=rel_err(r["logits"][:n], ref["logits"][:n]), tolerance=fp64_tolerance(cfg),
                       keys_rel_err=rel_err(keys, ref_keys),
                       keys_tolerance=fp64_tolerance(cfg) - torch.finfo(torch.float32).eps,
                       rule="rel_err <= eps64 * (hidden + ffn) * layers (+ eps32 for the float32 logits)")
        else:
            gold, gold_keys = ref64[att]["logits"][:n], ref64[att]["keys"][:, :, heads, :k]
            own = rel_err(ref["logits"][:n], gold)
            own_keys = rel_err(ref_keys, gold_keys)
            row.update(rel_err=rel_err(r["logits"][:n], gold), tp1_rel_err=own, tolerance=2 * own,
                       keys_rel_err=rel_err(keys, gold_keys), keys_tolerance=2 * own_keys,
                       rule="rel_err vs float64 <= 2 x TP=1's own")
        row["logits_ok"] = row["rel_err"] <= row["tolerance"] and row["keys_rel_err"] <= row["keys_tolerance"]
        out[att] = row
    if "dsa" in tp_runs and "prr" in tp_runs:
        out["prr_exact_tokens_equal_dsa"] = bool(torch.equal(tp_runs["prr"]["tokens"], tp_runs["dsa"]["tokens"]))
    return out


def passed(report: dict) -> bool:
    rows = [v for v in report.values() if isinstance(v, dict)]
    return all(r["tokens_equal"] and r["logits_ok"] for r in rows) and report.get("prr_exact_tokens_equal_dsa", True)


def spawn_worker(rank: int, world: int, init_file: str, out_dir: str, cfg: ModelConfig, steps: int,
                 sparse: SparseConfig, dtypes: tuple[torch.dtype, ...]) -> None:
    """One rank of a gloo group on the host (``torch.multiprocessing.spawn``): saves its runs per dtype to
    ``out_dir/rank{rank}.pt``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tp = TensorParallel(rank, world, "gloo")
        w, ids = full_weights(cfg), prompt(cfg)
        runs = {str(dt): rank_runs(tp, cfg, w, ids, steps, sparse, dt) for dt in dtypes}
        runs["rank0_ints"] = tp.rank0_ints([10 + rank, rank], torch.device("cpu"))  # a setup-time decision
        torch.save(runs, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
