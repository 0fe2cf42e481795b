"""Generate the lean fa3 softcap bf16 d128 module's sources and build.ninja (no build)."""
import os, sys, pathlib
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
import torch
from flashinfer import prefill
import prebuild_kernels
from flex_flash_infer.compile import lean_modules
backend, jit_args = prebuild_kernels.custom_jit_args(["score_mod:softcap"], torch.bfloat16, 128)[0]
lean_modules.install()
spec = prefill.gen_customize_batch_prefill_module(backend, *jit_args)
spec.write_ninja()
print(backend, spec.name); print(spec.build_dir); print(spec.ninja_path)
for s in spec.sources: print(s)
