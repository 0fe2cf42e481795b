"""The tiles route's whole tiles on the ragged (TMA) kernel gathering each request's key tiles
(backends/tile_gather.py), on the CPU model of FlashInfer (fake_flashinfer computes what the
patched kernel does) and, for the patches, on synthetic header texts."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask
from flex_flash_infer.backends import flashinfer_backend, own_modules, tile_gather
from flex_flash_infer.compile import lean_modules, patched_headers
from flexfuzz.routes import plan_route


def _on_the_model(monkeypatch):
    """FlashInfer as the CPU model on a Hopper whose FlashInfer takes the patches, at any dtype and
    head_dim (the model gathers tiles of 128 keys whatever the head_dim); the ragged wrappers made."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(tile_gather, "serves", lambda dtype, head_dim, block_kv: block_kv == 128)
    monkeypatch.setattr(own_modules, "_UNBUILT", set())
    monkeypatch.setattr(own_modules, "_BUILT", set())
    made = []
    real_init = fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper, "__init__", recording_init)
    return made


def _tile_mask(L, block, density, causal, gen, per_head=False):
    """Random key tiles (each query tile sees its own diagonal tile), causal inside them; or not
    causal, with random tiles of every other key besides (partial tiles, merged after the gather)."""
    n = -(-L // block)
    heads = 3 if per_head else 1
    tiles = torch.rand(heads, n, n, generator=gen) < density
    tiles |= torch.eye(n, dtype=torch.bool)
    halves = torch.rand(heads, n, n, generator=gen) < 0.3

    def mask_mod(b, h, q_idx, kv_idx):
        head = h % heads if per_head else 0
        seen = tiles[head, q_idx // block, kv_idx // block]
        if causal:
            return seen & (q_idx >= kv_idx)
        return seen | (halves[head, q_idx // block, kv_idx // block] & ((q_idx + kv_idx) % 2 == 0))

    return mask_mod


def _dense(mask_mod, Hq, L):
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    return torch.stack([mask_mod(torch.tensor(0), torch.tensor(h), qi, ki) for h in range(Hq)])[None].bool()


def _check(plan, mask_mod, B, Hq, Hkv, L, D, rng, score_mod=None, plans=()):
    """out and natural-log LSE of plan (and out of each of plans, on the same inputs) against the
    dense reference of mask_mod and score_mod."""
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    score_fn = None if score_mod is None else (lambda s, *idx: score_mod(s, *idx))
    ref_out, ref_lse = dense_attention(q, k, v, _dense(mask_mod, Hq, L), score_fn=score_fn)
    for n, each in enumerate((plan, *plans)):
        out, lse = each.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
        assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-6
        if n == 0:
            assert torch.allclose(lse.view(B, L, Hq).transpose(1, 2).double(), ref_lse, atol=1e-4)


# (B, L, causal, density, route): the causal diagonal as one launch, whole tiles beside partial
# ones merged, a last key tile shorter than 128 (1000 = 7 x 128 + 104), two batch entries
_CASES = [
    (1, 1024, True, 0.3, "tiles-causal/gather"),
    (2, 1000, True, 0.5, "tiles-causal/gather"),
    (1, 1024, False, 0.4, "tiles/gather"),
    (2, 1000, False, 0.5, "tiles/gather"),
]


@pytest.mark.parametrize("B,L,causal,density,route", _CASES)
def test_gathered_tiles_match_the_reference(monkeypatch, rng, B, L, causal, density, route):
    made = _on_the_model(monkeypatch)
    Hq, Hkv, D = 4, 2, 16
    mask_mod = _tile_mask(L, 128, density, causal, rng)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=128)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan_route(plan) == route
    assert plan.route == route.split("/")[0]
    gathers = [w for w in made if w.gather]
    assert len(gathers) == 1 and gathers[0].jit_args[0].startswith("ffi_tilegather_")
    assert gathers[0]._causal == causal
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng)


def test_a_per_head_tile_mask_gathers_in_its_head_major_launch(monkeypatch, rng):
    _on_the_model(monkeypatch)
    B, Hq, Hkv, L, D = 2, 6, 3, 1000, 16
    mask_mod = _tile_mask(L, 128, 0.4, False, rng, per_head=True)
    bm = create_block_mask(mask_mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=128)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan_route(plan).startswith("tiles-per-head") and "/gather" in plan_route(plan)
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng)


def _soft_capped_tiles(B, Hq, Hkv, L, D, causal, rng):
    """(mask_mod, block mask, the library's soft cap, the plan) of random 128-key tiles with a soft cap."""
    from flex_flash_infer.mods.softcap import generate_softcap_score_mod

    mask_mod = _tile_mask(L, 128, 0.4, causal, rng)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=128)
    softcap = generate_softcap_score_mod(5.0)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=softcap)
    return mask_mod, bm, softcap, plan


