"""The floor under issue 23's CPU window target (a 256-token sliding window at least 4x faster than
causal, 2048 tokens, 8 heads, head_dim 64, float32): what torch's fused CPU attention
(aten::_scaled_dot_product_flash_attention_for_cpu, the kernel the reference backend's causal and
band pieces call) costs per pair for each shape a band can be cut into, beside its causal call.

A row block of B rows of a window of W keys must compute B x (B - 1 + W) pairs to give B x W
visible ones, in one call over all blocks (overlapping key views, as reference_pieces.BandPiece).
Small blocks waste few pairs but run the kernel's small matrix products; large blocks run faster
per pair and waste more. The best block size bounds what the backend can reach with this kernel:

    python scripts/cpu_band_floor.py [--out FILE.json] [--rounds 15]

Each shape and the causal call are timed in interleaved rounds (median); the library's own causal
and window calls (flex_attention on the CPU) are timed in the same rounds."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer_bench.cpu import _cpu_name
from flex_flash_infer_bench.provenance import source_commit

H, L, D, W = 8, 2048, 64, 256
BLOCKS = (16, 32, 64, 128, 256)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    fns = {"causal call": lambda: fused(q, k, v, 0.0, True)}
    shapes = {}
    for b in BLOCKS:
        span, blocks = b - 1 + W, L // b
        qb, kb, vb = (torch.randn(blocks, H, n, D, generator=g) for n in (b, span, span))
        mask = torch.zeros(b, span)
        fns[f"blocks of {b}"] = (lambda qb, kb, vb, mask: lambda: fused(qb, kb, vb, 0.0, False, attn_mask=mask))(
            qb, kb, vb, mask)
        shapes[f"blocks of {b}"] = dict(block_rows=b, keys_per_block=span, computed_pairs=blocks * H * b * span)
    for name, params in (("causal", {}), ("sliding_window", {"window_size": W})):
        bm = create_block_mask(get_mask_fn(name, **params), None, None, L, L, device="cpu")
        fns[f"library {name}"] = (lambda bm: lambda: flex_attention(q, k, v, block_mask=bm))(bm)
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for r in range(args.rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(1e3 * (time.perf_counter() - t))
    ms = {name: statistics.median(t) for name, t in times.items()}
    visible = H * (L * W - W * (W - 1) // 2)
    causal = ms["causal call"]
    rows = []
    print(f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; L={L}, {H} heads, "
          f"d{D}, window {W}: {visible} visible pairs")
    print(f"{'shape':22s} {'ms':>8s} {'ns/computed pair':>17s} {'ns/visible pair':>16s} {'causal call / this':>19s}")
    for name, t in ms.items():
        row = dict(shape=name, ms=t, **shapes.get(name, {}))
        if name in shapes:
            row["ns_per_computed_pair"] = 1e6 * t / shapes[name]["computed_pairs"]
            row["ns_per_visible_pair"] = 1e6 * t / visible
        row["causal_call_over_this"] = causal / t
        rows.append(row)
        cells = [f"{row[c]:.2f}" if c in row else "-" for c in ("ns_per_computed_pair", "ns_per_visible_pair")]
        print(f"{name:22s} {t:8.2f} {cells[0]:>17s} {cells[1]:>16s} {causal / t:18.2f}x")
    lib = ms["library causal"] / ms["library sliding_window"]
    best = max((r for r in rows if "block_rows" in r), key=lambda r: r["causal_call_over_this"])
    print(f"library: window {lib:.2f}x faster than causal; best block shape ({best['shape']}) alone: "
          f"{best['causal_call_over_this']:.2f}x under the causal call")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                           torch=torch.__version__, date=datetime.date.today().isoformat(), commit=source_commit(),
                           rounds=args.rounds, seq_len=L, heads=H, head_dim=D, window=W, visible_pairs=visible,
                           rows=rows, library_window_over_causal=lib), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
