"""Command line: `python -m flex_flash_infer [check|demo] ...`.

check compares the library with PyTorch SDPA given the dense mask (the seed's test script);
demo (the default) runs check for the seed's three masks on the best device available.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from .block_mask import create_mask
from .mods.registry import MASK_FACTORIES, get_mask_fn
from .wrapper import FlexFlashInfer

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


def run_check(q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, mask, dtype, device, mask_params, seed=0):
    """Returns (relative error, max abs error, passed, backend)."""
    torch.manual_seed(seed)
    mask_fn = get_mask_fn(mask, **mask_params)
    flex = FlexFlashInfer(device=device)
    flex.prepare(mask_fn=mask_fn, seq_len_q=q_len, seq_len_kv=kv_len, num_qo_heads=num_qo_heads,
                 num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    q = torch.randn(q_len, num_qo_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(kv_len, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(kv_len, num_kv_heads, head_dim, dtype=dtype, device=device)
    out = flex(q, k, v).float()
    dense = create_mask(mask_fn, 1, 1, q_len, kv_len, device=device)[0]
    ref = sdpa_reference(q, k, v, dense)
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    max_abs = (out - ref).abs().max().item()
    passed = bool(torch.isfinite(out).all()) and rel <= TOLERANCE[dtype]
    return rel, max_abs, passed, flex.active_backend


def _params_from_args(args, mask):
    import inspect

    from .mods.registry import MASK_FACTORIES

    wanted = inspect.signature(MASK_FACTORIES[mask]).parameters
    params = {name: getattr(args, name) for name in MASK_PARAMS if name in wanted and getattr(args, name) is not None}
    return params


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m flex_flash_infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="compare with PyTorch SDPA on the dense mask")
    check.add_argument("--q-len", type=int, default=1024)
    check.add_argument("--kv-len", type=int, default=None, help="default: --q-len")
    check.add_argument("--num-qo-heads", type=int, default=8)
    check.add_argument("--num-kv-heads", type=int, default=None, help="default: --num-qo-heads")
    check.add_argument("--head-dim", type=int, default=64)
    check.add_argument("--mask", "--mask-type", dest="mask", default="causal",
                       choices=[name for name in MASK_FACTORIES if name != "document"])
    check.add_argument("--window-size", type=int, default=256)
    check.add_argument("--chunk-size", type=int, default=128)
    check.add_argument("--sink-size", type=int, default=4)
    check.add_argument("--prefix-len", type=int, default=256)
    check.add_argument("--dilation", type=int, default=2)
    check.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    check.add_argument("--device", default=None)
    demo = sub.add_parser("demo", help="check the seed's masks (causal, sliding_window, attamba)")
    demo.add_argument("--device", default=None)
    bench = sub.add_parser("bench", help="benchmark against torch FlexAttention, FlashInfer and cuDNN (CUDA)")
    bench.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    bench.add_argument("--cases", nargs="+", default=None, help="default: all")
    bench.add_argument("--out", default=None, help="default: benchmarks/results/<device>.json")
    bench.add_argument("--no-flex", action="store_true", help="skip torch FlexAttention")
    warm = sub.add_parser("warmup", help="compile FlashInfer kernels ahead of first use (CUDA)")
    warm.add_argument("--dtype", nargs="+", choices=["bf16", "fp16"], default=["bf16"])
    warm.add_argument("--head-dim", type=int, nargs="+", default=[128])
    warm.add_argument("--kinds", nargs="+", default=None)
    return parser


def _print_row(mask, backend, device, dtype, rel, max_abs, passed):
    print(f"{mask:24s} {backend:10s} {device:5s} {str(dtype).replace('torch.', ''):9s} "
          f"rel_err {rel:.2e}  max_abs {max_abs:.2e}  {'PASS' if passed else 'FAIL'}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "demo"
    device = getattr(args, "device", None) or _default_device()
    on_cuda = torch.device(device).type == "cuda"
    if command in ("bench", "warmup") and not torch.cuda.is_available():
        print(f"{command} needs a CUDA GPU with flashinfer installed", file=sys.stderr)
        return 2
    if command == "bench":
        from .bench import run_benchmark

        run_benchmark(tuple(args.seq_lens), args.cases, args.out, with_flex=not args.no_flex)
        return 0
    if command == "warmup":
        from .warmup import KINDS, warmup

        return warmup(args.dtype, args.head_dim, args.kinds or KINDS)
    if command == "check":
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.float32)
        rel, max_abs, passed, backend = run_check(
            args.q_len, args.kv_len or args.q_len, args.num_qo_heads, args.num_kv_heads or args.num_qo_heads,
            args.head_dim, args.mask, dtype, device, _params_from_args(args, args.mask))
        _print_row(args.mask, backend, device, dtype, rel, max_abs, passed)
        return 0 if passed else 1
    dtype = torch.float16 if on_cuda else torch.float32
    cases = [("causal", {}), ("sliding_window", {"window_size": 256}),
             ("attamba", {"window_size": 256, "chunk_size": 128})]
    print(f"flex-flash-infer demo: 1 x 1000 tokens, 8 query / 2 key heads, head_dim 64, vs PyTorch SDPA")
    ok = True
    for mask, params in cases:
        rel, max_abs, passed, backend = run_check(1000, 1000, 8, 2, 64, mask, dtype, device, params)
        _print_row(mask, backend, device, dtype, rel, max_abs, passed)
        ok &= passed
    return 0 if ok else 1
