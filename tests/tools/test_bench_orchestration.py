"""The benchmark's orchestration (bench_case: our default route, the alternative routes timed
beside it, FlashInfer's native call, correctness checks, row assembly) run on the CPU model of
FlashInfer's kernels, so a mistake there shows up here instead of costing GPU time. Timing is
replaced (no CUDA events on CPU); torch flex and cuDNN are left out or fail as rows."""
import sys

import pytest
import torch

import fake_flashinfer
from flex_flash_infer.backends import backend_choice, flashinfer_backend, score_mod_kernels, tile_kernels
from flex_flash_infer import varlen
from flex_flash_infer_bench import masks, profile


class _Event:
    def __init__(self, enable_timing=False):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1.0


@pytest.fixture
def cpu_bench(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(varlen, "_is_hopper", lambda device: True)
    monkeypatch.setattr(backend_choice, "unsupported_reason", lambda *a: None)
    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    # one call each, not a timing
    monkeypatch.setattr(masks, "time_interleaved", lambda fns: ({n: (f(), 1.0)[1] for n, f in fns.items()}, {}))


def _rows(name, seq_len):
    mod, native, sdpa = masks.case_masks(seq_len)[name]
    rows = masks.bench_case(name, seq_len, 16, mod, native, sdpa, heads_q=4, heads_kv=2, dtype=torch.float32,
                            with_flex=False, device="cpu")
    return {r["impl"]: r for r in rows}


@pytest.mark.parametrize("name,route,expected", [
    ("causal", "bands", {"flashinfer_native", "flashinfer_ragged_native"}),
    ("streaming", "bands+columns", set()),
    ("per_head_windows", "bands-per-head", set()),
    ("random_tiles", "tiles-causal", set()),
])
def test_bench_case_rows_on_the_cpu_model(cpu_bench, name, route, expected):
    rows = _rows(name, 2048)
    ours = rows["flex_flash_infer"]
    assert "error" not in ours and ours["rel_err"] < 1e-4 and ours["ms"] == 1.0
    assert ours["route"] == route and ours["tiles_nonempty"] <= ours["tiles_total"]
    for impl in expected:
        assert impl in rows and "error" not in rows[impl], (impl, rows.get(impl))
        assert rows[impl]["rel_err"] < 1e-4
    if name == "causal":   # cuDNN needs CUDA: its row says why, the rest ran
        assert "error" in rows["sdpa_cudnn"]


@pytest.mark.parametrize("name", ["causal", "streaming", "per_head_windows"])
def test_bench_case_times_ours_and_the_peers_only(cpu_bench, name):
    mod, native, sdpa = masks.case_masks(2048)[name]
    rows = masks.bench_case(name, 2048, 16, mod, native, sdpa, heads_q=4, heads_kv=2, dtype=torch.float32,
                            with_flex=False, device="cpu")
    impls = {r["impl"] for r in rows}
    assert "flex_flash_infer" in impls and not any(i.startswith("ours_") for i in impls), impls
    assert impls <= set(masks.SPEC_IMPLS) | {"flashinfer_ragged_native"}


@pytest.mark.parametrize("name,route", [("softcap+causal", "bands"), ("rel_bias+causal", "bands"),
                                        ("softcap+random_tiles", "tiles-causal")])
def test_score_mod_case_rows_on_the_cpu_model(cpu_bench, name, route):
    mask_name, score_mod, native = masks.score_mod_cases()[name]
    mod = masks.case_masks(1024)[mask_name][0]
    rows = {r["impl"]: r for r in masks.bench_case(name, 1024, 16, mod, native, None, heads_q=4, heads_kv=2,
                                                   dtype=torch.float32, with_flex=False, score_mod=score_mod,
                                                   device="cpu")}
    ours = rows["flex_flash_infer"]
    assert "error" not in ours and ours["rel_err"] < 1e-4 and ours["route"] == route
    if native is not None:
        assert "error" not in rows["flashinfer_native"] and rows["flashinfer_native"]["rel_err"] < 1e-4


@pytest.mark.parametrize("case", ["causal", "sliding_window", "softcap+causal"])
def test_decode_case_rows_on_the_cpu_model(cpu_bench, monkeypatch, case):
    from flex_flash_infer import paged
    from flex_flash_infer.mods import generate_softcap_score_mod
    from flex_flash_infer.mods.registry import get_mask_fn
    from flex_flash_infer_bench import decode

    monkeypatch.setattr(paged, "_is_hopper", lambda device: True)
    monkeypatch.setattr(paged, "unsupported_reason", lambda *a: None)
    mask = get_mask_fn("sliding_window", window_size=40) if case == "sliding_window" else get_mask_fn("causal")
    extra = {"score_mod": generate_softcap_score_mod(30.0), "native_kwargs": {"logits_soft_cap": 30.0}} \
        if case == "softcap+causal" else {}
    rows = {r["impl"]: r for r in decode.decode_case(case, mask, 39 if case == "sliding_window" else -1,
                                                     batch=3, context=256, hq=4, hkv=2, d=16, page=16,
                                                     dtype=torch.float32, with_flex=False, device="cpu",
                                                     **extra)}
    ours = rows["flex_flash_infer"]
    assert "error" not in ours and ours["rel_err"] < 1e-4 and ours["plan_ms"] > 0
    assert any(where.endswith("(plan)") for where, *_ in ours["plan_profile"])   # where plan() goes
    for impl in ("flashinfer_native", "ours_tensor_cores", "flashinfer_fa3_prefill_kernel"):
        assert "error" not in rows[impl] and rows[impl]["rel_err"] < 1e-4, (impl, rows[impl])


def test_varlen_rows_on_the_cpu_model(cpu_bench, tmp_path):
    import json

    from flex_flash_infer_bench.varlen import run_varlen_benchmark

    result = run_varlen_benchmark(str(tmp_path / "varlen.json"), hq=4, hkv=2, d=16, dtype=torch.float32,
                                  total=2048, count=4, device="cpu")
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"flex_flash_infer", "flashinfer_native"}
    assert all("error" not in r and r["rel_err"] < 1e-4 for r in rows.values()), rows
    assert rows["flex_flash_infer"]["case"] == "varlen_4_documents_causal"
    assert json.loads((tmp_path / "varlen.json").read_text())["rows"]


