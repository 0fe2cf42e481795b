#!/usr/bin/env bash
# The differential fuzzer through the real kernels on the GPU machine (issue 20's GPU campaign):
# mask cases in bf16 and in fp16 (FlashInfer's own modules only: masks compile nothing, prebuild
# them with scripts/prebuild_kernels.sh --kinds --dtypes bf16 fp16), score_mod cases from the
# fuzzer's pool of five (each compiles its variants once), side by side as background jobs that
# outlive a call. The GPU test suite is the pipeline's `suite` stage, after it: run beside the
# campaign, its compiles and the score process's starved each other (neither finished in 10 minutes). After `source scripts/gpu_env.sh`:
#   bash scripts/gpu_fuzz.sh start MINUTES SEED [all|masks|scores|both]
#       masks: seeds SEED..SEED+2 (bf16), SEED+1000..SEED+1002 (fp16);  all: and score_mods from SEED+2000;
#       scores: score_mods alone, one process per (pool member, dtype), seeds SEED+2000.., so that the
#       members' modules (1-3 minutes each) compile side by side instead of one after another;
#       both: masks, and scores in bf16 (one process per pool member), at the same time
#   bash scripts/gpu_fuzz.sh wait SECONDS          wait (at most SECONDS), then copy logs and JSON to $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
run=/tmp/gpu-fuzz
case "${1:-}" in
  start)
    minutes=${2:?minutes}; seed=${3:?seed}; what=${4:-all}
    case $what in all|masks|scores|both) ;; *) echo "gpu_fuzz.sh: all, masks, scores or both, got $what" >&2; exit 2 ;; esac
    mkdir -p $run
    fuzz() {   # name, then fuzz.py's arguments
      local name=$1; shift
      setsid nohup python3 scripts/fuzz.py --device cuda --head-dims 128 --minutes "$minutes" --json $run/$name.json \
        "$@" > $run/$name.log 2>&1 &
    }
    # three processes per mask dtype: the cases are host-bound (the oracle, planning); two threads
    # each keep seven processes within the machine's 16 cores
    export OMP_NUM_THREADS=2
    if [ "$what" != scores ]; then   # masks, all, both
      fuzz masks-bf16 --dtypes bf16 --score-share 0 --seed "$seed"
      fuzz masks-bf16b --dtypes bf16 --score-share 0 --seed $((seed + 1))
      fuzz masks-bf16c --dtypes bf16 --score-share 0 --seed $((seed + 2))
      fuzz masks-fp16 --dtypes fp16 --score-share 0 --seed $((seed + 1000))
      fuzz masks-fp16b --dtypes fp16 --score-share 0 --seed $((seed + 1001))
      fuzz masks-fp16c --dtypes fp16 --score-share 0 --seed $((seed + 1002))
    fi
    if [ "$what" = all ]; then fuzz scores --dtypes bf16 fp16 --score-share 1 --seed $((seed + 2000)); fi
    if [ "$what" = scores ] || [ "$what" = both ]; then
      # ten processes compiling at once: two nvcc jobs each (18 kernel sets at three ran the
      # 128 GiB machine out of memory); beside the mask processes, bf16 alone
      export MAX_JOBS=2
      n=0
      dtypes="bf16 fp16"; [ "$what" = both ] && dtypes=bf16
      for member in softcap alibi rel_bias gen1 gen2; do for dtype in $dtypes; do
        fuzz scores-$member-$dtype --dtypes $dtype --score-share 1 --score-pool $member --seed $((seed + 2000 + n))
        n=$((n + 1))
      done; done
    fi
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
