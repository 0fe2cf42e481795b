"""A new score_mod's fa3 module by separate compilation and device LTO.

Today each score_mod gets its own FlashInfer variant module (variant.fa3_score_mod_variant): every
kernel file and both host files include the variant, so a new score_mod recompiles all of them,
about a minute of one core each. Here the heavy part is built once per (dtype, head_dim, window
flag, kept mask modes), independent of any score_mod:

  * a generic variant, FlexScoreModLto, whose LogitsTransform calls two extern __device__ functions
    (ffi_lto_score_init in the constructor, once per tile and head: the codegen's hoisted values;
    ffi_lto_score per score), and generic kernel arguments: GENERIC_TENSORS untyped table pointers,
    GENERIC_INTS int64 and GENERIC_FLOATS double numbers (a score_mod's tables, numbers, strides
    and sizes go into these slots), so FlashInfer's host files no longer depend on the score_mod;
  * its kernel files compiled once with -dc to LTO IR (code=lto_90a), its host files once to
    ordinary objects, with FlashInfer's own build.ninja flags for them.

A new score_mod then costs: its own small file (score_source: the same traced graph and codegen
as the normal variant) compiled -dc to LTO IR; per kernel file an nvJitLink LTO link
to an sm_90a cubin, where the score code is inlined (the study found the same SASS as the normal
build); fatbinary, nvcc's link stub and the host link into one .so.
nvJitLink, not nvcc -dlink: nvcc 13.0's nvlink emits .target sm_90 for lto_90a input, and ptxas
then refuses the wgmma instructions (benchmarks/results/cpu-2026-12-06g-lto-study).

On an H100: bit-identical to today's module (scripts/lto_launch_check.py, bf16 d128, ragged and
paged), and through the library's fa3 band launches (backends/lto_score_mods.py, test_gpu's lto
tests). The tiles route's paged variants still build today's.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import functools
import glob
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import torch

from . import lean_modules
from .codegen import PRELUDE, element_ctype, emit_expression, graph_key
from .variant import INPUT_NAMES, REQUEST_TABLES, SCALE_NAME, VariantSpec, hoisted_code
from ..core.trace import Graph

# Generic argument slots: a score_mod needing more falls back to today's per-score_mod module
# (TooManyArguments). Unused tensor slots are optional ("maybe_" names: FlashInfer passes null).
GENERIC_TENSORS, GENERIC_INTS, GENERIC_FLOATS = 4, 16, 8
STATE_BYTES = 128           # the hoisted values' storage in the variant object (registers once inlined)
VARIANT_NAME = "FlexScoreModLto"
INIT_FN, SCORE_FN = "ffi_lto_score_init", "ffi_lto_score"
# bump when the generic variant's text or the build below changes meaning: it is in the cache key
GENERIC_VERSION = 1


class TooManyArguments(ValueError):
    """The score_mod's captured values or hoisted state do not fit the generic slots."""


def tensor_slot(i: int) -> str:
    return f"maybe_ffi_t{i}"


def int_slot(i: int) -> str:
    return f"ffi_i{i}"


def float_slot(i: int) -> str:
    return f"ffi_f{i}"


def generic_arguments():
    """(tensor names, dtypes, scalar names, dtypes) of the generic variant, in FlashInfer's order."""
    tensors = list(REQUEST_TABLES) + [tensor_slot(i) for i in range(GENERIC_TENSORS)]
    tensor_dtypes = ["int32_t"] * len(REQUEST_TABLES) + ["void"] * GENERIC_TENSORS
    scalars = [SCALE_NAME] + [int_slot(i) for i in range(GENERIC_INTS)] + [float_slot(i) for i in range(GENERIC_FLOATS)]
    scalar_dtypes = ["double"] + ["int64_t"] * GENERIC_INTS + ["double"] * GENERIC_FLOATS
    return tensors, tensor_dtypes, scalars, scalar_dtypes


