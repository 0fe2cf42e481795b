"""Which fa3 module a compiled score_mod's band launches run.

Where the score_mod fits the generic variant's slots (compile/lto_variants.py) and the device-LTO
toolchain is here, the module is the generic one: its kernel and host files are compiled once per
(dtype, head_dim, window flag) (GenericModule.build, the warm-up's "score_mod_generic" kind), and
a new score_mod costs only its small score file and the nvJitLink links, a fraction of a module
of its own (docs/benchmarks.md has the times). Otherwise - a score_mod with more tables, numbers or
hoisted values than the slots hold, or no nvcc / nvJitLink / CUDA link files - today's module of
the score_mod's own variant (variant.fa3_score_mod_variant), said once per reason as a warning.

Both modules compute the same thing (bit-identical on the H100: docs/benchmarks.md); the LTO one
takes the generic run arguments (lto_variants.run_arguments). Its kernels time as today's,
except a soft cap on a full (non-causal) mask, which is slower (not explained yet: docs/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
import threading
import warnings

import torch

from ..compile import lto_variants
from ..compile.codegen import graph_key
from ..core.trace import Graph

_LOCK = threading.Lock()     # one build of a module at a time in this process (threads share the caches)
_GENERIC = {}                # (dtype, head_dim, window flag) -> GenericModule
_LOADED = {}                 # module name -> LtoModule, loaded once per process
_SAID = set()                # fallback reasons already warned about


@dataclasses.dataclass(frozen=True)
class LtoModule:
    """A score_mod's LTO-linked module, loaded: `name` (the generic module's name + the score
    key) is FlashInfer's name for it (its custom ops are registered under it), `jit_args` the
    generic variant's arguments under that name, `loaded` what FlashInfer's JitSpec.load gave."""
    name: str
    jit_args: list
    loaded: object


def misfit(graph: Graph, position_bound: int | None) -> str | None:
    """Why the score_mod does not fit the generic variant, or None when it does."""
    try:
        lto_variants.slot_names(graph)
    except lto_variants.TooManyArguments as e:
        return str(e)
    hoisted = lto_variants.hoisted_bytes(graph, position_bound)
    if hoisted > lto_variants.STATE_BYTES:
        return f"score_mod hoists {hoisted} bytes of per-tile values; the generic state holds {lto_variants.STATE_BYTES}"
    return None


@functools.lru_cache(maxsize=None)
def toolchain_missing() -> str | None:
    """What of the device-LTO build is missing here (None: all there): nvcc, libnvJitLink at
    least as new as nvcc (it refuses newer LTO IR), the toolkit's fatbinary and link stub, nm
    and a host C++ compiler. Looked up once per process."""
    try:
        nvcc = shutil.which("nvcc") or str(lto_variants.cuda_file("bin", "nvcc"))
        for part in (("bin", "fatbinary"), ("bin", "crt", "link.stub"), ("include", "fatbinary_section.h")):
            lto_variants.cuda_file(*part)
        library = lto_variants.nvjitlink_library()
    except FileNotFoundError as e:
        return str(e)
    for tool in ("nm", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH"
    have = lto_variants._nvjitlink_version(library)
    need = tuple(int(x) for x in lto_variants._nvcc_version(nvcc)[:2])
    if have < need:
        return f"libnvJitLink {have} ({library}) is older than nvcc {need} ({nvcc})"
    return None


class LinkerTooOld(RuntimeError):
    """libnvJitLink is older than the nvcc that FlashInfer's build uses: nothing built, the
    score_mod takes its own module."""


@functools.lru_cache(maxsize=None)
def linker_too_old(nvcc: str) -> str | None:
    """Why libnvJitLink cannot link what this nvcc compiles (it refuses newer LTO IR), or None:
    asked of the nvcc FlashInfer's build uses (its build.ninja's: CUDA_HOME's before PATH's), which
    toolchain_missing's nvcc on PATH need not be."""
    library = lto_variants.nvjitlink_library()
    have = lto_variants._nvjitlink_version(library)
    need = tuple(int(x) for x in lto_variants._nvcc_version(nvcc)[:2])
    return f"libnvJitLink {have} ({library}) is older than nvcc {need} ({nvcc})" if have < need else None


def _say(reason: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        warnings.warn(f"flex_flash_infer: a compiled score_mod runs its own fa3 module (a full compile of "
                      f"FlashInfer's files) instead of the device-LTO one: {reason}", RuntimeWarning, stacklevel=4)


def generic_module(dtype: torch.dtype, head_dim: int, use_sliding_window: bool):
    """The GenericModule of (dtype, head_dim, window flag), one per process."""
    key = (dtype, int(head_dim), bool(use_sliding_window))
    if key not in _GENERIC:
        _GENERIC[key] = lto_variants.GenericModule(dtype, head_dim, use_sliding_window)
    return _GENERIC[key]


def build_generic(dtype: torch.dtype, head_dim: int, use_sliding_window: bool) -> None:
    """Compile the generic objects (the warm-up: a first score_mod then only links)."""
    with _LOCK:
        generic_module(dtype, head_dim, use_sliding_window).build()


def module_name(graph: Graph, position_bound: int | None, dtype, head_dim: int, use_sliding_window: bool) -> str:
    """FlashInfer's name for the score_mod's module: the generic module's name (its variant text,
    dtype, head_dim, window flag, mask modes) and the score key (the score file and the generic
    objects' names, which carry their compiler and flags)."""
    generic = generic_module(dtype, head_dim, use_sliding_window)
    return f"{generic.name}_{generic.score_key(graph, position_bound)}"


def build_module(graph: Graph, position_bound: int | None, dtype, head_dim: int, use_sliding_window: bool):
    """The score_mod's module, loaded: generic objects built if missing, its score file, the links
    and the .so (GenericModule.build_score_mod; each step skipped when its file is there), loaded
    with FlashInfer's loader."""
    generic = generic_module(dtype, head_dim, use_sliding_window)
    reason = linker_too_old(generic.nvcc)
    if reason is not None:
        raise LinkerTooOld(reason)
    return generic.spec.load(generic.build_score_mod(graph, position_bound))


def lto_module(graph: Graph, position_bound: int | None, dtype: torch.dtype, head_dim: int,
               use_sliding_window: bool) -> LtoModule | None:
    """The score_mod's LTO module (built and loaded on first use), or None with the reason warned
    (once) when it does not fit the generic slots or the toolchain is missing: the caller then
    builds today's module (as when the nvcc FlashInfer builds with is newer than libnvJitLink). A
    failing build with the toolchain here is raised, not hidden."""
    reason = misfit(graph, position_bound)
    if reason is not None:
        _say(f"{reason} (score_mod {graph_key(graph)})")
        return None
    reason = toolchain_missing()
    if reason is not None:
        _say(reason)
        return None
    with _LOCK:
        name = module_name(graph, position_bound, dtype, head_dim, use_sliding_window)
        if name not in _LOADED:
            try:
                loaded = build_module(graph, position_bound, dtype, head_dim, use_sliding_window)
            except LinkerTooOld as e:
                _say(str(e))
                return None
            jit_args = lto_variants.generic_spec().jit_args(name, dtype, head_dim, torch.int32, use_sliding_window)
            _LOADED[name] = LtoModule(name, jit_args, loaded)
        return _LOADED[name]
