"""The library's own FlashInfer variants are built with the mask modes it uses (lean_modules): the
config's mask-mode switch and the list of kernel files, on a generated layout like FlashInfer's;
anything else is left as FlashInfer builds it. (The CPU model of FlashInfer checks, on every
route the suite and the fuzzer run, that no variant is planned with a mode left out.)"""
import dataclasses
import pathlib
import time

import pytest

from flex_flash_infer.compile import lean_modules
from flex_flash_infer.compile.lean_modules import lean_config, lean_spec

CONFIG = """#pragma once
#include <flashinfer/utils.cuh>
#define DISPATCH_context(DTypeQ, MASK_MODE, AttentionVariant, ...) \\
  DISPATCH_MASK_MODE(mask_mode, MASK_MODE, { using AttentionVariant = V; __VA_ARGS__();})
using namespace flashinfer;
"""


@dataclasses.dataclass
class Spec:   # the fields of FlashInfer's JitSpec that lean_spec reads and replaces
    name: str
    sources: list
    extra_cuda_cflags: list


def generated(tmp_path, name="ffi_abc_bfloat16_d128_noswa", config=CONFIG):
    gen = tmp_path / name
    gen.mkdir()
    sources = []
    for kind in ("paged", "ragged"):
        for mode in range(4):
            sources.append(gen / f"batch_prefill_{kind}_sm90_kernel_mask_{mode}.cu")
            sources[-1].write_text(f"// {kind} {mode}\n")
    for host in ("batch_prefill_sm90.cu", "batch_prefill_sm90_jit_binding.cu"):
        sources.append(gen / host)
        sources[-1].write_text('#include "batch_prefill_sm90_config.inc"\n')
    (gen / "batch_prefill_sm90_config.inc").write_text(config)
    return Spec(name, sources, ["-O3"])


def test_config_switches_over_the_kept_modes_only():
    text = lean_config(CONFIG, (0, 1))
    assert "DISPATCH_MASK_MODE(" not in text
    assert text.count("FFI_DISPATCH_KEPT_MASK_MODES(mask_mode, MASK_MODE,") == 2   # the definition and the use
    assert "MaskMode::kNone" in text and "MaskMode::kCausal" in text
    assert "kCustom" not in text and "kMultiItemScoring" not in text
    assert text.startswith("#pragma once\n#define FFI_DISPATCH_KEPT_MASK_MODES")
    assert "FLASHINFER_ERROR" in text   # any other mode raises
    assert "MaskMode::kCustom" in lean_config(CONFIG, (0, 1, 2))


@pytest.mark.parametrize("config", [CONFIG.replace("DISPATCH_MASK_MODE(mask_mode, MASK_MODE,", "OTHER("),
                                    CONFIG + "  DISPATCH_MASK_MODE(mask_mode, MASK_MODE, {})\n"])
def test_an_unknown_config_is_left_alone(config):
    assert lean_config(config, (0, 1)) is None


def test_spec_keeps_the_kernel_files_of_its_modes(tmp_path):
    spec = generated(tmp_path)
    lean = lean_spec(spec, (0, 1))
    assert lean.name == "ffi_abc_bfloat16_d128_noswa_modes01"
    names = sorted(p.name for p in lean.sources)
    assert names == sorted(["batch_prefill_paged_sm90_kernel_mask_0.cu", "batch_prefill_paged_sm90_kernel_mask_1.cu",
                            "batch_prefill_ragged_sm90_kernel_mask_0.cu", "batch_prefill_ragged_sm90_kernel_mask_1.cu",
                            "batch_prefill_sm90.cu", "batch_prefill_sm90_jit_binding.cu"])
    lean_dir = tmp_path / lean.name
    assert all(p.parent == lean_dir for p in lean.sources)
    assert sorted(p.name for p in lean_dir.iterdir()) == sorted(names + ["batch_prefill_sm90_config.inc"])   # no temp file left
    # the kept files are FlashInfer's, the config (which the host code includes from its own folder) rewritten
    assert (lean_dir / "batch_prefill_ragged_sm90_kernel_mask_1.cu").read_text() == "// ragged 1\n"
    assert (lean_dir / "batch_prefill_sm90_config.inc").read_text() == lean_config(CONFIG, (0, 1))
    assert lean.extra_cuda_cflags == ["-O3"]
    assert len(spec.sources) == 10   # FlashInfer's spec itself is untouched