def params_struct(name: str = "FfiLtoParams") -> str:
    """The score file's copy of FlashInfer's AdditionalParams for the generic arguments: the same
    members in the same order (FlashInfer's generate_additional_params: tensors as pointers first,
    then scalars), so the score code reads the kernel's struct through a void pointer."""
    tensors, tensor_dtypes, scalars, scalar_dtypes = generic_arguments()
    members = [f"  {d}* {n};\n" for n, d in zip(tensors, tensor_dtypes)] + [
        f"  {d} {n};\n" for n, d in zip(scalars, scalar_dtypes)]
    return f"struct {name} {{\n{''.join(members)}}};\n"


_EXTERN_DECLS = f"""
// a score_mod's code, in its own file compiled to LTO IR and inlined by the device link (lto_variants.py)
struct FfiLtoState {{ alignas(16) unsigned char bytes[{STATE_BYTES}]; }};
extern "C" __device__ void {INIT_FN}(FfiLtoState* state, const void* additional_params, int b, int h);
extern "C" __device__ float {SCORE_FN}(float score, int b, int h, int q, int kv, bool padded,
                                       const FfiLtoState* state, const void* additional_params);
"""


def generic_variant_decl() -> str:
    """The variant FlashInfer's config gets: the normal fa3 variant's constructor and transform
    (variant.fa3_score_mod_variant) with the score_mod replaced by the two extern calls."""
    p = "params.additional_params."
    return f"""{_EXTERN_DECLS}
struct {VARIANT_NAME} : AttentionVariantBase {{
  float sm_scale_log2, sm_scale_;
  uint32_t qo_len_, kv_len_;
  int q0_, kv0_, b_;
  FfiLtoState state_;
  template <typename MainloopParams, typename BlockCoord>
  __device__ {VARIANT_NAME}(const MainloopParams& params, const BlockCoord& block_coord) {{
    auto [q_tile_idx, qo_head_idx, kv_head_idx, qo_indptr, kv_indptr, qo_len, kv_len, batch_idx] = block_coord;
    sm_scale_log2 = math::log2e;  // LogitsTransform returns scores already scaled
    sm_scale_ = float({p}{SCALE_NAME});
    qo_len_ = qo_len;
    kv_len_ = kv_len;
    q0_ = {p}ffi_req_q0[batch_idx];
    kv0_ = {p}ffi_req_kv0[batch_idx];
    b_ = {p}ffi_req_b[batch_idx];
    {INIT_FN}(&state_, &params.additional_params, b_, int(qo_head_idx));
  }}
  template <int NUM_ROWS_PER_THREAD>
  __device__ auto GetAttentionUpdater() {{ return OnlineSoftmax<NUM_ROWS_PER_THREAD, true>(sm_scale_log2); }}
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    // padded: the tile's tail past the lengths (fa3 masks it after this); the score code returns
    // -inf there only when it reads a table per score, else the test folds away once inlined
    return {SCORE_FN}(float(logits) * sm_scale_, b_, int(qo_head_idx), q0_ + int(qo_idx), kv0_ + int(kv_idx),
                      kv_idx >= kv_len_ || qo_idx >= qo_len_, &state_, &params.additional_params);
  }})
}};
"""


def generic_spec() -> VariantSpec:
    return VariantSpec(VARIANT_NAME, generic_variant_decl(), *generic_arguments())


def generic_uri(dtype: torch.dtype, head_dim: int, use_sliding_window: bool) -> str:
    """The generic module's name (lean_modules appends the kept mask modes): a hash of its
    variant text and slot counts, so a changed generic variant never reuses stale objects."""
    key = repr((GENERIC_VERSION, generic_variant_decl(), generic_arguments()))
    return (f"ffi_lto_{hashlib.sha256(key.encode()).hexdigest()[:12]}_{str(dtype).split('.')[-1]}_d{head_dim}_"
            f"{'swa' if use_sliding_window else 'noswa'}")


# --- the score_mod's own file -----------------------------------------------------------------

