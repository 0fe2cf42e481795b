"""A mask_mod that is also the seed's two-argument mask_fn.

The seed calls library masks as ``mask_fn(q_idx, kv_idx)``; torch FlexAttention (and every part
of this project) calls them as ``mask_mod(b, h, q_idx, kv_idx)``. ``seed_form(mod)`` answers both:

- with four arguments it runs exactly ``mod``, so planners, torch's vmap and dynamo see the same
  mask;
- with two it runs ``mod`` at b = h = 0 and checks that the result did not take the dims of b
  or h: a mask that depends on them has no two-argument form, and saying so beats answering
  for batch 0, head 0.

Why an object and not a function: a function cannot take both 2 and 4 required positional
arguments, and torch's ``create_block_mask`` counts a function's ``__code__.co_argcount`` (it
must be 4). An object without ``__code__`` is judged by ``inspect.signature``, which follows
``__wrapped__`` to ``mod``'s four parameters (mask_eval.count_positional_args does the same).
``functools.update_wrapper`` copies ``mod``'s name and attributes; the lowering hints it states
(band_hint, key_columns_hint, document_ids ...) are passed on as stated (core/hints.py).

trace.py turns a function's captured numbers into kernel parameters by rebuilding its closure;
it does that for plain functions only, so under a trace this object hands it ``mod`` to
rebuild (same graph, same parameters as before the wrapping).
"""
from __future__ import annotations

import functools

import torch

from ..core import trace
from ..core.hints import pass_hints
from ..core.mask_eval import INDEX_DTYPE


class BatchOrHeadDependent(TypeError):
    """A mask that depends on b or h was called as mask_fn(q_idx, kv_idx)."""


def _for_active_trace(mod):
    """mod itself, or under trace.trace() the copy of mod whose captured numbers are parameters."""
    tracers = trace.active_tracers()
    if not tracers:
        return mod
    return trace._parametrize(mod, tracers[-1], {})


class SeedFormMask:
    """mod, callable as mask_mod(b, h, q_idx, kv_idx) and as mask_fn(q_idx, kv_idx)."""

    def __init__(self, mod):
        functools.update_wrapper(self, mod)
        pass_hints(self, mod)   # it computes what mod computes: mod's hints hold for it
        self._mask_mod = mod

    def __repr__(self):
        return f"<mask {getattr(self, '__name__', self._mask_mod)!r}: mask_fn(q_idx, kv_idx) or mask_mod(b, h, q_idx, kv_idx)>"

    def _usage(self, got: str) -> TypeError:
        return TypeError(f"mask {getattr(self, '__name__', self._mask_mod)!r} takes (q_idx, kv_idx) or "
                         f"(b, h, q_idx, kv_idx); got {got}")

    def __call__(self, *args, **kwargs):
        count = len(args) + len(kwargs)
        if count == 4:
            return _for_active_trace(self._mask_mod)(*args, **kwargs)
        if count != 2:
            raise self._usage(f"{count} arguments")
        bound = dict(zip(("q_idx", "kv_idx"), args), **kwargs)
        if set(bound) != {"q_idx", "kv_idx"}:
            raise self._usage(f"keywords {sorted(kwargs)}")
        return self._two_arguments(bound["q_idx"], bound["kv_idx"])

    def _two_arguments(self, q_idx, kv_idx):
        mod = _for_active_trace(self._mask_mod)
        if not isinstance(q_idx, torch.Tensor) and not isinstance(kv_idx, torch.Tensor):
            if isinstance(q_idx, int) and isinstance(kv_idx, int):
                q_idx = torch.tensor(q_idx, dtype=INDEX_DTYPE)
            else:
                # symbolic indices (trace.py): b and h are zeros of their kind. A trace has no
                # shapes to check; a mask that reads b or h is caught when it runs on tensors.
                zero = q_idx * 0
                return mod(zero, zero, q_idx, kv_idx)
        like = q_idx if isinstance(q_idx, torch.Tensor) else kv_idx
        q_idx, kv_idx = (torch.as_tensor(x, device=like.device) for x in (q_idx, kv_idx))
        dims = max(q_idx.dim(), kv_idx.dim())
        # b and h one dim wider than the indices: a result that reads either of them gains that dim
        zero = torch.zeros((1,) * (dims + 1), dtype=INDEX_DTYPE, device=like.device)
        out = mod(zero, zero, q_idx, kv_idx)
        if isinstance(out, torch.Tensor) and out.dim() > dims:
            raise BatchOrHeadDependent(
                f"mask {getattr(self, '__name__', self._mask_mod)!r} depends on the batch or head index, so it "
                "has no two-argument form: call it as mask_mod(b, h, q_idx, kv_idx)")
        return out


def seed_form(mod) -> SeedFormMask:
    """mod, callable as mask_mod(b, h, q_idx, kv_idx) and as mask_fn(q_idx, kv_idx)."""
    return mod if isinstance(mod, SeedFormMask) else SeedFormMask(mod)
