#!/bin/bash
# Step 1 again (second timing sample) with ptxas -v (spills) and --keep (the baseline PTX, to diff with the LTO PTX)
. /tmp/lto/study/env.sh
mkdir -p /tmp/lto/study/out/keep && cd /tmp/lto/study/out
rm -f time_step1b.csv
t step1b_baseline_verbose nvcc $CUDA_FLAGS -gencode=arch=compute_90a,code=sm_90a -Xptxas -v --keep --keep-dir keep --time time_step1b.csv -c $GEN/batch_prefill_ragged_sm90_kernel_mask_1.cu -o baseline_b.o
