"""Per-head windows (the bench's per_head_windows: four head groups, one FlashInfer launch each)
timed in one process, interleaved, each output checked against the float32 reference first:
called (the groups in turn) and replayed from a CUDA graph, where the library runs the groups on
side streams (the default) or, for comparison, in turn; a plain sliding window over every head
beside them for scale. Issue 22: per-head windows ran 0.81x FlashAttention-4 on the H200.

    python scripts/ab_head_streams.py OUT.json [--seq-len 8192] [--head-dim 128] [--rounds 30]
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer import FlexFlashInfer
from flex_flash_infer_bench.profile import graphed
from flex_flash_infer_bench.provenance import source_commit


def prepared(mask_mod, seq_len, head_dim, heads_q, heads_kv):
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask_mod, seq_len_q=seq_len, seq_len_kv=seq_len, num_qo_heads=heads_q,
                 num_kv_heads=heads_kv, head_dim=head_dim, dtype=torch.bfloat16)
    return flex


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    S, D, HQ, HKV = args.seq_len, args.head_dim, 32, 8
    gen = torch.Generator(device="cuda").manual_seed(bench.SEED)
    q = torch.randn(S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = torch.sort(torch.randperm(S, device="cuda", generator=gen)[:bench.CHECK_ROWS]).values
    masks = bench.case_masks(S)
    per_head = masks["per_head_windows"][0]
    ref = bench.reference_rows(q, k, v, per_head, rows)
    called = prepared(per_head, S, D, HQ, HKV)
    assert called._prepared.segments[0].plan.route == "bands-per-head"
    in_turn = prepared(per_head, S, D, HQ, HKV)
    # the comparison only: this instance runs its groups in turn under capture too
    in_turn._prepared.segments[0].plan._streams_if_capturing = lambda q: None
    window = prepared(masks["sliding_window"][0], S, D, HQ, HKV)
    window_ref = bench.reference_rows(q, k, v, masks["sliding_window"][0], rows)
    fns = {"called": lambda: called(q, k, v),
           "graph_streams": graphed(lambda: called(q, k, v)),
           "graph_in_turn": graphed(lambda: in_turn(q, k, v))}
    fns["window_all_heads"] = lambda: window(q, k, v)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
              "date": datetime.date.today().isoformat(), "seq_len": S, "head_dim": D, "heads": [HQ, HKV],
              "rows": []}
    checked = {}
    for name, fn in fns.items():
        row = {"impl": name}
        bench.check(row, fn, lambda out: bench.rel_error(out[rows], window_ref if name == "window_all_heads" else ref))
        result["rows"].append(row)
        if "error" not in row:
            checked[name] = fn
    times, errors = bench.time_interleaved(checked, rounds=args.rounds)
    host = {}
    for name, fn in checked.items():   # host time per call: 50 calls enqueued, no wait on the GPU
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        host[name] = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
    for row in result["rows"]:
        row["ms"] = times.get(row["impl"])
        row["host_ms"] = host.get(row["impl"])
        if row["impl"] in errors:
            row["error"] = errors[row["impl"]]
        print(f"{row['impl']:18s} {row.get('ms') or float('nan'):8.3f} ms  host {row.get('host_ms') or float('nan'):.3f} ms"
              f"  rel_err {row.get('rel_err', float('nan')):.2e}"
              f"  {row.get('error', '')}", flush=True)
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
