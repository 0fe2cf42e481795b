"""This library's own FlashInfer variants built with only the mask modes it passes them.

FlashInfer's generator for a custom prefill variant (gen_customize_batch_prefill_module) writes one
kernel file per mask mode - none, causal, custom bit mask, multi-item scoring - for the ragged and
for the paged kernel, each a full template instantiation, and the host code dispatches over all
four. This library asks its variants for fewer: never multi-item scoring, and on Hopper (fa3) only
no mask or causal (a bit mask goes to an fa2 launch); a module whose name ends in
only_mode_suffix(m) (native_copy's) with mode m alone. Every kernel file left out is compile work a
new score_mod or mask no longer waits for: half of an fa3 variant's kernel files, a quarter of an
fa2 one's (docs/design.md, "Compiling").

The module is FlashInfer's own generated code: the kernel files kept are byte for byte FlashInfer's;
the host's mask-mode switch (the DISPATCH_MASK_MODE its config uses) is replaced by one over the
kept modes that raises for any other, so a mode left out is an error, never a different kernel.
It has its own name (FlashInfer's, plus the kept modes), so it never stands in for a full module.
Only variants named by this library (uri "ffi_...") are built this way; every other FlashInfer
module, the native ones a prebuilt flashinfer-jit-cache provides included, is left as FlashInfer
builds it. A FlashInfer whose generated sources look different (another version) is left alone too.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import threading

OWN_URI_PREFIX = "ffi_"
# mask modes (FlashInfer's MaskMode) each backend's variants are asked for
KEPT_MODES = {"fa3": (0, 1), "fa2": (0, 1, 2)}
_MODE_NAMES = ("kNone", "kCausal", "kCustom", "kMultiItemScoring")
_KERNEL_FILE = re.compile(r"_kernel_mask_(\d)\.cu$")
_DISPATCH_CALL = "DISPATCH_MASK_MODE(mask_mode, MASK_MODE,"
_LEAN_DISPATCH = "FFI_DISPATCH_KEPT_MASK_MODES"
_ONLY_MODE = re.compile(r"_only_mode(\d)$")


def only_mode_suffix(mode: int) -> str:
    """The end of an own module's name that has it built with this one mask mode (native_copy: a
    launch runs one), instead of its backend's KEPT_MODES."""
    return f"_only_mode{int(mode)}"


def kept_modes(backend: str, uri: str):
    """The mask modes an own module of this name is built with (None: not one of this library's)."""
    if backend not in KEPT_MODES or not str(uri).startswith(OWN_URI_PREFIX):
        return None
    only = _ONLY_MODE.search(str(uri))
    return (int(only.group(1)),) if only else KEPT_MODES[backend]


def lean_dispatch_macro(modes) -> str:
    """A DISPATCH_MASK_MODE over `modes` alone; any other mode raises FlashInfer's error."""
    cases = "".join(f"    case MaskMode::{_MODE_NAMES[m]}: {{ constexpr MaskMode MASK_MODE = MaskMode::{_MODE_NAMES[m]}; "
                    f"__VA_ARGS__ break; }} \\\n" for m in modes)
    return (f"#define {_LEAN_DISPATCH}(mask_mode, MASK_MODE, ...) \\\n  switch (mask_mode) {{ \\\n{cases}"
            f"    default: {{ std::ostringstream err_msg; err_msg << \"flex_flash_infer built this module with "
            f"mask modes {', '.join(map(str, modes))} only, got \" << int(mask_mode); "
            f"FLASHINFER_ERROR(err_msg.str()); }} \\\n  }}\n")


def lean_config(text: str, modes) -> str | None:
    """FlashInfer's generated config with its mask-mode switch over `modes` only; None when the
    text is not the layout this knows (the switch used other than once)."""
    if text.count(_DISPATCH_CALL) != 1 or _LEAN_DISPATCH in text:
        return None
    call = f"{_LEAN_DISPATCH}(mask_mode, MASK_MODE,"
    head, sep, rest = text.partition("#pragma once\n")
    if not sep:
        return lean_dispatch_macro(modes) + text.replace(_DISPATCH_CALL, call)
    return head + sep + lean_dispatch_macro(modes) + rest.replace(_DISPATCH_CALL, call)


def _write_if_different(path: pathlib.Path, text: str) -> None:
    # an unchanged file keeps its time, so ninja does not rebuild what it already built; a new one
    # replaces the old whole (several processes or threads may generate the same module at once:
    # pytest-xdist, the warm-up's kernel sets, the demo's checks), so a compile never reads a
    # half-written file
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_SM90_BINDING = "batch_prefill_sm90_jit_binding.cu"
_SM90_CONFIG_INCLUDE = '#include "batch_prefill_sm90_config.inc"'
_BINDING_PARAMS = "batch_prefill_sm90_binding_params.inc"
_FUNC_PARAMS = re.compile(r"^#define ADDITIONAL_FUNC_PARAMS .*$", re.MULTILINE)


