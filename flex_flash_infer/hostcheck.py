"""Compile a traced mod's generated C++ on the host (g++) and evaluate it on arrays.

This checks the code generator without a GPU: the same expression text that goes into the
FlashInfer variant is compiled here and compared with the torch function on random inputs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile

import torch

from .codegen import CTYPE, ELEMENT_CTYPE, POSITION_BOUND, PRELUDE, element_kind, emit_expression, kernel_tensor
from .trace import Graph

_CACHE_DIR = os.path.join(tempfile.gettempdir(), "flex_flash_infer_hostcheck")


def host_source(graph: Graph, tanh_call=None) -> str:
    tensor_decl = "".join(
        f"  const {ELEMENT_CTYPE[element_kind(t)]}* {name} = (const {ELEMENT_CTYPE[element_kind(t)]}*)tensors[{i}];\n"
        + "".join(f"  const long long {name}_stride{d} = strides[{4 * i + d}];\n" for d in range(t.dim()))
        for i, (name, t) in enumerate(graph.tensors))
    scalar_index = {name: i for i, (name, _, _) in enumerate(graph.scalars)}
    # hoisted as the GPU variant hoists (what reads only b and h), here recomputed per element
    hoisted = []
    expr = emit_expression(graph, lambda n: f"scalars[{scalar_index[n]}]", lambda n: n, hoisted=hoisted,
                           invariant_inputs=("b", "h"), position_bound=POSITION_BOUND, tanh_call=tanh_call)
    hoisted_decl = "".join(f"    {ctype} const {name} = {code};\n" for name, ctype, code in hoisted)
    return f"""#include <cmath>
#include <cstdint>
{PRELUDE}
extern "C" void eval_mod(long long n, const float* score_in, const int* b_in, const int* h_in, const int* q_in,
                         const int* kv_in, const double* scalars, const void* const* tensors,
                         const long long* strides, float* out) {{
{tensor_decl}  for (long long i = 0; i < n; ++i) {{
    const float score = score_in[i]; const int b = b_in[i], h = h_in[i], q_idx = q_in[i], kv_idx = kv_in[i];
    (void)score; (void)b; (void)h; (void)q_idx; (void)kv_idx;
{hoisted_decl}    out[i] = (float)({CTYPE[graph.output.kind]})({expr});
  }}
}}
"""


def compile_host(graph: Graph, tanh_call=None):
    """The generated expression as a callable f(score, b, h, q_idx, kv_idx) on flat tensors.
    tanh_call: as emit_expression's (the host loop names the key position kv_idx)."""
    source = host_source(graph, tanh_call)
    os.makedirs(_CACHE_DIR, exist_ok=True)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    lib_path = os.path.join(_CACHE_DIR, f"mod_{digest}.so")
    if not os.path.exists(lib_path):
        src_path = lib_path[:-3] + ".cpp"
        with open(src_path, "w") as f:
            f.write(source)
        tmp = lib_path + f".{os.getpid()}.tmp"
        result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", tmp, src_path], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"generated C++ failed to compile:\n{result.stderr[:3000]}\n--- source ---\n{source}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(lib_path)
    tensors = [kernel_tensor(t) for _, t in graph.tensors]
    strides = torch.zeros(max(1, 4 * len(tensors)), dtype=torch.int64)
    for i, t in enumerate(tensors):
        strides[4 * i:4 * i + t.dim()] = torch.tensor(t.stride())
    scalars = torch.tensor([float(v) for _, _, v in graph.scalars] or [0.0], dtype=torch.float64)

    def run(score, b, h, q_idx, kv_idx):
        score, b, h, q_idx, kv_idx = torch.broadcast_tensors(
            torch.as_tensor(score, dtype=torch.float32), *(torch.as_tensor(x, dtype=torch.int32) for x in (b, h, q_idx, kv_idx)))
        flat = [x.contiguous().reshape(-1) for x in (score, b, h, q_idx, kv_idx)]
        out = torch.empty(flat[0].numel(), dtype=torch.float32)
        ptrs = (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])
        lib.eval_mod(ctypes.c_longlong(out.numel()), *(ctypes.c_void_p(x.data_ptr()) for x in flat),
                     ctypes.c_void_p(scalars.data_ptr()), ptrs, ctypes.c_void_p(strides.data_ptr()),
                     ctypes.c_void_p(out.data_ptr()))
        return out.view(score.shape)

    return run
