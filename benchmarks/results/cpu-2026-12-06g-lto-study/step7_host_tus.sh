#!/bin/bash
# Step 7: the module's two other (host-side) files, as ninja compiles them: they include the config with the variant,
# so today they are per score_mod too; with a generic variant + generic params they would be compiled once.
. /tmp/lto/study/env.sh
cd /tmp/lto/study/out
for f in batch_prefill_sm90 batch_prefill_sm90_jit_binding; do
  rm -f time_step7_$f.csv
  t step7_$f nvcc $CUDA_FLAGS -gencode=arch=compute_90a,code=sm_90a --time time_step7_$f.csv -c $GEN/$f.cu -o $f.o
done
