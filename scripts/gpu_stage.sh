#!/usr/bin/env bash
# One stage of the GPU validation, for the offline Hopper machine (each call there is at most
# 10 minutes, and a fresh machine compiles every FlashInfer module again, so run the stages
# back to back on one warm machine). Logs and JSON go to $OUT (or ./gpu_out).
#   bash scripts/gpu_stage.sh warm-bf16   # compile bf16 kernels, head_dim 64 and 128 (~7 min)
#   bash scripts/gpu_stage.sh warm-fp16   # the same for fp16 (needed by the fp16 tests)
#   bash scripts/gpu_stage.sh tests       # every GPU test (compiles nothing new after both warms)
#   bash scripts/gpu_stage.sh bench-8k    # benchmark at 8192 tokens (torch.compile per case)
#   bash scripts/gpu_stage.sh bench-32k   # benchmark at 32768 tokens
#   bash scripts/gpu_stage.sh plan        # planning time vs torch.compile(create_block_mask)
set -uo pipefail
case "${1:-}" in warm-bf16|warm-fp16|tests|bench-8k|bench-32k|plan) ;; *)
  echo "usage: bash scripts/gpu_stage.sh warm-bf16|warm-fp16|tests|bench-8k|bench-32k|plan" >&2; exit 2 ;; esac
out=${OUT:-gpu_out}
mkdir -p "$out"
source scripts/gpu_env.sh || exit 1
export MAX_JOBS=${MAX_JOBS:-4}
case "${1:-}" in
  warm-bf16|warm-fp16)
    dt=${1#warm-}
    python3 -m flex_flash_infer warmup --dtype "$dt" --head-dim 128 64 2>&1 | grep -v INFO | tee "$out/$1.log" ;;
  tests)
    python3 -m pytest -q -m gpu tests/test_gpu.py -rfE 2>&1 | tail -40 | tee "$out/gpu_tests.log" ;;
  plan)
    python3 -m flex_flash_infer bench --plan --out "$out/plan.json" 2>&1 | grep -v "INFO\|arning" | tee "$out/plan.log" ;;
  bench-8k|bench-32k)
    n=$([ "$1" = bench-8k ] && echo 8192 || echo 32768)
    timeout 580 python3 -m flex_flash_infer bench --seq-lens "$n" --out "$out/$1.json" 2>&1 \
      | grep -v "INFO\|arning" | tee "$out/$1.log" ;;
esac
