#!/usr/bin/env bash
# The whole GPU validation as one background job on the offline Hopper machine, so that it
# outlives a device call (10 minutes at most): the first call starts it, later calls made while
# the machine is still warm wait on it and bring its logs back.
#   bash scripts/gpu_pipeline.sh start [STAGE...]   # copy the repo to /tmp/ffi and run the stages
#   bash scripts/gpu_pipeline.sh wait SECONDS       # wait for the job (at most SECONDS), pack logs to $OUT
# Modules built ahead on the CPU machine (bash scripts/prebuild_kernels.sh -> .aot/, 1-5 MB each) are
# loaded instead of compiled: pack them (bash scripts/pack_prebuilt.sh -> .aotpack/, xz) and carry
# [".whl", ".aotpack", ".aotpack2", ..., "SOURCE_COMMIT"] with `start` (run 10: 48 modules in two
# packs, 30 MB, beside 33 MB of wheels: just under the 64 MiB a call carries).
# The machine's copy of .git is stale: `git rev-parse --short HEAD > SOURCE_COMMIT` here and carry
# it, so that benchmark rows name their commit.
# Stages, in the default order (what is missing most first, for a 30-minute machine whose modules
# were built ahead: run 10 ran the whole GPU suite in 81 s that way; then the 32768 rows never run
# on the H200, decode with its plan() profile, and the 8192 rows profiled):
#   warm tests bench-32k decode bench-8k varlen plan examples score-tests
# and the rest:
#   warm-bench   bf16 kernels of the bench stages only (fits a 30-minute machine)
#   decode-tests  CUDA-graph decode, and a score_mod / per-head masks on the paged cache
#   bench-32k-score  causal and the score_mod rows at 32768
#   warm-tiles   the tile-variant kinds only (fa3_mask included);   tile-tests  their GPU tests
#   bench-columns  8192 streaming, attamba (both merges of the columns), per_head_windows, profiled
#   warm         compile bf16 (head_dim 128, 64) and fp16 (128), then the score_mod variants in the background
#   tests        every GPU test except the compiled score_mod ones
#   examples     python examples/*.py on the GPU (each checks its own result)
#   score-tests  the compiled score_mod and tile-variant tests (after the variants are built)
#   bench-8k, bench-32k  python -m flex_flash_infer bench at 8192 (--profile) / 32768 tokens (JSON in the run dir)
#   bench-32k-rest       the 32768 random_tiles, alibi and rel_bias rows only
#   bench-bands  8192: prefix_lm, prefix_lm_2000 (a prefix inside a query tile), document
#   bench-tiles  8192 random_tiles, per_head_windows (mask in kernel vs bits, bands per head), softcap on tiles
#   bench-score  8192: causal and the score_mod rows (softcap, alibi, rel_bias, identity)
#   bench-one-band  8192 full and sliding_window (d128, d64): the ragged kernel vs the single call
#   far-bias-tests  the relative-position bias split at its reach (GPU tests)
#   bench-rel-bias  rel_bias+causal at 32768 and 8192, split (default) and not (ours_no_far_split)
#   bench-static    the other cases at 32768 and 8192 without our alternative routes (quick on a fresh machine)
#   bench-static-8k every case at 8192 so (flex static; the next run's first bench: carry .aotpack-bench)
#   decode-plan-check  bench --decode without torch flex (is the slow per-step plan flex's doing?)
#   softcap-tests  the library softcap on FlashInfer's own soft cap, and the far-bias split (GPU tests)
#   bench-softcap  8192 causal / softcap / rel_bias with flex and the alternative routes; 32768 without flex
#   warm-fma-far     compile what bench-fma-far needs and was not prebuilt, in parallel processes
#   fma-far-tests    GPU tests: softcap with half its tanh on the FMA pipe (and the far branch, since removed)
#   bench-fma-far    8192 / 32768 without flex: those beside the default routes, causal and identity (run 15)
#   warm-near-fa2    the same for the rel_bias routes only;  near-fa2-tests  the split with its near keys on fa2
#   bench-near-fa2   rel_bias with the near keys on fa2 vs fa3, profiled at 8192, then 32768
#   split-tests-fa2  the relative-position split's GPU tests (windows, T5) with the near keys on fa2
#   profile-score    8192 rel_bias and softcap with --profile (every route's kernels), without flex
#   bench-score-flex 8192 causal, softcap and rel_bias with torch flex (default routes only)
#   bench-interleaved  8192 causal and per-head windows (flex, alternatives); rel_bias and softcap profiled
#   decode       bench --decode (paged decode);   varlen  bench --varlen;   plan   bench --plan (planning time)
set -uo pipefail
run_dir=/tmp/ffi_run
case "${1:-}" in
  start)
    shift
    if [ -f $run_dir/pid ] && kill -0 "$(cat $run_dir/pid)" 2>/dev/null; then echo "already running"; exit 0; fi
    rm -rf /tmp/ffi $run_dir && mkdir -p $run_dir && cp -r . /tmp/ffi
    # the machine's .git is not this checkout's history (run 9's rows read a stale HEAD): with
    # SOURCE_COMMIT carried, the rows name that commit instead
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
            score_mod:identity tile_variants:softcap tile_variants:rel_bias+mask tile_variants:alibi+columns \
            mask_in_kernel score_mod_fa2:rel_bias score_mod_fa2:softcap+window score_mod_fa2:alibi \
            >$run_dir/warm-score.log 2>&1 &
          MAX_JOBS=3 python3 -m flex_flash_infer warmup --dtype fp16 --head-dim 128 --kinds score_mod:softcap \
            >$run_dir/warm-score-fp16.log 2>&1 &
          echo $! > $run_dir/score_warm_pid ;;
        warm-bench)
          # what the bench stages need, bf16 only, in one batch of 15 kernel sets at 2 nvcc jobs each
          # (a lent machine goes back after 30 minutes held: the full warm-up does not leave time to bench;
          # 18 sets at 3 jobs ran the machine out of memory).
          MAX_JOBS=2 python3 -m flex_flash_infer warmup --dtype bf16 --head-dim 128 --kinds causal sliding_window \
            tiles documents decode bands_per_head native_score score_mod:softcap score_mod:alibi \
            score_mod:rel_bias score_mod:identity tile_variants:softcap mask_in_kernel >$run_dir/warm-bench.log 2>&1 &
          # the decode-tests and tile-tests kinds too: those not prebuilt compile here beside the rest
          # instead of one after another inside the tests
          MAX_JOBS=3 python3 -m flex_flash_infer warmup --dtype bf16 --head-dim 128 --kinds paged_mods fa3_mask \
            fa3_mask:softcap fa3_mask_bench tile_variants:rel_bias+mask tile_variants:alibi+columns \
            >$run_dir/warm-bench-tests.log 2>&1 &
          MAX_JOBS=2 python3 -m flex_flash_infer warmup --dtype bf16 --head-dim 64 --kinds causal sliding_window \
            >$run_dir/warm-bench-64.log 2>&1
          wait
          grep -h " ok \|FAILED" $run_dir/warm-bench*.log | cut -c1-200
          echo "compiled here: $(cat $run_dir/warm-bench*.log | grep -c 'Building JIT module') modules;" \
            "prebuilt that failed to load: $(cat $run_dir/warm-bench*.log | grep -c 'Failed to load AOT')" ;;
        decode-tests)  # the paged decode kernels (fa3 opt-in included) in a CUDA graph, and the paged
          # cache's compiled mods, against the reference
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -k "cuda_graph or paged_cache_mods" -p no:cacheprovider \
            >$run_dir/decode_tests.log 2>&1; tail -n 8 $run_dir/decode_tests.log ;;
        bench-32k-score)  # the 32768 score_mod rows
          python3 -m flex_flash_infer bench --seq-lens 32768 --cases causal softcap+causal alibi+causal \
            rel_bias+causal --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/$stage.log; tail -n 10 $run_dir/$stage.log ;;
        warm-tiles)
          # the four tile-variant kinds only, 16 nvcc jobs in all (18 kernel sets at 3 jobs each ran
          # the 128 GiB machine out of memory: nvcc killed)
          MAX_JOBS=3 python3 -m flex_flash_infer warmup --dtype bf16 --head-dim 128 --kinds tile_variants:softcap \
            tile_variants:rel_bias+mask tile_variants:alibi+columns mask_in_kernel fa3_mask fa3_mask:softcap \
            >$run_dir/warm-tiles.log 2>&1
          grep -h " ok \|FAILED\|error" $run_dir/warm-tiles.log | cut -c1-300 | tail -n 20 ;;
        tile-tests)
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -k "tile_route" -p no:cacheprovider \
            >$run_dir/tile_tests.log 2>&1; tail -n 15 $run_dir/tile_tests.log ;;
        tests)
          # -v: a stage cut short by the machine's return still shows which tests passed
          python3 -m pytest -v -m gpu tests/ -rfE -k "not compiled_into" -p no:cacheprovider --durations=12 \
            >$run_dir/gpu_tests.log 2>&1; tail -n 15 $run_dir/gpu_tests.log ;;
        examples)
          for f in examples/*.py; do echo "--- $f"; python3 "$f" 2>&1 | grep --line-buffered -v "INFO\|arning" | tail -n 4; \
            echo "exit ${PIPESTATUS[0]}"; done >$run_dir/examples.log 2>&1; cat $run_dir/examples.log ;;
        score-tests)
          while pgrep -f "kinds score_mod" >/dev/null; do sleep 5; done
          grep -h "ok\|FAILED" $run_dir/warm-score*.log
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -k "compiled_into" -p no:cacheprovider \
            >$run_dir/score_tests.log 2>&1; tail -n 15 $run_dir/score_tests.log ;;
        bench-8k|bench-32k)
          # 8192 with --profile: each row's host time and kernels, and our call replayed from a CUDA graph
          n=$([ "$stage" = bench-8k ] && echo "8192 --profile" || echo 32768)
          python3 -m flex_flash_infer bench --seq-lens $n --out "$run_dir/$stage.json" 2>&1 \
            | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 14 $run_dir/$stage.log ;;
        bench-32k-rest)  # the 32768 rows after random_tiles
          python3 -m flex_flash_infer bench --seq-lens 32768 --cases random_tiles alibi+causal rel_bias+causal \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 8 $run_dir/$stage.log ;;
        bench-bands)  # 8192 rows whose planning goes through the band finder's row splits
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases prefix_lm prefix_lm_2000 document \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 8 $run_dir/$stage.log ;;
        bench-tiles)  # 8192 tiles routes: mask_mod in the kernel vs bits (per_head_windows has partial
                      # tiles; it also times the opt-in bands-per-head route); softcap on the tiles route
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases random_tiles per_head_windows \
            softcap+random_tiles --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log
          tail -n 10 $run_dir/$stage.log ;;
        bench-columns)  # 8192 streaming and attamba: bands + key columns (the one-pass Triton merge, and
                        # FlashInfer's paged launch + merge_state) beside the tiles route, two launches or
                        # one fa3 launch with the mask in the kernel (ours_tiles_fa3_mask); profiled
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases streaming attamba attamba_no_hint per_head_windows --profile \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log
          tail -n 8 $run_dir/$stage.log ;;
        far-bias-tests)  # a relative-position bias split at its reach (far_bias.py), fa3, against the reference
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -p no:cacheprovider \
            -k "relative_position_bias_split or (compiled_into_the_kernel and rel_bias and not fa2)" \
            >$run_dir/far_bias_tests.log 2>&1; tail -n 8 $run_dir/far_bias_tests.log ;;
        bench-rel-bias)  # rel_bias at 32768 and 8192: split at its reach (default) vs every key in the variant
          python3 -m flex_flash_infer bench --seq-lens 32768 8192 --cases rel_bias+causal \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 8 $run_dir/$stage.log ;;
        bench-static)  # every other case at 32768 and 8192, ours' default route and the peers only
          python3 -m flex_flash_infer bench --seq-lens 32768 8192 --no-alternatives --cases full causal sliding_window \
            streaming attamba attamba_no_hint prefix_lm prefix_lm_2000 document random_tiles per_head_windows \
            softcap+causal alibi+causal identity+causal softcap+random_tiles \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 30 $run_dir/$stage.log ;;
        bench-static-8k)  # every case at 8192 with torch flex static, ours' default route and the peers only
                          # (runs 9 and 10 timed flex under automatic dynamic shapes); rel_bias beside causal
          python3 -m flex_flash_infer bench --seq-lens 8192 --no-alternatives \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 30 $run_dir/$stage.log ;;
        decode-plan-check)  # bench --decode without torch flex: are the window and softcap plans (35 ms in
                            # run 11a, causal 3.9 ms) slow without a compiled flex in the process?
          python3 -m flex_flash_infer bench --decode --no-flex --out "$run_dir/$stage.json" 2>&1 \
            | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log; tail -n 30 $run_dir/$stage.log ;;
        warm-fma-far|warm-near-fa2)  # the modules of bench-fma-far / bench-near-fa2 not prebuilt, each in its own
                       # process: the bench at 1024 tokens with env switches that make each one its default route
          warm() {   # VAR=value ... then the bench's own arguments
            local envs=(); while [[ "$1" == *=* ]]; do envs+=("$1"); shift; done
            env "${envs[@]}" python3 -m flex_flash_infer bench --seq-lens 1024 --no-flex --no-alternatives \
              --out "$run_dir/$stage-$RANDOM.json" "$@" >>$run_dir/$stage.log 2>&1; }
          export MAX_JOBS=5
          if [ $stage = warm-fma-far ]; then
            warm FLEX_FLASH_INFER_NATIVE_SOFT_CAP=0 FLEX_FLASH_INFER_TANH_FMA_SHARE=1/2 --cases softcap+causal &
            warm FLEX_FLASH_INFER_NATIVE_SOFT_CAP=0 --cases softcap+causal &
            warm --cases identity+causal &
          fi
          warm --cases rel_bias+causal &
          warm FLEX_FLASH_INFER_NEAR_FA2=0 --cases rel_bias+causal &   # ours_near_fa3 (fa2 is the default)
          warm FLEX_FLASH_INFER_FAR_BIAS_SPLIT=0 --cases rel_bias+causal &
          wait
          export MAX_JOBS=16
          grep -h "rel_err\|Error" $run_dir/$stage.log | tail -n 8
          echo "compiled here: $(grep -c 'Building JIT module' $run_dir/$stage.log) modules;" \
            "prebuilt that failed to load: $(grep -c 'Failed to load AOT' $run_dir/$stage.log)" ;;
        near-fa2-tests)  # the relative-position split with its near keys on fa2, against the reference
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -p no:cacheprovider -k "near_keys_on_fa2" \
            >$run_dir/near_fa2_tests.log 2>&1; tail -n 8 $run_dir/near_fa2_tests.log ;;
        split-tests-fa2)  # every relative-position split test (windows, T5) with its near keys on fa2 (default since)
          FLEX_FLASH_INFER_NEAR_FA2=1 python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -p no:cacheprovider \
            -k "relative_position_bias_split or near_keys_on_fa2" >$run_dir/split_tests_fa2.log 2>&1
          tail -n 8 $run_dir/split_tests_fa2.log ;;
        bench-near-fa2)  # rel_bias split with its near keys on fa2 vs fa3, profiled at 8192; then 32768
          python3 -m flex_flash_infer bench --seq-lens 8192 --no-flex --profile --cases causal rel_bias+causal \
            --out "$run_dir/$stage-8192.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage-8192.log
          tail -n 30 $run_dir/$stage-8192.log
          python3 -m flex_flash_infer bench --seq-lens 32768 --no-flex --cases causal rel_bias+causal \
            --out "$run_dir/$stage-32768.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage-32768.log
          tail -n 12 $run_dir/$stage-32768.log ;;
        fma-far-tests)  # softcap with half its tanh on the FMA pipe, rel_bias unsplit with the branch beyond
                        # its reach, and the library softcap on FlashInfer's soft cap, against the reference
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -p no:cacheprovider \
            -k "tanh_on_the_fma_pipe or library_softcap" >$run_dir/fma_far_tests.log 2>&1
          tail -n 8 $run_dir/fma_far_tests.log ;;
        bench-fma-far)  # 8192 then 32768 without flex: softcap with half its tanh on the FMA pipe, rel_bias
                        # unsplit with its branch, beside the default routes and causal / identity
          for n in 8192 32768; do
            python3 -m flex_flash_infer bench --seq-lens $n --no-flex --cases causal identity+causal softcap+causal \
              rel_bias+causal --out "$run_dir/$stage-$n.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
              >$run_dir/$stage-$n.log
            tail -n 20 $run_dir/$stage-$n.log
          done ;;
        profile-score)  # 8192 rel_bias and softcap profiled (kernels per row), without flex
          python3 -m flex_flash_infer bench --seq-lens 8192 --no-flex --profile --cases rel_bias+causal softcap+causal \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log
          tail -n 60 $run_dir/$stage.log ;;
        bench-score-flex)  # 8192 causal and the score_mod rows with torch flex, the default routes only
          python3 -m flex_flash_infer bench --seq-lens 8192 --no-alternatives --cases causal softcap+causal \
            rel_bias+causal --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/$stage.log; tail -n 12 $run_dir/$stage.log ;;
        softcap-tests)  # the library softcap on FlashInfer's own soft cap, the relative-position split with its
                        # far keys on the ragged kernel (fa3), against the reference
          python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -p no:cacheprovider \
            -k "library_softcap or relative_position_bias_split" >$run_dir/softcap_tests.log 2>&1
          tail -n 8 $run_dir/softcap_tests.log ;;
        bench-softcap)  # 8192 causal, softcap (FlashInfer's soft cap vs the compiled variant) and rel_bias (far
                        # keys ragged vs single call), with torch flex; then 32768 without flex
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases causal softcap+causal rel_bias+causal \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log
          tail -n 12 $run_dir/$stage.log
          python3 -m flex_flash_infer bench --seq-lens 32768 --no-flex --cases causal softcap+causal rel_bias+causal \
            --out "$run_dir/$stage-32k.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage-32k.log
          tail -n 12 $run_dir/$stage-32k.log ;;
        bench-interleaved)  # 8192 causal and per-head windows with flex and the alternatives, timed in
                            # interleaved rounds (does ours still lead FlashInfer's own ragged call? bands-per-head
                            # with strided head views against tiles-per-head); then rel_bias and softcap profiled
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases causal per_head_windows \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log
          tail -n 16 $run_dir/$stage.log
          python3 -m flex_flash_infer bench --seq-lens 8192 --no-flex --profile --cases rel_bias+causal softcap+causal \
            --out "$run_dir/$stage-profile.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage-profile.log
          tail -n 40 $run_dir/$stage-profile.log ;;
        bench-one-band)  # 8192 full and sliding_window: the ragged kernel for a band without a window
                         # (default) vs the single-sequence call (ours_single_call)
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases full sliding_window \
            --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" >$run_dir/$stage.log
          tail -n 12 $run_dir/$stage.log ;;
        bench-score)
          python3 -m flex_flash_infer bench --seq-lens 8192 --cases causal softcap+causal alibi+causal \
            rel_bias+causal identity+causal --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/$stage.log; tail -n 10 $run_dir/$stage.log ;;
        decode|varlen)
          python3 -m flex_flash_infer bench --$stage --out "$run_dir/$stage.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/$stage.log; tail -n 8 $run_dir/$stage.log ;;
        plan)
          python3 -m flex_flash_infer bench --plan --out "$run_dir/plan.json" 2>&1 | grep --line-buffered -v "INFO\|arning" \
            >$run_dir/plan.log; tail -n 12 $run_dir/plan.log ;;
        *) echo "unknown stage $stage" ;;
      esac
    done
    echo "=== done $(date +%T)"
    touch $run_dir/done ;;
  *) echo "usage: bash scripts/gpu_pipeline.sh start [STAGE...] | wait SECONDS" >&2; exit 2 ;;
esac
