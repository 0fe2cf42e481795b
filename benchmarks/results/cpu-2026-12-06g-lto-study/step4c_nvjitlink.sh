#!/bin/bash
# Step 4 via nvJitLink (13.0.88, PyPI nvidia-nvjitlink): LTO link straight to an sm_90a cubin; it keeps the 'a'
# (nvlink 13.0 does not). The fast-math flags must be given again here (the modules' -use_fast_math is not applied).
v=${1:-state}; split=${2:-1}
cd /tmp/lto/study/out
J=/tmp/lto/wheels/nvjl130/nvidia/cu13/lib/libnvJitLink.so.13
F=-ftz=1,-prec-div=0,-prec-sqrt=0,-fma=1
python3 ../nvjitlink_link.py $J nvjl_$v.ptx -arch=sm_90a,-lto,-ptx,$F kernel_lto_$v.o softcap_lto_$v.o
python3 ../nvjitlink_link.py $J nvjl_${v}_split$split.cubin -arch=sm_90a,-lto,$F,-split-compile=$split,-Xptxas=-v kernel_lto_$v.o softcap_lto_$v.o
