"""What a host-side step asks of a GPU, counted without one: prepare() of a 32768-token causal
problem (the library's mask and a user's own `q >= kv`) and a decode step's
PagedFlexAttention.plan() (64 requests x 8192 keys, tables on the GPU), run on the simulated CUDA
device (tests/simulated_cuda.py) with FlashInfer's CPU model. Per step: operators that run on the
device (each a kernel launch or more), copies to the device, and reads back to the host (each a
wait for the GPU's queue: .cpu(), .item(), .tolist(), bool() of a device tensor). Issue 23's
plan() and prepare() targets are host times on a GPU machine, where these are what the CPU model
does not cost. What FlashInfer's CPU model does is left out: the real plan()'s own copies are FlashInfer's.

    PYTHONPATH=.:tests python scripts/device_ops.py [--json OUT.json]
"""
import argparse
import collections
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import simulated_cuda  # noqa: E402
from flexfuzz.simulated import simulated  # noqa: E402

READS_BACK = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero", "numpy"}


def _inside_flashinfer_model() -> bool:
    """True when FlashInfer's CPU model made the call: its work stands for FlashInfer's, not ours."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith("fake_flashinfer.py"):
            return True
        frame = frame.f_back
    return False


class Counting(simulated_cuda.SimCuda):
    def __init__(self):
        super().__init__()
        self.device_ops, self.to_device, self.reads = collections.Counter(), collections.Counter(), collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        out = super().__torch_function__(func, types, args, kwargs)
        if name == "__get__" or _inside_flashinfer_model():
            return out
        first = args[0] if args else None
        on_device = isinstance(first, simulated_cuda.Dev)
        lands_on_device = any(isinstance(t, simulated_cuda.Dev) for t in
                              (out if isinstance(out, (tuple, list)) else (out,)))
        if on_device and (name in READS_BACK or (name == "to" and not lands_on_device)):
            self.reads[name] += 1
        elif lands_on_device and not on_device and name in ("to", "cuda", "copy_", "tensor", "as_tensor"):
            self.to_device[name] += 1
        elif lands_on_device or (on_device and name.endswith("_")):
            self.device_ops[name] += 1
        return out


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
        batch, context, page = 64, 8192, 16
        pages_per = context // page
        tables = (torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                  torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages_per,
                  torch.randperm(batch * pages_per, generator=torch.Generator().manual_seed(0)).to(torch.int32).to("cuda"),
                  torch.full((batch,), page, dtype=torch.int32, device="cuda"))
        for what, mod in (("decode plan() causal, 64 x 8192", get_mask_fn("causal")),
                          ("decode plan() sliding_window(1024)", get_mask_fn("sliding_window", window_size=1024)),
                          ("decode plan() streaming(4, 1024)", get_mask_fn("streaming", sink_size=4, window_size=1024))):
            ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer")
            rows.append(step(what, lambda mod=mod, ours=ours: ours.plan(mod, *tables, 32, 8, 128, page,
                                                                        dtype=torch.bfloat16)))
    if args.json:
        json.dump({"what": "device work of host steps, simulated CUDA device", "commit": source_commit(),
                   "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
