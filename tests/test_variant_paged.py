"""The paged variants of the tiles route (variant_paged.py) compile as CUDA device code against
FlashInfer's variant headers (nvcc, no GPU), with each combination of score_mod, mask_mod and
bit mask; their argument lists put the five tables first."""
import shutil
import subprocess

import pytest
import torch

from flex_flash_infer.codegen import POSITION_BOUND
from flex_flash_infer.mods import generate_alibi_score_mod, generate_relative_position_bias_score_mod, generate_softcap_score_mod
from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.trace import trace
from flex_flash_infer.variant_paged import PAGED_TABLES, fa2_paged_variant, fa3_paged_score_mod_variant
from test_variant import flashinfer_include

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or flashinfer_include() is None,
                                reason="needs nvcc and the flashinfer package (its headers)")
SCORE_MODS = {"softcap": generate_softcap_score_mod(30.0), "alibi": generate_alibi_score_mod(num_heads=8),
              "rel_bias": generate_relative_position_bias_score_mod(torch.randn(8, 33))}


def _fields(spec, indent="    "):
    return "\n".join(f"{indent}{'const ' + d + '*' if n in spec.tensor_names else d} {n};"
                     for n, d in list(zip(spec.tensor_names, spec.tensor_dtypes)) + list(zip(spec.scalar_names, spec.scalar_dtypes)))


def _nvcc(tmp_path, source: str, arch: str):
    path = tmp_path / "variant.cu"
    path.write_text(source)
    result = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-I", str(flashinfer_include()), "-c", str(path),
                             "-o", str(tmp_path / "variant.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_arguments_put_the_tables_first_and_keep_the_two_graphs_apart():
    score = trace(SCORE_MODS["rel_bias"], "score_mod")
    table = torch.randint(0, 2, (8, 64), dtype=torch.bool)
    mask = trace(lambda b, h, q, kv: table[h, kv % 64] & (q >= kv), "mask_mod")
    spec = fa2_paged_variant(score, mask, 128)
    assert spec.tensor_names[:5] == list(PAGED_TABLES)
    assert spec.tensor_names[5:] == ["ffi_t0", "ffi_mask_t0"]   # both graphs name their table t0
    assert spec.tensor_dtypes[5:] == ["float", "uint8_t"]
    assert spec.scalar_names[0] == "ffi_sm_scale"
    assert spec.name.endswith("<use_custom_mask>")
    assert "variant_owns_mask" not in spec.decl and "maybe_mask_indptr" not in spec.decl
    bits = fa2_paged_variant(score, None, 128)
    assert "maybe_mask_indptr" in bits.decl and bits.name != spec.name
    assert fa3_paged_score_mod_variant(score, 1).name != fa3_paged_score_mod_variant(score, 128).name


@needs_nvcc
@pytest.mark.parametrize("page_size", [128, 1])
@pytest.mark.parametrize("mod", list(SCORE_MODS), ids=list(SCORE_MODS))
def test_fa3_paged_variant_compiles_as_device_code(tmp_path, mod, page_size):
    spec = fa3_paged_score_mod_variant(trace(SCORE_MODS[mod], "score_mod"), page_size, POSITION_BOUND)
    _nvcc(tmp_path, f"""
#include <cstdint>
#include <flashinfer/math.cuh>
#include <flashinfer/attention/hopper/variant_helper.cuh>
namespace flashinfer {{
template <int N, bool B> struct OnlineSoftmax {{ __device__ explicit OnlineSoftmax(float) {{}} }};
{spec.decl}
struct FakeParams {{ struct {{
{_fields(spec)}
  }} additional_params; }};
}}  // namespace flashinfer
using namespace flashinfer;
struct Coord {{ int a, b, c, d, e; uint32_t f, g, h; }};
__global__ void probe(FakeParams params, float* out) {{
  Coord coord{{0, 0, 0, 0, 0, 128u, 256u, 0u}};
  {spec.name} variant(params, coord);
  out[threadIdx.x] = variant.LogitsTransform(params, 1.0f, 0u, threadIdx.x, threadIdx.x, 1u, 0u);
}}
""", "sm_90a")


@needs_nvcc
@pytest.mark.parametrize("combo", ["score+bits", "score+mask", "mask", "bits"])
def test_fa2_paged_variant_compiles_as_device_code(tmp_path, combo):
    score = trace(SCORE_MODS["rel_bias"], "score_mod") if combo.startswith("score") else None
    mask = trace(get_mask_fn("sliding_window", window_size=100), "mask_mod") if "mask" in combo else None
    spec = fa2_paged_variant(score, mask, 128, POSITION_BOUND)
    base = spec.name.split("<")[0]
    _nvcc(tmp_path, f"""
#include <cstdint>
#include <flashinfer/math.cuh>
#include <flashinfer/attention/variant_helper.cuh>
namespace flashinfer {{
{spec.decl}
struct FakeParams {{
{_fields(spec, "  ")}
  uint8_t* maybe_custom_mask;
  int32_t* maybe_mask_indptr;
  int32_t window_left;
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
""", "sm_80")
