"""Build FlashInfer's JIT modules for Hopper (sm_90a) on this CPU machine, ahead of a GPU session.

A lent GPU machine compiles every module it has not built (1-2 minutes each there): most of a
30-minute device session went to compiling. FlashInfer loads <package>/data/aot/<name>/<name>.so
instead of building when that file exists, and falls back to its own build (with a warning) when
the file does not load; scripts/gpu_env.sh copies .aot/ there.

The modules are the warm-up kinds' (flex_flash_infer/tools/warmup.py): FlashInfer's own kernels by the
parameters its wrappers pass, and the library's compiled variants by replaying each warm-up kind's
planning on the CPU against a recording stand-in for FlashInfer, which keeps the jit_args the
library hands it (their module names hash the generated code, so they must come from the code).

Run it through scripts/prebuild_kernels.sh, which supplies what this machine's toolchain lacks.
    bash scripts/prebuild_kernels.sh [--list] [--dtypes bf16] [--head-dims 128 64] [--only TEXT]
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import sys
import time
import types

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the library's compiled variants, as the warm-up kinds build them (bf16 and head_dim 128 first:
# the benchmarks' own); a kind not listed here compiles on the GPU as before
CUSTOM_KINDS = ("score_mod:softcap", "score_mod:alibi", "score_mod:rel_bias",
                "tile_variants:softcap", "score_mod:temperature", "score_mod:causal_decay",
                "score_mod:softcap+window", "tile_variants:rel_bias", "tile_variants:alibi+columns",
                "score_mod_fa2:rel_bias", "score_mod_fa2:softcap+window", "score_mod_fa2:alibi", "paged_mods")


class _Stop(Exception):
    """Raised where a recorded call would launch a kernel: planning is over by then."""


def _recording_flashinfer(recorded: list):
    """A stand-in for the flashinfer package that records (backend, jit_args) of every wrapper."""
    class Wrapper:
        def __init__(self, workspace, layout="NHD", backend="auto", jit_args=None, **_):
            if jit_args is not None:
                recorded.append((backend, list(jit_args)))

        def plan(self, *args, **kwargs):
            return None

        def run(self, *args, **kwargs):
            raise _Stop

    def stop(*args, **kwargs):
        raise _Stop

    stub = types.ModuleType("flashinfer")
    stub.BatchPrefillWithRaggedKVCacheWrapper = stub.BatchPrefillWithPagedKVCacheWrapper = Wrapper
    stub.BatchDecodeWithPagedKVCacheWrapper = Wrapper
    stub.single_prefill_with_kv_cache = stub.merge_state = stub.merge_state_in_place = stop
    stub.__version__ = "recording stand-in"
    return stub


@contextlib.contextmanager
def _planning_on_cpu_as_hopper(stub):
    """The library plans as on a Hopper GPU, on CPU tensors, against the stand-in (restored after)."""
    from flex_flash_infer.backends import backend_choice, flashinfer_backend, lto_score_mods
    from flex_flash_infer import paged, varlen

    saved_module = sys.modules.get("flashinfer")
    # the fa3 band score_mods record today's variant modules, whatever toolchain this machine has:
    # the device-LTO module is built per score_mod on the GPU machine from the generic objects
    # (scripts/lto_pack.py carries those), not by FlashInfer's prebuild
    patches = [(lto_score_mods, "lto_module", lambda *a: None),
               (flashinfer_backend, "unsupported_reason", lambda *a: None),
               (backend_choice, "unsupported_reason", lambda *a: None),
               (flashinfer_backend, "_is_hopper", lambda device: True),
               (paged, "_is_hopper", lambda device: True), (varlen, "_is_hopper", lambda device: True),
               (paged, "unsupported_reason", lambda *a: None)]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    sys.modules["flashinfer"] = stub
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        if saved_module is None:
            sys.modules.pop("flashinfer", None)
        else:
            sys.modules["flashinfer"] = saved_module


def custom_jit_args(kinds, dtype, head_dim) -> list:
    """(backend, jit_args) of every compiled variant the warm-up kinds build, in first-use order."""
    from flex_flash_infer.backends import flashinfer_backend
    from flex_flash_infer.tools.warmup import compile_score_mod, run_paged_mods, run_tile_variant

    recorded = []
    with _planning_on_cpu_as_hopper(_recording_flashinfer(recorded)):
        for kind in kinds:
            hopper = flashinfer_backend._is_hopper
            try:
                if kind.startswith(("score_mod:", "score_mod_fa2:")):
                    compile_score_mod(kind, dtype, head_dim, device="cpu")
                elif kind == "paged_mods":   # each case plans its own launches: record them all
                    run_paged_mods(dtype, head_dim, "cpu", run=False)
                else:   # as warmup.compile_one runs the tile kinds
                    q = torch.randn(1, 4, 600, head_dim, dtype=dtype)
                    run_tile_variant(kind, q, q[:, :2], q[:, :2])
            except _Stop:
                pass
            finally:
                flashinfer_backend._is_hopper = hopper   # compile_score_mod forces fa2 for its fa2 kinds
    unique = {}
    for backend, args in recorded:
        unique.setdefault(args[0], (backend, args))
    return list(unique.values())


def module_specs(dtypes, head_dims, kinds) -> list:
    """FlashInfer JitSpecs to build: its own kernels the library's routes and the benchmarks use,
    then the library's variants. Each getter is asked as FlashInfer's wrappers ask it; its build
    is intercepted, so the spec is exactly the one a GPU machine would build."""
    from flashinfer import decode, prefill
    from flashinfer.jit.core import JitSpec

    specs = {}
    original = JitSpec.build_and_load

    def keep(self, *args, **kwargs):
        specs.setdefault(self.name, self)
        raise _Stop

    def ask(getter, *args):
        try:
            getattr(getter, "__wrapped__", getter)(*args)
        except _Stop:
            pass

    JitSpec.build_and_load = keep
    try:
        # merge_state (cascade) and the mask bit packing (quantization): each route with partial
        # tiles or columns uses one of them, and run 11a compiled both on the GPU machine
        from flashinfer.jit.cascade import gen_cascade_module
        from flashinfer.jit.quantization import gen_quantization_module

        for spec in (gen_cascade_module(), gen_quantization_module()):
            specs.setdefault(spec.name, spec)
        for dtype in dtypes:
            for hd in head_dims:
                for swa in (False, True):
                    ask(prefill.get_single_prefill_module, "fa3", dtype, dtype, dtype, hd, hd, 0, swa, False, False)
                    for backend in ("fa3", "fa2"):
                        ask(prefill.get_batch_prefill_module, backend, dtype, dtype, dtype, torch.int32, hd, hd, 0,
                            swa, False, False)
                    ask(decode.get_batch_decode_module, dtype, dtype, dtype, torch.int32, hd, hd, 0, swa, False)
        dtype, hd = dtypes[0], head_dims[0]
        # the benchmarks' native score_mod rows: FlashInfer's soft cap (fa3) and ALiBi (fa2)
        ask(prefill.get_single_prefill_module, "fa3", dtype, dtype, dtype, hd, hd, 0, False, True, False)
        ask(prefill.get_single_prefill_module, "fa2", dtype, dtype, dtype, hd, hd, 2, False, False, False)
        # bench --decode's softcap case: FlashInfer's decode wrapper and fa3 paged prefill with a soft cap
        ask(decode.get_batch_decode_module, dtype, dtype, dtype, torch.int32, hd, hd, 0, False, True)
        ask(prefill.get_batch_prefill_module, "fa3", dtype, dtype, dtype, torch.int32, hd, hd, 0, False, True, False)
        # per-head windows in one launch: FlashInfer's window kernel against its patched headers
        from flex_flash_infer.backends import head_windows
        from flex_flash_infer.compile import patched_headers

        for sinks in (False, True):   # the windows' module and the sinks', each where its patches fit
            if patched_headers.include_root("window_sinks" if sinks else "head_windows") is not None:
                for dtype in dtypes:
                    for hd in head_dims:
                        ask(prefill.get_customize_batch_prefill_module, "fa3", *head_windows.jit_args(dtype, hd, sinks))
        # the tiles route's whole tiles: FlashInfer's ragged kernel gathering key tiles, patched
        from flex_flash_infer.backends import tile_gather

        if patched_headers.include_root("tile_gather") is not None:
            served = [hd for hd in head_dims if tile_gather.serves(torch.bfloat16, hd, tile_gather.TILE)]
            for dtype in dtypes:
                for hd in served:
                    ask(prefill.get_customize_batch_prefill_module, "fa3", *tile_gather.jit_args(dtype, hd))
            if served:   # and with FlashInfer's soft cap (the bench's softcap + random tiles row)
                ask(prefill.get_customize_batch_prefill_module, "fa3", *tile_gather.jit_args(dtypes[0], served[0], True))
        # FlashInfer's fa3 kernels as the library's one-mode copies (compile/native_copy.py), which run
        # where FlashInfer's own module is not built: the GPU tests of the copy force them (causal,
        # full, and causal with FlashInfer's soft cap; no window)
        from flex_flash_infer.compile import native_copy

        for dtype in dtypes[:1]:
            for hd in head_dims[:1]:
                for causal, cap in ((True, False), (False, False), (True, True)):
                    ask(prefill.get_customize_batch_prefill_module, "fa3", *native_copy.jit_args(dtype, hd, causal, False, cap))
        for dtype in dtypes:
            for hd in head_dims:
                for backend, args in custom_jit_args(kinds, dtype, hd):
                    ask(prefill.get_customize_batch_prefill_module, backend, *args)
    finally:
        JitSpec.build_and_load = original
    return list(specs.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--kinds", nargs="*", default=list(CUSTOM_KINDS), help="warm-up kinds whose variants to build")
    parser.add_argument("--only", default=None, help="build only modules whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the module names, build nothing")
    parser.add_argument("--out", default=str(ROOT / ".aot"))
    args = parser.parse_args(argv)
    specs = module_specs([DTYPES[d] for d in args.dtypes], args.head_dims, args.kinds)
    specs = [s for s in specs if args.only is None or args.only in s.name]
    out = pathlib.Path(args.out)
    for n, spec in enumerate(specs, 1):
        target = out / spec.name / f"{spec.name}.so"
        if args.list or target.exists():
            print(f"{n}/{len(specs)} {'built ' if target.exists() else ''}{spec.name}", flush=True)
            continue
        start = time.time()
        print(f"{n}/{len(specs)} building {spec.name}", flush=True)
        spec.build()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(spec.jit_library_path, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").rename(target)   # a stopped build leaves no half file under its name
        print(f"    {time.time() - start:.0f} s, {target.stat().st_size / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
