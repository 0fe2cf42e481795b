"""A scale the FlashInfer kernels cannot take goes to the reference backend (auto) or raises
(forced), naming the scale: FlashInfer's kernels return NaN for every row at sm_scale 0, where
FlexAttention averages the visible values."""
import math
import warnings

import pytest
import torch

from flex_flash_infer import backend_choice, flashinfer_backend, flex_attention, notices


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