def test_a_soft_cap_over_whole_tiles_runs_as_the_gather_kernels_own(monkeypatch, rng):
    """The library's soft cap on the causal diagonal's one launch: the soft-capped gather module,
    no compiled variant; a user's own soft cap (no hint) stays a compiled score_mod."""
    made = _on_the_model(monkeypatch)
    B, Hq, Hkv, L, D = 2, 4, 2, 1000, 16
    mask_mod, bm, softcap, plan = _soft_capped_tiles(B, Hq, Hkv, L, D, True, rng)
    assert plan_route(plan) == "tiles-causal/gather/soft-cap" and plan.groups[0].variants is None
    assert [w.jit_args[0].split("_")[1] for w in made] == ["tilegather"] and made[0].jit_args[11].endswith("<true>")
    from flex_flash_infer.backends import tile_kernels
    from flex_flash_infer.tools.warmup import without_soft_cap_hint

    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)
    made.clear()
    own = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                            score_mod=without_soft_cap_hint(softcap))
    assert plan_route(own) == "tiles-causal/compiled" and not made
    # the soft-capped module answering yes, then its launch not coming: the compiled score_mod, never no cap
    monkeypatch.setattr(tile_gather, "built_launch", lambda *args, **kwargs: None)
    fallen = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                               score_mod=softcap)
    assert plan_route(fallen) == "tiles-causal/compiled"
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng, softcap, plans=(own, fallen))


def test_a_soft_cap_beside_partial_tiles_stays_compiled(monkeypatch, rng):
    """Partial tiles beside the whole ones: the soft cap must reach the partial launch too, so the
    whole plan runs the compiled score_mod (no soft-capped gather, which would leave it out there)."""
    from flex_flash_infer.backends import tile_kernels

    _on_the_model(monkeypatch)
    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)
    B, Hq, Hkv, L, D = 1, 4, 2, 1000, 16
    mask_mod, bm, softcap, plan = _soft_capped_tiles(B, Hq, Hkv, L, D, False, rng)
    assert plan.plan.soft_cap is None and plan_route(plan) == "tiles/compiled"
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng, softcap)


def test_query_tiles_without_a_whole_tile_get_theirs_from_the_partial_launch(monkeypatch, rng):
    """Rows of query tiles whose keys all lie in partial tiles list no tile in the gather launch
    (kv_len 0: zeros and LSE -inf there, joined by the merge)."""
    _on_the_model(monkeypatch)
    B, Hq, Hkv, L, D = 2, 4, 2, 1000, 16
    n = -(-L // 128)
    whole = torch.rand(n, n, generator=rng) < 0.4
    whole[2] = whole[5] = False   # two query tiles without a whole tile
    some = torch.rand(n, n, generator=rng) < 0.5
    some[2, 0] = some[5, 3] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return whole[q_idx // 128, kv_idx // 128] | (some[q_idx // 128, kv_idx // 128] & ((q_idx + kv_idx) % 3 == 0))

    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=128)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan_route(plan) == "tiles/gather"
    counts = plan.plan.tiles.full.kv_indptr.diff()
    assert int(counts[2]) == 0 and int(counts[5]) == 0
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng)


def test_tiles_of_another_width_stay_on_the_paged_kernel(monkeypatch, rng):
    made = _on_the_model(monkeypatch)
    B, Hq, Hkv, L, D = 1, 4, 2, 1000, 16
    mask_mod = _tile_mask(L, 64, 0.4, True, rng)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan_route(plan) == "tiles-causal" and not made
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng)


