"""The differential fuzzer's long and GPU modes (the CI slice is tests/doors/test_fuzz.py).

  python scripts/fuzz.py --minutes 30 --seed N          CPU campaign through the CPU model of FlashInfer
  python scripts/fuzz.py --device cuda --cases 2000 --dtypes bf16 fp16 --json fuzz.json
                                                         the real kernels, fp16/bf16, head_dim 64 and 128
  python scripts/fuzz.py --case N:I                      one case: its source, then its verdict
  python scripts/fuzz.py --simulated --minutes 30        the CPU campaign on a simulated CUDA device
                                                         (tests/flexfuzz/simulated.py): host/device mixes fail

Seeds: without --seed a fresh one is drawn and printed; case I of seed N is the same case on
every machine, and a failure prints as Python source that reproduces it (PYTHONPATH=tests).
On the GPU every distinct score_mod compiles kernel modules (1-2 minutes each, cached), so the
GPU profile takes score_mods from a pool of five (cases.GPU_SCORE_POOL) and compiles per
(score_mod, dtype, head_dim, kernel kind); masks cost no compiling there (bit masks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, help="first seed (default: a fresh one, printed)")
    p.add_argument("--minutes", type=float, help="stop after this long")
    p.add_argument("--cases", type=int, help="stop after this many cases")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", nargs="+", help="input dtypes (bf16 fp16 fp32 fp64); default: cpu mixes all, cuda bf16 fp16")
    p.add_argument("--head-dims", nargs="+", type=int, help="head_dims to draw (default: cpu 8/16/32, cuda 64/128)")
    p.add_argument("--score-share", type=float, default=0.3,
                   help="share of cases with a score_mod (on cuda each pool score_mod compiles its kernels once)")
    p.add_argument("--score-pool", nargs="+", default=[],
                   help="on cuda, draw score_mods from these members of the pool only (cases.GPU_SCORE_POOL)")
    p.add_argument("--per-seed", type=int, default=200, help="cases per seed before the next seed")
    p.add_argument("--torch-share", type=float, default=None,
                   help="share of cases also run through torch's flex_attention (default 0.25 on cpu, 0 on cuda)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--case", help="run one case SEED:INDEX, printing its source")
    p.add_argument("--quiet", action="store_true", help="no line per case")
    p.add_argument("--avoid", nargs="+", default=[], choices=["grad", "nan", "narrow"],
                   help="leave out inputs that require grad, NaN inputs, or narrow ints and bool arithmetic "
                        "(issue 20's classes 4, 6 and 5), to look past known bugs")
    p.add_argument("--no-shrink", action="store_true", help="print failing cases as found, without shrinking them")
    p.add_argument("--simulated", action="store_true",
                   help="the CPU profile on a simulated CUDA device (CPU tensors marked as on the GPU, FlashInfer's "
                        "CPU model): a host tensor meeting device tensors fails as on a GPU")
    args = p.parse_args(argv)

    import torch

    from flexfuzz import campaign
    from flexfuzz.cases import Profile, generate_case
    from flexfuzz.doors import run_case

    if args.simulated and args.device == "cuda":
        p.error("--simulated runs the CPU profile on a simulated device: leave --device at cpu")
    profile = Profile("gpu" if args.device == "cuda" else "cpu", args.score_share, tuple(args.head_dims or ()),
                      tuple(args.score_pool))
    if profile.name == "gpu" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    dtypes = [DTYPE_NAMES[d] for d in args.dtypes] if args.dtypes else None
    if args.case:
        seed, index = (int(x) for x in args.case.split(":"))
        case = generate_case(seed, index, profile, dtypes, "cuda" if args.simulated else args.device, args.avoid)
        print(case.source())
        if args.simulated:
            from flexfuzz.simulated import simulated

            with simulated():
                result = run_case(case)
        else:
            result = run_case(case, torch_check=profile.name == "cpu")
        print(f"{result.status}: routes {result.routes}; max output error {result.error:.3g}")
        for line in result.problems + result.notes:
            print("  " + line)
        return 0 if result.status in ("pass", "refused") else 1
    if args.minutes is None and args.cases is None:
        args.minutes = 30
    torch_share = args.torch_share if args.torch_share is not None else (0.25 if profile.name == "cpu" else 0.0)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % (1 << 31)
    print(f"fuzz: seed {seed}, device {'cuda (simulated)' if args.simulated else args.device}, " + (f"avoiding {' '.join(args.avoid)}, " if args.avoid else "")
          + (f"{args.minutes} minutes" if args.minutes is not None else f"{args.cases} cases"), flush=True)

    def progress(result):
        if args.quiet and result.status != "fail":
            return
        c = result.case
        print(f"{c.name:>12} {result.status:8} {result.seconds:6.2f}s {c.door:6} {','.join(sorted(set(result.routes))):40}"
              f" {c.dtype} B{c.B} H{c.Hq}/{c.Hkv} L{c.L} S{c.S} D{c.D}"
              + (f"  {result.problems[0][:160]}" if result.problems and result.status != "pass" else ""), flush=True)

    start = time.time()
    saved = [start]

    def checkpoint(summary):
        # the summary so far, every 30 s: a GPU campaign's process killed mid-compile at its
        # deadline still leaves its counts (marked partial)
        if args.json and time.time() - saved[0] > 30:
            write_json(summary, partial=True)
            saved[0] = time.time()

    from flex_flash_infer_bench.provenance import source_commit
    commit = source_commit()   # read once, at the start: the code the campaign imported

    def write_json(summary, partial=False):
        data = summary.as_json()
        data.update(device="cuda (simulated)" if args.simulated else args.device, torch=torch.__version__, wall_seconds=round(time.time() - start, 1),
                    gpu=torch.cuda.get_device_name() if profile.name == "gpu" else None,
                    command=" ".join(sys.argv), partial=partial, commit=commit,
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)))
        try:
            import flashinfer
            data["flashinfer"] = getattr(flashinfer, "__version__", "?")
        except Exception:
            data["flashinfer"] = None
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)

    summary = campaign.run(seed, args.cases, args.minutes, profile, dtypes, args.device, args.per_seed, torch_share,
                           progress, args.avoid, checkpoint, simulated=args.simulated)
    if summary.failures and not args.no_shrink:
        print(f"shrinking and triaging {len(summary.failures)} kinds of failure ...", flush=True)
        if args.simulated:
            from flexfuzz.simulated import simulated

            with simulated():
                campaign.minimize(summary)
        else:
            campaign.minimize(summary)
    print()
    print(summary.report())
    if profile.name == "cpu":
        missing = summary.missing()
        print("routes not reached: " + (", ".join(missing) if missing else "none"))
    if args.json:
        write_json(summary)
        print(f"summary written to {args.json}")
    return 1 if summary.failures or summary.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
