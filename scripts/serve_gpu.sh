#!/usr/bin/env bash
# `prr serve`'s GPU targets in one command, from the repository root (no installs: PYTHONPATH=src; the engine
# loop runs in process, so neither uvicorn nor starlette is needed). JSON and logs go to $OUT (default ./out).
#   continuous-8b  target 2: random Llama-3.1-8B, prompts mixed 4K-128K (random keys and values instead of a
#                  prefill), outputs 64-512 tokens, 16 requests from 8 clients: continuous batching vs static
#                  batches of the same requests (Engine.generate_batch, same KV budget), dense vs DSA vs PRR;
#                  throughput, TTFT and TPOT p50/p99
#   continuous-smollm2  target 2 on the real SmolLM2 (5K-token prompts of real text); skipped where the bundled
#                  model cannot load (see scripts/gpu_real_model.sh for getting it onto the machine)
#   load-8b        target 3: 1,000 requests from 64 clients (random 8B, prompts 256-2K, outputs 16-64, PRR),
#                  every request answered, host RSS and CUDA memory from the 100th request to the last
# Usage: bash scripts/serve_gpu.sh [STEP...]   (default: all three; at most 7.5 minutes)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(continuous-8b continuous-smollm2 load-8b)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
for step in "${steps[@]}"; do
  case "$step" in
    continuous-8b) timeout 240 python3 -m prr bench serve --model llama-3.1-8b --attentions dense,dsa,prr \
      --requests 16 --concurrency 8 --max-batch 8 --prompt-mix 4K,8K,16K,32K,64K,128K --output 64-512 \
      --out "$OUT/bench_serve_8b.json" 2>&1 | tee "$OUT/bench_serve_8b.log" | tail -14 ;;
    continuous-smollm2) timeout 90 python3 -m prr bench serve --model smollm2 --attentions dense,dsa,prr \
      --requests 32 --concurrency 16 --max-batch 16 --prompt-mix 5K --output 64-512 \
      --out "$OUT/bench_serve_smollm2.json" 2>&1 | tee "$OUT/bench_serve_smollm2.log" | tail -14 ;;
    load-8b) timeout 120 python3 -m prr bench serve --model llama-3.1-8b --attentions prr --no-static \
      --requests 1000 --concurrency 64 --max-batch 32 --max-queue 64 --prompt-mix 256,512,1K,2K --output 16-64 \
      --memory-probe --out "$OUT/bench_serve_load_8b.json" 2>&1 | tee "$OUT/bench_serve_load_8b.log" | tail -8 ;;
    *) echo "unknown step $step (continuous-8b, continuous-smollm2, load-8b)"; exit 2 ;;
  esac
done
