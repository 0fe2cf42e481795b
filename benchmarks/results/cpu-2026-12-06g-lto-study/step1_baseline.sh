#!/bin/bash
# Step 1: the normal compile of the ragged causal kernel file, exactly as FlashInfer's ninja does it
. /tmp/lto/study/env.sh
cd /tmp/lto/study/out
rm -f time_step1.csv
t step1_baseline nvcc $CUDA_FLAGS -gencode=arch=compute_90a,code=sm_90a --time time_step1.csv -c $GEN/batch_prefill_ragged_sm90_kernel_mask_1.cu -o baseline.o
