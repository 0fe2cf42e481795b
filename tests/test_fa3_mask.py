"""Full and partial tiles in one fa3 launch with the mask in the kernel (tile_kernels.FA3_MASK):
the planner's flags against the tile states, and the launches through the CPU model of the
kernels (host-compiled mask_mod and score_mod, as the generated variant evaluates them) against
the dense float64 oracle, for shared and per-head masks, GQA and odd lengths."""
import sys

import pytest
import torch

import fake_flashinfer
from flex_flash_infer import create_block_mask, create_mask, flashinfer_backend, get_mask_fn, route, tile_kernels
from flex_flash_infer.block_build import EMPTY, PARTIAL
from flex_flash_infer.planner import plan_tiles
from flex_flash_infer.warmup import example_score_mod
from test_block_mask import random_mask_mod
from test_tile_kernels import _block_sparse_causal, _check, _run


@pytest.fixture
def fake(monkeypatch):
    """The CPU model as flashinfer, Hopper's launch choices, generated variants registered."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(tile_kernels, "TILE_VARIANTS", True)
    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)


@pytest.fixture
def fa3_mask(fake, monkeypatch):
    monkeypatch.setattr(tile_kernels, "FA3_MASK", True)


def test_one_launch_lists_every_non_empty_tile_and_flags_the_partial_ones(rng):
    states = torch.randint(0, 3, (2, 5, 7), generator=rng, dtype=torch.int8)
    plan = plan_tiles(states, 2, 300, 64, 64, one_launch=True)
    assert plan.partial is None
    launch = plan.full
    listed = torch.zeros(2 * 5, 7, dtype=torch.bool)
    listed[launch.tile_request, launch.kv_indices.long() % 7] = True
    assert torch.equal(listed, (states != EMPTY).reshape(10, 7))
    flagged = states.reshape(10, 7)[launch.tile_request, launch.kv_indices.long() % 7] == PARTIAL
    assert torch.equal(launch.masked, flagged)
    assert torch.equal(launch.kv_indptr[1:] - launch.kv_indptr[:-1], (states != EMPTY).sum(-1).flatten().int())


@pytest.mark.parametrize("case", ["random_elements", "streaming", "block_sparse_causal"])
@pytest.mark.parametrize("mod_name", [None, "softcap", "rel_bias"])
@pytest.mark.parametrize("L,S", [(330, 330), (200, 257)])
def test_shared_mask_in_one_fa3_launch(fa3_mask, monkeypatch, rng, case, mod_name, L, S):
    B, Hq, Hkv, D = 2, 4, 2, 16
    if case == "random_elements":
        table = torch.rand(L, S, generator=rng) < 0.4
        table[: L // 2, : S // 3] = True    # full tiles too

        def mask_mod(b, h, q, kv):
            return table[q, kv] | (q == kv)
    elif case == "streaming":
        mask_mod = get_mask_fn("streaming", sink_size=4, window_size=70)
    else:
        mask_mod = _block_sparse_causal(max(L, S), rng)
    score_mod = example_score_mod(mod_name, Hq, device="cpu") if mod_name else None
    monkeypatch.setattr(route, "ENABLE_COLUMN_LOWERING", False)   # streaming on the tiles route
    bm = create_block_mask(mask_mod, B, None, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    causal_diagonal = case == "block_sparse_causal" and L == S
    assert plan.route == ("tiles-causal" if causal_diagonal else "tiles-fa3-mask")
    group = plan.groups[0]
    assert group.partial is None and group.full is not None
    assert (group.full.variant is not None) == (score_mod is not None or not causal_diagonal)
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, S, D, rng)
    _check(inputs, out, lse, create_mask(mask_mod, B, 1, L, S, device="cpu"), score_mod)


@pytest.mark.parametrize("heads_one_launch", [False, True])
@pytest.mark.parametrize("mod_name", [None, "alibi"])
def test_per_head_mask_in_one_fa3_launch(fa3_mask, monkeypatch, rng, heads_one_launch, mod_name):
    monkeypatch.setattr(flashinfer_backend, "PER_HEAD_ONE_LAUNCH", heads_one_launch)
    B, Hq, Hkv, L, S, D = 2, 4, 2, 150, 170, 16
    mask_mod, dense = random_mask_mod(B, Hq, L, S, rng)
    score_mod = example_score_mod(mod_name, Hq, device="cpu") if mod_name else None
    bm = create_block_mask(mask_mod, B, Hq, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    assert plan.route == "tiles-per-head-fa3-mask" and plan.head_major == heads_one_launch
    assert all(g.partial is None and g.full.variant is not None for g in plan.groups)
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, S, D, rng)
    _check(inputs, out, lse, dense, score_mod)


def test_untraceable_mask_keeps_the_two_launches(fa3_mask, rng):
    L = 190
    table = torch.rand(L, L, generator=rng) < 0.3

    def untraceable(b, h, q, kv):   # a Python branch on a traced value: not compilable
        return table[q, kv] if int(q.max()) >= 0 else table[q, kv]

    bm = create_block_mask(untraceable, 1, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, 1, L, L, 2, 1, 16, torch.float64, 0.25, "cpu")
    assert plan.route == "tiles" and plan.groups[0].partial is not None
    inputs, out, lse = _run(plan, 1, 2, 1, L, L, 16, rng)
    _check(inputs, out, lse, table, None)


@pytest.mark.parametrize("kind", ["fa3_mask", "fa3_mask:softcap"])
def test_the_gpu_tests_fa3_cases_on_the_cpu_model(fake, monkeypatch, rng, kind):
    """test_gpu's and warmup's fa3_mask kinds take the one-launch route and are exact here."""
    from flex_flash_infer.warmup import tile_variant_case

    monkeypatch.setattr(tile_kernels, "FA3_MASK", True)
    B, Hq, Hkv, L, S, D = 2, 8, 2, 777, 901, 16
    mask_mod, score_mod, _ = tile_variant_case(kind, Hq, L, S, device="cpu")
    assert (score_mod is None) == (kind == "fa3_mask")
    bm = create_block_mask(mask_mod, None, None, L, S, device="cpu")
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    assert plan.route == "tiles-fa3-mask" and plan.groups[0].partial is None
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, S, D, rng)
    _check(inputs, out, lse, create_mask(mask_mod, 1, 1, L, S, device="cpu"), score_mod)


@pytest.mark.parametrize("one_launch", [False, True])
def test_per_head_bands_with_a_score_mod_run_on_the_tiles_route(fake, monkeypatch, rng, one_launch):
    """Per-head windows lower to bands per head, whose launches take no score_mod variant: with a
    score_mod the plan takes the tiles-per-head route's compiled variants instead (no fallback to
    the reference), exact against the dense oracle."""
    monkeypatch.setattr(route, "ENABLE_HEAD_BANDS", True)
    monkeypatch.setattr(tile_kernels, "FA3_MASK", one_launch)
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
    assert plan.route == ("tiles-per-head-fa3-mask" if one_launch else "tiles-per-head")
    inputs, out, lse = _run(plan, B, Hq, Hkv, L, L, D, rng)
    _check(inputs, out, lse, create_mask(mod, 1, Hq, L, L, device="cpu"), score_mod)
