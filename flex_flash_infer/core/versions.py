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


def snapshot(tensors) -> tuple:
    """(tensor, its version) pairs: what a plan built from these tensors' values depends on."""
    return tuple((t, version_of(t)) for t in tensors)


def moved(pairs) -> list:
    """The tensors of a snapshot written in place since it was taken."""
    return [t for t, version in pairs or () if version_of(t) != version]
