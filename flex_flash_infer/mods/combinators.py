"""Combine mask_mods: the same three helpers torch FlexAttention exports."""
from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def noop_mask(b, h, q_idx, kv_idx):
    """Every (query, key) pair is visible."""
    return b.new_ones(()).bool()


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A pair is visible when every mask_mod says so (no mods: all visible)."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError("and_masks: every argument must be a callable mask_mod(b, h, q_idx, kv_idx)")

    def and_mask(b, h, q_idx, kv_idx):
        result = b.new_ones(()).bool()
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = "and_" + "_".join(getattr(m, "__name__", "mod") for m in mask_mods)
    return and_mask


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A pair is visible when any mask_mod says so (no mods: nothing visible)."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError("or_masks: every argument must be a callable mask_mod(b, h, q_idx, kv_idx)")

    def or_mask(b, h, q_idx, kv_idx):
        result = b.new_zeros(()).bool()
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    or_mask.__name__ = "or_" + "_".join(getattr(m, "__name__", "mod") for m in mask_mods)
    return or_mask
