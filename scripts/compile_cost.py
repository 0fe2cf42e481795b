"""What a lean module (flex_flash_infer/compile/lean_modules.py) saves: one of the library's variants
built twice from empty build folders, as FlashInfer generates it and lean, one after the other on
this machine; prints a table and writes JSON (machine, cores, versions, commit, date).

Run it through the prebuild toolchain (scripts/prebuild_kernels.sh supplies what a machine without
a GPU lacks):
    PREBUILD_PY=scripts/compile_cost.py bash scripts/prebuild_kernels.sh [--kind score_mod:softcap] [--out F]
MAX_JOBS (2 there) bounds the parallel nvcc jobs; "work" sums every file's compile time, which is
what a machine compiling many modules at once (a warm-up, the GPU suite) pays; "wall" is what one
module alone costs here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def build_from_empty(spec) -> dict:
    shutil.rmtree(spec.build_dir, ignore_errors=True)
    start = time.time()
    spec.build()
    wall = time.time() - start
    lines = (spec.build_dir / ".ninja_log").read_text().splitlines()[1:]
    files = {line.split()[3].rsplit("/", 1)[-1]: (int(line.split()[1]) - int(line.split()[0])) / 1000 for line in lines}
    undefined = subprocess.run(f"nm -D --undefined-only {spec.jit_library_path} | c++filt | grep -c Dispatched",
                               shell=True, capture_output=True, text=True).stdout.strip()
    return {"module": spec.name, "sources": len(spec.sources), "wall_s": round(wall, 1),
            "work_s": round(sum(files.values()), 1), "files_s": files,
            "undefined_kernel_symbols": int(undefined or 0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="score_mod:softcap", help="a warm-up kind whose first variant to build")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import flashinfer
    from flashinfer import prefill
    import prebuild_kernels
    from flex_flash_infer.compile import lean_modules
    from flex_flash_infer_bench.provenance import source_commit

    backend, jit_args = prebuild_kernels.custom_jit_args([args.kind], torch.bfloat16, 128)[0]
    lean_modules.install()
    lean = prefill.gen_customize_batch_prefill_module(backend, *jit_args)
    full = prefill.gen_customize_batch_prefill_module.__wrapped__(backend, *jit_args)
    assert lean.name != full.name, "the lean build did not apply"
    rows = {"flashinfer": build_from_empty(full), "lean": build_from_empty(lean)}
    print(f"{args.kind} ({backend}), MAX_JOBS={os.environ.get('MAX_JOBS')}, {os.cpu_count()} cores")
    print("| module | sources | work s | wall s |\n|---|---|---|---|")
    for row in rows.values():
        print(f"| {row['module']} | {row['sources']} | {row['work_s']} | {row['wall_s']} |")
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    result = {"kind": args.kind, "backend": backend, "rows": rows, "machine": platform.node(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "max_jobs": os.environ.get("MAX_JOBS"), "nvcc": nvcc, "flashinfer": flashinfer.__version__,
              "torch": torch.__version__, "commit": source_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
