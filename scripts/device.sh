#!/usr/bin/env bash
# Runs on the lent GPU machine from the repository root (no installs there: PYTHONPATH=src).
# Usage: bash scripts/device.sh STEP...   steps: tests | kernels | kernels-quick
# Results and logs go to $OUT (default ./out).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    tests) timeout 300 python3 -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    kernels) timeout 480 python3 -m prr bench kernels --out "$OUT/bench_kernels.json" 2>&1 \
      | tee "$OUT/bench_kernels.log" | grep -v "it/s\]" | tail -120 ;;
    kernels-quick) timeout 200 python3 -m prr bench kernels --models llama-3.1-8b --batches 1 \
      --contexts 32K,512K --methods quest --out "$OUT/bench_quick.json" 2>&1 | tail -40 ;;
    *) echo "unknown step $step" ;;
  esac
done