def test_the_binding_reads_only_its_parameters_macro(tmp_path):
    """The fa3 binding declares and exports the host functions: it includes a file with the one
    macro its declarations use (ADDITIONAL_FUNC_PARAMS, as FlashInfer's config defines it) instead of
    the config, which pulls in the kernel headers; the host dispatch file keeps the config."""
    params = "#define ADDITIONAL_FUNC_PARAMS , Optional<ffi::Tensor> maybe_scale_v, double sm_scale"
    config = CONFIG.replace("using namespace flashinfer;", params + "\n#define ADDITIONAL_PARAMS_SETTER x\n"
                            "using namespace flashinfer;")
    lean = lean_spec(generated(tmp_path, config=config), (0, 1))
    lean_dir = tmp_path / lean.name
    assert (lean_dir / "batch_prefill_sm90_jit_binding.cu").read_text() == \
        '#include "batch_prefill_sm90_binding_params.inc"\n'
    assert (lean_dir / "batch_prefill_sm90_binding_params.inc").read_text() == f"#pragma once\n{params}\n"
    assert (lean_dir / "batch_prefill_sm90.cu").read_text() == '#include "batch_prefill_sm90_config.inc"\n'
    # a config without the macro (another FlashInfer): the binding as FlashInfer wrote it
    other = lean_spec(generated(tmp_path, name="ffi_other_d64"), (0, 1))
    assert (tmp_path / other.name / "batch_prefill_sm90_jit_binding.cu").read_text() == \
        '#include "batch_prefill_sm90_config.inc"\n'


def test_spec_rewrites_nothing_already_written(tmp_path):
    # an unchanged file keeps its time: ninja does not rebuild a module already built
    spec = generated(tmp_path)
    lean = lean_spec(spec, (0, 1))
    times = {p: p.stat().st_mtime_ns for p in (tmp_path / lean.name).iterdir()}
    time.sleep(0.05)   # a rewrite would move the times
    lean_spec(spec, (0, 1))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / lean.name).iterdir()} == times


def test_spec_of_an_unknown_layout_is_left_alone(tmp_path):
    spec = generated(tmp_path)
    (pathlib.Path(spec.sources[0]).parent / "batch_prefill_sm90_config.inc").unlink()
    assert lean_spec(spec, (0, 1)) is spec
    no_kernels = Spec("x", [tmp_path / "a.cu"], [])
    assert lean_spec(no_kernels, (0, 1)) is no_kernels


def test_only_the_librarys_own_variants_are_built_lean(tmp_path):
    specs = {}

    def generate(backend, uri, *args):
        specs[uri] = generated(tmp_path, uri)
        return specs[uri]

    lean_generate = lean_modules._lean_generator(generate)
    assert lean_generate("fa3", "ffi_own_d128").name == "ffi_own_d128_modes01"
    assert lean_generate("fa2", "ffi_fa2_own_d128").name == "ffi_fa2_own_d128_modes012"
    # another library's variant in the same process, and a backend this does not know, as FlashInfer builds them
    assert lean_generate("fa3", "someone_else") is specs["someone_else"]
    assert lean_generate("trtllm-gen", "ffi_x") is specs["ffi_x"]


def test_install_wraps_flashinfers_generator_once(tmp_path, monkeypatch):
    import sys
    import types

    prefill = types.ModuleType("flashinfer.prefill")
    prefill.gen_customize_batch_prefill_module = lambda backend, uri, *args: generated(tmp_path, uri)
    package = types.ModuleType("flashinfer")
    package.__path__ = []
    package.prefill = prefill
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.prefill", prefill)
    monkeypatch.setattr(lean_modules, "_installed", False)
    lean_modules.install()
    wrapped = prefill.gen_customize_batch_prefill_module
    assert wrapped("fa3", "ffi_a_d128").name == "ffi_a_d128_modes01"
    monkeypatch.setattr(lean_modules, "_installed", False)
    lean_modules.install()   # never wrapped twice
    assert prefill.gen_customize_batch_prefill_module is wrapped


def test_threads_writing_one_generated_file_at_once(tmp_path):
    """Threads of one process generating the same module at once (the demo prepares its checks in
    threads) each write through a temporary file of their own: no write is lost or fails."""
    import threading

    path, errors = tmp_path / "config.inc", []

    def write(i):
        try:
            for j in range(200):
                lean_modules._write_if_different(path, f"// {i} {j}\n")
        except Exception as e:   # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert path.read_text().startswith("// ") and not list(tmp_path.glob(".*.tmp"))
