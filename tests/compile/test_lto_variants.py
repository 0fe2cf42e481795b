"""lto_variants: the generic fa3 variant does not depend on the score_mod, a
score_mod's own file differs from another's only in its functions' bodies (and its hoisted-state
struct), and the cache keys. Pure Python; the one compile (the score file to LTO IR) is skipped
where nvcc is missing. The full build (FlashInfer's files, nvJitLink, the .so) is
scripts/lto_compile_cost.py's."""

import re
import shutil
import subprocess

import pytest
import torch

from flex_flash_infer.compile import lto_variants as L
from flex_flash_infer.compile.codegen import POSITION_BOUND
from flex_flash_infer.core.trace import trace
from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod


def _graph(mod):
    return trace(mod, "score_mod")


SOFTCAP = _graph(generate_softcap_score_mod(30.0))
REL_BIAS = _graph(generate_relative_position_bias_score_mod(torch.randn(8, 33)))


def test_generic_variant_names_no_score_mod():
    spec = L.generic_spec()
    assert spec.name == L.VARIANT_NAME
    assert f"{L.SCORE_FN}(" in spec.decl and f"{L.INIT_FN}(" in spec.decl
    assert "ffi_hoisted" not in spec.decl and "tanh" not in spec.decl   # no score code in it
    tensors, tensor_dtypes, scalars, scalar_dtypes = L.generic_arguments()
    assert tensors[:3] == ["ffi_req_q0", "ffi_req_kv0", "ffi_req_b"] and scalars[0] == "ffi_sm_scale"
    # unused table slots are FlashInfer's optional arguments (null), so no dummy tensors are needed
    assert all(n.startswith("maybe_") for n in tensors[3:]) and set(tensor_dtypes[3:]) == {"void"}
    assert len(tensors) == 3 + L.GENERIC_TENSORS and len(scalars) == 1 + L.GENERIC_INTS + L.GENERIC_FLOATS


def test_generic_uri_depends_on_the_module_not_the_score_mod():
    a = L.generic_uri(torch.bfloat16, 128, False)
    assert a == L.generic_uri(torch.bfloat16, 128, False)
    assert len({a, L.generic_uri(torch.float16, 128, False), L.generic_uri(torch.bfloat16, 64, False),
                L.generic_uri(torch.bfloat16, 128, True)}) == 4
    assert a.startswith("ffi_lto_")   # lean_modules builds it lean (its "ffi_" prefix)


def _skeleton(source: str) -> str:
    """The score file without its hoisted struct's members and its two functions' bodies."""
    source = re.sub(r"struct FfiHoisted \{.*?\n\};", "struct FfiHoisted {};", source, flags=re.S)
    head, mark, functions = source.partition(f'extern "C" __device__ void {L.INIT_FN}')
    functions = re.sub(r"\) \{\n.*?\n\}\n", ") {}\n", functions, flags=re.S)
    return re.sub(r"^// score_mod \w+", "// score_mod", head) + mark + functions


def test_score_files_differ_only_in_function_bodies():
    a, b = L.score_source(SOFTCAP, POSITION_BOUND), L.score_source(REL_BIAS, POSITION_BOUND)
    assert a != b
    assert _skeleton(a) == _skeleton(b)
    assert _skeleton(a).count(") {}") == 2   # both extern functions were cut
    assert "if (ffi_pad) return -INFINITY;" in b and "if (ffi_pad)" not in a   # the guard only with a table read
    assert "ffi_tanh" in a and "static_cast<const float*>(p.maybe_ffi_t0)" in b


def test_params_struct_matches_flashinfers_additional_params():
    """The score file reads FlashInfer's AdditionalParams through a void pointer: its copy of the
    struct must list the same members in the same order."""
    utils = pytest.importorskip("flashinfer.jit.attention.utils")
    decl = utils.generate_additional_params(*L.generic_arguments(), is_sm90_template=True)[0]
    theirs = [" ".join(line.split()) for line in decl.splitlines() if line.strip()]
    ours = [" ".join(line.split()) for line in L.params_struct().splitlines()[1:-1]]
    assert ours == theirs


def test_slots_and_values():
    t, s, shape = L.slot_names(REL_BIAS)
    assert t == {"t0": "maybe_ffi_t0"} and s == {"s0_reach": "ffi_i0"}
    assert shape[("t0", "stride", 0)] == "ffi_i1" and shape[("t0", "size", 1)] == "ffi_i4"
    table = torch.zeros(8, 33)
    tensors, ints, floats = L.slot_values(REL_BIAS, [table], [16, 33, 1, 8, 33])
    assert tensors[0] is table and tensors[1:] == [None] * (L.GENERIC_TENSORS - 1)
    assert ints[:5] == [16, 33, 1, 8, 33] and ints[5:] == [0] * (L.GENERIC_INTS - 5) and floats == [0.0] * 8
    _, _, floats = L.slot_values(SOFTCAP, [], [30.0])
    assert floats[0] == 30.0


def test_too_many_tables_is_refused():
    tables = [torch.randn(4, 4) for _ in range(L.GENERIC_TENSORS + 1)]

    def many(score, b, h, q, kv):
        for t in tables:
            score = score + t[h % 4, kv % 4]
        return score
    with pytest.raises(L.TooManyArguments):
        L.score_source(_graph(many), POSITION_BOUND)


