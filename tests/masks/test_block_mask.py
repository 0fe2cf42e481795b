import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from dense_reference import dense_predicate
from flex_flash_infer import BlockMask, create_block_mask, get_mask_fn
from flex_flash_infer.masks.block_build import EMPTY, FULL, PARTIAL
from random_masks import random_mask_mod


def dense_tile_states(dense, bq, bkv):
    """Tile states from a dense [B, H, L, S] mask: full = every in-range query row sees every
    key of the tile and the tile has no padded keys."""
    B, H, L, S = dense.shape
    nq, nkv = -(-L // bq), -(-S // bkv)
    states = torch.empty(B, H, nq, nkv, dtype=torch.int8)
    for i in range(nq):
        for j in range(nkv):
            tile = dense[:, :, i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv]
            full = tile.flatten(2).all(-1) & ((j + 1) * bkv <= S)
            states[:, :, i, j] = torch.where(full, FULL, torch.where(tile.flatten(2).any(-1), PARTIAL, EMPTY))
    return states


@pytest.mark.parametrize("L,S,block", [(256, 256, 64), (301, 173, 64), (130, 400, (32, 48)), (50, 50, 128)])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 3000])
def test_tiles_match_dense_classification_for_random_masks(rng, L, S, block, chunk_elements):
    B, H = 2, 3
    mod, dense = random_mask_mod(B, H, L, S, rng)
    bm = create_block_mask(mod, B, H, L, S, device="cpu", BLOCK_SIZE=block, chunk_elements=chunk_elements)
    bq, bkv = (block, block) if isinstance(block, int) else block
    assert torch.equal(bm.states, dense_tile_states(dense, bq, bkv))
    assert bm.shape == (B, H, L, S)
    assert bm.BLOCK_SIZE == (bq, bkv)


@pytest.mark.parametrize("name,params", [("causal", {}), ("sliding_window", {"window_size": 100}),
                                         ("attamba", {"window_size": 64, "chunk_size": 32}),
                                         ("prefix_lm", {"prefix_len": 200}), ("chunked_causal", {"chunk_size": 96})])
def test_library_tiles_match_dense_and_torch(name, params):
    L = S = 512
    mod = get_mask_fn(name, **params)
    bm = create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=64)
    assert torch.equal(bm.states, dense_tile_states(dense_predicate(name, L, S, **params)[None, None], 64, 64))
    ref = torch_flex.create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=64)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    for field in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(bm, field), getattr(ref, field)), field
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        n = getattr(bm, num)
        for r in range(n.shape[-1]):
            k = int(n[0, 0, r])
            assert torch.equal(getattr(bm, idx)[0, 0, r, :k], getattr(ref, idx)[0, 0, r, :k])
    assert abs(bm.sparsity() - ref.sparsity()) < 1e-6


def test_round_trip_through_torch_block_mask(rng):
    mod, dense = random_mask_mod(1, 2, 200, 300, rng)
    bm = create_block_mask(mod, 1, 2, 200, 300, device="cpu", BLOCK_SIZE=64)
    tbm = bm.to_torch()
    assert tbm.seq_lengths == (200, 300)
    back = BlockMask.from_torch(tbm)
    assert torch.equal(back.states, bm.states)
    assert back.mask_mod is mod


def test_per_batch_and_per_head_masks_differ_where_they_should():
    def per_head_window(b, h, q, kv):
        return (q >= kv) & (q - kv < 64 * (h + 1) + 32 * b)

    bm = create_block_mask(per_head_window, 2, 3, 512, 512, device="cpu", BLOCK_SIZE=64)
    for b in range(2):
        for h in range(3):
            w = 64 * (h + 1) + 32 * b
            expected = dense_tile_states(dense_predicate("sliding_window", 512, 512, window_size=w)[None, None], 64, 64)
            assert torch.equal(bm.states[b, h], expected[0, 0])


