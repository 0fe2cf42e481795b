"""Pick the backend for a call: FlashInfer where it can run, the reference elsewhere."""
from __future__ import annotations

import torch

from .flashinfer_backend import unsupported_reason
from ..core.notices import warn_once
from ..planning.plan import FORCEABLE_ROUTES

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


# torch's BACKEND values pick among torch's own kernels: here they leave the choice to backend=
TORCH_BACKENDS = ("AUTO", "TRITON", "FLASH", "TRITON_DECODE")
OUR_BACKENDS = {"FLASHINFER": "flashinfer", "REFERENCE": "reference"}


def read_kernel_options(kernel_options, backend: str) -> tuple[str, str | None]:
    """(backend, route) from torch's per-call kernel_options: {"BACKEND": "FLASHINFER" or
    "REFERENCE"} picks the backend as backend= does, {"ROUTE": ...} forces a FlashInfer route
    (plan.FORCEABLE_ROUTES). torch's own keys (BLOCK_M, num_warps, its BACKEND values, ...) tune
    torch's kernels and change nothing here."""
    check_backend_name(backend)
    if kernel_options is None:
        return backend, None
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    wanted = kernel_options.get("BACKEND")
    if wanted is not None and wanted not in TORCH_BACKENDS:
        if wanted not in OUR_BACKENDS:
            raise ValueError(f"kernel_options['BACKEND'] must be one of {tuple(OUR_BACKENDS)} (or torch's "
                             f"{TORCH_BACKENDS}, which leave the choice to backend=), got {wanted!r}")
        if backend not in ("auto", OUR_BACKENDS[wanted]):
            raise ValueError(f"backend={backend!r} and kernel_options['BACKEND']={wanted!r} disagree")
        backend = OUR_BACKENDS[wanted]
    route = kernel_options.get("ROUTE")
    if route is not None:
        if route not in FORCEABLE_ROUTES:
            raise ValueError(f"kernel_options['ROUTE'] must be one of {FORCEABLE_ROUTES}, got {route!r}")
    return backend, route
