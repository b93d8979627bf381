"""``prr bench kernels``: every kernel at real attention shapes, beside dense SDPA and the plain-PyTorch path.

Per case (model shape, batch, context, method) on one layer, bf16: metadata append, block scoring, top-K,
selection (score + top-K), block-sparse decode over the budget, speculation with per-block states, repair of
10% misses (exact mode), the serialized DSA step (selection then attention), dense SDPA over the whole
context, and the same selection / attention / DSA step through the PyTorch reference ops. Every op is
graph-captured and timed by :mod:`prr.bench.common`; byte counts are listed with each op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import memory, ops
from ..algo.sparse import BlockMetadata, SparseConfig, select
from ..cache import KVCache
from ..model.config import ModelConfig
from ..ops.backend import use_backend
from ..timing import time_op
from .common import Row, copy_bandwidth_tbps, graph_overhead_us, save, table

BF16 = 2
METHOD_BUDGET = {"quest": 2048, "infllm_v2": 4096}  # tokens; Quest pages of 16, InfLLM-v2 blocks of 64


def _label(n: int) -> str:
    return f"{n // 1024}K"


def _metadata_bytes(cfg: SparseConfig, b: int, hkv: int, d: int, ctx: int) -> int:
    if cfg.method == "quest":
        return 2 * b * hkv * (ctx // cfg.block_size) * d * BF16
    return b * hkv * ((ctx - cfg.window) // cfg.stride + 1) * d * 4  # float32 compressed keys


def _replace_fraction(s_idx, s_cnt, nblk, frac, n_forced, gen):
    """P = S with `frac` of each row's dynamic blocks swapped for blocks outside S (host side, untimed)."""
    idx, cnt = s_idx.cpu().clone(), s_cnt.cpu().clone()
    for b in range(idx.shape[0]):
        n = int(nblk[b])
        for h in range(idx.shape[1]):
            row = idx[b, h, : cnt[b, h]].tolist()
            dyn = [j for j in row if n_forced[0] <= j < n - n_forced[1]]
            k = max(1, round(frac * len(dyn)))
            drop = set(torch.tensor(dyn)[torch.randperm(len(dyn), generator=gen)[:k]].tolist())
            outside = [j for j in range(n) if j not in set(row)]
            add = torch.tensor(outside)[torch.randperm(len(outside), generator=gen)[:k]].tolist()
            new = sorted((set(row) - drop) | set(add))
            idx[b, h, : len(new)] = torch.tensor(new, dtype=torch.int32)
    return idx.to(s_idx.device), cnt.to(s_cnt.device)


@dataclass
class RandomLayer:
    """One layer's attention inputs at a real shape: random KV filling the whole cache, its metadata, a query."""

    case: str
    cfg: SparseConfig
    cache: KVCache
    meta: BlockMetadata
    q: torch.Tensor
    nblk: torch.Tensor

    @classmethod
    def make(cls, model: str, batch: int, ctx: int, method: str, device="cuda", dtype=torch.bfloat16,
             budget: int | None = None):
        """``budget``: tokens the selection holds (default :data:`METHOD_BUDGET`); a non-default budget is
        named in the case label."""
        shp = ModelConfig.from_name(model)  # the attention shape of a named model
        budget = budget or METHOD_BUDGET[method]
        cfg = SparseConfig.from_budget(method, budget)
        # The cache and its metadata, plus a dense copy of K and V for the SDPA baseline.
        nbytes = memory.kv_cache_bytes(2, batch, ctx, shp.num_kv_heads, shp.head_dim, dtype, block_size=16)
        memory.require(nbytes, device, f"the benchmark buffers of {model} b{batch} {ctx} tokens")
        cache = KVCache.allocate(batch, ctx, shp.num_kv_heads, shp.head_dim, dtype=dtype, device=device)
        cache.k.normal_()
        cache.v.normal_()
        cache.seq_lens.fill_(ctx)
        q = torch.randn(batch, shp.num_q_heads, shp.head_dim, device=device, dtype=dtype)
        label = f"{model}/b{batch}/{_label(ctx)}/{method}" + ("" if budget == METHOD_BUDGET[method] else f"/{budget}")
        return cls(label, cfg, cache, BlockMetadata(cfg, cache), q,
                   ops.num_blocks(cache.seq_lens, cfg.block_size))


