"""Host tables copied to the GPU without waiting for it.

torch's plain copy from ordinary (pageable) host memory synchronises the stream after it: the host
waits for every kernel queued before, in a server the previous step's. A plan that copies a table
that way cannot overlap the step before it. A copy from page-locked memory with non_blocking=True
is queued like a kernel instead, and torch's caching host allocator keeps the page-locked block
until the copy has run, so the source may go out of scope at once."""
from __future__ import annotations

import torch


def to_device_queued(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on device (as dtype, converted on the host first), the copy queued on the current stream;
    what reads it later on that stream sees it. A tensor already on the device, or a torch without
    CUDA (the CPU model), takes the plain copy."""
    device = torch.device(device)
    if dtype is not None:
        t = t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu" or not torch.backends.cuda.is_built():
        return t.to(device)
    if t.is_pinned():   # pin_memory() would hand back the caller's own buffer, read after we return
        t = t.clone()
    return t.pin_memory().to(device, non_blocking=True)
