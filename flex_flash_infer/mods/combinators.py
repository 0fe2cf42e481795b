"""Combine mask_mods: the same three helpers torch FlexAttention exports.

and_masks / or_masks also take the seed's two-argument mask_fn(q_idx, kv_idx) among their
arguments, and what they return is callable both ways, as get_mask_fn's masks (_seed_form.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core.mask_eval import as_mask_mod
from ._seed_form import seed_form

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def noop_mask(b, h, q_idx, kv_idx):
    """Every (query, key) pair is visible."""
    return b.new_ones(()).bool()


def _as_mask_mods(helper: str, mask_mods) -> tuple:
    if not all(callable(m) for m in mask_mods):
        raise TypeError(f"{helper}: every argument must be a callable mask_mod(b, h, q_idx, kv_idx) "
                        "or mask_fn(q_idx, kv_idx)")
    return tuple(as_mask_mod(m, f"{helper} argument") for m in mask_mods)


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A pair is visible when every mask_mod says so (no mods: all visible)."""
    mask_mods = _as_mask_mods("and_masks", mask_mods)

    def and_mask(b, h, q_idx, kv_idx):
        result = b.new_ones(()).bool()
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = "and_" + "_".join(getattr(m, "__name__", "mod") for m in mask_mods)
    return seed_form(and_mask)


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A pair is visible when any mask_mod says so (no mods: nothing visible)."""
    mask_mods = _as_mask_mods("or_masks", mask_mods)

    def or_mask(b, h, q_idx, kv_idx):
        result = b.new_zeros(()).bool()
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    or_mask.__name__ = "or_" + "_".join(getattr(m, "__name__", "mod") for m in mask_mods)
    return seed_form(or_mask)