def bench_case(model: str, batch: int, ctx: int, method: str, copy_tbps: float, overhead: float,
               torch_path: bool, budget: int | None = None) -> list[Row]:
    lay = RandomLayer.make(model, batch, ctx, method, budget=budget)
    case, cfg, cache, meta, q, nblk = lay.case, lay.cfg, lay.cache, lay.meta, lay.q, lay.nblk
    hq, hkv, d = q.shape[1], cache.num_kv_heads, cache.head_dim
    dev = cache.device
    rows: list[Row] = []

    def add(op, impl, fn, nbytes, **extra):
        us = time_op(fn)
        rows.append(Row("kernels", case, op, impl, us, int(nbytes), nbytes / (copy_tbps * 1e12) * 1e6, overhead,
                        extra))

    meta_b = _metadata_bytes(cfg, batch, hkv, d, ctx)
    score_b = batch * hkv * cache.capacity // cfg.block_size * 4
    kv_tok = 2 * hkv * d * BF16  # bytes of one token's K and V across KV heads
    sel_kv_b = batch * cfg.budget_tokens * kv_tok
    qo_b = 2 * batch * hq * d * BF16

    sel = select(q, cache, meta)
    add("metadata_append", "triton", lambda: meta.append(cache), batch * hkv * d * BF16 * (3 if method == "quest"
                                                                                           else 33))
    add("score", "triton", lambda: meta.scores(q, cache), meta_b + score_b)
    add("topk", "triton", lambda: ops.select_blocks(sel.scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local),
        score_b)
    add("selection", "triton", lambda: select(q, cache, meta), meta_b)
    add("sparse_decode", "triton", lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size),
        sel_kv_b + qo_b, tokens=cfg.budget_tokens)
    blk_states_b = batch * hq * cfg.k_max * (d + 1) * 4
    add("speculate_block_states", "triton",
        lambda: ops.block_states(q, cache, sel.indices, sel.counts, cfg.block_size), sel_kv_b + blk_states_b)
    gen = torch.Generator().manual_seed(0)
    p_idx, p_cnt = _replace_fraction(sel.indices, sel.counts, nblk.cpu(), 0.10, (cfg.n_sink, cfg.n_local), gen)
    bo, blse = ops.block_states(q, cache, p_idx, p_cnt, cfg.block_size)
    misses = int((sel.counts - ops.selection_contains(p_idx, p_cnt, sel.indices, sel.counts).sum(-1)).sum())
    rep_b = misses * cfg.block_size * kv_tok // hkv + (batch * cfg.k_max * hkv - misses) * hq // hkv * (d + 1) * 4
    add("repair_exact", "triton",
        lambda: ops.repair_combine(q, cache, cfg.block_size, p_idx, p_cnt, sel.indices, sel.counts, block_o=bo,
                                   block_lse=blse), rep_b + qo_b, misses_per_row=misses / (batch * hkv))

    def dsa():
        s = select(q, cache, meta)
        return ops.sparse_decode(q, cache, s.indices, s.counts, cfg.block_size)

    add("dsa_step", "triton", dsa, meta_b + sel_kv_b + qo_b)

    kd = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
    vd = torch.randn_like(kd)
    q4 = q[:, :, None]
    add("dense", "sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True),
        batch * ctx * kv_tok + qo_b)
    if torch_path:
        with use_backend("reference"):
            add("selection", "torch", lambda: select(q, cache, meta), meta_b)
            add("sparse_decode", "torch",
                lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size), sel_kv_b + qo_b)
            add("dsa_step", "torch", dsa, meta_b + sel_kv_b + qo_b)
    return rows


TARGETS = [
    # (op, impl, context filter, limit, kind): kind "x_floor" bounds median/floor, "us" bounds the median
    ("selection", "quest", [512 * 1024], 1.5, "x_floor"),
    ("sparse_decode", "quest", None, 8.0, "us"),
    ("repair_exact", "quest", None, 5.0, "us"),
    ("dsa_step", "quest", [128 * 1024, 512 * 1024], 2.5, "x_floor"),
]


def check_targets(rows: list[dict]) -> list[dict]:
    out = []
    for op, method, ctxs, limit, kind in TARGETS:
        for r in rows:
            _, b, c, m = r["case"].split("/")
            if r["op"] != op or r["impl"] != "triton" or m != method:
                continue
            if ctxs is not None and c not in [_label(x) for x in ctxs]:
                continue
            if op in ("sparse_decode", "repair_exact") and b != "b1":
                continue
            val = r["x_floor"] if kind == "x_floor" else r["net_us"]
            unit = "x floor" if kind == "x_floor" else " us"
            out.append({"case": r["case"], "op": op, "target": f"<= {limit}{unit}", "value": round(val, 2),
                        "met": val <= limit})
    return out


def run(models, batches, contexts, methods, out: str, torch_path: bool = True, budgets=None) -> dict:
    copy = copy_bandwidth_tbps()
    overhead = graph_overhead_us()
    print(f"copy bandwidth {copy:.2f} TB/s; graph replay overhead {overhead:.1f} us")
    rows: list[Row] = []
    cases = [(m, b, c, me, bu) for m in models for b in batches for c in contexts for me in methods
             for bu in (budgets or [None])]
    failed = []
    for m, b, c, me, bu in tqdm(cases, desc="bench kernels", unit="case"):
        try:
            rows += bench_case(m, b, c, me, copy, overhead, torch_path, budget=bu)
        except Exception as e:  # one broken case must not lose the others' numbers
            failed.append({"case": f"{m}/b{b}/{_label(c)}/{me}/{bu or METHOD_BUDGET[me]}", "error": repr(e)[:500]})
            print(f"FAILED {failed[-1]}")
        torch.cuda.empty_cache()
    dicts = [r.to_dict() for r in rows]
    targets = check_targets(dicts)
    save(out, "kernels", rows, {"copy_tbps": copy, "overhead_us": overhead, "targets": targets, "failed": failed,
                                "budgets": METHOD_BUDGET, "dtype": "bfloat16"})
    print(table(dicts))
    print()
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['case']:36s} {t['op']:14s} {t['value']:8.2f} {t['target']}")
    return {"rows": dicts, "targets": targets}


__all__ = ["bench_case", "check_targets", "run"]