def slot_names(graph: Graph):
    """{graph tensor name: slot}, {scalar name: slot}, {(tensor, 'stride'|'size', dim): slot}:
    tables to tensor slots, int numbers, strides and sizes to int slots, float numbers to float
    slots, in graph_arguments' order (variant.py)."""
    tensors = {n: tensor_slot(i) for i, (n, _) in enumerate(graph.tensors)}
    ints = [n for n, k, _ in graph.scalars if k == "int"]
    floats = [n for n, k, _ in graph.scalars if k != "int"]
    dims = [(n, what, d) for what in ("stride", "size") for n, t in graph.tensors for d in range(t.dim())]
    if len(tensors) > GENERIC_TENSORS or len(ints) + len(dims) > GENERIC_INTS or len(floats) > GENERIC_FLOATS:
        raise TooManyArguments(f"score_mod needs {len(tensors)} tables, {len(ints) + len(dims)} ints, "
                               f"{len(floats)} floats; the generic variant has {GENERIC_TENSORS}, "
                               f"{GENERIC_INTS}, {GENERIC_FLOATS}")
    scalars = {n: int_slot(i) for i, n in enumerate(ints)}
    scalars.update({n: float_slot(i) for i, n in enumerate(floats)})
    shape = {key: int_slot(len(ints) + i) for i, key in enumerate(dims)}
    return tensors, scalars, shape


def run_arguments(graph: Graph, tensors: list, scalars: list, scale: float) -> list:
    """What a FlashInfer wrapper's run() takes after q, k, v (and the three request tables) for the
    generic variant: the tensor slots (None where unused: FlashInfer passes null for "maybe_"
    names), the scale, then the int and the float slots, in generic_arguments' order, each as the
    type its slot is declared (int64 / double)."""
    out_t, ints, floats = slot_values(graph, tensors, scalars)
    return [*out_t, float(scale), *(int(v) for v in ints), *(float(v) for v in floats)]


def slot_values(graph: Graph, tensors: list, scalars: list):
    """The generic arguments' values (tensor slots, int slots, float slots; unused: None / 0) from
    variant.graph_values' (tensors, numbers + strides + sizes), for a later wiring."""
    t_slots, s_slots, shape = slot_names(graph)
    values = dict(zip([n for n, _, _ in graph.scalars] + list(shape), scalars))
    out_t = list(tensors) + [None] * (GENERIC_TENSORS - len(tensors))
    ints, floats = [0] * GENERIC_INTS, [0.0] * GENERIC_FLOATS
    for name, slot in list(s_slots.items()) + list(shape.items()):
        i = int(slot[len("ffi_i"):] if slot.startswith("ffi_i") else slot[len("ffi_f"):])
        (ints if slot.startswith("ffi_i") else floats)[i] = values[name]
    return out_t, ints, floats


