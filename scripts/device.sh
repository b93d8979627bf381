#!/usr/bin/env bash
# Runs on the lent GPU machine from the repository root (no installs there: PYTHONPATH=src).
# Usage: bash scripts/device.sh STEP...   steps: tests | gpu-tests | kernels | kernels-quick | layer | layer-quick | e2e | e2e-quick
# Results and logs go to $OUT (default ./out).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    e2e-refresh) { timeout 200 python3 -m prr bench e2e --contexts 4K,128K --batches 1,4 --out "$OUT/bench_e2e_h200.json" \
      2>&1 | grep -v "it/s\]" | tail -16
      timeout 170 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 --attentions dsa \
      --amortized 16x8,32x6 --steps 16 --out "$OUT/bench_e2e_glm_1m_amortized_h200.json" 2>&1 | grep -v "it/s\]" | tail -8
      timeout 120 python3 -m prr bench e2e --contexts 128K --batches 1 --attentions dsa --amortized 32x6 --steps 16 \
      --out "$OUT/bench_e2e_amortized_h200.json" 2>&1 | grep -v "it/s\]" | tail -6; } | tee -a "$OUT/run.log" ;;
    layer-sweep-b*) b=${step#layer-sweep-b}; timeout 560 python3 -m prr bench layer --quick --models llama-3.1-8b,glm-4-9b \
      --batches "$b" --contexts 32K,128K,512K --budgets 2048,4096,8192 --methods quest \
      --out "$OUT/bench_layer_h200_b$b.json" 2>&1 | grep -v "it/s\]" | tail -45 | tee -a "$OUT/run.log" ;;
    diag-amortized) timeout 450 python3 scripts/diag_amortized.py --out "$OUT" ${DIAG_ARGS:-} 2>&1 | grep -v "it/s\]" | tail -150 \
      | tee -a "$OUT/run.log" ;;
    radix-tests) timeout 200 python3 -m pytest -q tests/test_select.py tests/test_candidates.py tests/test_amortized.py \
      2>&1 | tail -3 | tee -a "$OUT/run.log" ;;
    select-scan) { timeout 120 python3 -m pytest -q tests/test_amortized.py tests/test_candidates.py 2>&1 | tail -2
      timeout 200 python3 -m prr bench select --batches 1,8 --contexts 512K --amortized 16x4,16x8,32x4,32x6 \
      --out "$OUT/bench_select_h200.json" 2>&1 | grep -v "it/s\]" | tail -40
      timeout 100 python3 scripts/diag_amortized.py --out "$OUT" --batches 1 2>&1 | grep -v "it/s\]" | tail -30; } \
      | tee -a "$OUT/run.log" ;;
    layer-infllm) timeout 560 python3 -m prr bench layer --quick --models llama-3.1-8b,glm-4-9b --batches 1,4 \
      --contexts 32K,128K --budgets 4096,8192 --methods infllm_v2 --out "$OUT/bench_layer_h200_infllm.json" 2>&1 \
      | grep -v "it/s\]" | tail -60 | tee -a "$OUT/run.log" ;;
    warps-eval) { timeout 150 python3 -m pytest -q tests/test_eval.py -k graph_path 2>&1 | tail -2
      timeout 200 python3 scripts/diag_amortized.py --out "$OUT" --batches 1,8 --parts-contexts 131072 2>&1 \
      | grep -v "it/s\]" | grep -v "^  s0" | tail -20; } | tee -a "$OUT/run.log" ;;
    select-final) { timeout 150 python3 -m pytest -q tests/test_select.py tests/test_candidates.py tests/test_amortized.py \
      tests/test_runtime.py 2>&1 | tail -2; timeout 100 python3 -m pytest -q tests/test_kernels.py -k "select or topk" \
      2>&1 | tail -2; timeout 200 python3 -m prr bench select --batches 1,8 --contexts 512K \
      --amortized 16x4,16x8,32x4,32x6 --out "$OUT/bench_select_h200.json" 2>&1 | grep -v "it/s\]" | tail -12; } \
      | tee -a "$OUT/run.log" ;;
    e2e-amortized) { timeout 200 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 \
      --attentions dsa --amortized 16x8,32x4 --steps 16 --out "$OUT/bench_e2e_glm_1m_amortized_h200.json" 2>&1 \
      | grep -v "it/s\]" | tail -8
      timeout 150 python3 -m prr bench e2e --contexts 128K --batches 1 --attentions dsa --amortized 16x8 --steps 16 \
      --out "$OUT/bench_e2e_amortized_h200.json" 2>&1 | grep -v "it/s\]" | tail -6; } | tee -a "$OUT/run.log" ;;
    gaps-amortized) timeout 200 python3 scripts/diag_gaps.py --out "$OUT" \
      --cases llama-3.1-8b:32768:1:dsa,llama-3.1-8b:32768:1:dsa_m16c8 2>&1 | grep -v "it/s\]" | tail -70 \
      | tee -a "$OUT/run.log" ;;
    select-fused) { timeout 100 python3 -m pytest -q tests/test_candidates.py tests/test_amortized.py 2>&1 | tail -2
      timeout 150 python3 -m prr bench select --batches 1,8 --contexts 512K --amortized 16x4,16x8,32x4,32x6 \
      --out "$OUT/bench_select_h200.json" 2>&1 | grep -v "it/s\]" | tail -8; } | tee -a "$OUT/run.log" ;;
    tests) timeout 300 python3 -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    kernels) timeout 480 python3 -m prr bench kernels --out "$OUT/bench_kernels.json" 2>&1 \
      | tee "$OUT/bench_kernels.log" | grep -v "it/s\]" | tail -120 ;;
    layer) timeout 450 python3 -m prr bench layer --out "$OUT/bench_layer.json" 2>&1 \
      | tee "$OUT/bench_layer.log" | grep -v "it/s\]" | tail -60 ;;
    layer-quick) timeout 300 python3 -m prr bench layer --models llama-3.1-8b --batches 1 --contexts 32K,512K \
      --methods quest --out "$OUT/bench_layer_quick.json" 2>&1 | tail -60 ;;
    e2e) timeout 420 python3 -m prr bench e2e --out "$OUT/bench_e2e.json" 2>&1 | tee "$OUT/bench_e2e.log" \
      | grep -v "it/s\]" | tail -30 ;;
    e2e-quick) timeout 200 python3 -m prr bench e2e --contexts 8K --batches 1 --steps 4 \
      --out "$OUT/bench_e2e_quick.json" 2>&1 | tail -30 ;;
    gpu-tests) timeout 150 python3 -m pytest -q -x tests/test_runtime.py tests/test_kernels.py 2>&1 | tail -25 ;;
    kernels-quick) timeout 200 python3 -m prr bench kernels --models llama-3.1-8b --batches 1 \
      --contexts 32K,512K --methods quest --out "$OUT/bench_quick.json" 2>&1 | tail -40 ;;
    # One call for the checks and timings of the 2026-11-29 session (logs appended to $OUT/run.log).
    final-tests) { timeout 100 python3 -m pytest -q tests/test_kernels.py tests/test_candidates.py 2>&1 | tail -4
      timeout 60 python3 -m pytest -q -m gpu tests 2>&1 | tail -6; } | tee -a "$OUT/run.log" ;;
    final-select) timeout 75 python3 -m prr bench select --batches 1,8 --contexts 512K --amortized 16x4 \
      --out "$OUT/bench_select_h200.json" 2>&1 | grep -v "it/s\]" | tail -15 | tee -a "$OUT/run.log" ;;
    final-gen) timeout 90 python3 scripts/gen_gpu.py --out "$OUT" --new-tokens 32 2>&1 | grep -v "it/s\]" \
      | tail -15 | tee -a "$OUT/run.log" ;;
    final-hf) timeout 80 python3 scripts/hf_gpu.py --out "$OUT" --steps 16 2>&1 | tail -15 | tee -a "$OUT/run.log" ;;
    final-fuse) for f in "" --no-fuse; do timeout 38 python3 -m prr bench e2e --attentions dense --contexts 4K \
      --batches 1 --steps 8 $f --out "$OUT/bench_e2e_4k_dense${f:+_nofuse}.json" 2>&1 | tail -3; done \
      | tee -a "$OUT/run.log" ;;
    # Session 2026-11-29 (2): whole-model decode with the per-token breakdown (kernel timeline of one replay).
    e2e-8b) timeout 170 python3 -m prr bench e2e --contexts 32K,128K --batches 1,4 --out "$OUT/bench_e2e_h200.json" \
      2>&1 | grep -v "it/s\]" | tail -20 | tee -a "$OUT/run.log" ;;
    e2e-glm) { timeout 170 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 32K,128K,512K --batches 1,4 \
      --out "$OUT/bench_e2e_glm_h200.json" 2>&1 | grep -v "it/s\]" | tail -24
      timeout 90 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 \
      --out "$OUT/bench_e2e_glm_1m_h200.json" 2>&1 | grep -v "it/s\]" | tail -8; } | tee -a "$OUT/run.log" ;;
    # PRR's best layer case of the budget sweep (GLM-4-9B, batch 1, 32K, budget 8192) as a whole model
    e2e-glm-best) timeout 80 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 32K --batches 1 --budget 8192 \
      --attentions dsa,prr --out "$OUT/bench_e2e_glm_32k_budget8192_h200.json" 2>&1 | grep -v "it/s\]" | tail -8 \
      | tee -a "$OUT/run.log" ;;
    layer-real) LOCALITY=results/real_model_h200/locality_k125.json timeout 200 bash scripts/gpu_real_model.sh \
      run layer-real 2>&1 | tail -30 | tee -a "$OUT/run.log" ;;
    # The fused decode step (prr.ops.fused) against the unfused baseline (--no-fuse), one call, same GPU.
    fused-tests) { timeout 150 python3 -m pytest -q tests/test_fused.py tests/test_llama_fused.py 2>&1 | tail -4
      timeout 120 python3 -m pytest -q -m gpu tests 2>&1 | tail -6; } | tee -a "$OUT/run.log" ;;
    e2e-fused-ab) for f in "" --no-fuse; do timeout 120 python3 -m prr bench e2e --contexts 4K,128K --batches 1,4 \
      $f --out "$OUT/bench_e2e_h200${f:+_unfused}.json" 2>&1 | grep -v "it/s\]" | tail -22; done \
      | tee -a "$OUT/run.log" ;;
    # GLM-4-9B-1M's two target rows with the fused step (DSA vs dense at 512K batch 4 and 1M batch 1)
    e2e-glm-targets) { timeout 80 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 512K --batches 4 \
      --attentions dense,dsa --out "$OUT/bench_e2e_glm_512k_b4_h200.json" 2>&1 | grep -v "it/s\]" | tail -6
      timeout 80 python3 -m prr bench e2e --model glm-4-9b-1m --contexts 1M --batches 1 --attentions dense,dsa \
      --out "$OUT/bench_e2e_glm_1m_b1_h200.json" 2>&1 | grep -v "it/s\]" | tail -6; } | tee -a "$OUT/run.log" ;;
    # Session 2026-11-29 (3): the selection's top-K, group maxima in the scoring kernel, per-token block counts;
    # A/B against the tree of 4494517 unpacked here first (untracked; it travels with the working tree):
    #   mkdir -p ab_base && git archive 4494517 src | tar -x -C ab_base
    sel-tests) { timeout 200 python3 -m pytest -q tests/test_kernels.py tests/test_fused.py tests/test_llama_fused.py \
      tests/test_select.py tests/test_candidates.py 2>&1 | tail -4
      timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tail -6; } | tee -a "$OUT/run.log" ;;
    ab-select) { PYTHONPATH=ab_base/src timeout 120 python3 scripts/ab_select.py --label base \
      --out "$OUT/ab_select_base.json" 2>&1 | tail -40
      timeout 200 python3 scripts/ab_select.py --label new --sweep all --out "$OUT/ab_select_new.json" 2>&1 \
      | tail -80; } | tee -a "$OUT/run.log" ;;
    e2e-ab) for t in base new; do p=src; c=${PRR_COMMIT:-unknown}; [ $t = base ] && p=ab_base/src && c=4494517
      PRR_COMMIT=$c PYTHONPATH=$p timeout 150 python3 -m prr \
      bench e2e --contexts 4K,128K --batches 1,4 --out "$OUT/bench_e2e_h200_$t.json" 2>&1 | grep -v "it/s\]" \
      | tail -14; done | tee -a "$OUT/run.log" ;;
    # After the bisection top-K: the new tree alone (the base numbers of the same GPU are in the A/B above)
    select-new) timeout 120 python3 scripts/ab_select.py --label new --sweep topk --out "$OUT/ab_select_new.json" \
      2>&1 | tail -50 | tee -a "$OUT/run.log" ;;
    e2e-new) timeout 150 python3 -m prr bench e2e --contexts 4K,128K --batches 1,4 --out "$OUT/bench_e2e_h200.json" \
      2>&1 | grep -v "it/s\]" | tail -14 | tee -a "$OUT/run.log" ;;
    select-12) timeout 100 python3 -m prr bench select --batches 1,8 --contexts 512K \
      --amortized 16x4,16x8,32x4,32x6 --out "$OUT/bench_select_h200.json" 2>&1 | grep -v "it/s\]" | tail -30 \
      | tee -a "$OUT/run.log" ;;
    # The session's closing A/B (baseline tree of 4494517 in ab_base/, untracked) and the #10 layer rows
    ab-select-final) for t in base new; do p=src; c=${PRR_COMMIT:-unknown}; [ $t = base ] && p=ab_base/src && c=4494517
      PRR_COMMIT=$c PYTHONPATH=$p timeout 110 \
      python3 scripts/ab_select.py --label $t --out "$OUT/ab_select_h200_$t.json" 2>&1 | tail -32; done \
      | tee -a "$OUT/run.log" ;;
    layer-128k) timeout 240 python3 -m prr bench layer --models llama-3.1-8b --batches 1,4 --contexts 128K \
      --methods quest --budgets 2048,8192 --out "$OUT/bench_layer_h200_128k.json" 2>&1 | grep -v "it/s\]" \
      | tail -40 | tee -a "$OUT/run.log" ;;
    gpu-tests-final) { timeout 240 python3 -m pytest -q tests/test_kernels.py tests/test_fused.py \
      tests/test_llama_fused.py tests/test_select.py tests/test_candidates.py tests/test_amortized.py 2>&1 | tail -4
      timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tail -6; } | tee -a "$OUT/run.log" ;;
    diag-ab) for t in base new; do p=src; c=${PRR_COMMIT:-unknown}; [ $t = base ] && p=ab_base/src && c=${BASE_COMMIT:-base}
      mkdir -p "$OUT/diag_$t"; PRR_COMMIT=$c PYTHONPATH=$p timeout 200 python3 scripts/diag_prr.py --out "$OUT/diag_$t" \
      --cases "${DIAG_CASES:-llama-3.1-8b:1:131072:quest:2048,llama-3.1-8b:1:131072:quest:8192,llama-3.1-8b:1:32768:quest:8192,glm-4-9b:1:32768:quest:8192,llama-3.1-8b:4:131072:quest:8192}" \
      2>&1 | tail -20; done | tee -a "$OUT/run.log" ;;
    diag-new) mkdir -p "$OUT/diag_new"; timeout 150 python3 scripts/diag_prr.py --out "$OUT/diag_new" \
      --cases "${DIAG_CASES:-llama-3.1-8b:1:131072:quest:2048,glm-4-9b:1:32768:quest:8192,llama-3.1-8b:1:131072:quest:8192}" \
      2>&1 | tail -12 | tee -a "$OUT/run.log" ;;
    e2e-128k-ab) for t in base new; do p=src; c=${PRR_COMMIT:-unknown}; [ $t = base ] && p=ab_base/src && c=${BASE_COMMIT:-base}
      PRR_COMMIT=$c PYTHONPATH=$p timeout 100 python3 -m prr bench e2e --contexts 128K --batches 1 \
      --out "$OUT/bench_e2e_128k_$t.json" 2>&1 | grep -v "it/s\]" | tail -8; done | tee -a "$OUT/run.log" ;;
    select-sweep) timeout 150 python3 scripts/ab_select.py --label new --sweep topk --out "$OUT/ab_select_h200.json" \
      2>&1 | tail -70 | tee -a "$OUT/run.log" ;;
    e2e-final) timeout 200 python3 -m prr bench e2e --contexts 4K,128K --batches 1,4 --out "$OUT/bench_e2e_h200.json" \
      2>&1 | grep -v "it/s\]" | tail -22 | tee -a "$OUT/run.log" ;;
    layer-128k-b1) timeout 200 python3 -m prr bench layer --models llama-3.1-8b --batches 1 --contexts 128K \
      --methods quest --budgets 2048,8192 --out "$OUT/bench_layer_h200_128k.json" 2>&1 | grep -v "it/s\]" \
      | tail -30 | tee -a "$OUT/run.log" ;;
    select-warps) timeout 170 python3 -m prr bench select --batches 1,8 --contexts 512K --amortized 16x8 \
      --out "$OUT/bench_select_h200.json" 2>&1 | grep -v "it/s\]" | tail -45 | tee -a "$OUT/run.log" ;;
    e2e-small-ab) for t in base new; do p=src; c=${PRR_COMMIT:-unknown}; [ $t = base ] && p=ab_base/src && c=${BASE_COMMIT:-base}
      PRR_COMMIT=$c PYTHONPATH=$p timeout 80 python3 -m prr bench e2e --model smollm2-135m --contexts 5K --batches 1 \
      --budget 1024 --out "$OUT/bench_e2e_smollm2_$t.json" 2>&1 | grep -v "it/s\]" | tail -8; done | tee -a "$OUT/run.log" ;;
    repair-tests) timeout 150 python3 -m pytest -q tests/test_kernels.py -k "repair or merge or sparse" 2>&1 | tail -4 \
      | tee -a "$OUT/run.log" ;;
    # Session 5 (2026-11-30): the Triton GEMV at one row (prr.ops.gemv) in the decode step
    gemv-tests) { timeout 200 python3 -m pytest -q tests/test_gemv.py tests/test_llama_fused.py tests/test_select.py 2>&1 \
      | tail -3; timeout 120 python3 -m pytest -q -m gpu tests 2>&1 | tail -3; } | tee -a "$OUT/run.log" ;;
    gemv-probe) timeout 200 python3 scripts/gemv_probe.py --out "$OUT" 2>&1 | grep -v "it/s\]" | tail -30 \
      | tee -a "$OUT/run.log" ;;
    e2e-llama) timeout 200 python3 -m prr bench e2e --contexts 4K,128K --batches 1,4 --out "$OUT/bench_e2e_h200.json" \
      2>&1 | grep -v "it/s\]" | tail -22 | tee -a "$OUT/run.log" ;;
    e2e-smollm2) timeout 80 python3 -m prr bench e2e --model smollm2-135m --contexts 5K --batches 1 --budget 1024 \
      --out "$OUT/bench_e2e_smollm2_h200.json" 2>&1 | grep -v "it/s\]" | tail -8 | tee -a "$OUT/run.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
