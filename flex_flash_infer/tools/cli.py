"""Command line: `python -m flex_flash_infer [check|demo|show|info|bench|warmup] ...`.

check compares the library with PyTorch SDPA given the dense mask (the seed's test script,
test_flex_flash.py at the repository root, runs it and takes the seed's underscore flags:
--q_len --kv_len --num_qo_heads --mask_type ...);
demo (the default) runs check for the seed's three masks on the best device available;
show draws a library mask to a PNG (needs matplotlib); info reports versions, the GPU, flashinfer,
the backend 'auto' picks here and FlashInfer's JIT cache.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import sys

import torch
import torch.nn.functional as F

from ..mods.registry import MASK_FACTORIES, get_mask_fn
from ..wrapper import FlexFlashInfer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
MASK_PARAMS = {"window_size": "--window-size", "chunk_size": "--chunk-size", "sink_size": "--sink-size",
               "prefix_len": "--prefix-len", "dilation": "--dilation"}


def sdpa_reference(q, k, v, dense_mask):
    """float32 SDPA with a dense mask; rows that see nothing give 0 (FlexAttention's rule)."""
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = (x.transpose(0, 1).float() for x in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense_mask)
    out = torch.where(dense_mask.any(-1, keepdim=True), out, 0.0)
    return out.transpose(0, 1)


def prepared_check(q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, mask, dtype, device, mask_params):
    """The FlexFlashInfer a check runs, prepared (its first prepare() builds the kernels it needs)."""
    flex = FlexFlashInfer(device=device)
    flex.prepare(mask_fn=get_mask_fn(mask, **mask_params), seq_len_q=q_len, seq_len_kv=kv_len,
                 num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    return flex


def run_check(q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, mask, dtype, device, mask_params, seed=0,
              flex=None):
    """Returns (the worst row's relative error, max abs error, passed, backend). flex: the check's
    prepared_check() when made ahead."""
    if flex is None:
        flex = prepared_check(q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, mask, dtype, device, mask_params)
    torch.manual_seed(seed)
    mask_fn = get_mask_fn(mask, **mask_params)
    q = torch.randn(q_len, num_qo_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(kv_len, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(kv_len, num_kv_heads, head_dim, dtype=dtype, device=device)
    out = flex(q, k, v).float()
    # SDPA's mask comes from the seed's two-argument form on the full index grid, not from the
    # library's block tables: the check does not lean on the code it checks
    dense = mask_fn(torch.arange(q_len, device=device)[:, None], torch.arange(kv_len, device=device)[None, :])
    ref = sdpa_reference(q, k, v, dense.expand(q_len, kv_len))
    # the worst (query, head) row's relative error: one wrong row among thousands would hide in
    # the whole output's norm (a zeroed row passed at 1.3e-2 in bfloat16)
    rows = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    rel = rows.max().item() if torch.isfinite(out).all() else math.inf
    max_abs = (out - ref).abs().max().item()
    passed = bool(torch.isfinite(out).all()) and rel <= TOLERANCE[dtype]
    return rel, max_abs, passed, flex.active_backend


def _params_from_args(args, mask):
    import inspect

    from ..mods.registry import MASK_FACTORIES

    wanted = inspect.signature(MASK_FACTORIES[mask]).parameters
    params = {name: getattr(args, name) for name in MASK_PARAMS if name in wanted and getattr(args, name) is not None}
    return params


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _flag(name: str) -> list:
    """--q-len and the seed's spelling --q_len: the seed's README documents the underscores."""
    return [f"--{name.replace('_', '-')}", f"--{name}"]


def _add_mask_parameters(parser):
    parser.add_argument(*_flag("window_size"), type=int, default=256)
    parser.add_argument(*_flag("chunk_size"), type=int, default=128)
    parser.add_argument(*_flag("sink_size"), type=int, default=4)
    parser.add_argument(*_flag("prefix_len"), type=int, default=256)
    parser.add_argument("--dilation", type=int, default=2)


def add_check_arguments(parser):
    """The flags of `check` (and of the seed's test_flex_flash.py, which is `check` under its own name)."""
    parser.add_argument(*_flag("q_len"), type=int, default=1024)
    parser.add_argument(*_flag("kv_len"), type=int, default=None, help="default: --q-len")
    parser.add_argument(*_flag("num_qo_heads"), type=int, default=8)
    parser.add_argument(*_flag("num_kv_heads"), type=int, default=None, help="default: --num-qo-heads")
    parser.add_argument(*_flag("head_dim"), type=int, default=64)
    parser.add_argument("--mask", *_flag("mask_type"), dest="mask", default="causal",
                        choices=[name for name in MASK_FACTORIES if name != "document"])
    _add_mask_parameters(parser)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m flex_flash_infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="compare with PyTorch SDPA on the dense mask")
    add_check_arguments(check)
    demo = sub.add_parser("demo", help="check the seed's masks (causal, sliding_window, attamba)")
    demo.add_argument("--device", default=None)
    bench = sub.add_parser("bench", help="benchmark against torch FlexAttention, FlashInfer and cuDNN (CUDA)")
    bench.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default: 8192 32768 (--cpu: 2048 8192)")
    bench.add_argument("--cases", nargs="+", default=None, help="default: all")
    bench.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<device>.json on the GPU; --cpu writes none unless given)")
    bench.add_argument("--head-dims", type=int, nargs="+", default=None,
                       help="mask cases at each (score_mod cases at 128 only; default: 128 64)")
    bench.add_argument("--no-flex", action="store_true",
                       help="skip torch FlexAttention (its Triton and FlashAttention-4 backends)")
    bench.add_argument("--profile", action="store_true",
                       help="also each row's host time and GPU kernels, and our call replayed from a CUDA graph")
    bench.add_argument("--plan", action="store_true",
                       help="measure planning time instead (flex_flash_infer_bench/planning.py)")
    bench.add_argument("--decode", action="store_true", help="paged decode instead (flex_flash_infer_bench/decode.py)")
    bench.add_argument("--varlen", action="store_true",
                       help="packed varlen prefill instead (flex_flash_infer_bench/varlen.py)")
    bench.add_argument("--cold", nargs="*", default=None, metavar="ITEM",
                       help="first use from empty compile caches, each item in a fresh process "
                            "(flex_flash_infer_bench/cold.py; default: every item)")
    bench.add_argument("--cpu", action="store_true",
                       help="the reference backend on this CPU against torch's eager flex_attention (no GPU needed)")
    warm = sub.add_parser("warmup", help="compile FlashInfer kernels ahead of first use (CUDA)")
    warm.add_argument("--dtype", nargs="+", choices=["bf16", "fp16"], default=["bf16"])
    warm.add_argument("--head-dim", type=int, nargs="+", default=[128])
    warm.add_argument("--kinds", nargs="+", default=None,
                      help="default: causal sliding_window tiles documents decode score_mod_generic (the "
                           "generic objects every score_mod's device-LTO module links; +window for windowed "
                           "bands); score_mod:<name>[+window] "
                           "compiles a score_mod variant (softcap alibi rel_bias temperature causal_decay); "
                           "tile_variants:softcap tile_variants:rel_bias tile_variants:alibi+columns: the paged "
                           "variants of the tiles route; score_mod_fa2:<name>[+window]: the fa2 band variant of "
                           "GPUs before Hopper; bands_per_head: per-head windows on the bands-per-head route; "
                           "native_score: FlashInfer's own soft cap and ALiBi; paged_mods: a score_mod and "
                           "per-head masks on a paged cache")
    show = sub.add_parser("show", help="draw a library mask to a PNG: its elements, or its tile map when long "
                                       "(needs matplotlib)")
    show.add_argument("name", choices=[name for name in MASK_FACTORIES if name != "document"])
    _add_mask_parameters(show)
    show.add_argument("--seq-len", type=int, default=2048,
                      help="query and key length (default 2048); up to 1024 the elements are drawn, "
                           "beyond it the 128x128 tile map")
    show.add_argument("-o", "--output", default=None, help="default: NAME.png")
    sub.add_parser("info", help="versions, GPU, flashinfer, the backend 'auto' picks here, FlashInfer's JIT cache")
    return parser


def _print_row(mask, backend, device, dtype, rel, max_abs, passed):
    print(f"{mask:24s} {backend:10s} {device:5s} {str(dtype).replace('torch.', ''):9s} "
          f"rel_err {rel:.2e}  max_abs {max_abs:.2e}  {'PASS' if passed else 'FAIL'}")


def _show(args) -> int:
    from .plot import plot

    output = args.output or f"{args.name}.png"
    try:
        mask_fn = get_mask_fn(args.name, **_params_from_args(args, args.name))
        plot(mask_fn, seq_len=args.seq_len, path=output)
    except (ImportError, ValueError, TypeError, OSError) as e:   # OSError: an output path that cannot be written
        print(f"show: {e}", file=sys.stderr)
        return 2
    print(output)
    return 0


def _flashinfer_cache_dir() -> str:
    """Where FlashInfer's JIT keeps compiled modules (as flashinfer.jit.env and warmup.py)."""
    import os

    base = os.environ.get("FLASHINFER_WORKSPACE_BASE", os.path.expanduser("~"))
    return os.path.join(base, ".cache", "flashinfer")


def _info() -> int:
    import pathlib

    from .. import __version__
    from ..backends.flashinfer_backend import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, unsupported_reason

    print(f"flex_flash_infer {__version__}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    cuda = torch.cuda.is_available()
    if cuda:
        try:
            major, minor = torch.cuda.get_device_capability()
            gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
        except Exception as e:  # a broken driver should not stop the report
            gpu = f"unknown ({type(e).__name__}: {e})"
        print(f"CUDA available: yes, {torch.cuda.device_count()} device(s); GPU 0: {gpu}")
    else:
        print("CUDA available: no")
    try:
        import flashinfer

        version = getattr(flashinfer, "__version__", None)
        if version is None:
            from importlib.metadata import version as dist_version

            version = dist_version("flashinfer-python")
        print(f"flashinfer: {version}")
    except Exception as e:
        print(f"flashinfer: does not import ({type(e).__name__}: {e})")
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = "/".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
    reason = unsupported_reason(device, SUPPORTED_DTYPES[0], SUPPORTED_HEAD_DIMS[0], SUPPORTED_HEAD_DIMS[0])
    if reason is None:
        heads = "/".join(map(str, SUPPORTED_HEAD_DIMS))
        print(f"backend 'auto': flashinfer for {dtypes} with head_dim {heads} (a score_mod compiled into its "
              f"kernels); reference otherwise, and for a mask_mod or score_mod it cannot trace")
    else:
        print(f"backend 'auto': reference ({reason})")
    cache = pathlib.Path(_flashinfer_cache_dir())
    if cache.is_dir():
        modules = sum(1 for _ in cache.rglob("*.so"))
        print(f"FlashInfer JIT cache: {cache} (exists, {modules} .so files)")
    elif cache.exists():
        print(f"FlashInfer JIT cache: {cache} (exists but is not a directory)")
    else:
        print(f"FlashInfer JIT cache: {cache} (does not exist yet)")
    return 0


def device_error(command: str, device: str) -> str | None:
    """Why --device cannot run command here, or None: a CPU or a CUDA GPU torch sees."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        return f"{command}: --device must be cpu or cuda (cuda:N), got {device!r}"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"{command}: --device {device}, but torch sees no CUDA GPU here"
    return None


def check_command(args, name: str = "check") -> int:
    """Run `check` from parsed add_check_arguments flags: 0 on PASS, 1 on FAIL, 2 on a bad argument."""
    device = args.device or _default_device()
    error = device_error(name, device)
    if error:
        print(error, file=sys.stderr)
        return 2
    on_cuda = torch.device(device).type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.float32)
    # unset: the query side's; 0 is a value, refused below by name
    kv_len = args.kv_len if args.kv_len is not None else args.q_len
    num_kv_heads = args.num_kv_heads if args.num_kv_heads is not None else args.num_qo_heads
    print(f"flex_flash_infer vs PyTorch SDPA with the dense {args.mask} mask: q_len {args.q_len}, kv_len {kv_len}, "
          f"{args.num_qo_heads} query / {num_kv_heads} key-value heads, head_dim {args.head_dim}, "
          f"{str(dtype).replace('torch.', '')} on {device}"
          + ("" if on_cuda else " (the reference backend: FlashInfer's kernels need a CUDA GPU)"))
    try:
        rel, max_abs, passed, backend = run_check(
            args.q_len, kv_len, args.num_qo_heads, num_kv_heads, args.head_dim, args.mask, dtype, device,
            _params_from_args(args, args.mask))
    except (ValueError, TypeError) as e:  # a bad argument: say which, no traceback
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    _print_row(args.mask, backend, device, dtype, rel, max_abs, passed)
    if passed:
        verdict = f"within the {TOLERANCE[dtype]:.0e} tolerance"
    elif not math.isfinite(max_abs):
        verdict = "the output is not finite"
    else:
        verdict = f"a row's relative error above the {TOLERANCE[dtype]:.0e} tolerance"
    print(f"{'PASS' if passed else 'FAIL'}: max abs error {max_abs:.3e}, worst row's relative error {rel:.3e} "
          f"({verdict} for {str(dtype).replace('torch.', '')})")
    return 0 if passed else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "demo"
    device = getattr(args, "device", None) or _default_device()
    error = device_error(command, device)
    if error:
        print(error, file=sys.stderr)
        return 2
    if any(n < 1 for n in getattr(args, "seq_lens", None) or ()):
        print(f"{command}: --seq-lens must be positive, got {args.seq_lens}", file=sys.stderr)
        return 2
    if command in ("bench", "warmup") and not torch.cuda.is_available() and not getattr(args, "cpu", False):
        print(f"{command} needs a CUDA GPU with flashinfer installed", file=sys.stderr)
        return 2
    if command == "bench":   # the benchmarks are a package above the library: imported here only
        if args.cpu:
            from flex_flash_infer_bench.cpu import MASKS, run_cpu_benchmark

            unknown = sorted(set(args.cases or ()) - set(MASKS))
            if unknown:   # the CPU benchmark's own cases: another one was silently left out
                print(f"bench --cpu times {' and '.join(MASKS)}; --cases got {', '.join(unknown)}", file=sys.stderr)
                return 2
            # the GPU benchmarks' options: the CPU one would run without them and say nothing
            ignored = [flag for flag, given in (("--head-dims", args.head_dims is not None), ("--no-flex", args.no_flex),
                                                ("--profile", args.profile), ("--plan", args.plan),
                                                ("--decode", args.decode), ("--varlen", args.varlen),
                                                ("--cold", args.cold is not None)) if given]
            if ignored:
                print(f"bench --cpu times the reference backend at head_dim 64 against torch's eager flex_attention "
                      f"and takes --seq-lens, --cases and --out only; got {' '.join(ignored)}", file=sys.stderr)
                return 2
            run_cpu_benchmark(args.out, tuple(args.seq_lens or (2048, 8192)), args.cases)
            return 0
        if args.cold is not None:
            from flex_flash_infer_bench.cold import run_cold_benchmark

            run_cold_benchmark(args.out, args.cold or None)
            return 0
        if args.plan:
            from flex_flash_infer_bench.planning import run_plan_benchmark

            run_plan_benchmark(args.out)
            return 0
        if args.varlen:
            from flex_flash_infer_bench.varlen import run_varlen_benchmark

            run_varlen_benchmark(args.out)
            return 0
        if args.decode:
            from flex_flash_infer_bench.decode import run_decode_benchmark

            run_decode_benchmark(args.out, with_flex=not args.no_flex)
            return 0
        from flex_flash_infer_bench.masks import run_benchmark

        run_benchmark(tuple(args.seq_lens or (8192, 32768)), args.cases, args.out, with_flex=not args.no_flex, profile=args.profile,
                      head_dims=tuple(args.head_dims or (128, 64)))
        return 0
    if command == "warmup":
        from .warmup import KINDS, warmup

        return warmup(args.dtype, args.head_dim, args.kinds or KINDS)
    if command == "show":
        return _show(args)
    if command == "info":
        return _info()
    if command == "check":
        return check_command(args)
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    cases = [("causal", {}), ("sliding_window", {"window_size": 256}),
             ("attamba", {"window_size": 256, "chunk_size": 128})]
    print("flex-flash-infer demo: 1 x 1000 tokens, 8 query / 2 key heads, head_dim 64, vs PyTorch SDPA")
    shape = (1000, 1000, 8, 2, 64)
    prepared = [None] * len(cases)
    if torch.device(device).type == "cuda":
        # on a fresh machine each check's prepare() compiles the FlashInfer modules its route needs
        # (about a minute each): prepared side by side, their builds share the cores at once
        # instead of one after the other (docs/benchmarks.md, the README's main job cold)
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            prepared = list(pool.map(lambda case: prepared_check(*shape, case[0], dtype, device, case[1]), cases))
    ok = True
    for (mask, params), flex in zip(cases, prepared):
        rel, max_abs, passed, backend = run_check(*shape, mask, dtype, device, params, flex=flex)
        _print_row(mask, backend, device, dtype, rel, max_abs, passed)
        ok &= passed
    return 0 if ok else 1
