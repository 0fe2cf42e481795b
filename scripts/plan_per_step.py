"""Host time of one PagedFlexAttention.plan() for the decode bench's step (64 requests x 8192 keys,
page size 16, 32/8 heads, d128, bf16) on the CPU model of FlashInfer (tests/fake_flashinfer.py):
the planning work of a serving step without a GPU, and the torch operators it runs (on a GPU each
operator on a device table is a launch or a copy). Issue 23 asks for plan() at most 0.3 ms on a
GPU host, FlashInfer's own plan included (scripts/ab_plan.py times that on the GPU).

    PYTHONPATH=.:tests python scripts/plan_per_step.py [--json OUT.json]
"""
import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import fake_flashinfer  # noqa: E402

sys.modules["flashinfer"] = fake_flashinfer.module()
from flex_flash_infer import paged  # noqa: E402
from flex_flash_infer.backends import flashinfer_backend  # noqa: E402
from flex_flash_infer.mods.registry import get_mask_fn  # noqa: E402
from flex_flash_infer.mods.softcap import generate_softcap_score_mod  # noqa: E402
from flex_flash_infer_bench.provenance import source_commit  # noqa: E402

for module in (flashinfer_backend, paged):
    module._is_hopper = lambda device: True
paged.unsupported_reason = lambda *a: None


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    batch, context, page = 64, 8192, 16
    pages_per = context // page
    gen = torch.Generator().manual_seed(0)
    tables = (torch.arange(batch + 1, dtype=torch.int32), torch.arange(batch + 1, dtype=torch.int32) * pages_per,
              torch.randperm(batch * pages_per, generator=gen).to(torch.int32),
              torch.full((batch,), page, dtype=torch.int32))
    rows = []
    for name, mask, score in (("causal", get_mask_fn("causal"), None),
                              ("sliding_window", get_mask_fn("sliding_window", window_size=1024), None),
                              ("softcap+causal", get_mask_fn("causal"), generate_softcap_score_mod(30.0))):
        ours = paged.PagedFlexAttention(device="cpu", backend="flashinfer")
        plan_args = (mask, *tables, 32, 8, 128, page)
        ours.plan(*plan_args, dtype=torch.bfloat16, score_mod=score)
        with _Count() as count:
            ours.plan(*plan_args, dtype=torch.bfloat16, score_mod=score)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(args.calls):
                ours.plan(*plan_args, dtype=torch.bfloat16, score_mod=score)
            times.append((time.perf_counter() - start) / args.calls * 1e3)
        row = {"case": name, "plan_ms": statistics.median(times), "torch_ops": sum(count.ops.values())}
        rows.append(row)
        print(f"{name:16s} plan {row['plan_ms']:.3f} ms, {row['torch_ops']} torch operators", flush=True)
    if args.json:
        result = {"what": "PagedFlexAttention.plan() host time, CPU model", "commit": source_commit(),
                  "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
