"""Patching for a fuzz run outside pytest: the planner switches a case sets, the recording of the
plans it makes, and on the CPU the CPU model of FlashInfer (tests/fake_flashinfer.py) in place of
the real module, as the glue tests' fixtures do with pytest's monkeypatch."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager

_MISSING = object()


class OutOfDate(LookupError):
    """A case names a planner switch the library no longer has."""


class Patch:
    """setattr / setitem that undo() restores, in reverse order; the two methods the fake's
    register_* helpers call on pytest's monkeypatch."""

    def __init__(self):
        self._undo = []

    def setattr(self, target, name, value):
        old = getattr(target, name, _MISSING)
        self._undo.append(lambda: delattr(target, name) if old is _MISSING else setattr(target, name, old))
        setattr(target, name, value)

    def setitem(self, mapping, key, value):
        old = mapping.get(key, _MISSING)
        self._undo.append(lambda: mapping.pop(key, None) if old is _MISSING else mapping.__setitem__(key, old))
        mapping[key] = value

    def undo(self):
        while self._undo:
            self._undo.pop()()


def _module(name: str):
    return importlib.import_module(f"flex_flash_infer.{name}")


def own_modules_answer(seed: int):
    """native_copy.flashinfer_has_its_own as on a machine where some of FlashInfer's own fa3
    modules are built (prebuilt, or met before) and others not: per configuration, by the seed.
    Then one plan can run some band launches on FlashInfer's own module and others on the
    library's one-mode copy (a band with a window and one without, say)."""
    import zlib

    def answer(dtype, head_dim, window, soft_cap):
        key = f"{seed}:{str(dtype)}:{int(head_dim)}:{bool(window)}:{bool(soft_cap)}"
        return bool(zlib.crc32(key.encode()) & 1)
    return answer


@contextmanager
def patched(switches: dict, cpu_model: bool, hopper: bool = True, own_modules: int = 0):
    """switches: {"module.NAME": value} for modules of flex_flash_infer. cpu_model: flashinfer is
    the CPU model, _is_hopper answers `hopper`, CPU tensors pass the FlashInfer backend's device
    check, and every compiled variant the plans generate runs its host-compiled code; own_modules:
    0, FlashInfer's own fa3 modules are not built (the model's answer), else the seed of
    own_modules_answer."""
    patch = Patch()
    try:
        for key, value in switches.items():
            module, name = key.rsplit(".", 1)
            if not hasattr(_module(module), name):
                raise OutOfDate(f"the library has no switch {key} any more: this case is out of date")
            patch.setattr(_module(module), name, value)
        if cpu_model:
            import fake_flashinfer
            from flex_flash_infer.backends import (backend_choice, flashinfer_backend, head_windows, score_mod_kernels,
                                                   tile_gather, tile_kernels)
            from flex_flash_infer import paged, varlen

            patch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
            for module in (flashinfer_backend, paged, varlen):
                patch.setattr(module, "_is_hopper", lambda device, _h=hopper: _h)
            # CPU tensors of any dtype pass; a scale the kernels cannot take is refused as on a GPU
            def scale_only(device, dtype, head_dim, head_dim_v, scale=None):
                return flashinfer_backend.scale_reason(scale)
            patch.setattr(backend_choice, "unsupported_reason", scale_only)
            # the patched window kernel as on a Hopper GPU whose FlashInfer takes the patches (the
            # model computes what it does: fake_flashinfer's head-window module)
            patch.setattr(head_windows, "available", lambda device, dtype, head_dim, sinks=False, _h=hopper: _h)
            # the tile-gather kernel likewise, at every dtype and head_dim the model draws (on a GPU
            # only 64 and 128, whose key tiles the patches make 128); its tiles must be 128 keys
            patch.setattr(tile_gather, "serves", lambda dtype, head_dim, block_kv, _h=hopper: _h and block_kv == 128)
            patch.setattr(paged, "unsupported_reason", scale_only)
            fake_flashinfer.register_paged_variants(patch, tile_kernels)
            fake_flashinfer.register_band_variants(patch, score_mod_kernels)
            if own_modules:
                from flex_flash_infer.compile import native_copy
                patch.setattr(native_copy, "flashinfer_has_its_own", own_modules_answer(own_modules))
        yield patch
    finally:
        patch.undo()


@contextmanager
def recording_plans():
    """Yields the list of FlashInferPlans that flex_attention makes or reuses, in call order."""
    from flex_flash_infer import api

    plans = []
    real = api.flashinfer_plan_for

    def recording(*args, **kwargs):
        plan = real(*args, **kwargs)
        plans.append(plan)
        return plan

    patch = Patch()
    patch.setattr(api, "flashinfer_plan_for", recording)
    try:
        yield plans
    finally:
        patch.undo()
