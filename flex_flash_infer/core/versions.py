"""Noticing in-place writes to a tensor: torch bumps its version counter on every one (a view's
writes included), the cheap way for a plan to see that a table it copied has changed."""
from __future__ import annotations

import torch


def version_of(t: torch.Tensor) -> int | None:
    """t's in-place write counter, or None for an inference tensor (made under
    torch.inference_mode(), which keeps none: a write to it there goes unnoticed)."""
    try:
        return t._version
    except RuntimeError:
        return None
