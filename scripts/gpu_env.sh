# Source on the offline GPU machine from the project root, after ../shared/gpu/fetch-wheels.sh
# (plus pytest's wheels) filled .whl/ here:  source scripts/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
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
export PYTHONPATH=/tmp/site:$PWD FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1
python3 -c "import torch, flashinfer; print('torch', torch.__version__, '| flashinfer', flashinfer.__version__, '|', torch.cuda.get_device_name())"
