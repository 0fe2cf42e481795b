"""Compile a generated score_mod variant inside FlashInfer's real fa3 batch-prefill templates,
on a machine without a GPU (all CUDA translation units; the final link needs libcudart).

    pip install flashinfer-python nvidia-curand   # headers; curand only for cutlass' includes
    FLASHINFER_EXTRA_CUDAFLAGS="-I$(python -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia/cu13/include" \
        python scripts/check_variant_build.py

2026-11-25, this CPU machine (nvcc 13.0, flashinfer 0.7.2.post1): the softcap variant compiled in
all 10 TUs (paged and ragged kernels, 4 mask modes, binding); the link stopped at -lcudart.
"""
import os
import time

import torch

os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

from flashinfer.jit.attention.modules import gen_customize_batch_prefill_module  # noqa: E402

from flex_flash_infer.mods import generate_softcap_score_mod  # noqa: E402
from flex_flash_infer.core.trace import trace  # noqa: E402
from flex_flash_infer.compile.variant import fa3_score_mod_variant  # noqa: E402

spec = fa3_score_mod_variant(trace(generate_softcap_score_mod(30.0), "score_mod"))
start = time.time()
gen_customize_batch_prefill_module(
    "fa3", *spec.jit_args("ffi_variant_check", torch.bfloat16, 128, torch.int32, use_sliding_window=False)).build()
print(f"built in {time.time() - start:.0f} s")
