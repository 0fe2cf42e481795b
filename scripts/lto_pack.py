"""Build lto_variants' generic fa3 objects here (bf16, head_dim 128, no
window, the lean mask modes 0 and 1; built once, cached under FlashInfer's workspace) and pack them
into .ltopack/ (git-ignored) for scripts/lto_launch_check.py on the GPU machine:

    FLASHINFER_WORKSPACE_BASE=/tmp/lto-proto/ws MAX_JOBS=2 PREBUILD_PY=scripts/lto_pack.py \\
        bash scripts/prebuild_kernels.sh [--out .ltopack] [--nvjitlink .ltopack-nvjitlink]

.ltopack/generic.tar.xz holds the six objects and a manifest (lto_pack.py), about 3 MiB. With
--nvjitlink DIR also the newest libnvJitLink found here, xz-compressed into DIR (27 MiB: with the
35 MiB of wheels it does not fit one call's 64 MiB, so it is a separate, ignored folder, carried
only if the GPU machine's own nvJitLink refuses this nvcc's IR; lto_launch_check.py looks in both).
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from flex_flash_infer.compile import lto_pack, lto_variants  # noqa: E402
import lto_timing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".ltopack"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--nvjitlink", metavar="DIR", default=None,
                        help="also pack this machine's newest libnvJitLink (xz) into DIR (.ltopack-nvjitlink)")
    args = parser.parse_args()
    jobs = int(os.environ.get("MAX_JOBS") or 2)
    module = lto_variants.GenericModule(torch.bfloat16, args.head_dim, use_sliding_window=False)
    times = lto_timing.generic_build_times(module, jobs)
    nvcc = lto_variants._nvcc_version(module.nvcc)
    meta = {"built_on": os.uname().nodename, "cores": os.cpu_count(), "nvcc": ".".join(nvcc),
            "lto_flags": module.lto_flags(), "cuda_cflags": module.cuda_cflags, "ldflags": module.ldflags,
            "link_options": module.link_options(), "generic_version": lto_variants.GENERIC_VERSION,
            "flashinfer": __import__("flashinfer").__version__, "dtype": "bfloat16", "head_dim": args.head_dim,
            "use_sliding_window": False, "build_times": times, "sources_tag": module.sources_tag,
            "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    out = pathlib.Path(args.out)
    path = lto_pack.pack(out, module.name, lto_pack.module_files(module), meta)
    print(f"{path}: {module.name}, {path.stat().st_size / 2**20:.1f} MiB", flush=True)
    if args.nvjitlink:
        lib = lto_variants.nvjitlink_library()
        version = lto_variants._nvjitlink_version(lib)
        packed = lto_pack.pack_library(lib, args.nvjitlink, version)
        print(f"{packed}: {lib} {version}, {packed.stat().st_size / 2**20:.1f} MiB", flush=True)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {total / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
