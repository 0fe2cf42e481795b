"""Compiled mods on the tiles and key-column routes (tile_kernels.py, variant_paged.py), through
the plan on CPU: FlashInfer's kernels are the CPU model (fake_flashinfer.py), which hands the
host-compiled score_mod / mask_mod the positions the variant's five tables give, so a wrong
table (query tile, batch entry, head offset, page position, filler page) shows up as a wrong
output against the dense float64 oracle."""
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer.compile.codegen import graph_key
from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
from flex_flash_infer.backends import flashinfer_backend, tile_kernels
from flex_flash_infer.tools.warmup import example_score_mod
from hostcheck import compile_host
from random_masks import random_mask_mod


@pytest.fixture
def fake(monkeypatch):
    """The CPU model as flashinfer, Hopper's launch choices, and each generated variant
    registered with the host-compiled code of its graphs."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)


def _block_sparse_causal(L, rng, block=64):
    n = L // block + 1
    keep = torch.rand(n, n, generator=rng) < 0.5
    keep.fill_diagonal_(True)
    keep[:, 0] = True
    keep[torch.arange(2, n), torch.arange(n - 2)] = False   # rows of two or more runs: not a few bands

    def block_sparse_causal(b, h, q, kv):
        return (q >= kv) & keep[q // block, kv // block]

    return block_sparse_causal


def _run(plan, B, Hq, Hkv, L, S, D, rng):
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    return (q, k, v), out.view(B, L, Hq, D).transpose(1, 2), lse.view(B, L, Hq).transpose(1, 2).double()


def _check(inputs, out, lse, dense, score_mod):
    ref_out, ref_lse = dense_attention(*inputs, dense, score_fn=score_mod)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < 1e-5   # the score_mod runs in float32
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and torch.allclose(lse[seen], ref_lse[seen], atol=1e-4)


@pytest.mark.parametrize("mod_name", ["softcap", "alibi", "rel_bias"])
@pytest.mark.parametrize("case", ["block_sparse_causal", "random_elements"])
def test_score_mod_on_the_tiles_route(fake, rng, case, mod_name):
    B, Hq, Hkv, L, S, D = 2, 4, 2, 330, 330, 16
    if case == "block_sparse_causal":
        mask_mod = _block_sparse_causal(L, rng)
    else:
        table = torch.rand(L, S, generator=rng) < 0.4
        table[: L // 2, : S // 3] = True    # full tiles too

        def mask_mod(b, h, q, kv):
            return table[q, kv] | (q == kv)

    score_mod = example_score_mod(mod_name, Hq, device="cpu")
    bm = create_block_mask(mask_mod, B, None, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    assert plan.route == ("tiles-causal" if case == "block_sparse_causal" else "tiles")
    group = plan.groups[0]
    assert group.full is not None and group.full_args
    # block-sparse causal: one causal launch (the diagonal tile last); else a partial launch too
    assert (group.partial is None) == (case == "block_sparse_causal") and (group.partial is None or group.partial_args)
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, S, D, rng)
    _check(inputs, out, lse, create_mask(mask_mod, B, 1, L, S, device="cpu"), score_mod)


def test_score_mod_and_per_head_mask(fake, rng):
    """Per-head masks: head-major requests (head offset from the request)."""
    B, Hq, Hkv, L, S, D = 2, 4, 2, 150, 170, 16
    mask_mod, dense = random_mask_mod(B, Hq, L, S, rng)
    score_mod = example_score_mod("alibi", Hq, device="cpu")
    bm = create_block_mask(mask_mod, B, Hq, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    assert plan.route == "tiles-per-head" and plan.head_major
    assert all(g.partial_args for g in plan.groups)
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, S, D, rng)
    _check(inputs, out, lse, dense, score_mod)


@pytest.mark.parametrize("name,params", [("attamba", {"window_size": 40, "chunk_size": 32}),
                                         ("streaming", {"sink_size": 4, "window_size": 50})])
@pytest.mark.parametrize("mod_name", ["softcap", "alibi", "rel_bias"])
def test_score_mod_on_bands_plus_key_columns(fake, rng, name, params, mod_name):
    """Bands run the ragged score_mod variant (the library softcap: FlashInfer's own soft cap,
    native_soft_cap.py); gathered key columns (pages of one key) run the paged variant, whose page
    table gives each column's absolute key position."""
    from flex_flash_infer.planning import far_bias
    from flex_flash_infer.backends import score_mod_kernels
    from flex_flash_infer.core.trace import trace

    B, Hq, Hkv, L, D = 2, 4, 2, 300, 16
    score_mod = example_score_mod(mod_name, Hq, device="cpu")
    graph = trace(score_mod, "score_mod")
    fake_flashinfer.VARIANTS[f"FlexScoreMod_{graph_key(graph)}"] = compile_host(graph)
    # a split's near keys run the fa2 variant
    fake_flashinfer.VARIANTS[f"FlexScoreModFa2_{graph_key(graph)}<use_custom_mask>"] = compile_host(graph)
    try:
        mask_mod = get_mask_fn(name, **params)
        bm = create_block_mask(mask_mod, B, None, L, L, device="cpu", BLOCK_SIZE=64)
        plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                                 score_mod=score_mod)
        runner = plan.band_runner
        if mod_name == "rel_bias":   # the window reaches past the table (reach 32): split there (far_bias.py)
            assert isinstance(runner, far_bias.FarSplitBands) and runner.far_bands
            runner = runner.near
        if mod_name == "softcap":
            assert isinstance(runner, flashinfer_backend._BandRunner) and runner.soft_cap == 5.0
        else:
            assert isinstance(runner, score_mod_kernels.ScoreModBands)
        assert plan.route == "bands+columns" and plan.columns is not None
        inputs, out, lse = _run(plan, B, Hq, Hkv, L, L, D, rng)
        _check(inputs, out, lse, create_mask(mask_mod, B, 1, L, L, device="cpu"), score_mod)
    finally:
        del fake_flashinfer.VARIANTS[f"FlexScoreMod_{graph_key(graph)}"]
        del fake_flashinfer.VARIANTS[f"FlexScoreModFa2_{graph_key(graph)}<use_custom_mask>"]