def test_profiled_case_on_the_cpu_model(cpu_bench, monkeypatch):
    """--profile: every timed row gets host time and kernels; the CUDA-graph row fails with a reason on the CPU."""
    calls = []
    monkeypatch.setattr(profile, "kernel_times", lambda fn: (calls.append(fn), (0.1, [("k", 0.1, 1.0)]))[1])
    mod, native, sdpa = masks.case_masks(1024)["streaming"]
    rows = {r["impl"]: r for r in masks.bench_case("streaming", 1024, 16, mod, native, sdpa, heads_q=4, heads_kv=2,
                                                   dtype=torch.float32, with_flex=False, device="cpu", profile=True)}
    ours = rows["flex_flash_infer"]
    assert "error" not in ours and ours["host_ms"] > 0 and ours["gpu_busy_ms"] == 0.1
    assert len(calls) == sum("ms" in r for r in rows.values())   # every timed row was profiled
    assert "error" in rows["ours_cuda_graph"]   # no CUDA graphs on the CPU: the row says so


def test_markdown_table_compares_with_flex_on_flashattention4():
    def row(case, impl, ms, **extra):
        return {"case": case, "seq_len": 8192, "head_dim": 128, "impl": impl, "ms": ms, **extra}

    result = {"device": "H200", "torch": "2.11", "flashinfer": "0.7.2", "date": "2026-12-04", "rows": [
        row("causal", "flex_flash_infer", 0.8, route="bands"), row("causal", "torch_flex_fa4", 0.9),
        row("causal", "torch_flex", 1.4),
        row("streaming", "flex_flash_infer", 0.4, route="bands+columns"), row("streaming", "torch_flex_fa4", 0.3),
        {"case": "prefix_lm", "seq_len": 8192, "head_dim": 128, "impl": "torch_flex_fa4",
         "error": "RuntimeError: FlashAttention-4 not importable"},
        row("prefix_lm", "flex_flash_infer", 1.0, route="bands")]}
    table = masks.markdown_table(result)
    causal = next(line for line in table.splitlines() if line.startswith("| causal |"))
    assert "| 0.900 | 1.12x | 1.400 | 1.75x |" in causal
    assert "torch_flex_fa4: RuntimeError: FlashAttention-4 not importable" in table
    # geometric mean of 0.9/0.8 and 0.3/0.4; the slower row is named
    assert "geometric mean speed-up 0.92x over 2 rows; slower than it: streaming 8192 (0.75x)" in table


def test_fa4_peer_says_why_it_is_missing():
    try:
        import flash_attn.cute  # noqa: F401
        pytest.skip("FlashAttention-4 is installed here")
    except Exception:
        pass
    assert "fetch-fa4.sh" in masks.fa4_missing()


def test_per_head_windows_tiles_for_the_peers_are_torchs():
    """Past 8192 tokens the peers take this library's per-head window tiles as torch's BlockMask
    (torch's eager build would hold a dense [heads, S, S] mask): the same tables torch builds."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    from flex_flash_infer import create_block_mask

    # a multiple of the tile as the bench's lengths are (torch's tables also list tiles that only its
    # padding rows past the end would see)
    mod, S, H = masks.per_head_window_mask(), 1536, 8
    ours = create_block_mask(mod, None, H, S, S, device="cpu").to_torch()
    theirs = torch_create_block_mask(mod, None, H, S, S, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        a, b = getattr(ours, name), getattr(theirs, name)
        if name.endswith("indices"):   # only the listed entries of each row are meaningful
            counts = getattr(ours, name.replace("indices", "num_blocks"))
            keep = torch.arange(a.shape[-1]) < counts.unsqueeze(-1)
            a, b = a[keep], b[keep]
        assert torch.equal(a, b), name
