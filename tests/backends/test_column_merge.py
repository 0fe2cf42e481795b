"""The one-pass column merge of the window band + columns route (column_merge): per-row prefix
counts, the plan with it on and off through the CPU model of FlashInfer, and the Triton kernel
itself in Triton's CPU interpreter where triton is installed (the CPU install does not need it)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer.backends import column_merge, flashinfer_backend
from flex_flash_infer import create_block_mask, get_mask_fn
from flex_flash_infer.planning.columns import column_prefix_counts


def test_prefix_counts_or_none_when_a_row_skips_a_column():
    def first_n(b, h, q_idx, m_idx):      # row q sees columns 0 .. q % 5 - 1
        return m_idx < q_idx % 5

    counts = column_prefix_counts(first_n, 23, 7, torch.device("cpu"))
    assert counts.dtype == torch.int32 and torch.equal(counts, (torch.arange(23) % 5).int())

    def gap(b, h, q_idx, m_idx):          # row 10 sees column 2 but not column 1
        return (m_idx < q_idx % 3) | ((q_idx == 10) & (m_idx == 2))

    assert column_prefix_counts(gap, 23, 7, torch.device("cpu")) is None


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)


@pytest.mark.parametrize("B,S,name,params", [(2, 777, "streaming", {"sink_size": 4, "window_size": 150}),
                                             (1, 1000, "attamba", {"window_size": 100, "chunk_size": 64}),
                                             (2, 300, "streaming", {"sink_size": 40, "window_size": 30})])
def test_band_plus_columns_plan_with_the_merge(fake, rng, B, S, name, params):
    Hq, Hkv, D = 4, 2, 16
    mod = get_mask_fn(name, **params)
    bm = create_block_mask(mod, None, None, S, S, device="cpu")
    plan = flashinfer_backend.FlashInferPlan(bm, B, S, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.route == "bands+columns"
    assert plan.column_counts is not None and plan.columns is None
    q = torch.randn(B, Hq, S, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * S, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    dense = mod(0, 0, torch.arange(S).view(-1, 1), torch.arange(S).view(1, -1))
    ref, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, S, Hq, D).transpose(1, 2), ref) < 1e-6   # the CPU model's float32 merge
    assert torch.allclose(lse.view(B, S, Hq).transpose(1, 2).double(), ref_lse, atol=1e-5)


def test_a_score_mod_keeps_the_paged_columns_launch(fake, monkeypatch):
    """The merge kernel applies no score_mod: with one, the columns take the compiled paged launch."""
    from flex_flash_infer.backends import score_mod_kernels, tile_kernels

    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    bm = create_block_mask(get_mask_fn("streaming", sink_size=4, window_size=100), None, None, 500, 500, device="cpu")
    plan = flashinfer_backend.FlashInferPlan(bm, 1, 500, 500, 4, 2, 16, torch.float64, 0.25, "cpu",
                                             score_mod=lambda s, b, h, q, kv: s - 0.01 * (q - kv))
    assert plan.route == "bands+columns" and plan.column_counts is None and plan.columns is not None


INTERPRETED = textwrap.dedent("""
    import sys, torch
    from flex_flash_infer.backends.column_merge import merge_columns_reference
    from flex_flash_infer.backends.column_merge_triton import merge_columns_triton
    torch.manual_seed(0)
    dtype = getattr(torch, sys.argv[1])
    B, L, S, Hq, Hkv, D, M = 2, 150, 170, 4, 2, 32, int(sys.argv[2])
    q = torch.randn(B * L, Hq, D).to(dtype)
    k, v = torch.randn(B, S, Hkv, D).to(dtype), torch.randn(B, S, Hkv, D).to(dtype)
    positions = torch.sort(torch.randperm(S)[:M]).values
    counts = torch.randint(0, M + 1, (L,), dtype=torch.int32)
    counts[:10] = 0
    out, lse = torch.randn(B * L, Hq, D).to(dtype), torch.randn(B * L, Hq) * 3
    ref_out, ref_lse, got_out, got_lse = out.clone(), lse.clone(), out.clone(), lse.clone()
    merge_columns_reference(ref_out, ref_lse, q, k, v, positions, counts, 0.3, L)
    merge_columns_triton(got_out, got_lse, q, k, v, positions, counts, 0.3, L)
    assert not got_out.isnan().any() and not got_lse.isnan().any()
    assert torch.equal(got_out.view(B, L, Hq, D)[:, :10], out.view(B, L, Hq, D)[:, :10])   # rows with no column
    err = ((got_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3), err
    assert (got_lse - ref_lse).abs().max().item() < 1e-4
    print("ok", err)
""")


@pytest.mark.parametrize("dtype,columns", [("float32", 20), ("float16", 20), ("float16", 5), ("float32", 40)])
def test_triton_kernel_in_the_cpu_interpreter(dtype, columns):
    """float16 and float32 (the interpreter has no bfloat16 arithmetic; the GPU test runs bf16);
    5 columns fit one column block, 40 take three."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED, dtype, str(columns)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("dtype,head_dim,columns", [("bf16", 128, 16), ("fp16", 64, 64), ("bf16", 256, 256)])
def test_triton_kernel_compiles_for_hopper(dtype, head_dim, columns):
    """The kernel through Triton's whole compiler down to an sm_90 cubin (its bundled ptxas; no GPU
    needed): what the interpreter skips, Triton's type checks and its lowering to PTX."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flex_flash_infer.backends.column_merge_triton import _columns_merge_kernel

    sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "LSE": "*fp32", "POS": "*i64",
           "COUNTS": "*i32", "q_len": "i32", "num_columns": "i32", "group": "i32", "scale_log2": "fp32"}
    sig.update({name: "i32" for name in _columns_merge_kernel.arg_names if name.startswith("stride_")})
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": 64, "BLOCK_C": 16 if columns <= 16 else 32, "COLUMNS_PADDED": columns}
    sig.update({name: "constexpr" for name in consts})
    compiled = triton.compile(ASTSource(fn=_columns_merge_kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32))
    assert "_columns_merge_kernel" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
