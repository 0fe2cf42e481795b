#!/bin/bash
# Step 4: device link with LTO to sm_90a (an object for the host link, and a cubin to inspect)
. /tmp/lto/study/env.sh
v=${1:-state}
cd /tmp/lto/study/out
# this toolkit keeps libnvvm in lib/, nvlink -dlto looks in nvvm/lib64: a shadow toolkit (/tmp/lto/cuda) fixes that
NVCC=/tmp/lto/cuda/bin/nvcc
rm -f time_step4_$v.csv time_step4c_$v.csv
t step4_dlink_$v $NVCC -dlink -dlto -use_fast_math -Xfatbin=-compress-all --compress-mode=size --compiler-options=-fPIC -gencode=arch=compute_90a,code=sm_90a --time time_step4_$v.csv \
  kernel_lto_$v.o softcap_lto_$v.o -o dlink_$v.o
t step4_dlink_cubin_$v $NVCC -dlink -dlto -use_fast_math -cubin -arch=sm_90a --time time_step4c_$v.csv \
  kernel_lto_$v.o softcap_lto_$v.o -o dlink_$v.cubin
