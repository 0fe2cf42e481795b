import sys

import pytest
import torch


def _gpu_ready():
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _gpu_ready():
        return
    skip = pytest.mark.skip(reason="needs CUDA and flashinfer")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test: inputs are new every run; the seed is printed on failure."""
    seed = torch.seed() % (2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def flashinfer_on_cpu(monkeypatch):
    """backend="flashinfer" runs on CPU tensors: the CPU model as flashinfer, Hopper's launch
    choices, and every compiled variant registered with the host-compiled code of its graphs."""
    import fake_flashinfer
    from flex_flash_infer.backends import backend_choice, flashinfer_backend, score_mod_kernels, tile_kernels
    from flex_flash_infer import paged, varlen, wrapper

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    for module in (flashinfer_backend, paged, varlen):
        monkeypatch.setattr(module, "_is_hopper", lambda device: True)
    monkeypatch.setattr(backend_choice, "unsupported_reason", lambda *a: None)
    monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "flashinfer")
    monkeypatch.setattr(paged, "unsupported_reason", lambda *a: None)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)
