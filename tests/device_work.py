"""Counting what a step would ask of a GPU, on the simulated CUDA device (simulated_cuda.py):
operators that run on the device (each a kernel launch or more; views, no-ops and allocations
left out), copies to the device, and reads back to the host (each a wait for the GPU's queue).
What FlashInfer's CPU model does stands for FlashInfer's own work and is left out, as is the torch
stand-in of the key-column merge (one Triton kernel on a GPU). Used by scripts/device_ops.py and
tests/doors/test_device_work.py."""
import collections
import sys

import torch

import simulated_cuda

ALLOCATIONS = {"empty", "empty_like", "empty_strided"}   # memory from the caching allocator, no launch
READS_BACK = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero", "numpy"}


def _inside_flashinfer_model() -> bool:
    """True when FlashInfer's CPU model made the call (its work stands for FlashInfer's, not ours),
    or the column merge's torch stand-in (the one Triton launch it stands for is left out too)."""
    frame = sys._getframe(2)
    while frame is not None:
        # FlashInfer's model, and the torch stand-in of the key-column merge (one Triton kernel on a GPU)
        if frame.f_code.co_filename.endswith("fake_flashinfer.py") or frame.f_code.co_name == "merge_columns_reference":
            return True
        frame = frame.f_back
    return False


def _views_an_input(out, args, kwargs) -> bool:
    """True when the result shares memory with an argument: a view or a no-op (unsqueeze, basic
    indexing, .contiguous() of a contiguous tensor), which launches nothing."""
    from torch.utils._pytree import tree_flatten
    outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
           if isinstance(t, torch.Tensor) and t.numel()}
    return bool(outs) and all(t.numel() == 0 or t.untyped_storage().data_ptr() in ins for t in outs)


class Counting(simulated_cuda.SimCuda):
    def __init__(self):
        super().__init__()
        self.device_ops, self.to_device, self.reads = collections.Counter(), collections.Counter(), collections.Counter()
        # copies to the device that wait for the GPU: torch's plain copy from host memory
        # synchronises the stream after it (non_blocking=True from page-locked memory does not)
        self.waiting_copies = collections.Counter()

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
            if not (kwargs or {}).get("non_blocking") or not getattr(first, "_pinned_in_test", False):
                self.waiting_copies[name] += 1
        elif name in ALLOCATIONS:
            pass
        elif ((lands_on_device and not _views_an_input(out, args, kwargs))
              or (on_device and (name == "__setitem__" or (name.endswith("_") and not name.startswith("__"))))):
            self.device_ops[name] += 1   # a new result, or an in-place write
        return out