def score_source(graph: Graph, position_bound: int | None = None) -> str:
    """The score_mod's file: PRELUDE, the generic params struct, and the two extern functions,
    written by the normal variant's emit_expression (hoisting what depends on b and h only into
    the per-tile init, as the normal variant's constructor does)."""
    t_slots, s_slots, shape = slot_names(graph)
    element = {n: element_ctype(t) for n, t in graph.tensors}
    hoisted = []
    expr = emit_expression(graph, scalar_ref=lambda n: f"p.{s_slots[n]}",
                           tensor_ref=lambda n: f"static_cast<const {element[n]}*>(p.{t_slots[n]})",
                           stride_ref=lambda n, d: f"p.{shape[n, 'stride', d]}",
                           size_ref=lambda n, d: f"p.{shape[n, 'size', d]}", input_ref=INPUT_NAMES.__getitem__,
                           hoisted=hoisted, invariant_inputs=("b", "h"), position_bound=position_bound)
    members, _ = hoisted_code(hoisted)
    computed = "".join(f"  {c} {n} = {code};\n  s.{n} = {n};\n" for n, c, code in hoisted)
    reloaded = "".join(f"  {'' if c.startswith('const ') else 'const '}{c} {n} = s.{n};\n  (void){n};\n"
                       for n, c, _ in hoisted)
    guard = "  if (ffi_pad) return -INFINITY;\n" if "[" in expr else "  (void)ffi_pad;\n"
    return f"""// score_mod {graph_key(graph)} for the generic fa3 variant {VARIANT_NAME} (lto_variants.py)
#include <cstdint>
#include <cmath>
{PRELUDE}
{params_struct()}struct FfiLtoState {{ alignas(16) unsigned char bytes[{STATE_BYTES}]; }};
struct FfiHoisted {{
{members}}};
static_assert(sizeof(FfiHoisted) <= sizeof(FfiLtoState), "hoisted values exceed the generic state");
extern "C" __device__ void {INIT_FN}(FfiLtoState* state, const void* additional_params, int ffi_b, int ffi_h) {{
  const FfiLtoParams& p = *static_cast<const FfiLtoParams*>(additional_params);
  FfiHoisted& s = *reinterpret_cast<FfiHoisted*>(state->bytes);
  (void)p; (void)s; (void)ffi_b; (void)ffi_h;
{computed}}}
extern "C" __device__ float {SCORE_FN}(float ffi_score, int ffi_b, int ffi_h, int ffi_q, int ffi_kv, bool ffi_pad,
                                       const FfiLtoState* state, const void* additional_params) {{
{guard}  const FfiLtoParams& p = *static_cast<const FfiLtoParams*>(additional_params);
  const FfiHoisted& s = *reinterpret_cast<const FfiHoisted*>(state->bytes);
  (void)p; (void)s; (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;
{reloaded}  return ({expr});
}}
"""


def hoisted_bytes(graph: Graph, position_bound: int | None = None) -> int:
    """An upper bound of the hoisted state's size (8 bytes a value), checked before compiling."""
    hoisted = []
    t_slots, s_slots, shape = slot_names(graph)
    emit_expression(graph, scalar_ref=str, tensor_ref=str, stride_ref=lambda n, d: "x", size_ref=lambda n, d: "x",
                    input_ref=INPUT_NAMES.__getitem__, hoisted=hoisted, invariant_inputs=("b", "h"),
                    position_bound=position_bound)
    return 8 * len(hoisted)


def score_key(graph: Graph, position_bound: int | None) -> str:
    """The score file's own identity (code generator included); GenericModule.score_key adds the
    generic objects it is linked with."""
    return hashlib.sha256(score_source(graph, position_bound).encode()).hexdigest()[:16]


# --- the toolchain ----------------------------------------------------------------------------

def _cuda_homes():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes += [str(pathlib.Path(nvcc).parent.parent), str(pathlib.Path(nvcc).resolve().parent.parent)]
    homes += ["/usr/local/cuda"]
    return [pathlib.Path(h) for h in homes if h]


def cuda_file(*parts) -> pathlib.Path:
    """A file of the CUDA toolkit (fatbinary, crt/link.stub, fatbinary_section.h)."""
    for home in _cuda_homes():
        for sub in ("", "targets/x86_64-linux"):
            path = home / sub / pathlib.Path(*parts) if sub else home / pathlib.Path(*parts)
            if path.exists():
                return path
    raise FileNotFoundError(f"CUDA toolkit file {'/'.join(parts)} not found under {_cuda_homes()}")


def nvjitlink_library() -> str:
    """libnvJitLink: the nvidia-nvjitlink wheel (torch's CUDA dependency) first, then the toolkit."""
    # FFI_NVJITLINK: a carried one (lto_pack), a candidate like the others (the newest wins)
    found = [p for p in [os.environ.get("FFI_NVJITLINK")] if p and os.path.exists(p)]
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvJitLink.so*")))
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "nvjitlink", "lib", "libnvJitLink.so*")))
    for home in _cuda_homes():
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            found += sorted(glob.glob(str(home / lib / "libnvJitLink.so*")))
    if not found:
        raise FileNotFoundError("libnvJitLink not found: install nvidia-nvjitlink (CUDA 13) or set CUDA_HOME")
    # the newest: nvJitLink refuses LTO IR from an nvcc newer than itself
    return max(found, key=lambda path: (_nvjitlink_version(path), -found.index(path)))


