"""Calling user mask_mods / score_mods on broadcast index grids.

torch FlexAttention calls a mod on 0-d tensors under vmap; here the mod is called once on
broadcastable index tensors (b: [B,1,1,1], h: [1,H,1,1], q_idx: [..., Q, 1], kv_idx: [..., 1, KV]),
which evaluates ordinary elementwise mods identically and much faster. Indices are int32, as in
FlexAttention, and are always in range: padding never reaches a user's mod.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

INDEX_DTYPE = torch.int32


def count_positional_args(fn: Callable) -> int | None:
    """Positional parameters without defaults (FlexAttention's rule); None for *args."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(
        1 for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )


def as_mask_mod(fn: Callable, name: str = "mask_mod") -> Callable:
    """Accept mask_mod(b, h, q_idx, kv_idx) or the seed's mask_fn(q_idx, kv_idx)."""
    if not callable(fn):
        raise TypeError(f"{name} must be a callable mask_mod(b, h, q_idx, kv_idx) or mask_fn(q_idx, kv_idx), got {type(fn).__name__}")
    nargs = count_positional_args(fn)
    if nargs == 4 or nargs is None:
        return fn
    if nargs == 2:
        def seed_mask_mod(b, h, q_idx, kv_idx):
            return fn(q_idx, kv_idx)

        seed_mask_mod.__name__ = getattr(fn, "__name__", "mask_fn")
        seed_mask_mod.wrapped_mask_fn = fn
        return seed_mask_mod
    raise TypeError(
        f"{name} must take 4 arguments (b, h, q_idx, kv_idx) or 2 (q_idx, kv_idx); "
        f"{getattr(fn, '__name__', fn)!r} takes {nargs}"
    )


def check_score_mod(fn: Callable | None, name: str = "score_mod") -> Callable | None:
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"{name} must be a callable score_mod(score, b, h, q_idx, kv_idx), got {type(fn).__name__}")
    nargs = count_positional_args(fn)
    if nargs not in (5, None):
        raise TypeError(
            f"{name} must take 5 arguments (score, b, h, q_idx, kv_idx); {getattr(fn, '__name__', fn)!r} takes {nargs}"
        )
    return fn


def index_grid(b, h, q_idx, kv_idx, device):
    """Broadcastable int32 index tensors [B,1,1,1], [1,H,1,1], [1,1,Q,1], [1,1,1,KV]."""
    def as_index(x):
        return torch.as_tensor(x, dtype=INDEX_DTYPE, device=device)

    return (
        as_index(b).view(-1, 1, 1, 1),
        as_index(h).view(1, -1, 1, 1),
        as_index(q_idx).view(1, 1, -1, 1),
        as_index(kv_idx).view(1, 1, 1, -1),
    )


def call_mask_mod(mask_mod: Callable, b, h, q_idx, kv_idx) -> torch.Tensor:
    """The mod's own result on the index tensors (not broadcast), checked to be a bool tensor."""
    out = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out, device=q_idx.device)
    if out.dtype != torch.bool:
        raise TypeError(f"mask_mod {getattr(mask_mod, '__name__', mask_mod)!r} must return a bool tensor, got {out.dtype}")
    return out


def evaluate_mask_mod(mask_mod: Callable, b, h, q_idx, kv_idx) -> torch.Tensor:
    """The mask on the grid of the given indices, as a bool tensor broadcast to full shape."""
    shape = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
    out = call_mask_mod(mask_mod, b, h, q_idx, kv_idx)
    try:
        return out.expand(shape)
    except RuntimeError as e:
        raise ValueError(
            f"mask_mod {getattr(mask_mod, '__name__', mask_mod)!r} returned shape {tuple(out.shape)}, "
            f"which does not broadcast to the index grid {tuple(shape)}"
        ) from e


def evaluate_score_mod(score_mod: Callable, score, b, h, q_idx, kv_idx) -> torch.Tensor:
    out = score_mod(score, b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out, dtype=score.dtype, device=score.device)
    return out.to(score.dtype).expand(score.shape)


def mask_dependence(mask_mod: Callable, batch: int, heads: int, q_len: int, kv_len: int, device) -> tuple[bool, bool]:
    """Whether the mask can differ across batch entries and across heads.

    Decided structurally: the mod runs on a small grid with b and h as broadcast dims; a mod
    that never combines b (or h) into its result cannot grow that dim.
    """
    grid = index_grid(range(batch), range(heads), range(min(4, q_len)), range(min(4, kv_len)), device)
    out = mask_mod(*grid)
    if not isinstance(out, torch.Tensor):
        return False, False
    shape = (1,) * (4 - out.dim()) + tuple(out.shape)
    return shape[0] > 1, shape[1] > 1
