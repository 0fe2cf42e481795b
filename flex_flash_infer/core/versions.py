"""Noticing in-place writes to a tensor: torch bumps its version counter on every one (a view's
writes included), the cheap way for a plan to see that a table it copied has changed."""
from __future__ import annotations

import weakref

import torch

from .notices import warn_once

# copies of a tensor on another device (mods/_captured.follow_device), by id: {id: (weak copy, source)}.
# A plan that read a copy depends on the source: a write to the source is what a user makes
_COPIES: dict = {}


def copied_from(copy: torch.Tensor, source: torch.Tensor) -> None:
    """Record that copy holds source's values (a plan reading copy is watched on source)."""
    key = id(copy)
    _COPIES[key] = (weakref.ref(copy, lambda _: _COPIES.pop(key, None)), source)


def source_of(t: torch.Tensor) -> torch.Tensor:
    entry = _COPIES.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else t


def version_of(t: torch.Tensor) -> int | None:
    """t's in-place write counter, or None for an inference tensor (made under
    torch.inference_mode(), which keeps none: a write to it there goes unnoticed)."""
    try:
        return t._version
    except RuntimeError:
        return None


def snapshot(tensors) -> tuple:
    """(tensor, its version) pairs: what a plan built from these tensors' values depends on (a
    copy on another device is watched on its source)."""
    return tuple((s, version_of(s)) for s in map(source_of, tensors))


def moved(pairs) -> list:
    """The tensors of a snapshot written in place since it was taken."""
    return [t for t, version in pairs or () if version_of(t) != version]


def unwatched(pairs) -> list:
    """The tensors of a snapshot that keep no version counter (inference tensors): a write to
    them cannot be noticed."""
    return [t for t, version in pairs or () if version is None]


def warn_unwatched(pairs, door: str, what: str, again: str) -> None:
    """Say once that a plan reads tensors whose writes cannot be noticed (made under
    torch.inference_mode()): the plan holds their values as planned."""
    if unwatched(pairs):
        warn_once(f"{door}: the {what} reads a tensor made under torch.inference_mode(), which keeps no write "
                  f"counter: a write to it after {again} cannot be noticed and runs the values it had then; "
                  f"call {again} again after changing it (or make the tensor outside inference_mode)")
