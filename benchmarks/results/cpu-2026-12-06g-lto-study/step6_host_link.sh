#!/bin/bash
# Step 6: a host-linkable device-link object from the nvJitLink cubin (what nvcc -dlink would make, were its nvlink
# not dropping the 'a'), then the module's .so: host objects + this object.
v=${1:-state}
. /tmp/lto/study/env.sh
cd /tmp/lto/study/out
C=/tmp/lto/cuda
objs="kernel_lto_$v.o softcap_lto_$v.o"
# 1. registration list: one DEFINE_REGISTER_FUNC per -rdc host object (its __cudaRegisterLinkedBinary_<module id>)
{ echo "#define NUM_PRELINKED_OBJECTS $(echo $objs | wc -w)"
  for o in $objs; do nm $o | sed -n 's/.* U __cudaRegisterLinkedBinary\(_.*\)$/DEFINE_REGISTER_FUNC(\1)/p'; done; } > dlink_$v.reg.c
cat dlink_$v.reg.c
# 2. the linked sm_90a cubin into an embedded fatbin, as nvcc -dlink does
t step6_fatbinary_$v $C/bin/fatbinary -64 -compress-all --ident=lto -link "--image3=kind=elf,sm=90a,file=nvjl_${v}_split1.cubin" \
  --embedded-fatbin=dlink_$v.fatbin.c
# 3. nvcc's link stub (host registration code) around them
t step6_link_stub_$v gcc -D__CUDA_ARCH_LIST__=900 -c -x c++ -DFATBINFILE="\"dlink_$v.fatbin.c\"" -DREGISTERLINKBINARYFILE="\"dlink_$v.reg.c\"" \
  -I. -D__NV_EXTRA_INITIALIZATION= -D__NV_EXTRA_FINALIZATION= -D__CUDA_INCLUDE_COMPILER_INTERNAL_HEADERS__ -fPIC -Wno-psabi \
  -I$C/targets/x86_64-linux/include -D__CUDACC_VER_MAJOR__=13 -D__CUDACC_VER_MINOR__=0 -D__CUDACC_VER_BUILD__=88 \
  -D__CUDA_API_VER_MAJOR__=13 -D__CUDA_API_VER_MINOR__=0 -D__NVCC_DIAG_PRAGMA_SUPPORT__=1 -D__CUDACC_DEVICE_ATOMIC_BUILTINS__=1 -m64 \
  $C/bin/crt/link.stub -o dlink_$v.o
# 4. the .so (FlashInfer's link rule: c++ $in -shared -L.. -lcudart -lcuda; here only the kernel file's objects)
t step6_so_link_$v c++ $objs dlink_$v.o -shared -L/usr/local/cuda-13.0/lib -lcudart -o mod_$v.so
nm -D --undefined-only mod_$v.so | grep -c __cudaRegisterLinkedBinary
nm -D --defined-only mod_$v.so | grep -c BatchPrefillWithRaggedKVCacheDispatched
PATH=/tmp/lto/tools/nvidia/cu13/bin:$PATH cuobjdump -res-usage mod_$v.so | grep -E "REG|arch" | head -4
