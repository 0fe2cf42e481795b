"""Where prefix-LM's time over causal goes on FlashInfer's Hopper kernel: its launches timed alone
and against causal's, in one process, interleaved (the bench's time_interleaved), each checked
against a float32 reference on sampled rows first.

    python scripts/prefix_lm_probe.py OUT.json [--seq-lens 8192 32768] [--prefix 2048]

Rows (bf16, batch 1, 32/8 heads, d128; planned_ragged: the launches the band runner makes):
  causal, causal+lse            one causal launch over every row, without and with its LSE
  rows, rows+lse                prefix-LM's causal rows [P, L) over every key (queries P keys in)
  block+lse                     prefix-LM's full block [0, P) x [0, P)
  ours_causal, ours_prefix_lm   FlexFlashInfer's calls (no LSE)
(Session 40's run also timed a square causal launch plus the prefix's reversed triangle, an
experiment that lost: commit a575d93, docs/benchmarks.md.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer import FlexFlashInfer
from flex_flash_infer.backends.flashinfer_backend import default_workspace
from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer.planning.ragged import planned_ragged
from flex_flash_infer_bench.provenance import source_commit

HQ, HKV, D = 32, 8, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    import flashinfer

    dev, dtype, P = torch.device("cuda"), torch.bfloat16, args.prefix
    scale = D ** -0.5
    ws = default_workspace(dev)
    results = []
    for L in args.seq_lens:
        gen = torch.Generator(device="cuda").manual_seed(bench.SEED)
        q = torch.randn(L, HQ, D, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(L, HKV, D, device=dev, dtype=dtype, generator=gen)
        v = torch.randn(L, HKV, D, device=dev, dtype=dtype, generator=gen)
        shape = (1, L, L, HQ, HKV, D)

        def ind(n):
            return torch.tensor([0, n], dtype=torch.int32)

        causal = planned_ragged(ws, "fa3", ind(L), ind(L), shape, dtype, True, sm_scale=scale)
        rows = planned_ragged(ws, "fa3", ind(L - P), ind(L), shape, dtype, True, sm_scale=scale)
        block = planned_ragged(ws, "fa3", ind(P), ind(P), shape, dtype, False, sm_scale=scale)
        out = torch.empty_like(q)
        lse = torch.empty(L, HQ, dtype=torch.float32, device=dev)

        flex = FlexFlashInfer(device=dev, backend="flashinfer")
        prefix_mod = get_mask_fn("prefix_lm", prefix_len=P)
        causal_mod = get_mask_fn("causal")
        flex.prepare(mask_fn=causal_mod, seq_len_q=L, seq_len_kv=L, num_qo_heads=HQ, num_kv_heads=HKV,
                     head_dim=D, dtype=dtype)
        fns = {
            "causal": lambda: causal.run(q, k, v, return_lse=False),
            "causal+lse": lambda: causal.run(q, k, v, return_lse=True),
            "rows": lambda: rows.run(q[P:], k, v, out=out[P:], return_lse=False),
            "rows+lse": lambda: rows.run(q[P:], k, v, out=out[P:], lse=lse[P:], return_lse=True),
            "block+lse": lambda: block.run(q[:P], k[:P], v[:P], out=out[:P], lse=lse[:P], return_lse=True),
            "ours_causal": lambda: flex(q, k, v),
        }
        ours_prefix = FlexFlashInfer(device=dev, backend="flashinfer")
        ours_prefix.prepare(mask_fn=prefix_mod, seq_len_q=L, seq_len_kv=L, num_qo_heads=HQ, num_kv_heads=HKV,
                            head_dim=D, dtype=dtype)
        fns["ours_prefix_lm"] = lambda: ours_prefix(q, k, v)

        sample = torch.sort(torch.randperm(L, device=dev, generator=gen)[:256]).values
        sample_prefix = torch.cat([torch.arange(0, P, 97, device=dev), sample[sample >= P][:128]])
        ref_causal = bench.reference_rows(q, k, v, causal_mod, sample)
        ref_prefix = bench.reference_rows(q, k, v, prefix_mod, sample_prefix)
        errors = {
            "causal": bench.rel_error(fns["causal"]()[sample], ref_causal),
            "ours_causal": bench.rel_error(fns["ours_causal"]()[sample], ref_causal),
            "ours_prefix_lm": bench.rel_error(fns["ours_prefix_lm"]()[sample_prefix], ref_prefix),
        }
        fns["rows+lse"]()
        fns["block+lse"]()
        errors["rows+block"] = bench.rel_error(out[sample_prefix], ref_prefix)
        print(L, "errors", {n: f"{e:.2e}" for n, e in errors.items()}, flush=True)
        bad = {n: e for n, e in errors.items() if not e < 2e-2}
        if "rows+block" in bad:   # checked together: both launches write the one output
            bad["rows+lse"] = bad["block+lse"] = bad["rows+block"]
        times, failed = bench.time_interleaved(fns, rounds=args.rounds)
        for name in fns:
            row = {"seq_len": L, "prefix": P, "impl": name, "ms": times.get(name), "error": failed.get(name)}
            if name in bad:
                row["error"] = f"wrong result: rel_err {bad[name]:.3e}"
            results.append(row)
            print(f"{L:6d} {name:16s} {times.get(name, float('nan')):9.4f} ms  {failed.get(name, '')}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
            "date": datetime.date.today().isoformat(), "commit": source_commit(), "host": platform.node(),
            "errors_checked_on": "sampled rows against float32", "rows": results}
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
