#!/usr/bin/env bash
# The whole GPU validation as one background job on the offline Hopper machine, so that it
# outlives a device call (10 minutes at most): the first call starts it, later calls made while
# the machine is still warm wait on it and bring its logs back.
#   bash scripts/gpu_pipeline.sh start [STAGE...]   # copy the repo to /tmp/ffi and run the stages
#   bash scripts/gpu_pipeline.sh wait SECONDS       # wait for the job (at most SECONDS), pack logs to $OUT
# Modules built ahead on the CPU machine (bash scripts/prebuild_kernels.sh -> .aot/, 1-5 MB each) are
# loaded instead of compiled: pack them (bash scripts/pack_prebuilt.sh -> .aotpack/, xz) and carry
# [".whl", ".aotpack", ".aotpack2", ..., "SOURCE_COMMIT"] with `start` (wheels and packs must fit the
# 64 MiB a call carries).
# The machine's copy of .git is stale: `git rev-parse --short HEAD > SOURCE_COMMIT` here and carry
# it, so that benchmark rows name their commit.
# Stages, in the default order (what is missing most first, for a 30-minute machine whose modules
# were built ahead):
#   warm tests bench-32k decode bench-8k varlen plan examples score-tests
# and:
#   warm         compile bf16 (head_dim 128, 64) and fp16 (128), then the score_mod variants in the background
#   tests        every GPU test except the compiled score_mod ones
#   examples     python examples/*.py on the GPU (each checks its own result)
#   score-tests  the compiled score_mod and tile-variant tests (after the variants are built)
#   bench-8k, bench-32k, bench-8k-d64, bench-32k-d64  python -m flex_flash_infer bench at 8192 / 32768
#                tokens, head_dim 128 / 64 (JSON in the run dir; BENCH_CASES: only those cases);
#                profile-8k, profile-32k the same with --profile (at 8192 / 32768, head_dim 128);
#                profile-leads only the rows slower in the bench than alone
#   prefix-probe scripts/prefix_lm_probe.py: prefix-LM's launches timed alone beside causal's (8192, 32768)
#   peer-timing  scripts/peer_timing.py: the Triton-flex causal time timed two ways
#   formulations scripts/formulations.py: window, prefix-LM and streaming handed to FlashInfer in other shapes
#   cold         bench --cold: first use of each route, a new score_mod, warmup, torch flex, from empty caches
#   decode       bench --decode (paged decode);   varlen  bench --varlen;   plan   bench --plan (planning time)
#   profile-plan scripts/profile_prepare.py: prepare()'s host time by function (cProfile)
#   fuzz         scripts/gpu_fuzz.sh for FUZZ_MINUTES (8) from FUZZ_SEED (9001); fuzz-masks, fuzz-scores: one half;
#                fuzz-both: the masks and the bf16 score_mods, one process per pool member, at once
#   tests-k      the GPU tests matching TESTS_K (pytest -k)
#   suite        the whole GPU test suite (pytest -m gpu) over 6 processes, alone on the machine, compiling
#                the modules it meets side by side
#   plan-model   scripts/plan_per_step.py: the CPU model's plan() timed on this host (its Python's speed)
#   plan-segments scripts/plan_segments.py: a decode step's plan() split by piece, each CUDA call it makes timed alone
#   ab-plan      scripts/ab_plan.py: a decode step's plan() from this checkout against the package copy in
#                .ab_before/ (as for ab-layout), interleaved, each side's run() checked first
#   ab-layout, ab-layout-32k  scripts/ab_layout.py: our call from this checkout against the package copy in .ab_before/
#                (git archive OLD flex_flash_infer | tar -x -C .ab_before; carry it), interleaved, 8192 / 32768
#                tokens (AB_CASES: only these bench cases); ab-layout-d64, ab-layout-32k-d64: the same at
#                head_dim 64 (AB_CASES_D64: only these cases)
#   lto-check    scripts/lto_launch_check.py: lto_variants'
#                per-score_mod module (softcap, relative-position bias) built here from the carried generic
#                objects (.ltopack, scripts/lto_pack.py), loaded, run ragged and paged against the reference and
#                today's module, both timed, a new score_mod's build timed, then the generic objects built
#                again here (timed); JSON lto-check.json, log lto-check.log. Carry [".whl", ".ltopack",
#                ".aotpack", "SOURCE_COMMIT"] (.aotpack: main's, holds today's softcap module; about 53 MiB in all)
# FlashAttention-4 (../shared/gpu/fetch-fa4.sh) is installed by gpu_env.sh when .fa4b is carried and
# an earlier call copied .fa4a's libraries to /tmp/fa4.
set -uo pipefail
run_dir=/tmp/ffi_run
case "${1:-}" in
  start)
    shift
    if [ -f $run_dir/pid ] && kill -0 "$(cat $run_dir/pid)" 2>/dev/null; then echo "already running"; exit 0; fi
    rm -rf /tmp/ffi $run_dir && mkdir -p $run_dir && cp -r . /tmp/ffi
    # the machine's .git is not this checkout's history: with SOURCE_COMMIT carried, the rows
    # name that commit instead
    [ -f SOURCE_COMMIT ] && rm -rf /tmp/ffi/.git
    cd /tmp/ffi && setsid nohup bash scripts/gpu_pipeline.sh run "${@:-warm tests bench-32k decode bench-8k varlen plan examples score-tests}" \
      >$run_dir/pipeline.log 2>&1 < /dev/null &
    echo $! > $run_dir/pid
    echo "started: ${*:-all stages}" ;;
  wait)
    [ -d $run_dir ] || { echo "no pipeline on this machine (a fresh machine: start it again)"; exit 3; }
    end=$(( $(date +%s) + ${2:-540} ))
    while [ ! -f $run_dir/done ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    [ -f $run_dir/done ] && echo "pipeline finished" || echo "pipeline still running"
    tail -n 25 $run_dir/pipeline.log
    out=${OUT:-gpu_out}; mkdir -p "$out"
    tar -czf "$out/ffi_run.tgz" -C $run_dir . && echo "packed $(ls $run_dir | tr '\n' ' ')" ;;
  run)
    shift
    source scripts/gpu_env.sh || { touch $run_dir/done; exit 1; }
    for stage in $*; do
      echo "=== $stage $(date +%T)"
      case $stage in
        warm)
          # 15 kernel sets compile at once (one process each, 3 nvcc jobs each): 12 minutes on 16 cores
          MAX_JOBS=3 python3 -m flex_flash_infer warmup --dtype bf16 --head-dim 128 64 >$run_dir/warm-bf16.log 2>&1 &
          MAX_JOBS=3 python3 -m flex_flash_infer warmup --dtype fp16 --head-dim 128 >$run_dir/warm-fp16.log 2>&1
          wait
          grep -h "ok\|FAILED" $run_dir/warm-*.log | tail -n 12
          # 14 kernel sets at once: 2 nvcc jobs each (18 sets at 3 each ran the 128 GiB machine out of memory)
          MAX_JOBS=2 python3 -m flex_flash_infer warmup --dtype bf16 --head-dim 128 --kinds score_mod:softcap \
            score_mod:alibi score_mod:rel_bias score_mod:temperature score_mod:causal_decay score_mod:softcap+window \
            tile_variants:softcap tile_variants:rel_bias tile_variants:alibi+columns \
            score_mod_fa2:rel_bias score_mod_fa2:softcap+window score_mod_fa2:alibi \
            >$run_dir/warm-score.log 2>&1 &
          MAX_JOBS=3 python3 -m flex_flash_infer warmup --dtype fp16 --head-dim 128 --kinds score_mod:softcap \
            >$run_dir/warm-score-fp16.log 2>&1 &
          echo $! > $run_dir/score_warm_pid ;;
        tests)
          # -v: a stage cut short by the machine's return still shows which tests passed
          python3 -m pytest -v -m gpu tests/ -rfE -k "not compiled_into" -p no:cacheprovider --durations=12 \
            >$run_dir/gpu_tests.log 2>&1; tail -n 15 $run_dir/gpu_tests.log ;;
        suite)
          # the whole GPU suite in one pytest over 6 processes (pytest-xdist, on the machine): the
          # machine compiles every module the tests meet that came without a prebuilt pack, and one
          # process compiled them one at a time (2026-12-05: 129 of 140 tests in 19 minutes beside a
          # 13-module warm-up, the compiled score_mod tests never reached); six processes compile
          # side by side, 3 nvcc jobs each (18 sets at 3 ran the 128 GiB machine out of memory), a
          # module two processes meet is built once (FlashInfer locks it)
          MAX_JOBS=3 python3 -m pytest -v -n 6 -m gpu tests/ -rfE -p no:cacheprovider --durations=12 \
            >$run_dir/gpu_suite.log 2>&1
          tail -n 6 $run_dir/gpu_suite.log ;;
        tests-k)
          # the GPU tests whose names match TESTS_K alone (a change's own tests, when the suite's compiles do not fit)
          # bounded: a patched kernel whose loads and steps fell out of step would hang
          timeout 900 python3 -m pytest -v -m gpu tests/ -rfE -k "${TESTS_K:?set TESTS_K}" -p no:cacheprovider --durations=12 \
            >$run_dir/gpu_tests_k.log 2>&1; tail -n 15 $run_dir/gpu_tests_k.log ;;
        examples)
          for f in examples/*.py; do echo "--- $f"; python3 "$f" 2>&1 | grep --line-buffered -v "INFO\|arning" | tail -n 4; \
            echo "exit ${PIPESTATUS[0]}"; done >$run_dir/examples.log 2>&1; cat $run_dir/examples.log ;;
        score-tests)
          while pgrep -f "kinds score_mod" >/dev/null; do sleep 5; done
          grep -h "ok\|FAILED" $run_dir/warm-score*.log
          python3 -m pytest -q -m gpu tests/backends/test_gpu.py -rfE -k "compiled_into" -p no:cacheprovider \
            >$run_dir/score_tests.log 2>&1; tail -n 15 $run_dir/score_tests.log ;;
        bench-8k|bench-32k|bench-8k-d64|bench-32k-d64|profile-8k|profile-leads|profile-32k)
          # every peer (torch flex on Triton and, when installed, on FlashAttention-4) in one process;
          # profile-8k: each row's host time and kernels, and our call replayed from a CUDA graph
          case $stage in
            bench-8k) a="8192 --head-dims 128" ;;          bench-8k-d64) a="8192 --head-dims 64" ;;
            bench-32k) a="32768 --head-dims 128" ;;        bench-32k-d64) a="32768 --head-dims 64" ;;
            profile-8k) a="8192 --head-dims 128 --profile" ;;
            # the 32768 rows at FA4 flex's level (PROFILE_CASES: only those), with causal beside them
            profile-32k) a="32768 --head-dims 128 --profile${PROFILE_CASES:+ --cases $PROFILE_CASES}" ;;
            # the rows under FlashAttention-4's (per-head windows 0.81x, the identity score_mod 0.97x at
            # 8192; streaming and random tiles at 32768) and a plain window beside them
            profile-leads) a="8192 --head-dims 128 --profile --cases per_head_windows identity+causal streaming random_tiles sliding_window" ;;
          esac
          # BENCH_CASES: only these cases (a change's own rows, when the whole bench does not fit)
          [ -n "${BENCH_CASES:-}" ] && [ "$stage" != profile-leads ] && [ "$stage" != profile-32k ] && a="$a --cases $BENCH_CASES"
          python3 -m flex_flash_infer bench --seq-lens $a --out "$run_dir/$stage.json" 2>&1 \
            | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 14 $run_dir/$stage.log ;;
        cold)   # first use from empty compile caches, each item in a fresh process (bench --cold)
          # COLD_ITEMS: only these items (bench --cold's names)
          python3 -m flex_flash_infer bench --cold ${COLD_ITEMS:-} --out "$run_dir/cold.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/cold.log; tail -n 16 $run_dir/cold.log ;;
        formulations)   # issue 22's leads against ours and FA4 (scripts/formulations.py)
          python3 scripts/formulations.py $run_dir/formulations.json 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/formulations.log; tail -n 40 $run_dir/formulations.log ;;
        plan-model)   # the CPU model's plan() on this host's CPU (scripts/plan_per_step.py): how much slower
          # its Python is than the development machine's, apart from what the GPU adds to ab-plan
          PYTHONPATH=.:tests python3 scripts/plan_per_step.py --rounds 7 --calls 100 --json $run_dir/plan-model.json \
            >$run_dir/plan-model.log 2>&1; tail -n 4 $run_dir/plan-model.log ;;
        plan-segments)   # a decode step's plan() split by piece on this host (scripts/plan_segments.py)
          python3 scripts/plan_segments.py $run_dir/plan-segments.json 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/plan-segments.log; tail -n 30 $run_dir/plan-segments.log ;;
        ab-plan)   # a planning change against the code before it, one process (scripts/ab_plan.py)
          python3 scripts/ab_plan.py .ab_before $run_dir/ab-plan.json 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/ab-plan.log; tail -n 8 $run_dir/ab-plan.log ;;
        ab-layout|ab-layout-32k|ab-layout-d64|ab-layout-32k-d64)   # a change against the code before it, one process (scripts/ab_layout.py)
          # the -d64 stages take their cases from AB_CASES_D64 (a head_dim 64 change's own rows)
          case $stage in *-d64) d=64; c=${AB_CASES_D64:-} ;; *) d=128; c=${AB_CASES:-} ;; esac
          python3 scripts/ab_layout.py .ab_before $run_dir/$stage.json --seq-len $(case $stage in *32k*) echo 32768 ;; *) echo 8192 ;; esac) \
            --head-dim $d ${c:+--cases $c} \
            2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 20 $run_dir/$stage.log ;;
        prefix-probe)   # prefix-LM's launches timed alone beside causal's (scripts/prefix_lm_probe.py)
          python3 scripts/prefix_lm_probe.py $run_dir/prefix-probe.json 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/prefix-probe.log; tail -n 24 $run_dir/prefix-probe.log ;;
        peer-timing)   # the Triton-flex causal time two ways (scripts/peer_timing.py)
          python3 scripts/peer_timing.py $run_dir/peer-timing.json >$run_dir/peer-timing.log 2>&1
          tail -n 12 $run_dir/peer-timing.log ;;
        decode|varlen)
          python3 -m flex_flash_infer bench --$stage --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/$stage.log; tail -n 8 $run_dir/$stage.log ;;
        plan)
          python3 -m flex_flash_infer bench --plan --out "$run_dir/plan.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/plan.log; tail -n 12 $run_dir/plan.log ;;
        profile-plan)   # where prepare()'s host time goes (scripts/profile_prepare.py, cProfile)
          python3 scripts/profile_prepare.py $run_dir/profile-plan.txt >/dev/null 2>$run_dir/profile-plan.err
          head -n 30 $run_dir/profile-plan.txt ;;
        fuzz|fuzz-masks|fuzz-scores|fuzz-both)  # the differential fuzzer through the real kernels (gpu_fuzz.sh)
          bash scripts/gpu_fuzz.sh start "${FUZZ_MINUTES:-8}" "${FUZZ_SEED:-9001}" \
            "$(case $stage in fuzz) echo all ;; fuzz-masks) echo masks ;; fuzz-both) echo both ;; *) echo scores ;; esac)"
          bash scripts/gpu_fuzz.sh wait $(( ${FUZZ_MINUTES:-8} * 60 + 120 ))
          # the stages after this one time kernels: nothing of the campaign may share the GPU
          # (the GPU tests once ran on through a whole bench); SIGKILL, pytest ignores SIGINT
          pkill -9 -f "[s]cripts/fuzz.py|[p]ytest -q -p no:warnings" && echo "stopped the campaign's leftovers"
          cp /tmp/gpu-fuzz/* $run_dir/ ;;
        lto-check)   # the LTO per-score_mod module against today's, side by side (scripts/lto_launch_check.py)
          timeout 1500 python3 scripts/lto_launch_check.py --time-generic-build --out $run_dir/lto-check.json \
            >$run_dir/lto-check.log 2>&1; echo "lto-check exit $?"
          grep -h "^| \|WRONG\|cases, \|new score_mod\|generic objects built\|today's module\|ratio" \
            $run_dir/lto-check.log | tail -n 45 ;;
        *) echo "unknown stage $stage" ;;
      esac
    done
    echo "=== done $(date +%T)"
    touch $run_dir/done ;;
  *) echo "usage: bash scripts/gpu_pipeline.sh start [STAGE...] | wait SECONDS" >&2; exit 2 ;;
esac
