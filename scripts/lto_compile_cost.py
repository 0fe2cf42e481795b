"""What a new score_mod costs with separate compilation and device LTO
(flex_flash_infer/compile/lto_variants.py), measured on a machine without a GPU.

Builds the generic fa3 module's objects once (bf16, head_dim 128, no window, mask modes 0 and 1),
then the .so of two score_mods (softcap; a relative-position bias read from a table), timing each
step, and inspects the results: the .so exports FlashInfer's plan / ragged_run / paged_run as the
normal variant module does and leaves no score or registration symbol undefined; each cubin holds
its kernels for sm_90a, with the score code inlined (no CALL, no ffi_lto_score symbol) when
cuobjdump is found. Writes JSON (machine, cores, nvcc, commit, date, step -> seconds).

    FLASHINFER_WORKSPACE_BASE=/tmp/lto-proto/ws MAX_JOBS=2 PREBUILD_PY=scripts/lto_compile_cost.py \\
        bash scripts/prebuild_kernels.sh [--out F]

The generic objects are cached: a second run reports the times of the run that built them
(recorded next to them) and times only the per-score_mod steps again (their outputs are removed).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from flex_flash_infer.compile import lto_variants  # noqa: E402
import lto_timing  # noqa: E402
from flex_flash_infer.compile.codegen import POSITION_BOUND  # noqa: E402
from flex_flash_infer.core.trace import trace  # noqa: E402
from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu-2026-12-06h-lto-prototype.json"


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout


def cuobjdump() -> str | None:
    """cuobjdump: on PATH, beside nvcc, from an nvidia wheel (nvidia-cuda-cuobjdump), or where
    the LTO study unpacked one on this CPU machine (its toolkit has none)."""
    found = [shutil.which("cuobjdump")] + glob.glob(str(pathlib.Path(sys.prefix) / "lib/python*/site-packages/nvidia/*/bin/cuobjdump"))
    found += glob.glob("/tmp/lto/tools/nvidia/*/bin/cuobjdump")
    return next((f for f in found if f), None)


def inspect_so(so: pathlib.Path) -> dict:
    defined = sh(f"nm -D --defined-only {so}")
    undefined = sh(f"nm -D --undefined-only {so}")
    return {
        "exists": so.exists(), "bytes": so.stat().st_size if so.exists() else 0,
        "exports": sorted(set(re.findall(r"__tvm_ffi_(plan|ragged_run|paged_run)\b", defined))),
        "undefined_score_symbols": re.findall(r"\S*ffi_lto_score\S*", undefined),
        "undefined_registration_symbols": re.findall(r"__cudaRegisterLinkedBinary\S*", undefined),
        "dispatched_defined": len(re.findall(r"Dispatched", sh(f"nm -D --defined-only {so} | c++filt"))),
    }


def inspect_cubin(cubin: pathlib.Path, tool: str | None) -> dict:
    out = {"bytes": cubin.stat().st_size, "score_symbol_in_elf": "ffi_lto_score" in sh(f"strings {cubin}")}
    if tool is None:
        return out
    out.update(sass_summary(tool, cubin))
    return out


def sass_summary(tool: str, path) -> dict:
    sass = sh(f"{tool} -sass {path}")
    return {
        "kernels": len(re.findall(r"^\s*Function : ", sass, re.M)),
        "arch": sorted(set(re.findall(r"code for (sm_\w+)", sass))),
        "sass_instructions": len(re.findall(r"^\s+/\*[0-9a-f]+\*/", sass, re.M)),
        "CALL": len(re.findall(r"\bCALL\b", sass)), "STL": len(re.findall(r"\bSTL\b", sass)),
        "LDL": len(re.findall(r"\bLDL\b", sass)), "MUFU.TANH": sass.count("MUFU.TANH"),
        "registers": [int(r) for r in re.findall(r"REG:(\d+)", sh(f"{tool} -res-usage {path}"))],
    }


def baseline_kernel_files(graphs: dict, jobs: int, tool: str | None) -> dict:
    """Today's build of one kernel file (ragged, no mask) of each score_mod's own variant module
    (variant.fa3_score_mod_variant, as score_mod_kernels names it), on this machine now: its
    compile time, and its SASS to compare with the LTO-linked cubin of the same file."""
    import concurrent.futures
    import hashlib

    from flashinfer import prefill
    from flex_flash_infer.compile.variant import fa3_score_mod_variant

    def one(name, graph):
        spec = fa3_score_mod_variant(graph, POSITION_BOUND)
        uri = f"ffi_{hashlib.sha256(spec.decl.encode()).hexdigest()[:16]}_bfloat16_d128_noswa"
        jspec = prefill.gen_customize_batch_prefill_module("fa3", *spec.jit_args(uri, torch.bfloat16, 128, torch.int32, False))
        jspec.write_ninja()
        flags = lto_variants.ninja_flags(jspec.ninja_path.read_text())
        source = next(pathlib.Path(s) for s in jspec.sources if s.name == "batch_prefill_ragged_sm90_kernel_mask_0.cu")
        obj = pathlib.Path(jspec.build_dir) / "baseline_ragged_mask_0.o"
        obj.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run([flags["nvcc"][0], *flags["cuda_cflags"], "-c", str(source), "-o", str(obj)], check=True,
                       capture_output=True)
        out = {"module": jspec.name, "compile_seconds": round(time.perf_counter() - start, 2)}
        if tool:
            out.update(sass_summary(tool, obj))
        return name, out

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(lambda item: one(*item), graphs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--baseline", action="store_true",
                        help="also compile today's ragged no-mask kernel file of each score_mod (minutes)")
    args = parser.parse_args()
    jobs = int(os.environ.get("MAX_JOBS") or 2)
    steps, checks = {}, {}

    start = time.perf_counter()
    module = lto_variants.GenericModule(torch.bfloat16, 128, use_sliding_window=False)
    steps["generate generic sources (FlashInfer's generator, lean)"] = round(time.perf_counter() - start, 2)
    generic = lto_timing.generic_build_times(module, jobs)
    print(f"generic objects ({module.name}): {json.dumps(generic, indent=1)}", flush=True)

    tool = cuobjdump()
    mods = {"softcap": generate_softcap_score_mod(30.0),
            "relative_position_bias": generate_relative_position_bias_score_mod(torch.randn(8, 2 * 64 + 1))}
    per_mod = {}
    for name, mod in mods.items():
        graph = trace(mod, "score_mod")
        key, cubins, so, t = lto_timing.score_mod_build(module, graph, POSITION_BOUND, jobs)
        per_mod[name] = t
        checks[name] = {"key": key, "so": str(so), "so_check": inspect_so(so),
                        "cubins": {c.name: inspect_cubin(c, tool) for c in cubins}}
        print(name, json.dumps(t, indent=1), json.dumps(checks[name], indent=1), flush=True)

    if args.baseline:
        checks["today's build, ragged mask 0 kernel file"] = baseline_kernel_files(
            {name: trace(mod, "score_mod") for name, mod in mods.items()}, jobs, tool)
        print(json.dumps(checks["today's build, ragged mask 0 kernel file"], indent=1), flush=True)

    # the study's normal build of the same ragged causal kernel file (softcap), for the registers
    baseline = pathlib.Path("/tmp/lto/study/out/baseline.o")
    if tool and baseline.exists():
        # (its variant struct and kernel arguments are today's softcap ones, so not byte-identical)
        checks["study baseline (normal build today, softcap, ragged mask 1)"] = sass_summary(tool, baseline)

    nvcc = module.nvcc
    result = {
        "what": "EXPERIMENT issue 23: generic fa3 module + per-score_mod device LTO (lto_variants.py), CPU only",
        "machine": platform.node(), "cpu": sh("grep -m1 'model name' /proc/cpuinfo").split(":")[-1].strip(),
        "cores": os.cpu_count(), "load_before_after": os.getloadavg(), "jobs": jobs,
        "nvcc": sh(f"{nvcc} --version").strip().splitlines()[-1],
        "nvjitlink": lto_variants.nvjitlink_library(), "cuobjdump": tool,
        "flashinfer": __import__("flashinfer").__version__,
        "commit": sh(f"git -C {ROOT} rev-parse HEAD").strip(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "module": module.name, "dtype": "bfloat16", "head_dim": 128, "mask_modes": [0, 1],
        "kernel_flags": module.lto_flags(), "link_options": module.link_options(),
        "steps_seconds": {"generic objects, once": generic, "per score_mod": per_mod},
        "checks": checks,
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
