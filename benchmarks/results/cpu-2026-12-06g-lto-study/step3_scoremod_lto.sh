#!/bin/bash
# Step 3: the score_mod's tiny TU, -dc to LTO IR
. /tmp/lto/study/env.sh
v=${1:-state}
cd /tmp/lto/study/out
rm -f time_step3_$v.csv
t step3_scoremod_lto_$v nvcc --compiler-options=-fPIC -std=c++17 -use_fast_math -O3 -DNDEBUG -gencode=arch=compute_90a,code=lto_90a -dc --time time_step3_$v.csv \
  -c /tmp/lto/study/lto_src/softcap_$v.cu -o softcap_lto_$v.o
