"""Compile a traced mod's generated C++ on the host (g++) and evaluate it on arrays.

This checks the code generator without a GPU: the same expression text that goes into the
FlashInfer variant is compiled here and compared with the torch function on random inputs. The
host compile computes what the CUDA code does (the same prelude, the same wrapping helpers, int64
numbers passed as int64), not what torch does. compile_device builds the same expression as a
CUDA kernel (nvcc), to compile its device code without a GPU and to run it on one.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile

import torch

from flex_flash_infer.compile.codegen import (POSITION_BOUND, PRELUDE, ctype, element_ctype, emit_expression,
                                              kernel_tensor)
from flex_flash_infer.core.trace import Graph

_CACHE_DIR = os.path.join(tempfile.gettempdir(), "flex_flash_infer_hostcheck")


def host_source(graph: Graph, cuda: bool = False) -> str:
    """C++ (or, with cuda, a CUDA kernel and its launcher) that evaluates the graph's generated
    expression on n elements; eval_mod takes the same arguments either way (device pointers on
    CUDA)."""
    # strides then sizes of each table, one after the other, in the dims array
    dims_at = [sum(2 * t.dim() for _, t in graph.tensors[:i]) for i in range(len(graph.tensors))]
    tensor_decl = "".join(
        f"  const {element_ctype(t)}* {name} = (const {element_ctype(t)}*)tensors[{i}];\n"
        + "".join(f"  const long long {name}_stride{d} = dims[{dims_at[i] + d}];\n"
                  f"  const long long {name}_size{d} = dims[{dims_at[i] + t.dim() + d}];\n" for d in range(t.dim()))
        for i, (name, t) in enumerate(graph.tensors))
    # one 8-byte slot per number: an int64 for an int (as the kernels take it), else a double
    scalar_slot = {name: f"((const {'long long' if kind == 'int' else 'double'}*)scalars)[{i}]"
                   for i, (name, kind, _) in enumerate(graph.scalars)}
    # hoisted as the GPU variant hoists (what reads only b and h), here recomputed per element
    hoisted = []
    expr = emit_expression(graph, scalar_slot.__getitem__, lambda n: n, hoisted=hoisted,
                           invariant_inputs=("b", "h"), position_bound=POSITION_BOUND)
    hoisted_decl = "".join(f"    {c_type} const {name} = {code};\n" for name, c_type, code in hoisted)
    params = ("long long n, const float* score_in, const int* b_in, const int* h_in, const int* q_in, "
              "const int* kv_in, const void* scalars, const void* const* tensors, const long long* dims, float* out")
    body = f"""{tensor_decl}    const float score = score_in[i]; const int b = b_in[i], h = h_in[i], q_idx = q_in[i], kv_idx = kv_in[i];
    (void)score; (void)b; (void)h; (void)q_idx; (void)kv_idx;
{hoisted_decl}    out[i] = (float)({ctype(graph.output.dtype)})({expr});
"""
    if not cuda:
        return f"""#include <cmath>
#include <cstdint>
{PRELUDE}
extern "C" void eval_mod({params}) {{
  for (long long i = 0; i < n; ++i) {{
{body}  }}
}}
"""
    return f"""#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>
{PRELUDE}
__global__ void eval_kernel({params}) {{
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {{
{body}  }}
}}
extern "C" int eval_mod({params}) {{
  if (n > 0) eval_kernel<<<(unsigned)((n + 255) / 256), 256>>>(n, score_in, b_in, h_in, q_in, kv_in, scalars, tensors,
                                                               dims, out);
  const cudaError_t launched = cudaGetLastError();
  return launched != cudaSuccess ? (int)launched : (int)cudaDeviceSynchronize();
}}
"""


def _build(source: str, cuda: bool, arch: str | None) -> str:
    """The shared library of source (cached by its text), built with g++ or nvcc."""
    os.makedirs(_CACHE_DIR, exist_ok=True)
    digest = hashlib.sha256((source + str(arch)).encode()).hexdigest()[:20]
    lib_path = os.path.join(_CACHE_DIR, f"mod_{digest}{'_cuda' if cuda else ''}.so")
    if not os.path.exists(lib_path):
        src_path = lib_path[:-3] + (".cu" if cuda else ".cpp")
        with open(src_path, "w") as f:
            f.write(source)
        tmp = lib_path + f".{os.getpid()}.tmp"
        command = (["nvcc", "-O3", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch or 'native'}", "-o", tmp, src_path]
                   if cuda else ["g++", "-O1", "-shared", "-fPIC", "-o", tmp, src_path])
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"generated {'CUDA' if cuda else 'C++'} failed to compile:\n{result.stderr[:3000]}"
                               f"\n--- source ---\n{source}")
        os.replace(tmp, lib_path)
    return lib_path


def compile_device(graph: Graph, arch: str | None = None):
    """compile_host's callable, computed by a CUDA kernel of the same generated expression (nvcc
    and a GPU needed): the device code itself, its ffi_tanh the GPU's tanh.approx."""
    return _runner(graph, _build(host_source(graph, cuda=True), True, arch), "cuda")


