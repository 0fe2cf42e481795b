"""The pure-Python parts of the LTO launch check: the generic arguments a
FlashInfer wrapper's run() gets (lto_variants.run_arguments), the pack of the generic objects and
of libnvJitLink (lto_pack), and the check script's paged layout and request tables. No GPU, no
FlashInfer: the objects here are stand-in files."""

import importlib.util
import json
import lzma
import pathlib

import pytest
import torch

from flex_flash_infer.compile import lto_pack as P
from flex_flash_infer.compile import lto_variants as L
from flex_flash_infer.core.trace import trace
from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _check_script():
    spec = importlib.util.spec_from_file_location("lto_launch_check", ROOT / "scripts" / "lto_launch_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_arguments_fill_every_slot_in_flashinfers_order():
    graph = trace(generate_relative_position_bias_score_mod(torch.randn(8, 33)), "score_mod")
    table = torch.zeros(8, 33)
    args = L.run_arguments(graph, [table], [16, 33, 1, 8, 33], 0.125)
    tensors, _, scalars, scalar_dtypes = L.generic_arguments()
    # after the three request tables: every tensor slot, then every scalar, as generic_arguments
    assert len(args) == len(tensors) - 3 + len(scalars)
    assert args[0] is table and args[1:L.GENERIC_TENSORS] == [None] * (L.GENERIC_TENSORS - 1)
    values = args[L.GENERIC_TENSORS:]
    assert values[0] == 0.125 and type(values[0]) is float   # ffi_sm_scale
    assert values[1:6] == [16, 33, 1, 8, 33]
    # each scalar of the slot's declared type: tvm-ffi passes int64_t / double as given
    for v, d in zip(values, scalar_dtypes):
        assert type(v) is (int if d == "int64_t" else float), (v, d)


def test_run_arguments_of_a_float_capture():
    graph = trace(generate_softcap_score_mod(30.0), "score_mod")
    args = L.run_arguments(graph, [], [30], 0.5)
    assert args[:L.GENERIC_TENSORS] == [None] * L.GENERIC_TENSORS
    floats = args[L.GENERIC_TENSORS + 1 + L.GENERIC_INTS:]
    assert floats[0] == 30.0 and type(floats[0]) is float and floats[1:] == [0.0] * (L.GENERIC_FLOATS - 1)


def _objects(tmp_path, tag):
    files = {}
    for role, stem in [("kernel", "batch_prefill_ragged_sm90_kernel_mask_0"), ("kernel", "batch_prefill_paged_sm90_kernel_mask_1"),
                       ("host", "batch_prefill_sm90")]:
        path = tmp_path / "built" / f"mod_{stem}.{tag}.{'lto' if role == 'kernel' else 'cuda'}.o"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{role} {stem} {tag}".encode() * 100)
        files[role, stem] = path
    return files


def test_pack_unpack_installs_objects_under_the_local_names(tmp_path):
    files = _objects(tmp_path, "cpu0tag")
    out = P.pack(tmp_path / "pack", "ffi_lto_x_bfloat16_d128_noswa_modes01", files, {"nvcc": "13.0.88"})
    assert out.name == P.PACK_NAME and P.read_manifest(tmp_path / "pack")["meta"] == {"nvcc": "13.0.88"}
    # the other machine's names: its compiler and flags tag differ
    targets = {k: tmp_path / "gpu" / f"mod_{k[1]}.gpu1tag.o" for k in files}
    manifest = P.unpack(tmp_path / "pack", "ffi_lto_x_bfloat16_d128_noswa_modes01", targets)
    assert {(e["role"], e["stem"]) for e in manifest["files"]} == set(files)
    for k, path in files.items():
        assert targets[k].read_bytes() == path.read_bytes()
    # kept unless overwrite
    targets[next(iter(files))].write_bytes(b"local")
    P.unpack(tmp_path / "pack", "ffi_lto_x_bfloat16_d128_noswa_modes01", targets)
    assert targets[next(iter(files))].read_bytes() == b"local"
    P.unpack(tmp_path / "pack", "ffi_lto_x_bfloat16_d128_noswa_modes01", targets, overwrite=True)
    assert targets[next(iter(files))].read_bytes() == files[next(iter(files))].read_bytes()
    assert not list((tmp_path / "gpu").glob(".*tmp"))


def test_unpack_refuses_another_module_or_other_files(tmp_path):
    files = _objects(tmp_path, "t")
    P.pack(tmp_path / "pack", "ffi_lto_a", files)
    targets = {k: tmp_path / "gpu" / f"{k[1]}.o" for k in files}
    with pytest.raises(P.PackMismatch, match="holds ffi_lto_a"):
        P.unpack(tmp_path / "pack", "ffi_lto_b", targets)
    fewer = dict(list(targets.items())[:-1])
    with pytest.raises(P.PackMismatch, match="not in this module"):
        P.unpack(tmp_path / "pack", "ffi_lto_a", fewer)
    more = {**targets, ("kernel", "batch_prefill_ragged_sm90_kernel_mask_1"): tmp_path / "gpu" / "x.o"}
    with pytest.raises(P.PackMismatch, match="missing"):
        P.unpack(tmp_path / "pack", "ffi_lto_a", more)
    assert not (tmp_path / "gpu").exists()


def test_unpack_refuses_objects_of_other_generated_sources(tmp_path):
    files = _objects(tmp_path, "t")
    P.pack(tmp_path / "pack", "ffi_lto_a", files, {"sources_tag": "aaaa"})
    targets = {k: tmp_path / "gpu" / f"{k[1]}.o" for k in files}
    with pytest.raises(P.PackMismatch, match="other generated sources"):
        P.unpack(tmp_path / "pack", "ffi_lto_a", targets, sources_tag="bbbb")
    assert not (tmp_path / "gpu").exists()
    P.unpack(tmp_path / "pack", "ffi_lto_a", targets, sources_tag="aaaa")
    assert all(t.exists() for t in targets.values())


def test_pack_needs_built_objects(tmp_path):
    with pytest.raises(FileNotFoundError):
        P.pack(tmp_path / "pack", "ffi_lto_a", {("host", "x"): tmp_path / "nothing.o"})


def test_library_pack_round_trip(tmp_path):
    lib = tmp_path / "libnvJitLink.so.13"
    lib.write_bytes(bytes(range(256)) * 1000)
    P.pack_library(lib, tmp_path / "pack", (13, 0))
    info = json.loads((tmp_path / "pack" / P.NVJITLINK_INFO).read_text())
    assert info["version"] == [13, 0] and info["file"] == lib.name
    out = P.unpack_library(tmp_path / "pack", tmp_path / "dest")
    assert out == tmp_path / "dest" / lib.name and out.read_bytes() == lib.read_bytes()
    assert P.unpack_library(tmp_path / "pack", tmp_path / "dest") == out   # there already: kept
    assert P.unpack_library(tmp_path / "nothing", tmp_path / "dest") is None
    with lzma.open(tmp_path / "pack" / P.NVJITLINK_NAME, "wb") as f:   # a corrupt pack is refused
        f.write(b"other")
    with pytest.raises(P.PackMismatch):
        P.unpack_library(tmp_path / "pack", tmp_path / "dest2")


def test_carried_nvjitlink_is_a_candidate(tmp_path, monkeypatch):
    lib = tmp_path / "libnvJitLink.so.13"
    lib.write_bytes(b"not a library")
    monkeypatch.setenv("FFI_NVJITLINK", str(lib))
    monkeypatch.setattr("sys.path", [])
    monkeypatch.setattr(L, "_cuda_homes", lambda: [])
    assert L.nvjitlink_library() == str(lib)   # alone: chosen even if it reports no version


def test_check_script_paged_layout_and_tables():
    chk = _check_script()
    shape = {"lens": [5, 40], "hq": 4, "hkv": 2}
    g = torch.Generator().manual_seed(0)
    k = torch.randn(45, 2, 8, generator=g)
    v = torch.randn(45, 2, 8, generator=g)
    indptr = torch.tensor([0, 5, 45], dtype=torch.int32)
    kp, vp, page_indptr, indices, last = chk.paged_layout(k, v, indptr, page_size=16)
    assert kp.shape == (1 + 3, 16, 2, 8) and page_indptr.tolist() == [0, 1, 4] and last.tolist() == [5, 8]
    assert indices.tolist() == [0, 1, 2, 3]
    # each request's keys read back from its pages in order
    for r, (s, e) in enumerate([(0, 5), (5, 45)]):
        pages = kp[page_indptr[r]:page_indptr[r + 1]].reshape(-1, 2, 8)
        assert torch.equal(pages[:e - s], k[s:e]) and torch.equal(vp[page_indptr[r]:page_indptr[r + 1]].reshape(-1, 2, 8)[:e - s], v[s:e])
    q0, kv0, b = chk.request_tables(indptr, device="cpu")
    assert q0.tolist() == [0, 0] and kv0.tolist() == [0, 0] and b.tolist() == [0, 1]
    assert shape["lens"] == [5, 40]


def test_check_script_verdicts():
    chk = _check_script()
    ok = {"rel_l2": 1e-3, "max_abs": 0.01, "nan": False, "bitwise_equal": False}
    row = {"lto vs reference": ok, "today vs reference": ok, "lto vs today": ok}
    chk.verdict(row, 1e-2, True)
    assert row["verdict"] == "ok"
    row = {"lto vs reference": {**ok, "rel_l2": 0.5}, "lto vs today": {**ok, "rel_l2": float("nan")}}
    chk.verdict(row, 1e-2, True)
    assert row["verdict"].startswith("WRONG") and "lto vs reference" in row["verdict"] and "lto vs today" in row["verdict"]
    row = {"today vs reference": ok}
    chk.verdict(row, 1e-2, True)
    assert row["verdict"].startswith("ERROR")
    a = torch.ones(3, 2)
    assert chk.compare(a, a)["bitwise_equal"] and chk.compare(a, a)["rel_l2"] == 0.0
