#!/usr/bin/env bash
# The differential fuzzer through the real kernels on the GPU machine (issue 20's GPU campaign):
# mask cases in bf16 and in fp16 (FlashInfer's own modules only: masks compile nothing, prebuild
# them with scripts/prebuild_kernels.sh --kinds --dtypes bf16 fp16), score_mod cases from the
# fuzzer's pool of five (each compiles its variants once), side by side as background jobs that
# outlive a call. The GPU test suite is the pipeline's `suite` stage, after it: run beside the
# campaign, its compiles and the score process's starved each other (neither finished in 10 minutes). After `source scripts/gpu_env.sh`:
#   bash scripts/gpu_fuzz.sh start MINUTES SEED   the campaign, seeds SEED..SEED+2 (bf16), SEED+1000..SEED+1002 (fp16), SEED+2000 (score_mods)
#   bash scripts/gpu_fuzz.sh wait SECONDS          wait (at most SECONDS), then copy logs and JSON to $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
run=/tmp/gpu-fuzz
case "${1:-}" in
  start)
    minutes=${2:?minutes}; seed=${3:?seed}
    mkdir -p $run
    fuzz() {   # name, then fuzz.py's arguments
      local name=$1; shift
      setsid nohup python3 scripts/fuzz.py --device cuda --head-dims 128 --minutes "$minutes" --json $run/$name.json \
        "$@" > $run/$name.log 2>&1 &
    }
    # three processes per mask dtype: the cases are host-bound (the oracle, planning); two threads
    # each keep seven processes within the machine's 16 cores
    export OMP_NUM_THREADS=2
    fuzz masks-bf16 --dtypes bf16 --score-share 0 --seed "$seed"
    fuzz masks-bf16b --dtypes bf16 --score-share 0 --seed $((seed + 1))
    fuzz masks-bf16c --dtypes bf16 --score-share 0 --seed $((seed + 2))
    fuzz masks-fp16 --dtypes fp16 --score-share 0 --seed $((seed + 1000))
    fuzz masks-fp16b --dtypes fp16 --score-share 0 --seed $((seed + 1001))
    fuzz masks-fp16c --dtypes fp16 --score-share 0 --seed $((seed + 1002))
    fuzz scores --dtypes bf16 fp16 --score-share 1 --seed $((seed + 2000))
    echo "started: $(ls $run)"
    ;;
  wait)
    deadline=$((SECONDS + ${2:-540}))
    while pgrep -f "scripts/fuzz.py" > /dev/null && [ $SECONDS -lt $deadline ]; do sleep 10; done
    for f in $run/*.log; do echo "== $f: $(grep -c '^ *[0-9]*:[0-9]* pass' $f) passed lines"; tail -n 4 $f; done
    [ -n "${OUT:-}" ] && cp $run/* "$OUT"/ 2>/dev/null
    pgrep -f "scripts/fuzz.py" > /dev/null && echo "still running" || echo "all done"
    ;;
  *) echo "usage: gpu_fuzz.sh start MINUTES SEED | wait SECONDS" >&2; exit 2 ;;
esac