def test_a_gather_module_that_does_not_build_leaves_the_paged_kernel(monkeypatch, rng):
    """Said once; the same answer from FlashInfer's paged kernel; not tried again."""
    made = _on_the_model(monkeypatch)
    tried = []

    def unbuildable(jit_args):
        tried.append(jit_args[0])
        raise RuntimeError("Ninja build failed")

    monkeypatch.setattr(own_modules, "_build", unbuildable)
    B, Hq, Hkv, L, D = 1, 4, 2, 1000, 16
    mask_mod = _tile_mask(L, 128, 0.4, True, rng)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=128)

    def make():
        return flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")

    with pytest.warns(RuntimeWarning, match="tile-gather kernel .* did not build"):
        plan = make()
    assert plan_route(plan) == "tiles-causal" and not made
    _check(plan, mask_mod, B, Hq, Hkv, L, D, rng)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_route(make()) == "tiles-causal"
    assert len(tried) == 1


def test_only_16_bit_head_dims_64_and_128_and_tiles_of_128_are_served(monkeypatch):
    monkeypatch.setattr(patched_headers, "include_root", lambda name: "/patched")
    assert tile_gather.serves(torch.bfloat16, 128, 128) and tile_gather.serves(torch.float16, 64, 128)
    assert not tile_gather.serves(torch.bfloat16, 256, 128)   # FlashInfer's key tile there is 64
    assert not tile_gather.serves(torch.bfloat16, 128, 64) and not tile_gather.serves(torch.float32, 128, 128)
    monkeypatch.setattr(patched_headers, "include_root", lambda name: None)   # headers refusing the patches
    assert not tile_gather.serves(torch.bfloat16, 128, 128)


def test_listed_kv_indptr_puts_each_requests_tiles_side_by_side():
    from flex_flash_infer.planning.planner import PagedLaunch

    empty = torch.zeros(0, dtype=torch.int64)
    launch = PagedLaunch(torch.tensor([0, 2, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 1, 2, 4], dtype=torch.int32),
                         torch.tensor([128, 0, 44], dtype=torch.int32), empty, empty, empty)
    assert tile_gather.listed_kv_indptr(launch, 128).tolist() == [0, 256, 256, 256 + 2 * 128 + 44]


def test_the_module_asks_for_the_patched_headers(tmp_path, monkeypatch):
    texts = {}
    for rel, old, _, times in patched_headers.PATCH_SETS["tile_gather"]:
        texts[rel] = texts.get(rel, "// header\n") + (old + "\n") * times
    for rel, text in texts.items():
        path = tmp_path / "src" / "flashinfer" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert patched_headers.patched_tree("tile_gather", tmp_path / "src", tmp_path / "cache") is not None
    Spec = dataclasses.make_dataclass("Spec", [("name", str), ("extra_include_dirs", list)])
    monkeypatch.setattr(patched_headers, "include_root", lambda name: tmp_path / name)
    args = tile_gather.jit_args(torch.bfloat16, 128)
    assert args[0].startswith("ffi_tilegather_") and args[0].endswith("_bfloat16_d128")
    assert lean_modules.with_patched_headers(Spec("m", []), args[1:]).extra_include_dirs == [tmp_path / "tile_gather"]


@pytest.mark.gpu   # FlashInfer is installed on the GPU machine only; the test itself needs no GPU
def test_the_patches_fit_the_installed_flashinfer(tmp_path):
    """Against the FlashInfer installed here (the GPU machine; skipped without it): every key and
    value load of the ragged producer goes through the tile table, over the whole tensor, and
    every tile of the kernel and of the host's schedule is 128 x 128."""
    pytest.importorskip("flashinfer")
    from flashinfer.jit import env

    root = patched_headers.patched_tree("tile_gather", pathlib.Path(env.FLASHINFER_INCLUDE_DIR), tmp_path)
    assert root is not None, "FlashInfer's headers here refuse the tile_gather patches"
    hopper = root / "flashinfer/attention/hopper"
    mainloop = (hopper / "mainloop.cuh").read_text()
    loads = re.findall(r"t[KV]g[KV]\(_, ([^)]*\)?)\)", mainloop)
    assert len(loads) == 4 and all(load.startswith("FFI_TILE(") for load in loads), loads
    assert "kv_indptr,\n" not in mainloop and mainloop.count("FFI_KV_ROWS(mainloop_params)") == 2
    sizes = (hopper / "prefill_sm90.cuh").read_text().split("constexpr auto getCTATileSize()")[1].split("\n}\n")[0]
    assert set(re.findall(r"make_tuple\((\d+), (\d+)\)", sizes)) <= {("128", "128"), ("128", "64")}, sizes
    schedule = (root / "flashinfer/attention/scheduler.cuh").read_text()
    assert "cta_tile_q = 192" not in schedule and "int cta_tile_q = 128;" in schedule
