#!/bin/bash
# Step 2: the heavy kernel TU (score_mod-independent: calls extern __device__ functions), -dc to LTO IR
# usage: step2_kernel_lto.sh state|plain
. /tmp/lto/study/env.sh
v=${1:-state}
cd /tmp/lto/study/out
rm -f time_step2_$v.csv
t step2_kernel_lto_$v nvcc $CUDA_FLAGS -gencode=arch=compute_90a,code=lto_90a -dc --time time_step2_$v.csv \
  -c /tmp/lto/study/lto_src/$v/batch_prefill_ragged_sm90_kernel_mask_1.cu -o kernel_lto_$v.o