def test_mask_mod_only_ever_sees_bounded_chunks_and_in_range_indices():
    seen = {"max": 0, "q": 0, "kv": 0}
    L, S = 4100, 5000

    def spy(b, h, q, kv):
        seen["max"] = max(seen["max"], torch.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape).numel())
        seen["q"], seen["kv"] = max(seen["q"], int(q.max())), max(seen["kv"], int(kv.max()))
        return q >= kv

    create_block_mask(spy, None, None, L, S, device="cpu", chunk_elements=1 << 20)
    assert seen["max"] <= 1 << 20
    assert seen["q"] == L - 1 and seen["kv"] == S - 1


def test_to_string_shows_full_partial_and_empty_tiles():
    bm = create_block_mask(get_mask_fn("causal"), None, None, 512, 512, device="cpu", BLOCK_SIZE=128)
    text = bm.to_string()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows == ["|▒   |", "|█▒  |", "|██▒ |", "|███▒|"]
    assert "sparsity=37.50%" in repr(bm)


def test_bad_block_mask_arguments():
    causal = get_mask_fn("causal")
    with pytest.raises(ValueError, match="Q_LEN"):
        create_block_mask(causal, 1, 1, 0, 10, device="cpu")
    with pytest.raises(TypeError, match="BLOCK_SIZE"):
        create_block_mask(causal, 1, 1, 10, 10, device="cpu", BLOCK_SIZE="big")
    with pytest.raises(TypeError, match="mask_mod"):
        create_block_mask(lambda q: q, 1, 1, 10, 10, device="cpu")
    with pytest.raises(TypeError, match="bool"):
        create_block_mask(lambda b, h, q, kv: q - kv, 1, 1, 10, 10, device="cpu")


def test_a_torch_block_mask_is_converted_once_per_object():
    from flex_flash_infer.block_mask import check_block_mask

    tbm = torch_flex.create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu")
    first = check_block_mask(tbm, 1, 2, 256, 256, "cpu")
    assert check_block_mask(tbm, 1, 2, 256, 256, "cpu") is first      # its plans are reused
    other = torch_flex.create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu")
    assert check_block_mask(other, 1, 2, 256, 256, "cpu") is not first


@pytest.mark.parametrize("L,S,block", [(301, 173, 64), (256, 512, (32, 128))])
def test_compiled_build_matches_dense_classification(rng, L, S, block):
    """_compile=True: the chunk evaluated by torch.compile (inductor's CPU backend here) gives
    the same tiles as the dense mask, padding and per-(batch, head) masks included."""
    B, H = 2, 3
    mod, dense = random_mask_mod(B, H, L, S, rng)
    bm = create_block_mask(mod, B, H, L, S, device="cpu", BLOCK_SIZE=block, _compile=True)
    bq, bkv = (block, block) if isinstance(block, int) else block
    assert torch.equal(bm.states, dense_tile_states(dense, bq, bkv))


def test_chunks_shrink_for_masks_that_differ_per_head():
    """The chunk budget counts every (batch, head) slice a per-head mask materializes."""
    seen = {"max": 0}

    def per_head(b, h, q, kv):
        out = (q >= kv) & (h >= 0)
        seen["max"] = max(seen["max"], out.numel())
        return out

    create_block_mask(per_head, 2, 8, 1000, 1000, device="cpu", chunk_elements=1 << 18)
    assert seen["max"] <= 1 << 18


