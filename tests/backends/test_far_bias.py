"""far_bias: splitting causal bands at a score_mod's reach, and checking the hint that allows it."""
import pytest
import torch

from flex_flash_infer.planning.bands import Band
from flex_flash_infer.planning.far_bias import hint_holds, plan_split, split_bands
from flex_flash_infer.mods.hints import ConstantBeyond
from flex_flash_infer.mods import generate_alibi_score_mod, generate_relative_position_bias_score_mod


def _visible(bands, q, kv):
    return torch.stack([b.visible(q, kv) for b in bands]).long().sum(0)


@pytest.mark.parametrize("trial", range(40))
def test_split_covers_each_key_once_on_the_right_side_of_the_reach(trial):
    g = torch.Generator().manual_seed(trial)

    def rand(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    q_len = rand(1, 300)
    kv_len = max(1, q_len + rand(-40, 40))   # the diagonal near the band's corner, as masks give
    q_start, kv_start = rand(0, q_len), rand(0, kv_len // 2 + 1)
    window = rand(-1, 200) if trial % 2 else -1
    bands = [Band(q_start, q_len, kv_start, kv_len, True, window)]
    if trial % 3 == 0 and q_start > 0:   # two bands, as packed documents give
        bands.insert(0, Band(0, q_start, 0, kv_start, True, -1))
    reach = rand(1, 100)
    q = torch.arange(q_len).view(-1, 1)
    kv = torch.arange(kv_len).view(1, -1)
    whole = _visible(bands, q, kv)
    split = split_bands(bands, reach)
    if split is None:   # nothing to split: every visible key on one side of the reach
        beyond = q - kv >= reach
        assert not bool(((whole > 0) & beyond).any()) or not bool(((whole > 0) & ~beyond).any())
        return
    near, far = split
    n, f = _visible(near, q, kv), _visible(far, q, kv)
    assert torch.equal(n + f, whole)   # each visible key exactly once, nothing added
    assert not bool(((f > 0) & (q - kv < reach)).any())
    assert not bool(((n > 0) & (q - kv >= reach)).any())
    for band in far:   # FlashInfer needs a key in every row of a launch
        rows = _visible([band], q[band.q_start:band.q_end], kv).sum(1)
        assert bool((rows > 0).all())


def test_bands_that_are_not_causal_do_not_split():
    assert split_bands([Band(0, 100, 0, 100, False)], 8) is None
    assert split_bands([Band(0, 100, 0, 100, True, 5)], 8) is None   # the window lies within reach


@pytest.mark.parametrize("shape", [(65,), (4, 65)])
def test_the_relative_position_bias_hint_holds_and_splits_causal_bands(shape):
    table = torch.randn(*shape, dtype=torch.float64)
    mod = generate_relative_position_bias_score_mod(table)
    hint = mod.constant_beyond
    assert hint.reach == 32 and hint_holds(mod, hint, 4)
    assert torch.equal(hint.values(torch.device("cpu")), table[..., 64])
    near, far, got = plan_split(mod, [Band(0, 512, 0, 512, True)], 4)
    assert got is hint and near == [Band(0, 512, 0, 512, True, 31)] and far == [Band(32, 512, 0, 480, True)]


def test_a_malformed_hint_names_its_field():
    with pytest.raises(ValueError, match="reach"):
        ConstantBeyond(2.5, lambda device: torch.zeros(1))
    with pytest.raises(ValueError, match="reach"):
        ConstantBeyond(0, lambda device: torch.zeros(1))
    with pytest.raises(ValueError, match="values"):
        ConstantBeyond(8, torch.zeros(1))


def test_a_hint_that_does_not_hold_is_refused():
    alibi = generate_alibi_score_mod(num_heads=4)   # linear in q - kv: no constant beyond any reach
    alibi.constant_beyond = ConstantBeyond(16, lambda device: torch.zeros(4, device=device))
    assert not hint_holds(alibi, alibi.constant_beyond, 4)
    assert plan_split(alibi, [Band(0, 512, 0, 512, True)], 4) is None
    table = torch.randn(4, 33)
    wrong_value = generate_relative_position_bias_score_mod(table)
    wrong_value.constant_beyond = ConstantBeyond(16, lambda device: table[:, 0].to(device))
    assert not hint_holds(wrong_value, wrong_value.constant_beyond, 4)


def test_the_split_reads_a_table_changed_in_place_as_it_is_now(monkeypatch):
    """A table written in place after planning (an optimizer step on a learned bias) is read as
    it is now by both parts, the compiled near keys and the far keys' constant, as torch's
    flex_attention and the backward read it: the plan matches the reference of the new table."""
    import sys

    import fake_flashinfer
    from dense_reference import dense_attention, rel_err
    from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
    from flex_flash_infer.planning import far_bias
    from flex_flash_infer.backends import flashinfer_backend
    from flex_flash_infer.backends import score_mod_kernels

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    B, H, Hkv, L, D = 1, 4, 2, 300, 16
    table = torch.randn(H, 65, dtype=torch.float64)
    mod = generate_relative_position_bias_score_mod(table)
    bm = create_block_mask(get_mask_fn("causal"), B, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, H, Hkv, D, torch.float64, D ** -0.5, "cpu", score_mod=mod)
    assert isinstance(plan.band_runner, far_bias.FarSplitBands)
    table.add_(torch.randn_like(table))   # after planning
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    out, _ = plan.run(q.transpose(1, 2).reshape(B * L, H, D), k.transpose(1, 2), v.transpose(1, 2))
    ref, _ = dense_attention(q, k, v, create_mask(get_mask_fn("causal"), B, 1, L, L, device="cpu"),
                             score_fn=generate_relative_position_bias_score_mod(table.clone()))
    assert rel_err(out.view(B, L, H, D).transpose(1, 2), ref) < 1e-6


def test_near_keys_on_fa2_match_the_reference(monkeypatch):
    """The near keys through the fa2 variant (the far ones on the fa3 ragged kernel), on the CPU
    model of FlashInfer, against the float64 reference."""
    import sys

    import fake_flashinfer
    from dense_reference import dense_attention, rel_err
    from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
    from flex_flash_infer.planning import far_bias
    from flex_flash_infer.backends import flashinfer_backend
    from flex_flash_infer.backends import score_mod_kernels

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    B, H, Hkv, L, D = 1, 4, 2, 300, 16
    mod = generate_relative_position_bias_score_mod(torch.randn(H, 65, dtype=torch.float64))
    bm = create_block_mask(get_mask_fn("causal"), B, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, H, Hkv, D, torch.float64, D ** -0.5, "cpu", score_mod=mod)
    assert isinstance(plan.band_runner, far_bias.FarSplitBands)
    assert plan.band_runner.near.hopper is False
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    out, _ = plan.run(q.transpose(1, 2).reshape(B * L, H, D), k.transpose(1, 2), v.transpose(1, 2))
    ref, _ = dense_attention(q, k, v, create_mask(get_mask_fn("causal"), B, 1, L, L, device="cpu"), score_fn=mod)
    assert rel_err(out.view(B, L, H, D).transpose(1, 2), ref) < 1e-6
