#!/usr/bin/env bash
# Named measurement steps for a GPU machine, run from the repository root with no installs (PYTHONPATH=src).
# Usage: OUT=DIR bash scripts/device.sh STEP...   (results and logs go to $OUT, default ./out; run.log collects
# the console tails). Each step fits a 10-minute call; `bash scripts/device.sh list` prints the steps. Pass
# PRR_COMMIT=<hash> along: the machine's copy of the tree may report a stale git HEAD (the results' source_sha1
# names the code that ran in any case).
#
#   tests            every test on the GPU (the gpu-marked ones run here; bundled-model tests skip without it)
#   gpu-tests        the gpu-marked tests only
#   kernels          prr bench kernels, default shapes           kernels-quick   one model, batch 1, Quest
#   layer-sweep-bN   the per-layer sweep at batch N (1, 4, 8): Llama-3.1-8B and GLM-4-9B x 32K/128K/512K x
#                    budgets 2048/4096/8192, Quest; merge the parts with scripts/merge_layer_runs.py
#   layer-infllm     the per-layer sweep with InfLLM-v2 selection   layer-quick   one model, batch 1, Quest
#   e2e              whole-model decode, Llama-3.1-8B 4K/128K x b1/b4, and the amortized rows (GLM-4-9B-1M at
#                    1M, Llama-3.1-8B at 128K)                       e2e-quick     8K, b1, 4 steps
#   e2e-glm-targets  GLM-4-9B-1M dense vs DSA at 512K b4 and 1M b1
#   e2e-smollm2      SmolLM2-135M shapes at 5K tokens, budget 1024
#   select           prr bench select: full scan vs amortized selection at 512K, b1 and b8
#   guessed-tests    the guessed top-K's and the layer runtime's GPU tests
#   topk             prr bench topk: the guessed top-K vs the full one, Llama-3.1-8B 128K/512K x b1/b8, budget 2048
#   topk-timeline    scripts/topk_timeline.py: SM-clock stamps at the top-K programs' phase boundaries (full and
#                    guessed; L2 flushed and warm) and single-program primitives at the top-K's tile sizes
#   handoff          scripts/diag_handoff.py: how long a kernel waits for the one before it (ordinary launch,
#                    dependent launch, a per-row device flag)
#   layer-targets    the layer step at the two target cases (Llama-3.1-8B b1 128K and GLM-4-9B b1 512K,
#                    budget 2048), kernel timelines recorded
#   e2e-llama        whole-model decode, DSA vs DSA on the guessed top-K vs PRR: Llama-3.1-8B 128K b1
#   e2e-glm          the same for GLM-4-9B-1M at 1M b1
#   pdl-layer        the layer step at Llama-3.1-8B b1 128K / 2048 with programmatic dependent launch off, then on
#   pdl-e2e          whole-model decode (dense, DSA, PRR) at Llama-3.1-8B 128K b1, dependent launch off and on
#   overlap-layer    the layer step at Llama-3.1-8B b1 128K / 2048 alone (layer-targets' first case)
#   overlap-e2e      whole-model decode at Llama-3.1-8B 128K b1: DSA, PRR with its speculation beside the
#                    selection and beside the top-K alone (StepSettings.overlap), on the guessed and on the full
#                    top-K (predictor="previous"), and PRR with ratio="auto"
#   diag-prr         kernel timelines of DSA's and PRR's layer step (scripts/diag_prr.py; draw them with
#                    prr bench plot $OUT/diag_prr.json --timelines)
#   diag-amortized   kernel timelines of amortized selection's scan and re-score steps
#   gen              scripts/gen_gpu.py: generation with graphs, a ragged 32K-128K batch, auto's crossover
#   hf               scripts/hf_gpu.py: prr.hf in bf16 and its 32K latency against transformers' SDPA
#   layer-real       the layer step at the real model's hit rates (needs results/real_model_h200/locality_k125.json)
# The real bundled model on a GPU (the wheel must travel first): scripts/gpu_real_model.sh. Several GPUs:
# scripts/tp_gpu.sh.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
quiet() { grep -v "it/s\]"; }  # drop progress-bar lines from the logs
if [ "${1:-}" = list ]; then sed -n '/^#   /p' "$0"; exit 0; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    tests) timeout 590 python3 -m pytest -q tests 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    gpu-tests) timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -10 ;;
    kernels) timeout 480 python3 -m prr bench kernels --out "$OUT/bench_kernels.json" 2>&1 \
      | tee "$OUT/bench_kernels.log" | quiet | tail -120 ;;
    kernels-quick) timeout 200 python3 -m prr bench kernels --models llama-3.1-8b --batches 1 \
      --contexts 32K,512K --methods quest --out "$OUT/bench_kernels_quick.json" 2>&1 | quiet | tail -40 ;;
    layer-sweep-b*) b=${step#layer-sweep-b}; timeout 560 python3 -m prr bench layer --quick \
      --models llama-3.1-8b,glm-4-9b --batches "$b" --contexts 32K,128K,512K --budgets 2048,4096,8192 \
      --methods quest --out "$OUT/bench_layer_b$b.json" 2>&1 | quiet | tail -45 | tee -a "$OUT/run.log" ;;
    layer-infllm) timeout 560 python3 -m prr bench layer --quick --models llama-3.1-8b,glm-4-9b --batches 1,4 \
      --contexts 32K,128K --budgets 4096,8192 --methods infllm_v2 --out "$OUT/bench_layer_h200_infllm.json" 2>&1 \
      | quiet | tail -60 | tee -a "$OUT/run.log" ;;
    layer-quick) timeout 300 python3 -m prr bench layer --models llama-3.1-8b --batches 1 --contexts 32K,512K \
      --methods quest --out "$OUT/bench_layer_quick.json" 2>&1 | quiet | tail -60 ;;
    e2e) { timeout 200 python3 -m prr bench e2e --contexts 4K,128K --batches 1,4 --out "$OUT/bench_e2e_h200.json" \
      2>&1 | quiet | tail -16
      timeout 170 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 --attentions dsa \
      --amortized 16x8,32x6 --steps 16 --out "$OUT/bench_e2e_glm_1m_amortized_h200.json" 2>&1 | quiet | tail -8
      timeout 120 python3 -m prr bench e2e --contexts 128K --batches 1 --attentions dsa --amortized 32x6 --steps 16 \
      --out "$OUT/bench_e2e_amortized_h200.json" 2>&1 | quiet | tail -6; } | tee -a "$OUT/run.log" ;;
    e2e-quick) timeout 200 python3 -m prr bench e2e --contexts 8K --batches 1 --steps 4 \
      --out "$OUT/bench_e2e_quick.json" 2>&1 | quiet | tail -30 ;;
    e2e-glm-targets) { timeout 80 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 512K --batches 4 \
      --attentions dense,dsa --out "$OUT/bench_e2e_glm_512k_b4_h200.json" 2>&1 | quiet | tail -6
      timeout 80 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 --attentions dense,dsa \
      --out "$OUT/bench_e2e_glm_1m_b1_h200.json" 2>&1 | quiet | tail -6; } | tee -a "$OUT/run.log" ;;
    e2e-smollm2) timeout 80 python3 -m prr bench e2e --model smollm2-135m --contexts 5K --batches 1 --budget 1024 \
      --out "$OUT/bench_e2e_smollm2_h200.json" 2>&1 | quiet | tail -8 | tee -a "$OUT/run.log" ;;
    select) timeout 200 python3 -m prr bench select --batches 1,8 --contexts 512K --amortized 16x4,16x8,32x4,32x6 \
      --out "$OUT/bench_select_h200.json" 2>&1 | quiet | tail -40 | tee -a "$OUT/run.log" ;;
    guessed-tests) timeout 300 python3 -m pytest -q -m gpu tests/test_guessed.py tests/test_runtime.py 2>&1 \
      | tail -6 | tee -a "$OUT/run.log" ;;
    topk) timeout 200 python3 -m prr bench topk --batches 1,8 --contexts 128K,512K --warps 16 \
      --out "$OUT/bench_topk.json" 2>&1 | quiet | tail -12 | tee -a "$OUT/run.log" ;;
    handoff) timeout 200 python3 scripts/diag_handoff.py --out "$OUT/diag_handoff.json" 2>&1 | tail -8 \
      | tee -a "$OUT/run.log" ;;
    topk-timeline) timeout 400 python3 scripts/topk_timeline.py --out "$OUT/topk_timeline.json" 2>&1 \
      | tee "$OUT/topk_timeline.log" | tail -150 ;;
    layer-targets) { timeout 200 python3 -m prr bench layer --quick --timelines --models llama-3.1-8b --batches 1 \
      --contexts 128K --budgets 2048 --methods quest --out "$OUT/bench_layer_llama_128k.json" 2>&1 | quiet | tail -3
      timeout 200 python3 -m prr bench layer --quick --timelines --models glm-4-9b --batches 1 --contexts 512K \
      --budgets 2048 --methods quest --out "$OUT/bench_layer_glm_512k.json" 2>&1 | quiet | tail -3; } \
      | tee -a "$OUT/run.log" ;;
    e2e-llama) timeout 200 python3 -m prr bench e2e --contexts 128K --batches 1 --attentions dsa,dsa_guessed,prr \
      --out "$OUT/bench_e2e_llama_128k.json" 2>&1 | quiet | tail -5 | tee -a "$OUT/run.log" ;;
    e2e-glm) timeout 240 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 --steps 8 \
      --attentions dsa,dsa_guessed,prr --out "$OUT/bench_e2e_glm_1m.json" 2>&1 | quiet | tail -5 \
      | tee -a "$OUT/run.log" ;;
    pdl-layer) for m in off on; do PRR_PDL=$m timeout 200 python3 -m prr bench layer --quick --timelines \
      --models llama-3.1-8b --batches 1 --contexts 128K --budgets 2048 --methods quest \
      --out "$OUT/bench_layer_llama_128k_pdl_$m.json" 2>&1 | quiet | tail -3; done | tee -a "$OUT/run.log" ;;
    pdl-e2e) timeout 330 python3 -m prr bench e2e --contexts 128K --batches 1 --attentions dense,dsa,prr \
      --pdl off,on --out "$OUT/bench_e2e_llama_128k_pdl.json" 2>&1 | quiet | tail -14 | tee -a "$OUT/run.log" ;;
    overlap-layer) timeout 240 python3 -m prr bench layer --quick --timelines --models llama-3.1-8b --batches 1 \
      --contexts 128K --budgets 2048 --methods quest --out "$OUT/bench_layer_llama_128k.json" 2>&1 | quiet \
      | tail -3 | tee -a "$OUT/run.log" ;;
    overlap-e2e) timeout 400 python3 -m prr bench e2e --contexts 128K --batches 1 --attentions dsa,prr,prr_previous,prr_auto \
      --overlap selection,topk --out "$OUT/bench_e2e_llama_128k_overlap.json" 2>&1 | quiet | tail -14 \
      | tee -a "$OUT/run.log" ;;
    diag-prr) timeout 300 python3 scripts/diag_prr.py --out "$OUT" --timelines 2 \
      --cases "${DIAG_CASES:-llama-3.1-8b:1:131072:quest:2048,llama-3.1-8b:1:32768:quest:8192}" 2>&1 | quiet \
      | tail -30 | tee -a "$OUT/run.log" ;;
    diag-amortized) timeout 450 python3 scripts/diag_amortized.py --out "$OUT" ${DIAG_ARGS:-} 2>&1 | quiet \
      | tail -150 | tee -a "$OUT/run.log" ;;
    gen) timeout 300 python3 scripts/gen_gpu.py --out "$OUT" --new-tokens 32 2>&1 | quiet | tail -15 \
      | tee -a "$OUT/run.log" ;;
    hf) timeout 300 python3 scripts/hf_gpu.py --out "$OUT" --steps 16 2>&1 | quiet | tail -15 | tee -a "$OUT/run.log" ;;
    layer-real) LOCALITY=results/real_model_h200/locality_k125.json timeout 200 bash scripts/gpu_real_model.sh \
      run layer-real 2>&1 | tail -30 | tee -a "$OUT/run.log" ;;
    *) echo "unknown step $step (bash scripts/device.sh list)" ;;
  esac
done