def compile_host(graph: Graph):
    """The generated expression as a callable f(score, b, h, q_idx, kv_idx) on flat tensors."""
    return _runner(graph, _build(host_source(graph), False, None), "cpu")


def _runner(graph: Graph, lib_path: str, device: str):
    lib = ctypes.CDLL(lib_path)
    tensors = [kernel_tensor(t).to(device) for _, t in graph.tensors]
    dims = torch.tensor([v for t in tensors for v in (*t.stride(), *t.shape)] or [0], dtype=torch.int64, device=device)
    traced_scalars = torch.tensor([v if kind == "int" else torch.tensor(float(v), dtype=torch.float64).view(torch.int64).item()
                                   for _, kind, v in graph.scalars] or [0], dtype=torch.int64, device=device)
    pointers = torch.tensor([t.data_ptr() for t in tensors] or [0], dtype=torch.int64, device=device)

    def run(score, b, h, q_idx, kv_idx, tables=None, scalars=None):
        """tables: the captured tensors as a launch passes them (the kernel reads its arguments,
        not the tables as they were when compiled); by default the copies made here. scalars:
        the captured numbers as a launch passes them (graph.scalars' order), for a module shared
        by score_mods of one code (the device-LTO module); the tables may then have other sizes."""
        ptrs, sizes, numbers = pointers, dims, traced_scalars
        if scalars is not None:
            assert len(scalars) == len(graph.scalars)
            numbers = torch.tensor([int(v) if kind == "int" else torch.tensor(float(v), dtype=torch.float64)
                                    .view(torch.int64).item() for (_, kind, _), v in zip(graph.scalars, scalars)]
                                   or [0], dtype=torch.int64, device=device)
        if tables is not None:
            tables = [t.to(device) for t in tables]
            assert [(t.dtype, t.dim() if scalars is not None else t.shape) for t in tables] == \
                [(t.dtype, t.dim() if scalars is not None else t.shape) for t in tensors]
            ptrs = torch.tensor([t.data_ptr() for t in tables] or [0], dtype=torch.int64, device=device)
            sizes = torch.tensor([v for t in tables for v in (*t.stride(), *t.shape)] or [0], dtype=torch.int64,
                                 device=device)
        score, b, h, q_idx, kv_idx = torch.broadcast_tensors(
            torch.as_tensor(score, dtype=torch.float32), *(torch.as_tensor(x, dtype=torch.int32) for x in (b, h, q_idx, kv_idx)))
        flat = [x.contiguous().reshape(-1).to(device) for x in (score, b, h, q_idx, kv_idx)]
        out = torch.empty(flat[0].numel(), dtype=torch.float32, device=device)
        status = lib.eval_mod(ctypes.c_longlong(out.numel()), *(ctypes.c_void_p(x.data_ptr()) for x in flat),
                              ctypes.c_void_p(numbers.data_ptr()), ctypes.c_void_p(ptrs.data_ptr()),
                              ctypes.c_void_p(sizes.data_ptr()), ctypes.c_void_p(out.data_ptr()))
        if device != "cpu" and status:
            raise RuntimeError(f"the generated CUDA kernel failed: cudaError {status}")
        return out.cpu().view(score.shape)

    run.tables = tensors   # pointers holds their addresses only: they live as long as run
    return run
