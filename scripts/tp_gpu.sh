#!/usr/bin/env bash
# Tensor parallelism on the lent GPU machines, from the repository root (no installs: PYTHONPATH=src).
# Usage: bash scripts/tp_gpu.sh STEP...   results and logs go to $OUT (default ./out)
#   one H200:  check-tp1 check-gloo e2e-8b-tp1
#   two H200s: check-tp2 e2e-70b-32k e2e-70b-128k e2e-8b-tp2 e2e-8b-tp1 summary
# Per-step limits: T_CHECK (default 200 s), T_E2E (590 s); one device call runs at most 600 s in all.
# (e2e-8b-tp1 on the two-GPU machine runs on GPU 0 alone, so TP=2 and TP=1 are timed on the same host.)
# Llama-3.1-70B at 128K, batch 4 does not fit two H200s: per rank 70.6 GB of bf16 weights + 85.9 GB of KV
# cache (80 layers x 4 KV heads x 131072 tokens x 128 x 2 x 2 B x 4 sequences) > 139 GB; it is not run.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
# NVLink multicast off (the device notes): NCCL's ring/tree all-reduce, no symmetric-memory multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-out}
mkdir -p "$OUT"
TORCHRUN="python3 -m torch.distributed.run --standalone"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    # TP=1 through the tensor-parallel code path: the small model's decode (dense, DSA, PRR exact) vs the plain
    # model, fp32 and bf16, the step replayed from a CUDA graph.
    check-tp1) timeout 300 python3 scripts/tp_check.py --device cuda --graph --out "$OUT" 2>&1 | tee "$OUT/tp_check_tp1.log" | tail -5 ;;
    # Two ranks on ONE GPU over gloo (NCCL needs one GPU per rank): TP=2 vs TP=1, eager.
    check-gloo) timeout 300 $TORCHRUN --nproc-per-node 2 scripts/tp_check.py --device cuda:0 --backend gloo \
      --out "$OUT" 2>&1 | tee "$OUT/tp_check_gloo.log" | tail -5 ;;
    # Two GPUs, NCCL, each rank's whole decode step (collectives included) one CUDA graph: TP=2 vs TP=1 and
    # TP=2 PRR exact tokens == TP=2 DSA.
    check-tp2) timeout ${T_CHECK:-200} $TORCHRUN --nproc-per-node 2 scripts/tp_check.py --graph --out "$OUT" 2>&1 \
      | tee "$OUT/tp_check_tp2.log" | tail -5 ;;
    e2e-70b-32k) timeout ${T_E2E:-590} $TORCHRUN --nproc-per-node 2 -m prr bench e2e --model llama-3.1-70b --contexts 32K \
      --batches 1,4 --out "$OUT/bench_e2e_70b_tp2_32k.json" 2>&1 | tee "$OUT/bench_e2e_70b_tp2_32k.log" \
      | grep -v "it/s\]" | tail -12 ;;
    e2e-70b-128k) timeout ${T_E2E:-590} $TORCHRUN --nproc-per-node 2 -m prr bench e2e --model llama-3.1-70b --contexts 128K \
      --batches 1 --out "$OUT/bench_e2e_70b_tp2_128k.json" 2>&1 | tee "$OUT/bench_e2e_70b_tp2_128k.log" \
      | grep -v "it/s\]" | tail -12 ;;
    e2e-8b-tp2) timeout ${T_E2E:-590} $TORCHRUN --nproc-per-node 2 -m prr bench e2e --model llama-3.1-8b --contexts 128K \
      --batches 1,4 --out "$OUT/bench_e2e_8b_tp2_128k.json" 2>&1 | tee "$OUT/bench_e2e_8b_tp2_128k.log" \
      | grep -v "it/s\]" | tail -12 ;;
    e2e-8b-tp1) CUDA_VISIBLE_DEVICES=0 timeout ${T_E2E:-590} python3 -m prr bench e2e --tp 1 --model llama-3.1-8b \
      --contexts 128K --batches 1,4 --out "$OUT/bench_e2e_8b_tp1_128k.json" 2>&1 \
      | tee "$OUT/bench_e2e_8b_tp1_128k.log" | grep -v "it/s\]" | tail -12 ;;
    summary) python3 scripts/tp_summary.py "$OUT" ;;
    *) echo "unknown step $step" ;;
  esac
done
