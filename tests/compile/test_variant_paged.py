"""The paged variants of the tiles route (variant_paged.py) compile as CUDA device code against
FlashInfer's variant headers (nvcc, no GPU), with each combination of score_mod, mask_mod and
bit mask; their argument lists put the five tables first."""

import pytest
import torch

from flex_flash_infer.compile.codegen import POSITION_BOUND
from flex_flash_infer.mods import generate_alibi_score_mod, generate_relative_position_bias_score_mod, generate_softcap_score_mod
from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.core.trace import trace
from flex_flash_infer.compile.variant_paged import PAGED_TABLES, fa2_paged_variant, fa3_paged_score_mod_variant
from variant_probes import compile_device, fa2_probe, fa3_probe, needs_nvcc

SCORE_MODS = {"softcap": generate_softcap_score_mod(30.0), "alibi": generate_alibi_score_mod(num_heads=8),
              "rel_bias": generate_relative_position_bias_score_mod(torch.randn(8, 33))}


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
    # a custom variant's params hold only what it names: the bit mask path names FlashInfer's buffers
    assert bits.tensor_names[:2] == ["maybe_custom_mask", "maybe_mask_indptr"]
    assert bits.tensor_dtypes[:2] == ["uint8_t", "int32_t"]
    assert fa3_paged_score_mod_variant(score, 1).name != fa3_paged_score_mod_variant(score, 128).name


@needs_nvcc
@pytest.mark.parametrize("page_size", [128, 16, 1])   # key tiles, a serving cache's pages, key columns
@pytest.mark.parametrize("mod", list(SCORE_MODS), ids=list(SCORE_MODS))
def test_fa3_paged_variant_compiles_as_device_code(tmp_path, mod, page_size):
    spec = fa3_paged_score_mod_variant(trace(SCORE_MODS[mod], "score_mod"), page_size, POSITION_BOUND)
    compile_device(tmp_path, fa3_probe(spec), "sm_90a")


@needs_nvcc
@pytest.mark.parametrize("combo", ["score+bits", "score+mask", "mask", "bits", "score+head_mask"])
def test_fa2_paged_variant_compiles_as_device_code(tmp_path, combo):
    score = trace(SCORE_MODS["rel_bias"], "score_mod") if combo.startswith("score") else None
    windows = torch.tensor([16, 64, 256, 1024] * 2)

    def head_windows(b, h, q_idx, kv_idx):   # a paged cache's per-head mask (paged_kernels.py)
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    mask_mod = head_windows if combo.endswith("head_mask") else get_mask_fn("sliding_window", window_size=100)
    mask = trace(mask_mod, "mask_mod") if "mask" in combo else None
    spec = fa2_paged_variant(score, mask, 16 if combo.endswith("head_mask") else 128, POSITION_BOUND)
    compile_device(tmp_path, fa2_probe(spec), "sm_80")