def test_a_torch_mask_of_odd_length_keeps_its_route_and_its_answer(rng):
    """torch marks the last query tile's visible tiles partial at a length that is not a multiple
    of the block (it evaluates the padded rows): converted, they are settled on the real rows, so a
    causal mask of 1000 tokens is one causal band again (it planned as a window plus key columns),
    with the same attention; a table broadcast over b is left as it is for a mask that reads b."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

    from flex_flash_infer import flex_attention

    def causal(b, h, q, kv):
        return q >= kv

    converted = BlockMask.from_torch(torch_block_mask(causal, None, None, 1000, 1000, device="cpu"))
    assert converted.plan(4, 2).route == "bands"
    assert torch.equal(converted.states, create_block_mask(causal, None, None, 1000, 1000, device="cpu").states)
    q, k, v = (torch.randn(1, 4, 1000, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    # against attention written out here (the same backend on an equal mask would share its bugs)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (flex_attention(q, k, v, block_mask=converted) - want).abs().max() < 1e-10

    def per_batch(b, h, q, kv):
        return (q >= kv) & (kv >= 300 * b)

    broadcast = torch_block_mask(per_batch, 1, None, 1000, 1000, device="cpu")
    assert torch.equal(BlockMask.from_torch(broadcast).states, BlockMask(
        broadcast.seq_lengths, broadcast.kv_num_blocks, broadcast.kv_indices, broadcast.full_kv_num_blocks,
        broadcast.full_kv_indices, broadcast.BLOCK_SIZE, per_batch).states)


def test_settled_query_tiles_follow_the_values_the_mask_reads(rng):
    """The last query tile's tiles settled from the mask's values (a padded length) hold only while
    those values do: a torch BlockMask whose mask reads a table written in place afterwards is
    converted again, and the answer is torch's (found by a review: off by 3 before)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    from flex_flash_infer import flex_attention

    ids = torch.zeros(200, dtype=torch.long)

    def documents(b, h, q, kv):
        return (ids[q] == ids[kv]) & (q >= kv)

    tbm = torch_block_mask(documents, None, None, 200, 200, device="cpu")
    q, k, v = (torch.randn(1, 2, 200, 16, generator=rng) for _ in range(3))
    for values in (torch.zeros(200, dtype=torch.long), torch.arange(200) // 50):
        ids.copy_(values)   # the tables stay torch's (all causal tiles); the mask decides their partial ones
        want = torch_flex(q, k, v, block_mask=tbm)
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=tbm), want, rtol=1e-5, atol=1e-5)


def test_to_string_takes_torchs_grid_sizes():
    """grid_size as torch's to_string takes it: a pair, one int for both, -1 for every tile."""
    bm = create_block_mask(get_mask_fn("causal"), None, None, 512, 512, device="cpu", BLOCK_SIZE=64)

    def rows(text):
        return [line for line in text.splitlines() if line.startswith("|")]

    assert rows(bm.to_string(4)) == rows(bm.to_string((4, 4))) == ["|▒   |", "|█▒  |", "|██▒ |", "|███▒|"]
    every = rows(bm.to_string(-1))
    assert len(every) == 8 and every[0] == "|▒       |" and every[-1] == "|███████▒|"
    for bad in [0, (4, 0), "big", (4,)]:
        with pytest.raises(ValueError, match="grid_size"):
            bm.to_string(bad)



def test_a_block_mask_moved_to_a_device_plans_as_before():
    """.to(device) keeps what the tables were made from, so the mask's lowering hint still stands
    for them: the same route and key columns (show drew attamba's moved copy: 14 columns, where
    16 ran)."""
    mask = create_block_mask(get_mask_fn("attamba", window_size=256, chunk_size=128), None, None, 2048, 2048,
                             device="cpu")
    assert str(mask.to("cpu").plan(4, 2)) == str(mask.plan(4, 2))


def test_plan_with_heads_or_batch_the_mask_does_not_have_says_so():
    mask = create_block_mask(lambda b, h, q, kv: kv <= q + h, 2, 4, 256, 256, device="cpu")
    with pytest.raises(ValueError, match=r"\(B, H\) = \(2, 4\).*num_qo_heads=2"):
        mask.plan(2, 2)
    with pytest.raises(ValueError, match=r"\(B, H\) = \(2, 4\).*batch=3"):
        mask.plan(4, 2, batch=3)
    assert mask.plan(4, 2).route   # its own heads and batch plan
