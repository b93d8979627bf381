"""Can a Triton GEMV beat cuBLAS (F.linear) on the decode step's projections? A probe, not a library op.

Run on the GPU machine: PYTHONPATH=src python3 scripts/gemv_probe.py --out DIR
y[M, N] = x[M, K] @ W[N, K]^T in bf16 (fp32 accumulation) at the decode shapes of Llama-3.1-8B and GLM-4-9B,
M = 1 and 4. Weights rotate over enough copies (>= 256 MB) that every call reads them from HBM, as in a
decode step; one CUDA graph runs one call per copy, and the time per call is the graph's time / copies
(launch gaps included, as in the step). Variants: ``dot`` (x padded to 16 rows, tl.dot per K tile),
``fma`` (M = 1 only: elementwise products accumulated in a [BN, BK] tile, one reduction at the end; the
first run, docs/experiments/gemv_probe_h200.json), ``op`` (:func:`prr.ops.gemv.triton.linear`, the same idea
for M rows in an [M, BN, BK] tile: op-BN-BK-STAGES-WARPS, BK 0 = its default).
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from prr.bench.common import environment
from prr.ops.gemv import triton as op

SHAPES = {"llama_qkv": (6144, 4096), "llama_o": (4096, 4096), "llama_gate_up": (28672, 4096),
          "llama_down": (4096, 14336), "glm_qkv": (4608, 4096), "glm_down": (4096, 13696),
          "glm_gate_up": (27392, 4096), "llama_head": (128256, 4096), "smollm2_qkv": (960, 576),
          "smollm2_o": (576, 576), "smollm2_gate_up": (3072, 576), "smollm2_down": (576, 1536),
          "smollm2_head": (49152, 576)}


@triton.jit
def _gemv_dot(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemv_fma(x_ptr, w_ptr, y_ptr, N, K, swn, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros([BN, BK], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rk).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=rn[:, None] < N, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rn < N)


def gemv(x, w, y, variant, bn, bk, stages, warps):
    m, k = x.shape
    n = w.shape[0]
    if variant == "op":
        op.linear(x, w, None, bn=bn, bk=bk or None, stages=stages, warps=warps, out=y)
    elif variant == "tc":
        op.linear_dot(x, w, None, bn=bn, bk=bk, stages=stages, warps=warps, out=y)
    elif variant == "dot":
        _gemv_dot[(triton.cdiv(n, bn),)](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                         BM=16, BN=bn, BK=bk, STAGES=stages, num_warps=warps)
    else:
        _gemv_fma[(triton.cdiv(n, bn),)](x, w, y, n, k, w.stride(0), BN=bn, BK=bk, STAGES=stages, num_warps=warps)


def per_call_us(fn, copies):
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    ms = triton.testing.do_bench(g.replay, warmup=5, rep=40, return_mode="median")
    return 1e3 * ms / copies


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--m1", default="", help="one-row op configs instead of the default: BN:BK:STAGES:WARPS,...")
    ap.add_argument("--rows", default="1,4")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bw_bytes = 4.24e12  # the H200's copy bandwidth as prr bench measures it (only for the x-floor column)
    result = {"env": environment(), "rows": []}
    ap_cfg = {1: [("op", 8, 0, 3, 4), ("op", 8, 512, 4, 4), ("op", 4, 512, 3, 4), ("op", 16, 256, 4, 4)],
              2: [("op", 8, 0, 3, 4), ("op", 4, 512, 3, 4), ("tc", 32, 512, 4, 4), ("tc", 64, 256, 4, 4)],
              8: [("op", 8, 0, 3, 4), ("op", 2, 512, 3, 4), ("tc", 32, 512, 4, 4), ("tc", 64, 256, 4, 4),
                  ("tc", 64, 128, 4, 4)],
              4: [("op", 8, 0, 3, 4), ("op", 4, 256, 3, 4), ("op", 8, 256, 3, 4), ("op", 16, 64, 4, 4),
                  ("op", 4, 128, 4, 4), ("op", 2, 512, 3, 4), ("tc", 64, 256, 4, 4), ("tc", 32, 512, 4, 4)]}
    if args.m1:
        ap_cfg[1] = [("op", *map(int, c.split(":"))) for c in args.m1.split(",")]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        size = n * k * 2
        copies = max(2, min(64, -(-(256 << 20) // size)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            ref = F.linear(x, ws[0]).float()
            base = per_call_us(lambda i, x=x, ws=ws, ys=ys: torch.matmul(x, ws[i].t(), out=ys[i]), copies)
            floor = size / bw_bytes * 1e6
            rows = [{"shape": name, "n": n, "k": k, "m": m, "impl": "cublas", "us": round(base, 2),
                     "x_floor": round(base / floor, 3)}]
            for cfg in ap_cfg[m]:
                try:
                    gemv(x, ws[0], ys[0], *cfg)
                    err = float((ys[0].float() - ref).norm() / ref.norm())
                    us = per_call_us(lambda i, c=cfg, x=x, ws=ws, ys=ys: gemv(x, ws[i], ys[i], *c), copies)
                except Exception as e:  # a config that does not compile is a row, not a stop
                    rows.append({"shape": name, "m": m, "impl": "-".join(map(str, cfg)), "error": str(e)[:200]})
                    continue
                rows.append({"shape": name, "n": n, "k": k, "m": m, "impl": "-".join(map(str, cfg)),
                             "us": round(us, 2), "x_floor": round(us / floor, 3), "rel_err": err})
            ok = sorted((r for r in rows[1:] if "us" in r), key=lambda r: r["us"])
            print(f"{name} M={m}: cublas {base:.2f} us ({base / floor:.2f}x floor {floor:.2f}); best "
                  + ", ".join(f"{r['impl']} {r['us']:.2f} (err {r['rel_err']:.1e})" for r in ok[:4]), flush=True)
            result["rows"] += rows
        del ws
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "gemv_probe.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
