"""A compiled score_mod's fa3 bands on the device-LTO module
(backends/lto_score_mods.py) on the CPU model: the generic arguments the library passes (slots,
types, strides, devices, checked by fake_flashinfer.FakeLtoModule) give the reference's output;
the LTO module is the one handed to FlashInfer's wrapper; a score_mod that does not fit or a
missing toolchain falls back to today's variant module, with a warning saying why. The compiler
(nvcc, nvJitLink) is stubbed (fake_flashinfer.register_lto_build); its pieces that run on the
CPU (score files, keys, slots) are tests/compile/test_lto_variants.py's."""

import sys
import warnings

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
from flex_flash_infer.backends import flashinfer_backend, lto_score_mods, score_mod_kernels
from flex_flash_infer.compile import lto_variants
from flex_flash_infer.compile.codegen import graph_key
from flex_flash_infer.core.trace import trace
from flex_flash_infer.mods import (generate_relative_position_bias_score_mod, generate_softcap_score_mod,
                                   generate_temperature_score_mod)

B, Hq, Hkv, L, D = 2, 4, 2, 160, 16


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(lto_score_mods, "_SAID", set())
    return fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)


def plain(mod):
    """mod as a user's own function: no hint attributes (a library softcap would run FlashInfer's
    own soft cap, a relative bias with its reach would split its far keys off to fa2)."""
    return lambda score, b, h, q_idx, kv_idx: mod(score, b, h, q_idx, kv_idx)


def score_mods(rng):
    return {
        "softcap": plain(generate_softcap_score_mod(5.0)),   # a number, no table
        "rel_bias": plain(generate_relative_position_bias_score_mod(   # a table [H, 2M+1]
            torch.randn(Hq, 65, generator=rng, dtype=torch.float64).float())),
        "temperature": generate_temperature_score_mod(torch.rand(Hq, generator=rng) + 0.5),
    }


def plan_and_check(rng, score_mod, mask_name, params=None):
    """The band plan of score_mod under the mask, run against the dense reference; the plan."""
    params = params or {}
    bm = create_block_mask(get_mask_fn(mask_name, **params), B, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    ref_out, ref_lse = dense_attention(q, k, v, create_mask(get_mask_fn(mask_name, **params), B, 1, L, L, device="cpu"),
                                       score_fn=score_mod)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-5   # the score_mod runs in float32
    got = lse.view(B, L, Hq).transpose(1, 2).double()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(got), seen) and torch.allclose(got[seen], ref_lse[seen], atol=1e-4)
    return plan


@pytest.mark.parametrize("mask_name,params", [("causal", {}), ("full", {}), ("sliding_window", {"window_size": 40}),
                                              ("document", {"offsets": [0, 30, 100, L]})])
@pytest.mark.parametrize("mod_name", ["softcap", "rel_bias", "temperature"])
def test_fa3_bands_run_the_lto_module(fake, rng, mask_name, params, mod_name):
    built = fake
    score_mod = score_mods(rng)[mod_name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no fallback said
        plan = plan_and_check(rng, score_mod, mask_name, params)
    runner = plan.band_runner
    assert isinstance(runner, score_mod_kernels.ScoreModBands) and runner.lto is not None
    assert runner.module_name == runner.lto.name and built == [runner.lto.name]
    assert ("_swa_" in runner.lto.name) == (mask_name == "sliding_window")   # the window's own generic module
    for wrapper, _, _ in runner.launches:   # every launch on the handed LTO module
        assert wrapper.jit_args[11] == lto_variants.VARIANT_NAME and wrapper.jit_args[0] == runner.lto.name
        assert wrapper.lto_module is runner.lto.loaded and wrapper.backend == "fa3"


def test_a_captured_table_written_after_the_plan_is_read(fake, rng):
    """The generic tensor slot holds the kernel's copy of the table, refreshed in place at each run."""
    table = torch.zeros(Hq, 65)
    score_mod = plain(generate_relative_position_bias_score_mod(table))
    plan = plan_and_check(rng, score_mod, "causal")
    assert plan.band_runner.lto is not None
    table.copy_(torch.randn(Hq, 65, generator=rng))
    plan_and_check(rng, score_mod, "causal")   # a new plan reads it too; the old one:
    q = torch.randn(B * L, Hq, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, L, Hkv, D, generator=rng, dtype=torch.float64)
    out, _ = plan.run(q, k, k)
    ref, _ = dense_attention(q.view(B, L, Hq, D).transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                             create_mask(get_mask_fn("causal"), B, 1, L, L, device="cpu"), score_fn=score_mod)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref) < 1e-5