def light_binding(binding: str, config: str, lean_dir: pathlib.Path) -> str:
    """FlashInfer's fa3 binding file reading, of the config, only the macro its declarations use:
    the config pulls in the Hopper kernel headers (CUTLASS), which the binding - declarations and
    exports of the host functions, with tvm-ffi types - never uses. nvcc then takes a fraction of
    the time for it, with the same exported and undefined symbols (docs/benchmarks.md). The binding as it was when either is not the layout this knows."""
    params = _FUNC_PARAMS.findall(config)
    if binding.count(_SM90_CONFIG_INCLUDE) != 1 or len(params) != 1:
        return binding
    _write_if_different(lean_dir / _BINDING_PARAMS, f"#pragma once\n{params[0]}\n")
    return binding.replace(_SM90_CONFIG_INCLUDE, f'#include "{_BINDING_PARAMS}"')


def lean_spec(spec, modes):
    """FlashInfer's JitSpec of a prefill variant with the kernel files of `modes` alone, under its
    own name; the spec itself when its sources are not the layout this knows."""
    sources = [pathlib.Path(s) for s in spec.sources]
    kernel_modes = {s: int(m.group(1)) for s in sources if (m := _KERNEL_FILE.search(s.name))}
    if not kernel_modes or not set(modes) <= set(kernel_modes.values()):
        return spec
    gen_dir = next(iter(kernel_modes)).parent
    configs = list(gen_dir.glob("*config.inc"))
    if len(configs) != 1:
        return spec
    config = lean_config(configs[0].read_text(), modes)
    if config is None:
        return spec

    def kept(path):
        return path not in kernel_modes or kernel_modes[path] in modes

    name = f"{spec.name}_modes{''.join(map(str, modes))}"
    lean_dir = gen_dir.parent / name
    lean_dir.mkdir(parents=True, exist_ok=True)
    moved = {}
    for path in gen_dir.iterdir():
        if path.is_file() and kept(path):
            moved[path] = lean_dir / path.name
            text = config if path == configs[0] else path.read_text()
            if path.name == _SM90_BINDING:
                text = light_binding(text, config, lean_dir)
            _write_if_different(moved[path], text)
    changes = {"name": name, "sources": [moved.get(s, s) for s in sources if kept(s)]}
    by_source = getattr(spec, "extra_cuda_cflags_by_source", None)
    if by_source:
        changes["extra_cuda_cflags_by_source"] = {moved.get(pathlib.Path(k), k): v for k, v in by_source.items()}
    try:
        return dataclasses.replace(spec, **changes)
    except (TypeError, ValueError):
        return spec


def with_patched_headers(spec, args):
    """The spec with the patched FlashInfer headers its variant code asks for (patched_headers.MARKERS)
    first on its include path; the spec itself when it asks for none."""
    from . import patched_headers

    for name, marker in patched_headers.MARKERS.items():
        if any(isinstance(a, str) and marker in a for a in args):
            root = patched_headers.include_root(name)
            if root is None:   # the caller checks include_root() before it asks for such a module
                raise RuntimeError(f"flex_flash_infer: FlashInfer's headers here do not take the {name} patches")
            return dataclasses.replace(spec, extra_include_dirs=[root] + list(spec.extra_include_dirs or []))
    return spec


def _lean_generator(generate):
    @functools.wraps(generate)
    def generate_lean(backend, uri, *args, **kwargs):
        spec = generate(backend, uri, *args, **kwargs)
        modes = kept_modes(backend, uri)
        if modes is None:
            return spec
        return with_patched_headers(lean_spec(spec, modes), args)
    generate_lean.ffi_lean = True
    return generate_lean


_installed = False


def install() -> None:
    """Have FlashInfer build this library's variants lean (FlashInfer's other modules unchanged).
    VariantSpec.jit_args calls it, before any wrapper is given the arguments; once it has found
    FlashInfer's generator it does nothing more."""
    global _installed
    if _installed:
        return
    try:
        from flashinfer import prefill
    except Exception:   # no FlashInfer (or a stand-in without its modules): nothing to build
        return
    generate = getattr(prefill, "gen_customize_batch_prefill_module", None)
    if generate is not None and not getattr(generate, "ffi_lean", False):
        prefill.gen_customize_batch_prefill_module = _lean_generator(generate)
    _installed = True
