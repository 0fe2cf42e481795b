"""The generated FlashInfer fa3 and fa2 variants compile as CUDA device code against FlashInfer's own
variant headers (nvcc, no GPU needed). Skipped where nvcc or the flashinfer package is missing."""

import pytest
import torch

from flex_flash_infer.mods import generate_alibi_score_mod, generate_relative_position_bias_score_mod, generate_softcap_score_mod
from flex_flash_infer.compile.codegen import POSITION_BOUND
from flex_flash_infer.core.trace import trace
from flex_flash_infer.compile.variant import fa3_score_mod_variant
from variant_probes import compile_device, fa2_probe, fa3_probe, needs_nvcc


def test_variant_spec_lists_arguments_in_jit_order():
    spec = fa3_score_mod_variant(trace(generate_relative_position_bias_score_mod(torch.randn(8, 33)), "score_mod"))
    assert spec.tensor_names == ["ffi_req_q0", "ffi_req_kv0", "ffi_req_b", "ffi_t0"]
    assert spec.tensor_dtypes == ["int32_t", "int32_t", "int32_t", "float"]
    assert spec.scalar_names[0] == "ffi_sm_scale" and spec.scalar_dtypes[0] == "double"
    assert "ffi_t0_stride1" in spec.scalar_names
    args = spec.jit_args("uri", torch.bfloat16, 128, torch.int32, use_sliding_window=True)
    assert args[11] == spec.name and args[12] == spec.decl and args[14] is True
    assert "(params.additional_params.ffi_t0) + (" in spec.decl and "OnlineSoftmax" in spec.decl


def _per_score_code(decl: str) -> str:
    start = decl.index("REGISTER_LOGITS_TRANSFORM")
    return decl[start:decl.index("})", start)]


@pytest.mark.parametrize("mod", [generate_softcap_score_mod(30.0), generate_alibi_score_mod(num_heads=8),
                                 generate_relative_position_bias_score_mod(torch.randn(8, 33))],
                         ids=["softcap", "alibi", "rel_bias"])
def test_per_score_code_reads_no_kernel_scalar(mod):
    """Kernel scalars (the scale, captured numbers, strides) are doubles / int64 in FlashInfer's
    argument struct: read per score they cost a conversion each (seen in the H100 SASS as one
    F2F.F32.F64 per score), so the variant converts them once in its constructor."""
    graph = trace(mod, "score_mod")
    per_score = _per_score_code(fa3_score_mod_variant(graph).decl)
    scalar_names = fa3_score_mod_variant(graph).scalar_names
    assert [n for n in scalar_names if f"additional_params.{n}" in per_score] == []
    assert "sm_scale_" in per_score


def test_padding_guard_only_where_a_captured_table_is_read():
    """fa3 masks a tile's padded tail after the transform, so only a table read needs the guard."""
    with_table = fa3_score_mod_variant(trace(generate_relative_position_bias_score_mod(torch.randn(8, 33)), "score_mod"))
    without = fa3_score_mod_variant(trace(generate_softcap_score_mod(30.0), "score_mod"))
    per_head_table = fa3_score_mod_variant(trace(generate_alibi_score_mod(num_heads=8), "score_mod"))
    assert "kv_idx >= kv_len_ || qo_idx >= qo_len_" in _per_score_code(with_table.decl)
    assert "kv_len_" not in _per_score_code(without.decl)
    assert "kv_len_" not in _per_score_code(per_head_table.decl)   # its slope is read per tile


@needs_nvcc
@pytest.mark.parametrize("mod", [generate_softcap_score_mod(30.0), generate_alibi_score_mod(num_heads=8),
                                 generate_relative_position_bias_score_mod(torch.randn(8, 33)),
                                 lambda score, b, h, q, kv: torch.where((q - kv) % 3 == 0, score, score - 1.0),
                                 lambda score, b, h, q, kv: score],
                         ids=["softcap", "alibi", "rel_bias", "where_mod", "identity"])
def test_generated_variant_compiles_as_device_code(tmp_path, mod):
    spec = fa3_score_mod_variant(trace(mod, "score_mod"), POSITION_BOUND)  # with the int conversion trick
    compile_device(tmp_path, fa3_probe(spec), "sm_90a")


@needs_nvcc
@pytest.mark.parametrize("mod", [generate_softcap_score_mod(30.0), generate_alibi_score_mod(num_heads=8),
                                 generate_relative_position_bias_score_mod(torch.randn(8, 33))],
                         ids=["softcap", "alibi", "rel_bias"])
def test_generated_fa2_variant_compiles_as_device_code(tmp_path, mod):
    """The fa2 variant, with and without a custom bit mask, against FlashInfer's fa2 variant
    helpers and a stand-in for the params struct FlashInfer generates (members, as fa2 has them)."""
    from flex_flash_infer.compile.variant import fa2_score_mod_variant

    spec = fa2_score_mod_variant(trace(mod, "score_mod"), POSITION_BOUND)
    assert spec.name.endswith("<use_custom_mask>")
    compile_device(tmp_path, fa2_probe(spec), "sm_80")


def test_bit_trick_conversion_only_when_the_caller_vouches_for_the_bound():
    from flex_flash_infer.compile.codegen import POSITION_BOUND

    graph = trace(generate_alibi_score_mod(num_heads=8), "score_mod")
    assert "ffi_i2f_exact(" in _per_score_code(fa3_score_mod_variant(graph, POSITION_BOUND).decl)
    assert "ffi_i2f_exact(" not in _per_score_code(fa3_score_mod_variant(graph).decl)
