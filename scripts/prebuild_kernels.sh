#!/usr/bin/env bash
# Build FlashInfer's Hopper modules here, on the CPU machine, into .aot/ (see prebuild_kernels.py).
#   bash scripts/prebuild_kernels.sh [--list] [--dtypes bf16 fp16] [--head-dims 128 64] [--only TEXT]
# Needs .whl/ from ../shared/gpu/fetch-wheels.sh (the same FlashInfer and tvm-ffi as the GPU
# machine) and nvcc 13. What this machine lacks is supplied outside the repo, in $venv:
#   - FlashInfer's Python side and tvm-ffi for this Python (a venv over the system's CPU torch);
#   - curand's headers (CUTLASS includes them) from PyPI's nvidia-curand;
#   - a libcuda.so to link against: the driver is not here, so a stub with the driver API's names
#     and the driver's soname (libcuda.so.1), as CUDA's own lib64/stubs provides on other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PREBUILD_VENV:-/tmp/prebuild-venv}
fi_wheel=$(ls .whl/flashinfer_python-*.whl)
tvm_version=$(ls .whl/apache_tvm_ffi-*.whl | sed 's/.*apache_tvm_ffi-\([^-]*\)-.*/\1/')
cuda=${CUDA_HOME:-/usr/local/cuda}
[ -f "$cuda/include/cuda.h" ] || { echo "no $cuda/include/cuda.h: set CUDA_HOME to the CUDA toolkit" >&2; exit 2; }
if [ ! -x $venv/bin/python ]; then
  python3 -m venv --system-site-packages $venv
  $venv/bin/pip install -q "apache-tvm-ffi==$tvm_version" ninja nvidia-curand einops tabulate nvidia-ml-py tqdm \
    click requests numpy
  $venv/bin/pip install -q --no-deps "$fi_wheel"
fi
curand_include=$($venv/bin/python -c "import glob, nvidia, os; print(glob.glob(os.path.join(nvidia.__path__[0], '*', 'include', 'curand_kernel.h'))[0].rsplit('/', 1)[0])")
stub=$venv/libcuda-stub
if [ ! -f $stub/libcuda.so ]; then
  mkdir -p $stub
  gcc -E -P -I"$cuda/include" "$cuda/include/cuda.h" | grep -oE "\bcu[A-Z][A-Za-z0-9_]*\s*\(" | sed 's/\s*(//' \
    | sort -u | awk '{print "void " $1 "(void) {}"}' > $stub/libcuda_stub.c
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o $stub/libcuda.so $stub/libcuda_stub.c
fi
export LIBRARY_PATH=$stub:$cuda/lib64 CPATH=$curand_include FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-2}
exec $venv/bin/python ${PREBUILD_PY:-scripts/prebuild_kernels.py} "$@"   # PREBUILD_PY: another script needing this toolchain (scripts/compile_cost.py)
