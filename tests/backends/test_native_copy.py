"""FlashInfer's own fa3 kernels as this library's one-mask-mode module (compile/native_copy.py) where
FlashInfer's module is not built: the band routes run on it through the CPU model of FlashInfer,
which checks the module's arguments, its one mode and its flags, against the dense reference."""
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import FlexFlashInfer, create_mask, get_mask_fn
from flex_flash_infer.backends import flashinfer_backend
from flex_flash_infer.compile import lean_modules, native_copy
from flex_flash_infer.planning import ragged


@pytest.fixture
def copies(monkeypatch):
    """The CPU model as flashinfer on Hopper, with FlashInfer's own native modules not built here."""
    from flex_flash_infer import paged, wrapper

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    for module in (flashinfer_backend, paged):
        monkeypatch.setattr(module, "_is_hopper", lambda device: True)
    monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "flashinfer")
    asked = []

    def not_built(*key):
        asked.append(key)
        return False

    monkeypatch.setattr(native_copy, "flashinfer_has_its_own", not_built)
    return asked


def _launches(plan):
    runner = plan.band_runner
    return [w for w in [runner.ragged, *runner.band_wrappers.values()] if w is not None]


@pytest.mark.parametrize("name,params,L,S,modes", [
    ("causal", {}, 200, 333, {1}), ("full", {}, 130, 257, {0}),
    ("prefix_lm", {"prefix_len": 77}, 300, 300, {0, 1}),     # a full block, then a causal band
    ("causal", {}, 333, 200, {0, 1}),                        # more queries than keys: a full band too
])
def test_band_routes_run_on_the_one_mode_modules(copies, rng, name, params, L, S, modes):
    Hq, Hkv, D = 4, 2, 16
    q = torch.randn(L, Hq, D, dtype=torch.float64, generator=rng)
    k = torch.randn(S, Hkv, D, dtype=torch.float64, generator=rng)
    v = torch.randn(S, Hkv, D, dtype=torch.float64, generator=rng)
    mask = get_mask_fn(name, **params)
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mask, seq_len_q=L, seq_len_kv=S, num_qo_heads=Hq,
                                                num_kv_heads=Hkv, head_dim=D, dtype=torch.float64)
    plan = flex._prepared.segments[0].plan
    launches = _launches(plan)
    assert plan.route == "bands" and launches and all(isinstance(w, ragged.NativeCopy) for w in launches)
    uris = {w.wrapper.jit_args[0] for w in launches}
    assert {lean_modules.kept_modes("fa3", u) for u in uris} == {(m,) for m in modes}
    dense = create_mask(mask, None, None, L, S, device="cpu")[0, 0]
    ref, _ = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dense)
    assert rel_err(flex(q, k, v), ref[0].transpose(0, 1)) < 1e-6
    assert copies and all(key[1:] == (D, False, False) for key in copies)


def test_the_soft_cap_and_scale_go_to_run(flashinfer_on_cpu, monkeypatch, rng):
    """FlashInfer's soft cap (its DefaultAttention<true>) and a scale of the caller's: the module is
    the soft-capped one, both numbers reach the kernel as run arguments."""
    from flex_flash_infer import flex_attention
    from flex_flash_infer.mods import generate_softcap_score_mod

    copies = []
    monkeypatch.setattr(native_copy, "flashinfer_has_its_own", lambda *key: copies.append(key) or False)
    B, H, L, D = 1, 2, 150, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=rng) for _ in range(3))
    mask = get_mask_fn("causal")
    out = flex_attention(q, k, v, score_mod=generate_softcap_score_mod(5.0),
                         block_mask=_causal_block_mask(L), scale=0.3, backend="flashinfer")
    dense = create_mask(mask, None, None, L, L, device="cpu")[0, 0]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3
    s = (5.0 * torch.tanh(s / 5.0)).masked_fill(~dense, float("-inf"))
    ref = torch.softmax(s, -1) @ v
    assert rel_err(out, ref) < 1e-6
    assert any(key[3] for key in copies), "the soft-capped module was asked for"


def _causal_block_mask(L):
    from flex_flash_infer import create_block_mask

    return create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu")


def test_flashinfers_own_module_is_kept_where_it_is_built(monkeypatch, rng):
    """Where FlashInfer has its own module (prebuilt or built before), the launch is FlashInfer's
    own wrapper with no module of ours."""
    from flex_flash_infer import wrapper

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "flashinfer")
    monkeypatch.setattr(native_copy, "flashinfer_has_its_own", lambda *key: True)
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=get_mask_fn("causal"), seq_len_q=100, seq_len_kv=100,
                                                num_qo_heads=2, num_kv_heads=2, head_dim=16, dtype=torch.float64)
    launches = _launches(flex._prepared.segments[0].plan)
    assert launches and not any(isinstance(w, ragged.NativeCopy) for w in launches)
    assert all(w.jit_args is None for w in launches)


def test_one_mode_names_and_kept_modes():
    causal = native_copy.jit_args(torch.bfloat16, 128, True, False, False)
    full = native_copy.jit_args(torch.bfloat16, 128, False, True, True)
    assert causal[0] != full[0] and native_copy.is_native_copy(causal) and not native_copy.is_native_copy(None)
    assert lean_modules.kept_modes("fa3", causal[0]) == (1,) and lean_modules.kept_modes("fa3", full[0]) == (0,)
    assert causal[11] == "DefaultAttention<false>" and full[11] == "DefaultAttention<true>"
    assert (causal[-2], causal[-1], full[-2], full[-1]) == (False, False, True, True)
    # another library's module, and this library's other modules, keep what they had
    assert lean_modules.kept_modes("fa3", "someone_else") is None
    assert lean_modules.kept_modes("fa3", "ffi_headwin_x_bfloat16_d128") == lean_modules.KEPT_MODES["fa3"]


@pytest.mark.parametrize("built", [False, True])
def test_flashinfers_answer_is_asked_once(monkeypatch, built):
    import types

    asked = []

    def generate(backend, *args):
        asked.append((backend, *args))
        return types.SimpleNamespace(is_aot=False, is_compiled=built)

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(prefill=types.SimpleNamespace(
        gen_batch_prefill_module=generate)))
    monkeypatch.setattr(native_copy, "_own_module_here", {})
    for _ in range(2):
        assert native_copy.flashinfer_has_its_own(torch.float16, 64, True, False) is built
    assert asked == [("fa3", torch.float16, torch.float16, torch.float16, torch.int32, 64, 64, 0, True, False, False)]


def test_flashinfer_without_the_generator_keeps_its_own(monkeypatch):
    """A FlashInfer whose generator this cannot read (a stand-in, another version) keeps its own."""
    import types

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(__version__="other"))
    monkeypatch.setattr(native_copy, "_own_module_here", {})
    assert native_copy.flashinfer_has_its_own(torch.float16, 64, False, False) is True
