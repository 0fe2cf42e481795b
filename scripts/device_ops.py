"""What host-side steps ask of a GPU, counted without one (tests/device_work.py on the simulated
CUDA device, FlashInfer's CPU model): prepare() of a 32768-token causal problem (the library's mask
and a user's own `q >= kv`) and of a window, calls of the bench's masks, and a decode step's
PagedFlexAttention.plan() and run() (64 requests x 8192 keys, tables on the GPU). Per step:
operators that run on the device, copies to it, and reads back to the host (each a wait for the
GPU's queue). Issue 23's plan() and prepare() targets are host times on a GPU machine, where these
cost what the CPU model does not.

    PYTHONPATH=.:tests python scripts/device_ops.py [--json OUT.json]
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from device_work import Counting  # noqa: E402
from flexfuzz.simulated import simulated  # noqa: E402


def step(what, fn, warm=2):
    for _ in range(warm):
        fn()
    mode = Counting()
    with mode:
        fn()
    row = {"step": what, "device_ops": sum(mode.device_ops.values()), "copies_to_device": sum(mode.to_device.values()),
           "reads_back": sum(mode.reads.values()), "ops": dict(mode.device_ops.most_common()),
           "copies": dict(mode.to_device), "reads": dict(mode.reads)}
    print(f"{what:44s} device ops {row['device_ops']:4d}  copies to device {row['copies_to_device']:3d}  "
          f"reads back {row['reads_back']:3d}   {dict(mode.reads)}", flush=True)
    return row


def _mask(name, params, S, get_mask_fn):
    """The bench's masks by name (flex_flash_infer_bench.masks for the ones it builds itself)."""
    if params is not None:
        return get_mask_fn(name, **params)
    import flex_flash_infer_bench.masks as bench
    return bench.case_masks(S, device="cuda")[name][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import fake_flashinfer
    sys.modules["flashinfer"] = fake_flashinfer.module()
    from flex_flash_infer import paged
    from flex_flash_infer.backends import flashinfer_backend
    from flex_flash_infer.mods import get_mask_fn
    from flex_flash_infer.wrapper import FlexFlashInfer
    from flex_flash_infer_bench.provenance import source_commit

    rows = []
    with simulated():
        for module in (flashinfer_backend, paged):
            module._is_hopper = lambda device: True
        paged.unsupported_reason = lambda *a: None
        flex = FlexFlashInfer(device="cuda", backend="flashinfer")

        def users_causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        for what, mod in (("prepare causal 32768 (library mask)", get_mask_fn("causal")),
                          ("prepare causal 32768 (a user's q >= kv)", users_causal),
                          ("prepare sliding_window(1024) 32768", get_mask_fn("sliding_window", window_size=1024))):
            rows.append(step(what, lambda mod=mod: flex.prepare(
                mask_fn=mod, seq_len_q=32768, seq_len_kv=32768, num_qo_heads=32, num_kv_heads=8, head_dim=128,
                dtype=torch.bfloat16)))
        # the calls themselves: a call must never read back (CUDA graphs capture it)
        S = 2048
        q = torch.randn(S, 32, 64, dtype=torch.bfloat16).to("cuda")
        k, v = (torch.randn(S, 8, 64, dtype=torch.bfloat16).to("cuda") for _ in range(2))
        for name, params in (("causal", {}), ("sliding_window", {"window_size": 256}),
                             ("streaming", {"sink_size": 4, "window_size": 256}),
                             ("attamba", {"window_size": 256, "chunk_size": 128}), ("prefix_lm", {"prefix_len": 500}),
                             ("document", None), ("per_head_windows", None), ("random_tiles", None)):
            mod = _mask(name, params, S, get_mask_fn)
            call = FlexFlashInfer(device="cuda", backend="flashinfer")
            call.prepare(mask_fn=mod, seq_len_q=S, seq_len_kv=S, num_qo_heads=32, num_kv_heads=8, head_dim=64,
                         dtype=torch.bfloat16)
            rows.append(step(f"call {name} 2048 ({call._prepared.segments[0].plan.route})",
                             lambda call=call: call(q, k, v)))
        batch, context, page = 64, 8192, 16
        pages_per = context // page
        tables = (torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                  torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages_per,
                  torch.randperm(batch * pages_per, generator=torch.Generator().manual_seed(0)).to(torch.int32).to("cuda"),
                  torch.full((batch,), page, dtype=torch.int32, device="cuda"))
        cache = tuple(torch.randn(batch * pages_per, page, 8, 128, dtype=torch.bfloat16).to("cuda") for _ in range(2))
        step_q = torch.randn(batch, 32, 128, dtype=torch.bfloat16).to("cuda")
        for what, mod in (("decode plan() causal, 64 x 8192", get_mask_fn("causal")),
                          ("decode plan() sliding_window(1024)", get_mask_fn("sliding_window", window_size=1024)),
                          ("decode plan() streaming(4, 1024)", get_mask_fn("streaming", sink_size=4, window_size=1024))):
            ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer")
            rows.append(step(what, lambda mod=mod, ours=ours: ours.plan(mod, *tables, 32, 8, 128, page,
                                                                        dtype=torch.bfloat16)))
            rows.append(step(what.replace("plan()", "run()"), lambda ours=ours: ours.run(step_q, cache)))
    if args.json:
        json.dump({"what": "device work of host steps, simulated CUDA device", "commit": source_commit(),
                   "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
