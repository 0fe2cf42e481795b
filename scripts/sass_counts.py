"""Count the instructions of a score_mod's fa3 kernel (causal ragged prefill, bf16, head_dim 128)
without a GPU: ptxas for sm_90a, then cuobjdump. This is how the per-score double conversion
(F2F.F32.F64) and the I2F in alibi were found; compare a kind against `identity`,
and `identity` against `plain` (FlashInfer's own module).

    pip install flashinfer-python nvidia-curand nvidia-cuda-cuobjdump triton   # headers, cuobjdump, nvdisasm
    python scripts/sass_counts.py identity softcap alibi rel_bias

Each kind takes about a minute on two cores. Prints ptxas' register / spill lines and, per kind,
how many of each instruction the kernel's SASS holds (one source line per instruction, unrolled).
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import torch

os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")

from flashinfer.jit.attention.modules import gen_batch_prefill_module, gen_customize_batch_prefill_module  # noqa: E402

from flex_flash_infer.compile.codegen import POSITION_BOUND  # noqa: E402
from flex_flash_infer.core.trace import trace  # noqa: E402
from flex_flash_infer.compile.variant import fa3_score_mod_variant  # noqa: E402
from flex_flash_infer.tools.warmup import example_score_mod  # noqa: E402

INSTRUCTIONS = ("MUFU.EX2", "MUFU.TANH", "F2F.F32.F64", "I2F", "LDC", "LDG", "STL", "FMUL", "FFMA", "FADD", "IMAD",
                "ISETP", "BRA", "FSEL")


def nvcc_flags(ninja: pathlib.Path) -> list:
    """The include paths and defines FlashInfer's own build of this module uses."""
    text = ninja.read_text().replace("$\n", "")
    common = re.search(r"^common_cflags = (.*)$", text, re.M).group(1)
    cuda = re.search(r"^cuda_cflags = \$common_cflags (.*)$", text, re.M).group(1)
    cuda_home = re.search(r"^cuda_home = (.*)$", text, re.M).group(1)
    flags = (common + " " + cuda).replace("$cuda_home", cuda_home).split()
    return [f for f in flags if not f.startswith(("-Xfatbin", "--compress-mode"))]


def count(kind: str) -> dict:
    """kind: a warmup.example_score_mod kind, or `plain` for FlashInfer's own module (no score_mod)."""
    tag = kind
    if kind == "plain":
        jit = gen_batch_prefill_module("fa3", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32,
                                       128, 128, 0, False, False, False)
    else:
        graph = trace(example_score_mod(kind, 32, device="cpu"), "score_mod")
        spec = fa3_score_mod_variant(graph, POSITION_BOUND)
        jit = gen_customize_batch_prefill_module(
            "fa3", *spec.jit_args(f"ffi_sass_{tag}", torch.bfloat16, 128, torch.int32, False))
    jit.write_ninja()
    source = next(pathlib.Path(s) for s in jit.sources if "ragged_sm90_kernel_mask_1" in str(s))  # causal
    import nvidia  # curand headers, which cutlass' utilities include
    extra = [f"-I{p}/include" for p in pathlib.Path(nvidia.__path__[0]).glob("cu*")]
    obj = pathlib.Path(f"/tmp/ffi_sass_{tag}.o")
    done = subprocess.run(["nvcc", *nvcc_flags(jit.ninja_path), *extra, "-Xptxas", "-v", "-c", str(source), "-o", str(obj)],
                          capture_output=True, text=True)
    print(kind, *[line for line in done.stderr.splitlines() if "registers" in line or "spill" in line], sep="\n  ")
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    cuobjdump = shutil.which("cuobjdump") or next(c for d in nvidia.__path__ for c in pathlib.Path(d).glob("cu*/bin/cuobjdump"))
    env = dict(os.environ)
    if not shutil.which("nvdisasm"):   # cuobjdump -sass calls it; Triton's wheel carries one
        import triton
        env["PATH"] += os.pathsep + str(pathlib.Path(triton.__file__).parent / "backends/nvidia/bin")
    sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True, check=True,
                          env=env).stdout
    return {ins: sass.count(ins) for ins in INSTRUCTIONS}


if __name__ == "__main__":
    rows = {kind: count(kind) for kind in sys.argv[1:] or ["identity", "softcap", "alibi"]}
    print(f"{'kind':20s}" + "".join(f"{i:>10s}" for i in INSTRUCTIONS))
    for kind, counts in rows.items():
        print(f"{kind:20s}" + "".join(f"{counts[i]:10d}" for i in INSTRUCTIONS))
