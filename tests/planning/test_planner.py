"""The planner's decisions, checked on CPU against the dense mask through a model of FlashInfer."""
import pytest
import torch

from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
from flex_flash_infer.masks.block_build import FULL, PARTIAL
from flex_flash_infer.planning.planner import partial_tile_mask, plan_tiles
from paged_simulator import merge_state, paged_prefill
from random_masks import random_mask_mod


def simulate(bm, q, k, v, head=0):
    """Run the planned launches of one head group through the CPU model. q [B*L, H, D], k/v [B, S, Hkv, D]."""
    B, S, Hkv, D = k.shape
    L = bm.seq_lengths[0]
    bq, bkv = bm.BLOCK_SIZE
    states = bm.states[:, head if bm.states.shape[1] > 1 else 0]
    plan = plan_tiles(states, B, L, bq, bkv)
    nkv = plan.num_kv_tiles
    pad = nkv * bkv - S
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).reshape(B * nkv, bkv, Hkv, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).reshape(B * nkv, bkv, Hkv, D)
    scale = D ** -0.5
    results = []
    if plan.full is not None:
        f = plan.full
        results.append(paged_prefill(q, kp, vp, plan.qo_indptr, f.kv_indptr, f.kv_indices, f.last_page_len, scale))
    if plan.partial is not None:
        p = plan.partial
        bits = partial_tile_mask(plan, bm.mask_mod, head, L, S, bq, bkv)
        results.append(paged_prefill(q, kp, vp, plan.qo_indptr, p.kv_indptr, p.kv_indices, p.last_page_len, scale, bits))
    out, lse = results[0] if len(results) == 1 else merge_state(*results[0], *results[1])
    return out, lse, plan


@pytest.mark.parametrize("B,L,S,block", [(1, 256, 256, 64), (2, 200, 333, 64), (3, 130, 70, (32, 48))])
def test_planned_launches_reproduce_dense_attention_for_random_masks(rng, B, L, S, block):
    H, Hkv, D = 4, 2, 16
    mod, dense = random_mask_mod(B, 1, L, S, rng)
    bm = create_block_mask(mod, B, None, L, S, device="cpu", BLOCK_SIZE=block)
    q = torch.randn(B, H, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    out, lse, _ = simulate(bm, q.transpose(1, 2).reshape(B * L, H, D), k.transpose(1, 2), v.transpose(1, 2))
    ref_out, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, L, H, D).transpose(1, 2), ref_out) < 1e-12
    got_lse = lse.view(B, L, H).transpose(1, 2) * torch.log(torch.tensor(2.0, dtype=torch.float64))
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(got_lse), seen)
    assert torch.allclose(got_lse[seen], ref_lse[seen])


def test_causal_sends_only_the_diagonal_to_the_masked_launch():
    bm = create_block_mask(get_mask_fn("causal"), None, None, 1024, 1024, device="cpu", BLOCK_SIZE=128)
    plan = plan_tiles(bm.states[:, 0], 1, 1024, 128, 128)
    tiles = torch.arange(8)
    assert torch.equal(plan.partial.kv_indices.long(), tiles)          # one diagonal tile per row
    assert not plan.partial.dummy.any()
    assert plan.full.kv_indices.numel() == 8 * 7 // 2                   # every tile below the diagonal
    assert torch.equal(plan.full.last_page_len, torch.tensor([0] + [128] * 7, dtype=torch.int32))


def test_rows_without_partial_tiles_get_an_all_zero_dummy_page():
    def two_regions(b, h, q, kv):
        return (q < 256) | ((q >= kv) & (q >= 256))  # first rows see everything: no partial tile

    bm = create_block_mask(two_regions, None, None, 512, 512, device="cpu", BLOCK_SIZE=128)
    plan = plan_tiles(bm.states[:, 0], 1, 512, 128, 128)
    assert plan.partial.dummy.sum() == 2
    bits = partial_tile_mask(plan, bm.mask_mod, 0, 512, 512, 128, 128)
    per_request = (plan.qo_len.long() * (plan.partial.kv_indptr[1:] - plan.partial.kv_indptr[:-1]) * 128)
    assert not bits[: int(per_request[:2].sum())].any()


def test_batch_entries_use_their_own_pages():
    def per_batch(b, h, q, kv):
        return kv < 64 * (b + 1)

    bm = create_block_mask(per_batch, 2, None, 64, 256, device="cpu", BLOCK_SIZE=64)
    plan = plan_tiles(bm.states[:, 0], 2, 64, 64, 64)
    # batch 0 sees key tile 0 only, batch 1 key tiles 0 and 1 (pages 4 and 5)
    assert plan.full.kv_indices.tolist() == [0, 4, 5]
    assert bm.states[1, 0, 0].tolist() == [FULL, FULL, 0, 0]
    assert PARTIAL not in bm.states.unique().tolist()


