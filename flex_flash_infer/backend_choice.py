"""Pick the backend for a call: FlashInfer where it can run, the reference elsewhere."""
from __future__ import annotations

import torch

from .flashinfer_backend import unsupported_reason
from .notices import warn_once

BACKENDS = ("auto", "flashinfer", "reference")


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   head_dim_v: int, scale: float | None = None) -> str:
    check_backend_name(backend)
    if backend == "reference":
        return "reference"
    reason = unsupported_reason(device, dtype, head_dim, head_dim_v, scale)
    if backend == "flashinfer":
        if reason:
            raise ValueError(f"backend='flashinfer' cannot run this call: {reason}")
        return "flashinfer"
    if device.type != "cuda":
        return "reference"
    if reason:
        warn_once(f"flex_flash_infer: running on the slow reference backend because {reason}")
        return "reference"
    return "flashinfer"