def _nvjitlink_version(path: str):
    try:
        lib = ctypes.CDLL(path)
        major, minor = ctypes.c_uint(), ctypes.c_uint()
        return (major.value, minor.value) if lib.nvJitLinkVersion(ctypes.byref(major), ctypes.byref(minor)) == 0 else (0, 0)
    except (OSError, AttributeError):
        return (0, 0)


def nvjitlink(inputs, out: pathlib.Path, options) -> str:
    """LTO-link objects holding LTO IR into a cubin with nvJitLink (ctypes); returns its info log.
    ctypes drops the GIL in the calls, so links on several threads run side by side."""
    lib = ctypes.CDLL(nvjitlink_library())
    handle = ctypes.c_void_p()
    opts = [o.encode() for o in options]

    def log(getsize, get):
        n = ctypes.c_size_t()
        getsize(handle, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value + 1)
        get(handle, buf)
        return buf.value.decode(errors="replace")

    def check(rc, what):
        if rc:
            raise RuntimeError(f"nvJitLink {what} failed ({rc}): "
                               f"{log(lib.nvJitLinkGetErrorLogSize, lib.nvJitLinkGetErrorLog)[:4000]}")
    check(lib.nvJitLinkCreate(ctypes.byref(handle), len(opts), (ctypes.c_char_p * len(opts))(*opts)), "create")
    try:
        for path in inputs:
            check(lib.nvJitLinkAddFile(handle, 10, str(path).encode()), f"add {path}")  # NVJITLINK_INPUT_ANY
        check(lib.nvJitLinkComplete(handle), "link")
        n = ctypes.c_size_t()
        check(lib.nvJitLinkGetLinkedCubinSize(handle, ctypes.byref(n)), "cubin size")
        buf = ctypes.create_string_buffer(n.value)
        check(lib.nvJitLinkGetLinkedCubin(handle, buf), "cubin")
        _write_bytes(out, buf.raw)
        return log(lib.nvJitLinkGetInfoLogSize, lib.nvJitLinkGetInfoLog)
    finally:
        lib.nvJitLinkDestroy(ctypes.byref(handle))


def _write_bytes(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)   # concurrent builders never see half a file