def _tile_sparse_causal(seq_len, block, rng):
    """Random kept tiles (diagonal always kept) intersected with causal."""
    n = -(-seq_len // block)
    tiles = (torch.rand(n, n, generator=rng) < 0.4) | torch.eye(n, dtype=torch.bool)

    def mod(b, h, q, kv):
        return tiles[q // block, kv // block] & (q >= kv)

    return mod


@pytest.mark.parametrize("B,L,block", [(1, 512, 64), (2, 333, 64), (1, 100, 128)])
def test_causal_diagonal_plan_is_one_causal_launch_equal_to_dense(rng, B, L, block):
    from flex_flash_infer.planning.planner import plan_causal_diagonal

    H, Hkv, D = 4, 2, 16
    mod = _tile_sparse_causal(L, block, rng)
    bm = create_block_mask(mod, None, None, L, L, device="cpu", BLOCK_SIZE=block)
    plan = plan_causal_diagonal(bm.states[:, 0], mod, 0, B, L, L, block, block)
    assert plan is not None and plan.causal and plan.partial is None
    q = torch.randn(B * L, H, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, L, Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, L, Hkv, D, generator=rng, dtype=torch.float64)
    nkv = plan.num_kv_tiles
    pad = nkv * block - L
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).reshape(B * nkv, block, Hkv, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).reshape(B * nkv, block, Hkv, D)
    f = plan.full
    out, lse = paged_prefill(q, kp, vp, plan.qo_indptr, f.kv_indptr, f.kv_indices, f.last_page_len, D ** -0.5,
                             causal=True)
    dense = create_mask(mod, None, None, L, L, device="cpu").expand(B, 1, L, L)
    ref_out, ref_lse = dense_attention(q.view(B, L, H, D).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dense)
    assert rel_err(out.view(B, L, H, D).transpose(1, 2), ref_out) < 1e-12
    got_lse = lse.view(B, L, H).transpose(1, 2) * torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(got_lse, ref_lse)


@pytest.mark.parametrize("name,params,L", [("sliding_window", {"window_size": 100}, 512), ("causal", {}, 500),
                                           ("attamba", {"window_size": 96, "chunk_size": 64}, 512)])
def test_causal_diagonal_plan_declines_other_partial_tiles(name, params, L):
    """Window edges, chunk-end columns or unequal lengths are not 'full tiles + a causal diagonal'."""
    from flex_flash_infer.planning.planner import plan_causal_diagonal

    mod = get_mask_fn(name, **params)
    bm = create_block_mask(mod, None, None, L, L + (name == "causal"), device="cpu", BLOCK_SIZE=64)
    assert plan_causal_diagonal(bm.states[:, 0], mod, 0, 1, L, L + (name == "causal"), 64, 64) is None


@pytest.mark.parametrize("B,Hq,Hkv,L,S,block,table_heads", [(2, 4, 2, 200, 333, 64, 4), (1, 6, 3, 130, 130, 64, 6),
                                                              (3, 4, 1, 100, 70, (32, 48), 4), (2, 4, 2, 150, 150, 64, 1)])
def test_head_major_plan_runs_every_head_in_one_launch_set(rng, B, Hq, Hkv, L, S, block, table_heads):
    """Per-head random masks (or one shared table with a mask that reads h): all heads' requests
    in one full + one partial launch over head-major queries and key-head pages."""
    from flex_flash_infer.planning.planner import plan_tiles_head_major

    D = 16
    mod, dense = random_mask_mod(B, Hq, L, S, rng)
    bm = create_block_mask(mod, B, Hq if table_heads > 1 else None, L, S, device="cpu", BLOCK_SIZE=block)
    if table_heads == 1:   # a shared H=None table (tile states agree across heads here), bits still per head
        assert bm.states.shape[1] == 1
    bq, bkv = bm.BLOCK_SIZE
    states = bm.states.transpose(0, 1).expand(Hq, *bm.states.transpose(0, 1).shape[1:])
    plan = plan_tiles_head_major(states, B, L, bq, bkv, Hq // Hkv)
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    q_hm = q.permute(1, 0, 2, 3).reshape(Hq * B * L, 1, D)
    nkv = plan.num_kv_tiles
    pad = nkv * bkv - S

    def pages(x):   # [B, Hkv, S, D] -> [Hkv * B * nKV, bkv, 1, D]
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.permute(1, 0, 2, 3).reshape(Hkv * B * nkv, bkv, 1, D)

    kp, vp = pages(k), pages(v)
    results = []
    if plan.full is not None:
        f = plan.full
        results.append(paged_prefill(q_hm, kp, vp, plan.qo_indptr, f.kv_indptr, f.kv_indices, f.last_page_len, D ** -0.5))
    if plan.partial is not None:
        p = plan.partial
        bits = partial_tile_mask(plan, mod, 0, L, S, bq, bkv)
        results.append(paged_prefill(q_hm, kp, vp, plan.qo_indptr, p.kv_indptr, p.kv_indices, p.last_page_len,
                                     D ** -0.5, bits))
    out, lse = results[0] if len(results) == 1 else merge_state(*results[0], *results[1])
    ref_out, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(Hq, B, L, D).transpose(0, 1), ref_out) < 1e-12
    got_lse = lse.view(Hq, B, L).transpose(0, 1) * torch.log(torch.tensor(2.0, dtype=torch.float64))
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(got_lse), seen) and torch.allclose(got_lse[seen], ref_lse[seen])
