"""Compile a generated FlashInfer variant as CUDA device code (nvcc, no GPU) against FlashInfer's
own variant headers, with a stand-in for the params struct FlashInfer would generate."""
import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest


def flashinfer_include():
    if os.environ.get("FLASHINFER_INCLUDE"):   # headers of a flashinfer installed elsewhere
        return pathlib.Path(os.environ["FLASHINFER_INCLUDE"])
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "include"
    return include if (include / "flashinfer" / "attention" / "hopper" / "variant_helper.cuh").exists() else None


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or flashinfer_include() is None,
                                reason="needs nvcc and the flashinfer package (its headers)")


def _fields(spec, indent):
    """The variant's arguments as FlashInfer declares them in its generated params: nothing else,
    so a variant that reads a member it did not name fails here as it would on the GPU."""
    return "\n".join(f"{indent}{d + '*' if n in spec.tensor_names else d} {n};"
                     for n, d in list(zip(spec.tensor_names, spec.tensor_dtypes)) + list(zip(spec.scalar_names, spec.scalar_dtypes)))


def fa3_probe(spec) -> str:
    """A kernel that builds the fa3 variant from a block coordinate and transforms one logit."""
    return f"""
#include <cstdint>
#include <flashinfer/math.cuh>
#include <flashinfer/attention/hopper/variant_helper.cuh>
namespace flashinfer {{
template <int N, bool B> struct OnlineSoftmax {{ __device__ explicit OnlineSoftmax(float) {{}} }};
{spec.decl}
struct FakeParams {{ struct {{
{_fields(spec, "    ")}
  }} additional_params; }};
}}  // namespace flashinfer
using namespace flashinfer;
struct Coord {{ int a, b, c, d, e; uint32_t f, g, h; }};
__global__ void probe(FakeParams params, float* out) {{
  Coord coord{{0, 0, 0, 0, 0, 128u, 256u, 0u}};
  {spec.name} variant(params, coord);
  out[threadIdx.x] = variant.LogitsTransform(params, 1.0f, 0u, threadIdx.x, threadIdx.x, 1u, 0u);
}}
"""


def fa2_probe(spec) -> str:
    """A kernel that builds the fa2 variant (both use_custom_mask instantiations, params as
    members, as fa2 has them) and applies its transform and mask to one logit."""
    base = spec.name.split("<")[0]
    return f"""
#include <cstdint>
#include <flashinfer/math.cuh>
#include <flashinfer/attention/variant_helper.cuh>
namespace flashinfer {{
{spec.decl}
struct FakeParams {{
{_fields(spec, "  ")}
  int32_t window_left;   // FlashInfer's own member of every fa2 params struct
  __device__ __host__ uint32_t get_qo_len(uint32_t) const {{ return 128; }}
  __device__ __host__ uint32_t get_kv_len(uint32_t) const {{ return 256; }}
}};
}}  // namespace flashinfer
using namespace flashinfer;
template <bool use_custom_mask>
__global__ void probe(FakeParams params, float* out) {{
  {base}<use_custom_mask> variant(params, 0u, nullptr);
  float s = variant.LogitsTransform(params, 1.0f, 0u, threadIdx.x, threadIdx.x, 1u, 0u);
  out[threadIdx.x] = variant.LogitsMask(params, 0u, threadIdx.x, threadIdx.x, 1u, 0u) ? s : 0.0f;
}}
template __global__ void probe<true>(FakeParams, float*);
template __global__ void probe<false>(FakeParams, float*);
"""


def compile_device(tmp_path, source: str, arch: str) -> None:
    path = tmp_path / "variant.cu"
    path.write_text(source)
    result = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-I", str(flashinfer_include()), "-c", str(path),
                             "-o", str(tmp_path / "variant.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