def test_values_share_a_module_a_new_structure_links_a_new_one(fake, rng):
    built = fake
    one = generate_relative_position_bias_score_mod(torch.randn(Hq, 65, generator=rng))
    two = generate_relative_position_bias_score_mod(torch.randn(Hq, 65, generator=rng))
    names = {plan_and_check(rng, plain(m), "causal").band_runner.module_name for m in (one, two)}
    assert len(names) == 1 and len(built) == 1   # the table's values are run arguments, not code
    plan_and_check(rng, plain(generate_softcap_score_mod(5.0)), "causal")
    assert len(built) == 2 and built[1] not in names


def test_no_toolchain_falls_back_to_todays_module_and_says_why(fake, monkeypatch, rng):
    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: "libnvJitLink not found: (test)")
    score_mod = score_mods(rng)["rel_bias"]
    with pytest.warns(RuntimeWarning, match="instead of the device-LTO one: libnvJitLink not found"):
        plan = plan_and_check(rng, score_mod, "causal")
    runner = plan.band_runner
    assert runner.lto is None and fake == []
    graph = trace(score_mod, "score_mod")
    assert all(w.jit_args[11] == f"FlexScoreMod_{graph_key(graph)}" and w.lto_module is None
               for w, _, _ in runner.launches)
    with warnings.catch_warnings():   # said once per reason, not at every plan
        warnings.simplefilter("error", RuntimeWarning)
        plan_and_check(rng, score_mod, "full")


def test_a_score_mod_beyond_the_slots_falls_back(fake, rng):
    tables = [torch.randn(Hq, generator=rng) for _ in range(lto_variants.GENERIC_TENSORS + 1)]

    def many(score, b, h, q_idx, kv_idx):
        return score + sum(t[h] for t in tables)

    with pytest.warns(RuntimeWarning, match=f"{len(tables)} tables.*has {lto_variants.GENERIC_TENSORS}"):
        plan = plan_and_check(rng, many, "causal")
    assert plan.band_runner.lto is None and fake == []


def test_misfit_counts_hoisted_state(monkeypatch):
    graph = trace(generate_relative_position_bias_score_mod(torch.randn(Hq, 65)), "score_mod")
    assert lto_score_mods.misfit(graph, None) is None
    monkeypatch.setattr(lto_variants, "STATE_BYTES", 0)
    hoisted = lto_variants.hoisted_bytes(graph, None)
    assert (lto_score_mods.misfit(graph, None) is None) == (hoisted == 0)


@pytest.mark.parametrize("corrupt", ["scalar", "stride", "int_as_float", "table_dtype", "table_in_wrong_slot"])
def test_the_model_refuses_wrong_generic_arguments(fake, monkeypatch, rng, corrupt):
    """The CPU model checks what the kernel would read: a wrong slot, type or table fails it."""
    real = lto_variants.run_arguments
    n_t = lto_variants.GENERIC_TENSORS

    def wrong(graph, tensors, scalars, scale):
        args = real(graph, tensors, scalars, scale)
        if corrupt == "scalar":           # softcap's cap: the first float slot
            args[n_t + 1 + lto_variants.GENERIC_INTS] += 1.0
        elif corrupt == "stride":         # the table's first stride: the first int slot
            args[n_t + 1] += 1
        elif corrupt == "int_as_float":
            args[n_t + 1] = float(args[n_t + 1])
        elif corrupt == "table_dtype":
            args[0] = args[0].double()
        else:
            args[0], args[1] = None, args[0]
        return args

    monkeypatch.setattr(score_mod_kernels.lto_variants, "run_arguments", wrong)
    mod = "softcap" if corrupt == "scalar" else "rel_bias"
    with pytest.raises(AssertionError):
        plan_and_check(rng, score_mods(rng)[mod], "causal")


