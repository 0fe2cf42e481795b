"""Calling user mask_mods / score_mods on broadcast index grids.

torch FlexAttention calls a mod on 0-d tensors under vmap; here the mod is called once on
broadcastable index tensors (b: [B,1,1,1], h: [1,H,1,1], q_idx: [..., Q, 1], kv_idx: [..., 1, KV]),
which evaluates ordinary elementwise mods identically and much faster. Indices are int32, as in
FlexAttention, and are always in range: padding never reaches a user's mod.
"""
from __future__ import annotations

import inspect
import os
import traceback
import weakref
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
        if isinstance(x, range) and len(x):   # (an empty range: arange refuses one that runs backwards)
            # made on the device: a host list copied there waits for the GPU's queue to drain
            # (a pageable copy), so prepare() would stall behind the work queued before it
            return torch.arange(x.start, x.stop, x.step, dtype=INDEX_DTYPE, device=device)
        return torch.as_tensor(x, dtype=INDEX_DTYPE, device=device)

    return (
        as_index(b).view(-1, 1, 1, 1),
        as_index(h).view(1, -1, 1, 1),
        as_index(q_idx).view(1, 1, -1, 1),
        as_index(kv_idx).view(1, 1, 1, -1),
    )


def _name(fn) -> str:
    return repr(getattr(fn, "__name__", fn))


def _user_line(tb) -> str:
    """'file:line' of the innermost frame outside torch and this package: the mod's own line."""
    package = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    for frame in reversed(traceback.extract_tb(tb)):
        path = os.path.abspath(frame.filename)
        if not path.startswith((package + os.sep, torch_dir + os.sep)):
            return f" (at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line})"
    return ""


def call_mod(fn: Callable, kind: str, *args):
    """fn(*args), with Python control flow on a tensor explained: a mod sees whole index tensors,
    so `if q_idx >= kv_idx:` (or `and`, `or`, `not` on tensors) cannot pick one branch."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if "with more than one value is ambiguous" not in str(e):
            raise
        raise TypeError(
            f"{kind} {_name(fn)} uses a tensor as a Python bool{_user_line(e.__traceback__)}: an `if`, `and`, "
            "`or` or `not` on q_idx, kv_idx, b, h or the score. A mod computes every position at once, as under "
            "torch FlexAttention's vmap: write conditions with `&`, `|` and `~` (parenthesized: "
            "(q_idx >= kv_idx) & (q_idx - kv_idx < window)) and choose values with torch.where(condition, a, b)"
        ) from e


def call_mask_mod(mask_mod: Callable, b, h, q_idx, kv_idx) -> torch.Tensor:
    """The mod's own result on the index tensors (not broadcast), checked to be a bool tensor."""
    out = call_mod(mask_mod, "mask_mod", b, h, q_idx, kv_idx)
    if out is None:
        raise TypeError(f"mask_mod {_name(mask_mod)} returned None: it must return a bool tensor, e.g. "
                        "`return q_idx >= kv_idx` (is a `return` missing?)")
    if not isinstance(out, torch.Tensor):
        if not isinstance(out, bool):
            raise TypeError(f"mask_mod {_name(mask_mod)} must return a bool tensor, got {type(out).__name__}")
        out = torch.as_tensor(out, device=q_idx.device)
    if out.dtype != torch.bool:
        raise TypeError(f"mask_mod {_name(mask_mod)} must return a bool tensor, got {out.dtype}")
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
    """score_mod's scores, checked: a tensor (or a number) that broadcasts to the scores' shape
    and, when it has fewer elements than the scores, does not depend on them (a reduction over
    the scores, such as score.sum(-1, keepdim=True), broadcasts but is not a score_mod)."""
    # taken before the grid's call: a mod may write its score in place (score += bias)
    probes = _per_score_probes(score, b, h, q_idx, kv_idx) if _not_yet_checked(score_mod) else None
    out = call_mod(score_mod, "score_mod", score, b, h, q_idx, kv_idx)
    if out is None:
        raise TypeError(f"score_mod {_name(score_mod)} returned None: it must return the new scores, e.g. "
                        "`return score + bias[h]` (is a `return` missing?)")
    if not isinstance(out, torch.Tensor):
        if not isinstance(out, (bool, int, float)):
            raise TypeError(f"score_mod {_name(score_mod)} must return a tensor of scores, got {type(out).__name__}")
        out = torch.as_tensor(out, dtype=score.dtype, device=score.device)
    if tuple(out.shape) != tuple(score.shape):
        try:
            fits = torch.broadcast_shapes(out.shape, score.shape) == score.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"score_mod {_name(score_mod)} returned shape {tuple(out.shape)}, which does not "
                             f"broadcast to the scores' shape {tuple(score.shape)}")
        if _depends_on_score(score_mod, score, b, h, q_idx, kv_idx):
            raise ValueError(
                f"score_mod {_name(score_mod)} returned shape {tuple(out.shape)} for scores of shape "
                f"{tuple(score.shape)}, from the scores: a score_mod computes each score from its own (score, b, "
                "h, q_idx, kv_idx) alone, as under torch FlexAttention's vmap; a reduction over the scores (sum, "
                "mean, max, any over a dimension) is not one")
    out = out.to(score.dtype).expand(score.shape)
    if probes is not None:
        _check_per_score(score_mod, out, probes)
    return out


