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


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (same shape, dtype, device) hold the same values, a NaN equal to itself
    (a table padded with NaN would otherwise never hold): floats compared bit for bit."""
    if a.dtype.is_floating_point and a.element_size() in _SAME_WIDTH_INT:
        width = _SAME_WIDTH_INT[a.element_size()]
        return torch.equal(a.view(width), b.view(width))
    return torch.equal(a, b)


def _memory(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()


class ReadState:
    """What a plan made from a mod's captured values depends on: the numbers its expression reads
    and each tensor it reads (a copy on another device stands for its source), with that
    tensor's memory and write counter. same_as() tells a plan that still holds from one that
    does not: a number changed, a tensor written in place, re-bound to another tensor, or its
    memory replaced (`.data =`); a tensor the mod makes again at each call with equal values
    (a constant built inside it), or a view made again of the same memory, still holds."""

    def __init__(self, scalars, tensors):
        self.scalars = tuple(scalars)
        self.tensors = [(t, _memory(t), version_of(t)) for t in map(source_of, tensors)]

    def watch(self) -> tuple:
        """Its tensors as a snapshot (moved() on it needs no trace: for run()'s hot path)."""
        return tuple((t, version) for t, _, version in self.tensors)

    def same_as(self, other: "ReadState | None") -> bool:
        if other is None or self.scalars != other.scalars or len(self.tensors) != len(other.tensors):
            return False
        for (a, a_mem, a_version), (b, b_mem, b_version) in zip(self.tensors, other.tensors):
            # the same memory (the same tensor, or a view of it made again): unwritten since (an
            # inference tensor, which keeps no counter, is taken as unchanged: plans warn once)
            if a_mem == b_mem and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride():
                if a_version != b_version:
                    return False
                continue
            if a is b or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
                return False   # memory replaced, or another tensor of another form
            if not same_values(a, b):   # made again: equal values hold
                return False
        return True



# the most bytes of read tensors a KeptReads copies to compare by value
KEPT_VALUES_BYTES = 64 << 20


class KeptReads:
    """A ReadState kept by a plan of values worked out on the CPU, with copies of the CPU tensors
    it reads: a write through `.data`, numpy or to an inference tensor moves no write counter, so
    holds() compares their values too (the reference backend is the oracle; torch evaluates the
    mask_mod anew at each call). Tensors off the CPU, where a comparison would wait for the
    device, are trusted by their write counters, as the FlashInfer path does. CPU tensors past
    KEPT_VALUES_BYTES are not copied: then `complete` is False, and a keeper that must notice
    every write keeps nothing.

    by_value: every tensor read is compared by value (all on the CPU, copied)."""

    def __init__(self, state: ReadState):
        self.state = state
        read = [t for t, _, _ in state.tensors]
        on_cpu = [t for t in read if t.device.type == "cpu"]
        small = sum(t.numel() * t.element_size() for t in on_cpu) <= KEPT_VALUES_BYTES
        self.copies = [t.detach().clone() if small and t.device.type == "cpu" else None for t in read]
        self.complete = small or not on_cpu
        self.by_value = small and len(on_cpu) == len(read)

    def holds(self, now: "ReadState | None") -> bool:
        if now is None or not now.same_as(self.state):
            return False
        return all(copy is None or same_values(t, copy) for (t, _, _), copy in zip(now.tensors, self.copies))