def test_the_generic_variant_is_never_built_from_source(fake, rng):
    """Without the module handed in, FlashInfer would build the generic variant with no score code:
    the model refuses it (so the tests above show the library hands it in)."""
    from flex_flash_infer.planning.ragged import planned_ragged

    lto = lto_score_mods.lto_module(trace(score_mods(rng)["softcap"], "score_mod"), None, torch.float64, D, False)
    indptr = torch.tensor([0, L], dtype=torch.int32)
    workspace = torch.empty(8, dtype=torch.uint8)
    with pytest.raises(AssertionError, match="not handed to the wrapper"):
        planned_ragged(workspace, "fa3", indptr, indptr, (1, L, L, Hq, Hkv, D), torch.float64, True, jit_args=lto.jit_args)
    wrapper = planned_ragged(workspace, "fa3", indptr, indptr, (1, L, L, Hq, Hkv, D), torch.float64, True,
                             jit_args=lto.jit_args, module=lto.loaded)
    assert wrapper.lto_module is lto.loaded
    # the getter is FlashInfer's again afterwards
    assert sys.modules["flashinfer"].prefill.get_customize_batch_prefill_module is fake_flashinfer._fake_module_getter


def test_toolchain_missing_names_what(monkeypatch):
    found = {"nvcc": "/cuda/bin/nvcc", "nm": "/usr/bin/nm", "c++": "/usr/bin/c++"}
    monkeypatch.setattr(lto_score_mods.shutil, "which", found.get)
    monkeypatch.setattr(lto_variants, "cuda_file", lambda *parts: "/cuda/" + "/".join(parts))
    monkeypatch.setattr(lto_variants, "nvjitlink_library", lambda: "/lib/libnvJitLink.so.13")
    monkeypatch.setattr(lto_variants, "_nvcc_version", lambda nvcc: ("13", "0", "88"))
    check = lto_score_mods.toolchain_missing.__wrapped__
    monkeypatch.setattr(lto_variants, "_nvjitlink_version", lambda path: (13, 0))
    assert check() is None
    monkeypatch.setattr(lto_variants, "_nvjitlink_version", lambda path: (12, 8))
    assert "older than nvcc" in check()
    monkeypatch.setattr(lto_variants, "_nvjitlink_version", lambda path: (13, 1))
    del found["nm"]
    assert check() == "nm not found on PATH"

    def missing():
        raise FileNotFoundError("libnvJitLink not found: install nvidia-nvjitlink")

    monkeypatch.setattr(lto_variants, "nvjitlink_library", missing)
    assert check().startswith("libnvJitLink not found")


def test_module_name_and_build_through_the_generic_module(monkeypatch):
    """FlashInfer's name for the module is the generic module's plus the score key; the build is
    GenericModule.build_score_mod's .so, loaded by FlashInfer's loader (JitSpec.load); a module
    already loaded in this process is neither named again nor built again by lto_module."""
    calls = []

    class Generic:
        name = "ffi_lto_abc_bfloat16_d128_noswa_modes01"
        nvcc = "nvcc"

        def score_key(self, graph, bound):
            calls.append("key")
            return "k" * 16

        def build_score_mod(self, graph, bound):
            calls.append("build")
            return "/x.so"

        class spec:
            @staticmethod
            def load(path):
                calls.append(("load", path))
                return "loaded"

    monkeypatch.setattr(lto_score_mods, "generic_module", lambda *a: Generic())
    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: None)
    monkeypatch.setattr(lto_score_mods, "linker_too_old", lambda nvcc: None)
    monkeypatch.setattr(lto_score_mods, "_LOADED", {})
    graph = trace(generate_softcap_score_mod(5.0), "score_mod")
    lto = lto_score_mods.lto_module(graph, None, torch.bfloat16, 128, False)
    assert lto.name == Generic.name + "_" + "k" * 16 and lto.loaded == "loaded" and lto.jit_args[0] == lto.name
    assert lto.jit_args[11] == lto_variants.VARIANT_NAME
    assert calls == ["key", "build", ("load", "/x.so")]
    assert lto_score_mods.lto_module(graph, None, torch.bfloat16, 128, False) is lto
    assert calls == ["key", "build", ("load", "/x.so"), "key"]


def test_warmup_builds_the_generic_objects(monkeypatch, capsys):
    """The warm-up's score_mod_generic kinds (no window in the default kinds, +window beside the
    score_mod kinds) build the generic objects; without the toolchain they say so and build none."""
    from flex_flash_infer.tools import warmup

    built = []

    class Generic:
        def __init__(self, *key):
            self.key = key

        def build(self):
            built.append(self.key)

    from flex_flash_infer.backends import flashinfer_backend

    monkeypatch.setattr(lto_score_mods, "generic_module", Generic)
    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: None)
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    assert "score_mod_generic" in warmup.KINDS and "score_mod_generic+window" in warmup.SCORE_MOD_KINDS
    warmup.compile_one("score_mod_generic", torch.bfloat16, 128)
    warmup.compile_one("score_mod_generic+window", torch.float16, 64)
    assert built == [(torch.bfloat16, 128, False), (torch.float16, 64, True)]
    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: "libnvJitLink not found")
    assert warmup.build_generic_objects(torch.bfloat16, 128) is False and len(built) == 2
    assert "libnvJitLink not found" in capsys.readouterr().out
    # another GPU runs fa2 variants: nothing of fa3's to build
    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: None)
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: False)
    assert warmup.build_generic_objects(torch.bfloat16, 128) is False and len(built) == 2
    assert "not a Hopper GPU" in capsys.readouterr().out


