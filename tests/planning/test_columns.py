"""Window band + gathered key columns (attamba's chunk ends, streaming's sinks), through the CPU model of FlashInfer."""
import math

import pytest
import torch

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import get_mask_fn
from flex_flash_infer.backends.column_merge import merge_columns_reference
from flex_flash_infer.planning.columns import column_lowering, column_prefix_counts, column_states, compact_mask_mod
from flex_flash_infer.planning.planner import partial_tile_mask, plan_tiles
from paged_simulator import merge_state, paged_prefill
from test_bands import union


@pytest.mark.parametrize("S,name,params", [
    (1024, "attamba", {"window_size": 256, "chunk_size": 128}), (777, "attamba", {"window_size": 100, "chunk_size": 32}),
    (500, "attamba", {"window_size": 64, "chunk_size": 100}), (777, "streaming", {"sink_size": 4, "window_size": 150}),
    (300, "streaming", {"sink_size": 200, "window_size": 30}), (100, "streaming", {"sink_size": 500, "window_size": 7})])
def test_window_band_plus_columns_is_exactly_the_mask(rng, S, name, params):
    mod = get_mask_fn(name, **params)
    bands, positions = column_lowering(mod, S, S)
    check_lowering(rng, mod, bands, positions, S, dense_predicate(name, S, S, **params))


@pytest.mark.parametrize("S,name,params", [
    (1024, "attamba", {"window_size": 256, "chunk_size": 128}), (777, "attamba", {"window_size": 100, "chunk_size": 32}),
    (777, "streaming", {"sink_size": 4, "window_size": 150}), (600, "streaming", {"sink_size": 50, "window_size": 30})])
def test_found_window_and_columns_are_exactly_a_users_own_mask(rng, S, name, params):
    """The same masks written by hand (no hint): found from the mask, then exact through the model."""
    from flex_flash_infer import create_block_mask
    from flex_flash_infer.planning.columns import find_window_columns

    hinted = get_mask_fn(name, **params)

    def users_own(b, h, q_idx, kv_idx):
        return hinted(b, h, q_idx, kv_idx)

    bm = create_block_mask(users_own, None, None, S, S, device="cpu")
    found = find_window_columns(bm.states[0, 0], users_own, S, S, *bm.BLOCK_SIZE)
    assert found is not None
    check_lowering(rng, users_own, *found, S, dense_predicate(name, S, S, **params))


def check_lowering(rng, mod, bands, positions, S, dense):
    """Band through the dense oracle + gathered columns through the FlashInfer model, merged."""
    compact = compact_mask_mod(mod, bands, positions)
    B, H, Hkv, D, bq = 2, 4, 2, 16, 128
    q = torch.randn(B, H, S, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    band_mask = union(bands, S, S)
    o_band, lse_band = dense_attention(q, k, v, band_mask)
    states = column_states(compact, S, positions.numel(), bq, torch.device("cpu"))
    plan = plan_tiles(states, B, S, bq, 1)
    bits = partial_tile_mask(plan, compact, 0, S, positions.numel(), bq, 1)
    kc = k.transpose(1, 2)[:, positions].reshape(-1, 1, Hkv, D)
    vc = v.transpose(1, 2)[:, positions].reshape(-1, 1, Hkv, D)
    launch = plan.partial
    o_col, lse_col = paged_prefill(q.transpose(1, 2).reshape(B * S, H, D), kc, vc, plan.qo_indptr,
                                   launch.kv_indptr, launch.kv_indices, launch.last_page_len, D ** -0.5, bits)
    to_base2 = 1 / math.log(2)
    o_band = o_band.transpose(1, 2).reshape(B * S, H, D)
    lse_band = lse_band.transpose(1, 2).reshape(B * S, H) * to_base2
    out, _ = merge_state(o_band, lse_band, o_col, lse_col)
    ref, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, S, H, D).transpose(1, 2), ref) < 1e-12
    # the one-pass merge (column_merge): each row sees a prefix of the columns, folded in place
    counts = column_prefix_counts(compact, S, positions.numel(), torch.device("cpu"))
    assert counts is not None
    merged, merged_lse = o_band.clone(), lse_band.clone()
    merge_columns_reference(merged, merged_lse, q.transpose(1, 2).reshape(B * S, H, D), k.transpose(1, 2),
                            v.transpose(1, 2), positions, counts, D ** -0.5, S)
    assert rel_err(merged.view(B, S, H, D).transpose(1, 2), ref) < 1e-12
    assert rel_err(merged_lse.view(B, S, H).transpose(1, 2), ref_lse * to_base2) < 1e-12
    # nothing counted twice: the column part never sees a key the band covers
    assert not (compact(0, 0, torch.arange(S).view(-1, 1), torch.arange(positions.numel()).view(1, -1))
                & band_mask[:, positions]).any()


def test_only_declared_masks_take_the_column_route():
    assert column_lowering(get_mask_fn("sliding_window", window_size=64), 512, 512) is None
    assert column_lowering(get_mask_fn("attamba", window_size=64, chunk_size=32), 512, 600) is None


@pytest.mark.parametrize("wrong", [(900, 95), (700, 300), (1000, 640)])
def test_one_wrong_pair_below_the_window_defeats_the_column_finder(wrong):
    """Tiles below the window are checked on one row when the mask is provably the same on
    every row; a mask with one pair off the pattern there is not (its traced q == ... keeps
    that tile on the full check), so the finder still refuses it."""
    from flex_flash_infer import create_block_mask
    from flex_flash_infer.planning.columns import find_window_columns

    hinted = get_mask_fn("attamba", window_size=128, chunk_size=64)
    q0, kv0 = wrong

    def almost_attamba(b, h, q_idx, kv_idx):
        return hinted(b, h, q_idx, kv_idx) ^ ((q_idx == q0) & (kv_idx == kv0))

    S = 1024 + 77
    bm = create_block_mask(almost_attamba, None, None, S, S, device="cpu")
    assert find_window_columns(bm.states[0, 0], almost_attamba, S, S, *bm.BLOCK_SIZE) is None
