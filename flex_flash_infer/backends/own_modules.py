"""Build this library's own fa3 modules (FlashInfer's kernels against its patched headers) before a
plan relies on one, and fall back when one does not build here."""
from __future__ import annotations

import warnings

import torch

_UNBUILT = set()   # names of modules that failed to build here: FlashInfer's own kernels instead
_BUILT = set()     # names of modules built or loaded here: asked again, the answer stands


def _build(jit_args: list) -> None:
    import flashinfer

    get = getattr(getattr(flashinfer, "prefill", None), "get_customize_batch_prefill_module", None)
    if get is not None:
        get("fa3", *jit_args)


def builds(jit_args: list, what: str, instead: str) -> bool:
    """Whether the fa3 module of jit_args builds (or loads) here. FlashInfer caches it, so the
    wrapper that asks for it next finds it built; a FlashInfer without the module getter builds it
    in the wrapper instead. A module that does not build (no toolchain, or one that rejects the
    patched headers) is said once, naming `what` it is and what runs `instead`, and the caller
    runs FlashInfer's own kernels, which compute the same thing more slowly. Only the build's own
    errors count: any other (out of memory) is raised as it comes."""
    name = jit_args[0]
    if name in _BUILT:
        return True
    if name in _UNBUILT:
        return False
    try:
        _build(jit_args)
    except RuntimeError as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        _UNBUILT.add(name)
        warnings.warn(f"flex_flash_infer: {what} (FlashInfer's headers patched, module {name}) did not build, so "
                      f"{instead}: {str(e)[:500]}", RuntimeWarning, stacklevel=3)
        return False
    _BUILT.add(name)
    return True
