#!/bin/bash
# Step 4 (workaround): nvlink 13.0's LTO emits '.target sm_90' for lto_90a input (the 'a' is dropped, so the
# wgmma/setmaxnreg PTX fails ptxas), and it ignores the modules' -use_fast_math (no ftz, rcp.rn): pass -Xnvvm. Here: LTO link to PTX (nvlink -dlto -emit-ptx), retarget to sm_90a, ptxas.
. /tmp/lto/study/env.sh
v=${1:-state}
cd /tmp/lto/study/out
N=/tmp/lto/cuda/bin/nvlink   # the shadow toolkit's copy, so -nvvmpath finds nvvm/lib64/libnvvm.so
t step4b_nvlink_lto_emit_ptx_$v $N -m64 --arch=sm_90a -cpu-arch=X86_64 -dlto -nvvmpath=/tmp/lto/cuda/nvvm -Xnvvm -ftz=1,-prec-div=0,-fma=1 -emit-ptx \
  kernel_lto_$v.o softcap_lto_$v.o -L/tmp/lto/cuda/targets/x86_64-linux/lib -lcudadevrt -o lto_$v.ptx
sed -i 's/^\.target sm_90$/.target sm_90a/' lto_$v.ptx
t step4b_ptxas_$v ptxas -arch=sm_90a -O3 -v lto_$v.ptx -o lto_$v.cubin
