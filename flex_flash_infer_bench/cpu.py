"""The CPU path (issue 23): the reference backend against torch's eager flex_attention, on this
machine's CPU, float32, batch 1, 8 heads, head_dim 64, causal and a 256-token sliding window.
Each output is checked against a float64 computation of the same call first (the chunked path);
then ours and torch's are timed in interleaved rounds (median). Prints a table and writes JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
import warnings

import torch

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.backends import reference

from .provenance import source_commit

MASKS = {"causal": {}, "sliding_window": {"window_size": 256}}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _float64(q, k, v, block_mask) -> torch.Tensor:
    """The same call in float64 through the chunked element-wise path (no fused kernel)."""
    q, k, v = (t.double() for t in (q, k, v))
    outs = []
    for r0, r1, c0, c1 in reference.row_chunks(q, k, block_mask):
        outs.append(reference.attend_rows(q[:, :, r0:r1], k, v, block_mask, None, None, r0, c0, c1)[0])
    return torch.cat(outs, 2)


def run_cpu_benchmark(out_path=None, seq_lens=(2048, 8192), cases=None, rounds: int = 5) -> dict:
    """cases: names of MASKS (default: all)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    rows = []
    print(f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'L':>6} {'mask':16} {'ours ms':>9} {'torch eager ms':>15} {'speedup':>8}  max err vs float64 (ours, torch)")
    for L in seq_lens:
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, 8, L, 64, generator=g) for _ in range(3))
        for name, params in MASKS.items():
            if cases and name not in cases:
                continue
            mod = get_mask_fn(name, **params)
            bm = create_block_mask(mod, None, None, L, L, device="cpu")
            tbm = torch_block_mask(mod, None, None, L, L, device="cpu")
            want = _float64(q, k, v, bm)
            errors = [float((f().double() - want).abs().max()) for f in (
                lambda: flex_attention(q, k, v, block_mask=bm), lambda: torch_flex(q, k, v, block_mask=tbm))]
            if max(errors) > 1e-4:
                raise AssertionError(f"{name} at {L}: max error {errors} against float64")
            ours, theirs = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                flex_attention(q, k, v, block_mask=bm)
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                torch_flex(q, k, v, block_mask=tbm)
                theirs.append(time.perf_counter() - t)
            row = dict(seq_len=L, mask=name, params=params, heads=8, head_dim=64, dtype="float32",
                       ours_ms=1e3 * statistics.median(ours), torch_eager_ms=1e3 * statistics.median(theirs),
                       max_error_vs_float64=dict(ours=errors[0], torch_eager=errors[1]))
            rows.append(row)
            print(f"{L:>6} {name:16} {row['ours_ms']:9.1f} {row['torch_eager_ms']:15.1f} "
                  f"{row['torch_eager_ms'] / row['ours_ms']:7.1f}x  {errors[0]:.1e}, {errors[1]:.1e}", flush=True)
    by = {(r["seq_len"], r["mask"]): r["ours_ms"] for r in rows}
    for L in seq_lens if {"causal", "sliding_window"} <= {r["mask"] for r in rows} else ():
        print(f"{L}: sliding window {by[(L, 'causal')] / by[(L, 'sliding_window')]:.1f}x faster than causal (ours)")
    result = dict(device=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), commit=source_commit(), rounds=rounds, rows=rows)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_path}")
    return result