def _run(cmd, cwd=None) -> None:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:2000]}\nfailed ({done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")


def _built(out: pathlib.Path, cmd_out: pathlib.Path, build) -> pathlib.Path:
    """build(tmp) writes tmp, then it becomes out (atomic); skipped when out is there already."""
    if out.exists():
        return out
    tmp = cmd_out.with_name(f".{cmd_out.name}.{os.getpid()}.{threading.get_ident()}.tmp{cmd_out.suffix}")
    build(tmp)
    os.replace(tmp, out)
    return out


def ninja_flags(ninja_text: str) -> dict:
    """cuda_cflags and ldflags of FlashInfer's build.ninja, variables expanded."""
    text = ninja_text.replace("$\n", " ")
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s*=\s*(.*)$", line)
        if m:
            values[m.group(1)] = re.sub(r"\$(\w+)", lambda v: values.get(v.group(1), ""), m.group(2)).split()
            values[m.group(1)] = " ".join(values[m.group(1)])
    return {k: values.get(k, "").split() for k in ("cuda_cflags", "ldflags", "nvcc")}


LTO_GENCODE = "-gencode=arch=compute_90a,code=lto_90a"
# nvJitLink does not take the modules' -use_fast_math from the IR: its parts, given again
FAST_MATH_LINK = ["-ftz=1", "-prec-div=0", "-prec-sqrt=0", "-fma=1"]


class GenericModule:
    """The score_mod-independent part for one (dtype, head_dim, window flag): FlashInfer's
    generated sources of the generic variant (lean: the kept mask modes only) and their objects,
    under FlashInfer's JIT workspace, built once."""

    def __init__(self, dtype=torch.bfloat16, head_dim: int = 128, use_sliding_window: bool = False,
                 idtype=torch.int32):
        from flashinfer import prefill

        lean_modules.install()
        uri = generic_uri(dtype, head_dim, use_sliding_window)
        args = generic_spec().jit_args(uri, dtype, head_dim, idtype, use_sliding_window)
        self.spec = prefill.gen_customize_batch_prefill_module("fa3", *args)
        self.spec.write_ninja()
        flags = ninja_flags(self.spec.ninja_path.read_text())
        self.nvcc = flags["nvcc"][0] if flags["nvcc"] else "nvcc"
        self.cuda_cflags, self.ldflags = flags["cuda_cflags"], flags["ldflags"]
        self.name, self.build_dir = self.spec.name, pathlib.Path(self.spec.build_dir)
        sources = [pathlib.Path(s) for s in self.spec.sources]
        self.kernel_sources = [s for s in sources if "_kernel_mask_" in s.name]
        self.host_sources = [s for s in sources if s not in self.kernel_sources]
        self.sources_tag = _sources_tag(sources)

    def lto_flags(self) -> list:
        """FlashInfer's flags for these files, but -dc and LTO IR instead of sm_90a SASS."""
        flags = [f for f in self.cuda_cflags if not f.startswith(("-gencode", "--generate-code"))]
        return flags + [LTO_GENCODE, "-dc"]

    def link_options(self) -> list:
        fast = "-use_fast_math" in self.cuda_cflags or "--use_fast_math" in self.cuda_cflags
        return ["-arch=sm_90a", "-lto"] + (FAST_MATH_LINK if fast else [])

    def _flags_tag(self, flags) -> str:
        # objects are reused whenever present (no ninja here): their names carry the compiler, its
        # flags and what they are compiled from, so another toolkit or flag set builds new ones
        # (nvJitLink refuses IR newer than itself, and mixed IR versions are untested), and so do
        # changed generated sources (a change of lean_modules' rewrite or of FlashInfer's generator)
        return hashlib.sha256(repr((_nvcc_version(self.nvcc), flags, self.sources_tag)).encode()).hexdigest()[:8]

    def kernel_object(self, source: pathlib.Path) -> pathlib.Path:
        return self.build_dir / f"{self.name}_{source.stem}.{self._flags_tag(self.lto_flags())}.lto.o"

    def host_object(self, source: pathlib.Path) -> pathlib.Path:
        return self.build_dir / f"{self.name}_{source.stem}.{self._flags_tag(self.cuda_cflags)}.cuda.o"

    def compile_jobs(self):
        """(object, command builder) of every file not built yet: kernel files to LTO IR, host
        files as FlashInfer builds them."""
        jobs = []
        for s in self.kernel_sources:
            jobs.append((self.kernel_object(s), lambda tmp, s=s: [self.nvcc, *self.lto_flags(), "-c", s, "-o", tmp]))
        for s in self.host_sources:
            jobs.append((self.host_object(s), lambda tmp, s=s: [self.nvcc, *self.cuda_cflags, "-c", s, "-o", tmp]))
        return [(o, c) for o, c in jobs if not o.exists()]

    def build(self, jobs: int | None = None, timings: dict | None = None) -> None:
        """Compile what is missing, jobs files at a time (FlashInfer's MAX_JOBS, else the cores)."""
        jobs = jobs or int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        # one process builds them, the others wait and find them built (the warm-up's kinds and
        # pytest-xdist workers start side by side; each object is a minute of one core)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        with open(self.build_dir / ".ffi_lto_generic.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _parallel([(o.name, lambda o=o, c=c: _built(o, o, lambda tmp: _run(c(tmp))))
                       for o, c in self.compile_jobs()], jobs, timings)

    def objects(self):
        return [self.kernel_object(s) for s in self.kernel_sources], [self.host_object(s) for s in self.host_sources]

    # --- per score_mod ------------------------------------------------------------------------

    def score_dir(self, key: str) -> pathlib.Path:
        d = self.build_dir / "scores" / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def score_key(self, graph: Graph, position_bound: int | None = None) -> str:
        """The per-score_mod module's key: its score file's text and the generic objects it links
        (their names carry their compiler and flags)."""
        return hashlib.sha256(repr((score_source(graph, position_bound), [o.name for objs in self.objects()
                                                                          for o in objs])).encode()).hexdigest()[:16]

    def library_path(self, key: str) -> pathlib.Path:
        """Where FlashInfer looks for a module named {generic}_{key} (JitSpec.jit_library_path), so
        a JitSpec of that name finds it compiled and only loads it."""
        name = f"{self.name}_{key}"
        (self.build_dir.parent / name).mkdir(parents=True, exist_ok=True)
        return self.build_dir.parent / name / f"{name}.so"

    def compile_score(self, graph: Graph, position_bound: int | None = None) -> tuple[str, pathlib.Path]:
        """(key, LTO object) of the score_mod's own file."""
        if hoisted_bytes(graph, position_bound) > STATE_BYTES:
            raise TooManyArguments(f"score_mod hoists more than {STATE_BYTES} bytes of per-tile values")
        source = score_source(graph, position_bound)
        key = self.score_key(graph, position_bound)
        d = self.score_dir(key)
        cu = d / "score_mod.cu"
        if not cu.exists():
            _write_bytes(cu, source.encode())
        obj = d / "score_mod.lto.o"
        _built(obj, obj, lambda tmp: _run([self.nvcc, *self.lto_flags(), "-c", cu, "-o", tmp]))
        return key, obj

    def link_kernels(self, key: str, score_object: pathlib.Path, jobs: int | None = None,
                     timings: dict | None = None) -> list:
        """One nvJitLink LTO link per kernel file (its own cubin and registration), side by side."""
        jobs = jobs or int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        d = self.score_dir(key)
        kernel_objects, _ = self.objects()
        cubins = [d / f"{s.stem}.cubin" for s in self.kernel_sources]
        _parallel([(c.name, lambda o=o, c=c: _built(c, c, lambda tmp: nvjitlink([o, score_object], tmp,
                                                                                  self.link_options())))
                   for o, c in zip(kernel_objects, cubins)], jobs, timings)
        return cubins

    def registration_object(self, kernel_object: pathlib.Path, cubin: pathlib.Path) -> pathlib.Path:
        """What nvcc -dlink makes for one -rdc object: its linked cubin as an embedded fatbin, and
        nvcc's link stub defining the object's __cudaRegisterLinkedBinary_<id>, which registers the
        cubin at load. The score file's object holds no host code and is not linked into the .so."""
        ids = re.findall(r"\bU (__cudaRegisterLinkedBinary_\S+)", subprocess.run(
            ["nm", str(kernel_object)], capture_output=True, text=True, check=True).stdout)
        if len(ids) != 1:
            raise RuntimeError(f"{kernel_object}: expected one __cudaRegisterLinkedBinary reference, got {ids}")
        stem = cubin.with_suffix("")
        reg, fatbin, obj = (pathlib.Path(f"{stem}.reg.c"), pathlib.Path(f"{stem}.fatbin.c"),
                            pathlib.Path(f"{stem}.dlink.o"))
        reg.write_text(f"#define NUM_PRELINKED_OBJECTS 1\nDEFINE_REGISTER_FUNC({ids[0][len('__cudaRegisterLinkedBinary'):]})\n")
        compress = ["-compress-all"] if "-Xfatbin=-compress-all" in self.cuda_cflags else []
        _run([cuda_file("bin", "fatbinary"), "-64", *compress, "--ident=ffi_lto", "-link",
              f"--image3=kind=elf,sm=90a,file={cubin}", f"--embedded-fatbin={fatbin}"])
        major, minor, build = _nvcc_version(self.nvcc)
        _run(["c++", "-D__CUDA_ARCH_LIST__=900", "-c", "-x", "c++", f'-DFATBINFILE="{fatbin}"',
              f'-DREGISTERLINKBINARYFILE="{reg}"', "-D__NV_EXTRA_INITIALIZATION=", "-D__NV_EXTRA_FINALIZATION=",
              "-D__CUDA_INCLUDE_COMPILER_INTERNAL_HEADERS__", "-fPIC", "-Wno-psabi",
              f"-I{cuda_file('include', 'fatbinary_section.h').parent}",
              f"-D__CUDACC_VER_MAJOR__={major}", f"-D__CUDACC_VER_MINOR__={minor}", f"-D__CUDACC_VER_BUILD__={build}",
              f"-D__CUDA_API_VER_MAJOR__={major}", f"-D__CUDA_API_VER_MINOR__={minor}",
              "-D__NVCC_DIAG_PRAGMA_SUPPORT__=1", "-D__CUDACC_DEVICE_ATOMIC_BUILTINS__=1", "-m64",
              cuda_file("bin", "crt", "link.stub"), "-o", obj])
        return obj

    def link_library(self, key: str, cubins: list) -> pathlib.Path:
        """The module's .so: the generic objects, one registration object per kernel file, and
        FlashInfer's link flags (its link rule: c++ objects ldflags -o out)."""
        kernel_objects, host_objects = self.objects()
        registrations = [self.registration_object(o, c) for o, c in zip(kernel_objects, cubins)]
        out = self.library_path(key)
        # -Bsymbolic: every score_mod's module of one generic part defines the same host symbols
        # (FlexScoreModLto's kernel stubs and dispatch functions, exported: FlashInfer builds with
        # -static-global-template-stub=false); each must call its own, even if loaded RTLD_GLOBAL
        return _built(out, out, lambda tmp: _run(["c++", *kernel_objects, *host_objects, *registrations,
                                                   *self.ldflags, "-Wl,-Bsymbolic", "-o", tmp]))

    def build_score_mod(self, graph: Graph, position_bound: int | None = None, jobs: int | None = None,
                        timings: dict | None = None) -> pathlib.Path:
        """The .so for one score_mod (generic objects built first if missing). One process at a
        time builds a score_mod's files (ranks or test workers meeting the same new score_mod):
        its registration sources are written under fixed names."""
        self.build(jobs)
        with open(self.score_dir(self.score_key(graph, position_bound)) / ".ffi_lto_score.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            key, obj = self.compile_score(graph, position_bound)
            if self.library_path(key).exists():
                return self.library_path(key)
            return self.link_library(key, self.link_kernels(key, obj, jobs, timings))


def _sources_tag(sources) -> str:
    """A hash of the generated files the objects are compiled from (every file in the sources'
    folders: the kernel and host files and the config they include) and of FlashInfer's version
    (its headers). FlashInfer's ninja rebuilds a module whose sources changed; these objects are
    not built by ninja, so their names must change instead."""
    try:
        from flashinfer import __version__ as version
    except ImportError:
        version = None
    digest = hashlib.sha256(repr(version).encode())
    for folder in sorted({pathlib.Path(s).parent for s in sources}):
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+)\.(\d+)\.(\d+)", out)
    return m.groups() if m else ("13", "0", "0")


def _parallel(tasks, jobs: int, timings: dict | None) -> None:
    """Run (name, fn) tasks, jobs at a time; with timings, record each one's wall seconds."""
    import time

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        if timings is not None:
            timings[name] = round(time.perf_counter() - start, 2)

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for f in [pool.submit(timed, n, fn) for n, fn in tasks]:
            f.result()
