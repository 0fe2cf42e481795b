"""Issue 22's window leads, timed as a 2 x 2 in one process: the kernel (FlashInfer's fa3 window
kernel as installed, or the library's head-window module, whose window starts at its first visible
key tile where FlashInfer's starts one all-masked tile early) by the schedule (FlashInfer's plan,
which prices every query tile as causal and never sees the window, or planned as not causal and
run causal: planning/ragged.py, schedules_by_window). Beside them: the library's own route for the
mask, and FlashInfer's single-sequence call (what the library ran before, on its own hardware
schedule). Every output is checked against float32 first; the calls are timed interleaved.

    python scripts/ab_window_tile.py OUT.json [--seq-lens 8192 32768] [--windows 128 256 1024]

Modules: FlashInfer's window kernels and the head-window module (scripts/prebuild_kernels.sh builds
all three ahead).
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer import FlexFlashInfer, get_mask_fn
from flex_flash_infer.backends import head_windows
from flex_flash_infer.backends.flashinfer_backend import default_workspace
from flex_flash_infer.planning.ragged import planned_ragged
from flex_flash_infer_bench.provenance import source_commit


def ragged_call(q, k, v, window: int, exact: bool, balanced: bool):
    """One ragged fa3 launch of the causal window over the whole sequence."""
    S, hq, D = q.shape
    indptr = torch.tensor([0, S], dtype=torch.int32)
    shape = (1, S, S, hq, k.shape[1], D)
    scale = D ** -0.5
    if not exact:
        wrapper = planned_ragged(default_workspace(q.device), "fa3", indptr, indptr, shape, q.dtype, True, window - 1,
                                 sm_scale=scale, balance_window=balanced)
        return lambda: wrapper.run(q, k, v)
    wrapper = planned_ragged(default_workspace(q.device), "fa3", indptr, indptr, shape, q.dtype, True, window - 1,
                             jit_args=head_windows.jit_args(q.dtype, D), balance_window=balanced)
    table = torch.full((hq,), window - 1, dtype=torch.int32, device=q.device)
    return lambda: wrapper.run(q, k, v, table, None, None, None, None, 0.0, scale, 1.0, 0)


def single_call(q, k, v, window: int):
    import flashinfer

    return lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, window_left=window - 1)


def ours(q, k, v, window: int):
    S, hq, D = q.shape
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=get_mask_fn("sliding_window", window_size=window), seq_len_q=S, seq_len_kv=S,
                 num_qo_heads=hq, num_kv_heads=k.shape[1], head_dim=D, dtype=q.dtype)
    return lambda: flex(q, k, v)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--windows", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    import flashinfer

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
              "commit": source_commit(), "date": datetime.date.today().isoformat(), "head_dim": args.head_dim,
              "rows": []}
    D = args.head_dim
    for S in args.seq_lens:
        gen = torch.Generator(device="cuda").manual_seed(bench.SEED)
        q = torch.randn(S, 32, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(S, 8, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(S, 8, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        rows = torch.sort(torch.randperm(S, device="cuda", generator=gen)[:bench.CHECK_ROWS]).values
        for W in args.windows:
            ref = bench.reference_rows(q, k, v, get_mask_fn("sliding_window", window_size=W), rows)
            makers = {"ours": lambda: ours(q, k, v, W), "single_call": lambda: single_call(q, k, v, W)}
            for exact in (False, True):
                for balanced in (False, True):
                    name = f"{'exact' if exact else 'stock'}_{'balanced' if balanced else 'causal_plan'}"
                    makers[name] = lambda e=exact, b=balanced: ragged_call(q, k, v, W, e, b)
            case_rows, checked = [], {}
            for name, make in makers.items():
                row = {"seq_len": S, "window": W, "impl": name}
                case_rows.append(row)
                try:
                    call = make()
                except Exception as e:
                    row["error"] = f"plan: {type(e).__name__}: {e}"[:300]
                    continue
                if bench.check(row, call, lambda out: bench.rel_error(out[rows], ref)):
                    checked[name] = call
            times, errors = bench.time_interleaved(checked, rounds=args.rounds)
            for row in case_rows:
                row["ms"] = times.get(row["impl"])
                if row["impl"] in errors:
                    row["error"] = errors[row["impl"]]
                print(f"S={S:6d} window={W:5d} {row['impl']:20s} {row.get('ms') or float('nan'):8.3f} ms  "
                      f"rel_err {row.get('rel_err', float('nan')):.2e} {row.get('error', '')}", flush=True)
            result["rows"] += case_rows
            json.dump(result, open(args.out, "w"), indent=1)   # after each case: a later failure keeps these


if __name__ == "__main__":
    main()