@pytest.mark.parametrize("kind", ["tile_variants:softcap", "tile_variants:rel_bias", "tile_variants:alibi+columns"])
def test_the_gpu_tests_cases_on_the_cpu_model(fake, monkeypatch, rng, kind):
    """The cases of test_gpu's tile-variant test (and of warmup) take the routes they name, with
    the launches they are meant to compile, and are exact through the CPU model."""
    from flex_flash_infer.tools.warmup import tile_variant_case

    B, Hq, Hkv, L, D = 2, 8, 2, 777, 16
    S = L if kind.endswith("columns") else 901
    mask_mod, score_mod = tile_variant_case(kind, Hq, L, S, device="cpu")
    if score_mod is not None and kind.endswith("columns"):
        from flex_flash_infer.core.trace import trace

        graph = trace(score_mod, "score_mod")
        monkeypatch.setitem(fake_flashinfer.VARIANTS, f"FlexScoreMod_{graph_key(graph)}", compile_host(graph))
    bm = create_block_mask(mask_mod, None, None, L, S, device="cpu")
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    group = plan.columns if kind.endswith("columns") else plan.groups[0]
    assert plan.route == ("bands+columns" if kind.endswith("columns") else "tiles")
    assert group.partial_args and (kind.endswith("columns") or group.full is not None)
    assert bool(group.full_args) == (score_mod is not None and group.full is not None)
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, S, D, rng)
    _check(inputs, out, lse, create_mask(mask_mod, 1, 1, L, S, device="cpu"), score_mod)



def test_the_library_softcap_before_hopper_runs_flashinfers_own_soft_cap(fake, monkeypatch):
    """On an older GPU the library softcap on bands still runs FlashInfer's own soft cap, which
    needs no variant."""
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: False)
    bm = create_block_mask(get_mask_fn("causal"), 1, None, 200, 200, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, 1, 200, 200, 2, 1, 16, torch.float64, 0.25, "cpu",
                                             score_mod=example_score_mod("softcap", 2, device="cpu"))
    assert plan.band_runner.soft_cap == 5.0


def test_per_head_bands_with_a_score_mod_run_on_the_tiles_route(fake, rng):
    """Per-head windows lower to bands per head, whose launches take no score_mod variant: with a
    score_mod the plan takes the tiles-per-head route's compiled variants instead (no fallback to
    the reference), exact against the dense oracle."""
    B, Hq, Hkv, L, D = 2, 8, 2, 257, 16
    widths = torch.tensor([16, 40, 100, 1000] * 2)

    def mod(b, h, q_idx, kv_idx):   # a causal window per query head
        return (q_idx >= kv_idx) & (q_idx - kv_idx < widths[h])

    score_mod = example_score_mod("softcap", Hq, device="cpu")
    bm = create_block_mask(mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
    assert flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu").route == \
        "bands-per-head"
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    assert plan.route == "tiles-per-head"
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, L, D, rng)
    _check(inputs, out, lse, create_mask(mod, 1, Hq, L, L, device="cpu"), score_mod)
