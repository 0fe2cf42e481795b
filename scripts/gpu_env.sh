# Source on the offline GPU machine from the project root, after ../shared/gpu/fetch-wheels.sh
# (plus pytest's wheels) filled .whl/ here:  source scripts/gpu_env.sh
# FlashAttention-4 (the peer torch flex runs on with BACKEND "FLASH") when ../shared/gpu/fetch-fa4.sh's
# .fa4b is carried and an earlier call on this machine copied .fa4a/*.xz to /tmp/fa4 (64 MiB a call)
fa4=(); [ -d .fa4b ] && [ -f /tmp/fa4/ir.so.xz ] && fa4=(.fa4b/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  "${fa4[@]}" || return 1
if [ ${#fa4[@]} -gt 0 ]; then
  tar -xzf .fa4b/libs_cu13_rest.tgz -C /tmp/site
  python3 -m zipfile -e .fa4b/nvidia_cutlass_dsl_libs_core-*.whl /tmp/site   # pip --target would replace the folder
  xz -dc /tmp/fa4/ir.so.xz > /tmp/site/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
  xz -dc /tmp/fa4/rt.so.xz > /tmp/site/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
fi
# FlashInfer modules built ahead on the CPU machine (scripts/prebuild_kernels.sh), carried as .aot/
# or packed as .aotpack*/aot.tar.xz (scripts/pack_prebuilt.sh, small enough to travel beside the
# wheels): FlashInfer loads these instead of compiling, and compiles any that fail to load
mkdir -p /tmp/site/flashinfer/data/aot
if [ -d .aot ]; then
  cp -r .aot/. /tmp/site/flashinfer/data/aot/
  echo "prebuilt FlashInfer modules: $(ls .aot | wc -l) (from .aot)"
fi
for pack in .aotpack*/aot.tar.xz; do
  [ -f "$pack" ] || continue
  tar -xJf "$pack" -C /tmp/site/flashinfer/data/aot || return 1
  echo "prebuilt FlashInfer modules: $(tar -tJf "$pack" | grep -c '\.so$') (from $pack)"
done
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  PYTHONUNBUFFERED=1   # the dsl_packages entry: the CUTLASS DSL wheel's .pth is not read from PYTHONPATH
python3 -c "import torch, flashinfer; print('torch', torch.__version__, '| flashinfer', flashinfer.__version__, '|', torch.cuda.get_device_name())"
if [ ${#fa4[@]} -gt 0 ]; then python3 -c 'import flash_attn.cute; print("FlashAttention-4 ready")'; fi