# score_mods that acted on each score alone once: a property of the function, asked once per object
_PER_SCORE: "weakref.WeakSet" = weakref.WeakSet()


def _not_yet_checked(score_mod) -> bool:
    try:
        return score_mod not in _PER_SCORE
    except TypeError:   # not weakly referable: asked at every evaluation
        return True


def _per_score_probes(score, b, h, q_idx, kv_idx) -> list:
    """(picker, that score's five inputs, cloned) of the first score, the last, and the first row's
    last: each is recomputed alone once the grid's scores are known (_check_per_score)."""
    if score.numel() <= 1:
        return []
    probes = []
    for ats in ((0, 0), (-1, -1), (0, -1)):
        def pick(t, ats=ats):   # position ats[1] along the key dim (the last), ats[0] along the others
            index = []
            for i, size in enumerate(t.shape):
                at = ats[1] if i == t.dim() - 1 else ats[0]
                index.append(slice(None) if size == 1 else slice(at, at + 1 or None))
            return t[tuple(index)]
        probes.append((pick, [pick(t).clone() for t in (score, b, h, q_idx, kv_idx)]))
    return probes


def _check_per_score(score_mod: Callable, out, probes) -> None:
    """Each probed score recomputed alone must come out as in the whole grid: a scan or a
    reduction kept at full shape (softmax, cumsum, s / s.amax(-1, keepdim=True)) mixes scores that
    torch's vmap hands a score_mod one at a time."""
    for pick, inputs in probes:
        own = call_mod(score_mod, "score_mod", *inputs)
        if not isinstance(own, torch.Tensor):
            own = torch.as_tensor(own, dtype=out.dtype, device=out.device)
        own, whole = own.to(out.dtype).reshape(-1)[:1], pick(out).reshape(-1)[:1]
        if own.numel() and not torch.allclose(own, whole, rtol=1e-5, atol=1e-6, equal_nan=True):
            where = tuple(int(t.reshape(-1)[0]) for t in inputs[1:])
            raise ValueError(
                f"score_mod {_name(score_mod)} gives {float(whole[0])!r} at (b, h, q_idx, kv_idx) = {where} "
                f"among the other scores but {float(own[0])!r} for that score alone: a score_mod computes each "
                "score from its own (score, b, h, q_idx, kv_idx) alone, as under torch FlexAttention's vmap; a "
                "scan or reduction over the scores (softmax, cumsum, score / score.amax(-1, keepdim=True)) is not one")
    try:
        _PER_SCORE.add(score_mod)
    except TypeError:
        pass


def _depends_on_score(score_mod: Callable, score, b, h, q_idx, kv_idx) -> bool:
    """Whether a result smaller than the scores changes with them (all zeros against all ones:
    any sum, mean, max or any() over them does)."""
    zeros = score_mod(torch.zeros_like(score), b, h, q_idx, kv_idx)
    ones = score_mod(torch.ones_like(score), b, h, q_idx, kv_idx)
    if not isinstance(zeros, torch.Tensor) or not isinstance(ones, torch.Tensor):
        return False
    return zeros.shape != ones.shape or not torch.equal(zeros, ones)


def mask_dependence(mask_mod: Callable, batch: int, heads: int, q_len: int, kv_len: int, device) -> tuple[bool, bool]:
    """Whether the mask can differ across batch entries and across heads.

    Decided structurally: the mod runs on a small grid with b and h as broadcast dims; a mod
    that never combines b (or h) into its result cannot grow that dim.
    """
    grid = index_grid(range(batch), range(heads), range(min(4, q_len)), range(min(4, kv_len)), device)
    out = call_mod(mask_mod, "mask_mod", *grid)
    if not isinstance(out, torch.Tensor):
        return False, False
    shape = (1,) * (4 - out.dim()) + tuple(out.shape)
    return shape[0] > 1, shape[1] > 1