def test_score_key_is_the_code_not_the_captured_values():
    assert L.score_key(SOFTCAP, POSITION_BOUND) == L.score_key(_graph(generate_softcap_score_mod(50.0)), POSITION_BOUND)
    assert L.score_key(SOFTCAP, POSITION_BOUND) != L.score_key(REL_BIAS, POSITION_BOUND)
    distance = _graph(lambda score, b, h, q, kv: score - 0.5 * (q - kv))
    assert L.score_key(distance, POSITION_BOUND) != L.score_key(distance, None)   # the bit trick or I2F


def test_ninja_flags_expand_variables():
    text = ("cuda_home = /opt/cuda\nnvcc = $cuda_home/bin/nvcc\ncommon_cflags = -DA $\n    -isystem $cuda_home/include\n"
            "cuda_cflags = $common_cflags $\n    -O3 $\n    -gencode=arch=compute_90a,code=sm_90a\n"
            "ldflags = -shared $\n    -lcudart\n")
    flags = L.ninja_flags(text)
    assert flags["cuda_cflags"] == ["-DA", "-isystem", "/opt/cuda/include", "-O3", "-gencode=arch=compute_90a,code=sm_90a"]
    assert flags["ldflags"] == ["-shared", "-lcudart"] and flags["nvcc"] == ["/opt/cuda/bin/nvcc"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("graph", [SOFTCAP, REL_BIAS], ids=["softcap", "rel_bias"])
def test_score_file_compiles_to_lto_ir(tmp_path, graph):
    cu = tmp_path / "score.cu"
    cu.write_text(L.score_source(graph, POSITION_BOUND))
    done = subprocess.run(["nvcc", "-std=c++17", "-use_fast_math", "-O3", L.LTO_GENCODE, "-dc", "-c", str(cu),
                           "-o", str(tmp_path / "score.o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr


def _stub_generator(monkeypatch, root):
    """FlashInfer's gen_customize_batch_prefill_module as a stand-in writing small generated files
    (once, as FlashInfer's does for a name it has written) and a build.ninja."""
    import pathlib
    import sys
    import types

    from flex_flash_infer.compile import lean_modules

    def generate(backend, uri, *args):
        folder = root / "generated" / uri
        folder.mkdir(parents=True, exist_ok=True)
        names = ["batch_prefill_ragged_kernel_mask_1.cu", "batch_prefill.cu", "batch_prefill_sm90_jit_binding.cu"]
        for n in names:
            if not (folder / n).exists():
                (folder / n).write_text(f"// {n}, first version\n")
        build = root / "cached_ops" / uri
        build.mkdir(parents=True, exist_ok=True)
        ninja = build / "build.ninja"
        return types.SimpleNamespace(
            name=uri, build_dir=str(build), sources=[str(folder / n) for n in names], ninja_path=ninja,
            write_ninja=lambda: ninja.write_text("nvcc = nvcc\ncuda_cflags = -O3 -gencode=arch=compute_90a,code=sm_90a\n"
                                                 "ldflags = -shared\n"))

    prefill = types.SimpleNamespace(gen_customize_batch_prefill_module=generate)
    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(prefill=prefill, __version__="0.7.2"))
    monkeypatch.setitem(sys.modules, "flashinfer.prefill", prefill)
    monkeypatch.setattr(lean_modules, "install", lambda: None)
    monkeypatch.setattr(L, "_nvcc_version", lambda nvcc: ("13", "0", "88"))
    return pathlib.Path(root)


def test_generic_objects_are_named_by_the_sources_they_come_from(monkeypatch, tmp_path):
    """The generic objects are reused whenever a file of their name is there (no ninja): a changed
    generated source (a change of lean_modules' rewrite, or of FlashInfer's generator) must give
    new names, so nothing built from the old sources is linked into a new score_mod's module."""
    _stub_generator(monkeypatch, tmp_path)
    first = L.GenericModule(torch.bfloat16, 128, False)
    objects = [o for objs in first.objects() for o in objs]
    for o in objects:
        o.write_bytes(b"built from the first version")
    assert first.compile_jobs() == []
    key = first.score_key(SOFTCAP, POSITION_BOUND)
    assert L.GenericModule(torch.bfloat16, 128, False).score_key(SOFTCAP, POSITION_BOUND) == key   # unchanged: reused
    host = next(s for s in first.host_sources if s.name == "batch_prefill.cu")
    host.write_text("// batch_prefill.cu, another version\n")
    second = L.GenericModule(torch.bfloat16, 128, False)
    assert [o.name for objs in second.objects() for o in objs] != [o.name for o in objects]
    assert len(second.compile_jobs()) == len(objects)   # everything built again
    assert second.score_key(SOFTCAP, POSITION_BOUND) != key


def test_one_process_at_a_time_builds_a_score_mods_files(monkeypatch, tmp_path):
    """build_score_mod holds a lock on the score_mod's folder while it writes its fixed-name
    files (two ranks meeting one new score_mod)."""
    import fcntl

    _stub_generator(monkeypatch, tmp_path)
    module = L.GenericModule(torch.bfloat16, 128, False)
    seen = []

    def compile_score(graph, bound):
        lock = module.score_dir(module.score_key(graph, bound)) / ".ffi_lto_score.lock"
        with open(lock) as f:   # held by build_score_mod: a second taker would block
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(lock)
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr(module, "build", lambda jobs=None: None)
    monkeypatch.setattr(module, "compile_score", compile_score)
    with pytest.raises(RuntimeError, match="stop before compiling"):
        module.build_score_mod(SOFTCAP, POSITION_BOUND)
    assert seen
    with open(seen[0]) as f:   # released after the failure
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
