"""A scale the FlashInfer kernels cannot take goes to the reference backend (auto) or raises
(forced), naming the scale: FlashInfer's kernels return NaN for every row at sm_scale 0, where
FlexAttention averages the visible values."""
import math
import warnings

import pytest
import torch

from flex_flash_infer.backends import backend_choice, flashinfer_backend
from flex_flash_infer import flex_attention
from flex_flash_infer.core import notices


@pytest.fixture
def flashinfer_present(monkeypatch):
    monkeypatch.setattr(flashinfer_backend, "flashinfer_available", lambda: True)


CUDA = torch.device("cuda")


@pytest.mark.parametrize("scale", [0.0, -0.0, math.inf, -math.inf, math.nan])
def test_scales_the_kernels_cannot_take(flashinfer_present, scale):
    reason = flashinfer_backend.unsupported_reason(CUDA, torch.bfloat16, 128, 128, scale)
    assert reason is not None and "scale" in reason
    with pytest.raises(ValueError, match="scale"):
        backend_choice.choose_backend("flashinfer", CUDA, torch.bfloat16, 128, 128, scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notices._warned.clear()
        assert backend_choice.choose_backend("auto", CUDA, torch.bfloat16, 128, 128, scale) == "reference"
    assert any("scale" in str(w.message) for w in caught)


@pytest.mark.parametrize("scale", [None, 0.125, -0.5, 1e-6])
def test_scales_the_kernels_take(flashinfer_present, scale):
    assert flashinfer_backend.unsupported_reason(CUDA, torch.float16, 64, 64, scale) is None
    assert backend_choice.choose_backend("auto", CUDA, torch.float16, 64, 64, scale) == "flashinfer"


def test_scale_zero_averages_the_visible_values(rng):
    q = torch.randn(1, 2, 5, 8, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 2, 7, 8, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 2, 7, 8, generator=rng, dtype=torch.float64)
    out, lse = flex_attention(q, k, v, scale=0.0, return_lse=True, backend="reference")
    assert torch.allclose(out, v.mean(2, keepdim=True).expand_as(out))
    assert torch.allclose(lse.double(), torch.full_like(lse.double(), math.log(7)))


@pytest.mark.parametrize("door", ["bands", "tiles", "columns", "soft_cap", "score_mod", "seed", "varlen", "paged"])
def test_a_negative_scale_runs_on_flashinfer_with_the_query_negated(flashinfer_on_cpu, door):
    """FlashInfer's kernels give NaN for a negative sm_scale (the GPU fuzzer, H200): every door
    hands them |scale| and the negated query, scale * q.k = |scale| * (-q).k exactly (the CPU model
    refuses a scale <= 0, so a door that passed one fails here)."""
    from flex_flash_infer import FlexFlashInfer, PagedFlexAttention, create_block_mask, get_mask_fn
    from flex_flash_infer.mods import generate_softcap_score_mod

    g = torch.Generator().manual_seed(5)
    L, scale = 300, -0.3
    q, k, v = (torch.randn(1, 4, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = {"tiles": lambda b, h, qi, kv: (qi * 3 + kv) % 5 != 0,
            "columns": get_mask_fn("streaming", sink_size=4, window_size=64)}.get(door, get_mask_fn("causal"))
    score_mod = {"soft_cap": generate_softcap_score_mod(5.0),
                 "score_mod": lambda s, b, h, qi, kv: s + 0.01 * (qi - kv)}.get(door)
    bm = create_block_mask(mask, None, None, L, L, device="cpu")
    want, want_lse = flex_attention(q, k, v, block_mask=bm, score_mod=score_mod, scale=scale, return_lse=True,
                                    backend="reference")
    rows = lambda x: x[0].transpose(0, 1).contiguous()   # noqa: E731  [L, H, D]
    if door == "seed":
        flex = FlexFlashInfer(device="cpu", backend="flashinfer").prepare(mask, seq_len_q=L, seq_len_kv=L, num_qo_heads=4,
                                                                          num_kv_heads=4, head_dim=16, dtype=torch.float64,
                                                                          scale=scale)
        out = flex(rows(q), rows(k), rows(v)).transpose(0, 1)[None]
    elif door == "varlen":
        cu = torch.tensor([0, 100, L])
        flex = FlexFlashInfer(device="cpu", backend="flashinfer").prepare(
            get_mask_fn("causal"), num_qo_heads=4, num_kv_heads=4, head_dim=16, dtype=torch.float64, scale=scale,
            cu_seqlens_q=cu, cu_seqlens_kv=cu)
        out = flex(rows(q), rows(k), rows(v)).transpose(0, 1)[None]
        doc = create_block_mask(lambda b, h, qi, kv: (kv <= qi) & ((qi >= 100) == (kv >= 100)), None, None, L, L,
                                device="cpu")
        want = flex_attention(q, k, v, block_mask=doc, scale=scale, backend="reference")
    elif door == "paged":
        paged = PagedFlexAttention(device="cpu", backend="flashinfer")
        paged.plan(mask, torch.tensor([0, L]), torch.tensor([0, L]), torch.arange(L), torch.tensor([1]), 4, 4, 16, 1,
                   dtype=torch.float64, scale=scale)
        out = paged.run(rows(q), (k[0].transpose(0, 1)[:, None].contiguous(), v[0].transpose(0, 1)[:, None].contiguous()))
        out = out.transpose(0, 1)[None]
    else:
        out, lse = flex_attention(q, k, v, block_mask=bm, score_mod=score_mod, scale=scale, return_lse=True,
                                  backend="flashinfer")
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_a_0d_tensor_scale_as_torch_takes_it(rng):
    """torch's flex_attention takes scale as a 0-d tensor: the same output as the float; one that
    requires grad is refused by name (its gradient would be dropped: the kernels take a number)."""
    q, k, v = (torch.randn(1, 2, 40, 16, generator=rng) for _ in range(3))
    want = flex_attention(q, k, v, scale=0.3, backend="reference")
    assert torch.equal(flex_attention(q, k, v, scale=torch.tensor(0.3), backend="reference"), want)
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        flex_attention(q, k, v, scale=torch.tensor(0.3, requires_grad=True))
    with pytest.raises(TypeError, match="scale must be a float"):
        flex_attention(q, k, v, scale=torch.tensor([0.3]))
