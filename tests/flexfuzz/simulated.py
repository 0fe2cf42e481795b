"""The fuzzer's cases on a simulated CUDA device (tests/simulated_cuda.py): CPU tensors marked as on
the GPU, an operator that mixes them with host tensors raising as CUDA torch does, FlashInfer
replaced by its CPU model (tests/fake_flashinfer.py, which checks what the real wrappers do with
the tables they get: the devices and dtypes their plan() and kernels read). Host/device mixes in
the library's own code and in what it hands FlashInfer then fail on a machine without a GPU.

What the simulation patches (each an artifact of simulating, not a library path):
  * torch.cuda's queries: is_available, device_count, current_device (the library asks for the
    current GPU's index), is_current_stream_capturing, current_stream / stream / synchronize;
  * torch's own create_block_mask: it evaluates the mask_mod under vmap, whose C++ unwrapping
    drops the marker subclass, so its tables come back as host tensors; they are moved to the
    device asked for, as CUDA torch builds them there;
  * the column-merge Triton kernel (column_merge_triton, taken when q.is_cuda): its torch
    reference runs instead, after the check Triton makes (every pointer argument on the GPU), and
    kernel_available answers as for a GPU with triton (the route is taken);
  * the CPU model in place of flashinfer for backend="flashinfer" cases (cpu_model=True).
The float64 oracle runs on the marked tensors too (host/device mixes in the harness itself fail
the same way, as a case that is "invalid", not a library failure).
"""
from __future__ import annotations

import contextlib
import sys

import torch

_ACTIVE = [False]


def active() -> bool:
    """True inside simulated(): doors.run_case then runs backend='flashinfer' cases on the CPU model."""
    return _ACTIVE[0]


def _dev_check(what, *tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_cuda:
            raise RuntimeError(f"[simcuda] {what}: a host tensor {tuple(t.shape)} handed to a Triton kernel "
                               "(Pointer argument cannot be accessed from Triton (cpu tensor?))")


@contextlib.contextmanager
def simulated():
    """The simulated device for the duration: torch.cuda's queries answer as for one GPU, and
    every torch call goes through simulated_cuda's mode."""
    from simulated_cuda import simulated_cuda
    import torch.nn.attention.flex_attention as torch_flex
    from flex_flash_infer.backends import column_merge, flashinfer_backend
    from .cpu_model import Patch

    patch = Patch()
    cuda = torch.cuda
    patch.setattr(cuda, "is_available", lambda: True)
    patch.setattr(cuda, "device_count", lambda: 1)
    patch.setattr(cuda, "current_device", lambda: 0)
    patch.setattr(cuda, "is_current_stream_capturing", lambda: False)
    patch.setattr(cuda, "synchronize", lambda device=None: None)
    patch.setattr(cuda, "get_device_capability", lambda device=None: (9, 0))
    patch.setattr(cuda, "current_stream", lambda device=None: None)
    patch.setattr(cuda, "stream", lambda s=None: contextlib.nullcontext())

    real_create = torch_flex.create_block_mask

    def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, *args, **kwargs):
        mask = real_create(mask_mod, B, H, Q_LEN, KV_LEN, device, *args, **kwargs)
        return mask.to(device) if device is not None and torch.device(device).type == "cuda" else mask

    patch.setattr(torch_flex, "create_block_mask", create_block_mask)
    # torch's BlockMask slicing and transposing evaluate _ordered_to_dense under vmap too: on the
    # host, the result on the tables' device
    real_to_dense = torch_flex._ordered_to_dense

    def ordered_to_dense(num_blocks_in_row, col_indices, *args):
        device = col_indices.device
        return real_to_dense(num_blocks_in_row.cpu(), col_indices.cpu(), *args).to(device)

    patch.setattr(torch_flex, "_ordered_to_dense", ordered_to_dense)

    def kernel_available(device, head_dim):   # as on a GPU with triton installed
        return head_dim in (16, 32, 64, 128, 256)

    def merge_columns(out, lse2, q, k, v, positions, counts, scale, q_len):
        if q.is_cuda:   # merge_columns_triton's arguments, all read by pointer
            _dev_check("merge_columns_triton", out, lse2, q, k, v, positions, counts)
        column_merge.merge_columns_reference(out, lse2, q, k, v, positions, counts, scale, q_len)

    patch.setattr(column_merge, "kernel_available", kernel_available)
    patch.setattr(column_merge, "merge_columns", merge_columns)
    patch.setattr(flashinfer_backend, "merge_columns", merge_columns)
    _ACTIVE[0] = True
    try:
        with simulated_cuda():
            yield
    finally:
        _ACTIVE[0] = False
        patch.undo()