def test_numbers_share_a_module_and_each_runs_its_own(fake, rng):
    """Two softcaps differ in a captured number only: one module (the score file is the same), and
    each plan runs its own cap from the float slot (the fuzzer found the CPU model reading the
    first one's)."""
    built = fake
    plans = [plan_and_check(rng, plain(generate_softcap_score_mod(cap)), "causal") for cap in (5.0, 20.0)]
    assert len(built) == 1 and plans[0].band_runner.module_name == plans[1].band_runner.module_name
    assert plans[0].band_runner.extra_args != plans[1].band_runner.extra_args


def test_a_handed_module_is_given_for_its_own_name_only(monkeypatch):
    """While a wrapper is made on a handed module, FlashInfer's getter gives that module for its
    name alone: another thread's wrapper asking for another module meanwhile gets FlashInfer's own
    answer, and the getter is FlashInfer's again afterwards."""
    import types

    from flex_flash_infer.planning.ragged import handed_module

    def own_getter(backend, uri, *args):
        return ("built", uri)

    prefill = types.SimpleNamespace(get_customize_batch_prefill_module=own_getter)
    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(prefill=prefill))
    handed = object()
    with handed_module(handed, "ffi_lto_x_key"):
        assert prefill.get_customize_batch_prefill_module("fa3", "ffi_lto_x_key", 1, 2) is handed
        assert prefill.get_customize_batch_prefill_module("fa3", "ffi_headwin_y") == ("built", "ffi_headwin_y")
    assert prefill.get_customize_batch_prefill_module is own_getter
    with handed_module(None, None):
        assert prefill.get_customize_batch_prefill_module is own_getter


def test_a_linker_older_than_flashinfers_nvcc_takes_todays_module(monkeypatch):
    """toolchain_missing asks the nvcc on PATH; FlashInfer builds with its build.ninja's (CUDA_HOME's
    first). Where libnvJitLink is older than that one, nothing is built and the score_mod takes its
    own module, said once, instead of a link that fails in the user's call."""
    built = []

    class Generic:
        nvcc = "/cuda-13.1/bin/nvcc"

        def build_score_mod(self, graph, bound):
            built.append(graph)
            return "/x.so"

    monkeypatch.setattr(lto_score_mods, "generic_module", lambda *a: Generic())
    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: None)
    monkeypatch.setattr(lto_score_mods, "module_name", lambda *a: "ffi_lto_x")
    monkeypatch.setattr(lto_score_mods, "_LOADED", {})
    monkeypatch.setattr(lto_score_mods, "_SAID", set())
    monkeypatch.setattr(lto_variants, "nvjitlink_library", lambda: "/lib/libnvJitLink.so.13")
    monkeypatch.setattr(lto_variants, "_nvjitlink_version", lambda path: (13, 0))
    monkeypatch.setattr(lto_variants, "_nvcc_version", lambda nvcc: ("13", "1", "80") if "13.1" in nvcc else ("13", "0", "88"))
    lto_score_mods.linker_too_old.cache_clear()
    graph = trace(generate_softcap_score_mod(5.0), "score_mod")
    with pytest.warns(RuntimeWarning, match=r"libnvJitLink \(13, 0\).*older than nvcc \(13, 1\)"):
        assert lto_score_mods.lto_module(graph, None, torch.bfloat16, 128, False) is None
    assert built == []
    lto_score_mods.linker_too_old.cache_clear()
    Generic.nvcc = "/cuda-13.0/bin/nvcc"

    class Spec:
        @staticmethod
        def load(path):
            return "loaded"

    Generic.spec = Spec
    assert lto_score_mods.lto_module(graph, None, torch.bfloat16, 128, False).loaded == "loaded"
    assert len(built) == 1
    lto_score_mods.linker_too_old.cache_clear()
