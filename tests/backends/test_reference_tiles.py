"""The reference backend's tile-sparse CPU path (issue 23): a call without score_mod and without
gradients on the CPU attends, per query tile, only the keys of its non-empty tiles through torch's
fused CPU attention. It must give what the chunked element-wise path gives (the same visibility:
full tiles, and partial tiles where mask_mod holds), on random masks, shapes and dtypes; and
step aside where it cannot be exact (NaN or inf inputs, gradients, score_mods)."""
import random

import pytest
import torch

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.backends import reference


def chunked(q, k, v, bm, scale=None):
    outs, lses = [], []
    for r0, r1, c0, c1 in reference.row_chunks(q, k, bm):
        o, lse, _ = reference.attend_rows(q[:, :, r0:r1], k, v, bm, None, scale, r0, c0, c1)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def random_case(seed):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(40, 40, generator=g) < r.choice([0.1, 0.3, 0.7])
    offset, period = r.randint(0, 50), r.randint(2, 9)
    masks = {
        "causal": get_mask_fn("causal"),
        "window": get_mask_fn("sliding_window", window_size=r.randint(1, 300)),
        "attamba": get_mask_fn("attamba", window_size=r.randint(16, 200), chunk_size=r.randint(8, 64)),
        "tiles": lambda b, h, q, kv: table[q // 64, kv // 64] & (kv <= q + offset),
        "per_head": lambda b, h, q, kv: (kv <= q) & ((q - kv) % (h + period) == 0) | (kv == b),
        "sparse_columns": lambda b, h, q, kv: (kv % 257 == offset) | (q == kv),
        "nothing_for_some_rows": lambda b, h, q, kv: ((q // 100) % 2 == 0) & (kv <= q),
        # a tile full for one (b, h), partial or empty for another
        "window_per_batch_and_head": lambda b, h, q, kv: (kv <= q) & (q - kv < 40 * (h + 1) + 90 * b),
    }
    name = r.choice(sorted(masks))
    B, Hkv = r.choice([1, 2]), r.choice([1, 2])
    Hq = Hkv * r.choice([1, 2, 3])
    L, S = r.randint(1, 700), r.randint(1, 700)
    block = r.choice([128, 64, (64, 32), (32, 128)])
    dtype = r.choice([torch.float32, torch.float64, torch.bfloat16])
    heads = Hq if name in ("per_head", "window_per_batch_and_head") else r.choice([None, Hq])
    batch = B if name == "window_per_batch_and_head" else r.choice([None, B])
    scale = r.choice([None, 0.3])
    return name, masks[name], B, Hq, Hkv, L, S, r.choice([16, 32]), block, dtype, heads, batch, scale, g


@pytest.mark.parametrize("seed", range(60))
def test_the_tile_sparse_path_equals_the_chunked_path(seed):
    name, mask_mod, B, Hq, Hkv, L, S, D, block, dtype, heads, batch, scale, g = random_case(seed)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    bm = create_block_mask(mask_mod, batch, heads, L, S, device="cpu", BLOCK_SIZE=block)
    fast = reference.tile_sparse_attention(q, k, v, bm, scale)
    assert fast is not None
    want_out, want_lse = chunked(q, k, v, bm, scale)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(fast[1]), torch.isneginf(want_lse)), name
    assert not torch.isnan(fast[0]).any() and not torch.isnan(fast[1]).any()
    torch.testing.assert_close(fast[0], want_out, **tol)
    seen = torch.isfinite(want_lse)
    torch.testing.assert_close(fast[1][seen], want_lse[seen], **tol)


def test_flex_attention_on_the_cpu_takes_it_and_steps_aside_where_it_cannot_be_exact(monkeypatch):
    calls = []
    original = reference.tile_sparse_attention
    monkeypatch.setattr(reference, "tile_sparse_attention", lambda *a: calls.append(1) or original(*a))
    bm = create_block_mask(get_mask_fn("causal"), None, None, 300, 300, device="cpu")
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    assert calls and torch.equal(out, original(q, k, v, bm, None)[0])
    k[0, 0, 5, 3] = float("nan")   # a NaN key: the chunked path, which keeps it out of the rows it is hidden from
    out = flex_attention(q, k, v, block_mask=bm)
    assert original(q, k, v, bm, None) is None
    assert torch.isnan(out[0, 0, 5:]).all() and not torch.isnan(out[0, 0, :5]).any()
    q.requires_grad_()
    assert original(q, k, v, bm, None) is None   # gradients: the differentiable chunked path


def test_scores_that_overflow_take_the_chunked_path():
    """Finite inputs whose scores overflow to +-inf: the fused kernel gave 0 where torch gives NaN
    (bf16, a +inf score) and LSE 0 where torch gives -inf (every score -inf); the tile path steps
    aside for the chunked one, which gives torch's."""
    bm = create_block_mask(get_mask_fn("causal"), None, None, 40, 40, device="cpu")
    k = torch.ones(1, 1, 40, 8)
    for dtype, q_value, nan_out in ((torch.bfloat16, 1e20, True), (torch.float32, -1e20, False)):
        q = torch.full((1, 1, 40, 8), q_value).to(dtype)
        kk, v = (k * 1e20).to(dtype), torch.randn(1, 1, 40, 8).to(dtype)
        assert reference.tile_sparse_attention(q, kk, v, bm, None) is None
        out, lse = flex_attention(q, kk, v, block_mask=bm, return_lse=True)
        if nan_out:
            assert torch.isnan(out).all()
        else:
            assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("write", ["in_place", "data", "numpy", "inference"])
def test_kept_pieces_follow_every_write_to_what_the_mask_reads(rng, write):
    """The pieces (keys and masks per tile) are kept on the block mask between calls; the
    reference is the oracle, so a write to a table the mask_mod reads must reach the next call
    however it is made, version counter or not (as torch's flex_attention evaluates the mask
    anew at each call)."""
    L = 256
    if write == "inference":
        with torch.inference_mode():
            ids = torch.repeat_interleave(torch.arange(4), 64)
    else:
        ids = torch.repeat_interleave(torch.arange(4), 64)
    mask = lambda b, h, q, kv: (ids[q] == ids[kv]) & (kv <= q)
    bm = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    bm.mask_mod = mask   # the causal tables, which hold every document layout; the mask decides
    q, k, v = (torch.randn(1, 2, L, 16, generator=rng) for _ in range(3))
    for new in (torch.arange(L) // 48, torch.arange(L) // 100):
        got = reference.tile_sparse_attention(q, k, v, bm, None)
        torch.testing.assert_close(got[0], chunked(q, k, v, bm)[0], rtol=1e-5, atol=1e-5)
        if write == "in_place":
            ids.copy_(new)
        elif write == "data":
            ids.data.copy_(new)
        elif write == "numpy":
            ids.numpy()[:] = new.numpy()
        else:
            with torch.inference_mode():
                ids.copy_(new)
    got = reference.tile_sparse_attention(q, k, v, bm, None)
    torch.testing.assert_close(got[0], chunked(q, k, v, bm)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 300.0, 3000.0])
def test_weights_sum_to_one_when_scores_are_far_from_zero(offset):
    """The chunked path's float32 weights of a row sum to 1 within float32 rounding however far
    its scores lie from 0: with every value 1 the output is 1 (a review found 1 +- 1.2e-4 at an
    offset of 3000, where the weights came from score - lse and lse rounded to the offset's ulp)."""
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    v = torch.ones(1, 2, 256, 16)
    out, lse = flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.05 * (i - j).abs() - offset,
                              return_lse=True)
    assert (out - 1).abs().max() < 2e-6
    assert torch.isfinite(lse).all() and (lse + offset).abs().max() < 20


def test_equal_huge_scores_average_their_values_in_float64():
    """Two keys with the same score of 2e20: the output is their values' mean, through the fused
    path and the chunked one (a score_mod), as torch gives."""
    q = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    k = torch.full((1, 1, 2, 4), 1e20, dtype=torch.float64)
    v = torch.tensor([[[[1.0], [3.0]]]], dtype=torch.float64)
    assert flex_attention(q, k, v).item() == 2.0
    assert flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s).item() == 2.0


def piece_kinds(bm, B, Hq, L, S, dtype=torch.float32):
    return sorted({type(p).__name__ for p in reference._make_pieces(bm, B, Hq, L, S, dtype)})


def assert_matches_chunked(q, k, v, bm, scale=None):
    fast = reference.tile_sparse_attention(q, k, v, bm, scale)
    assert fast is not None
    want_out, want_lse = chunked(q, k, v, bm, scale)
    tol = dict(rtol=2e-2, atol=2e-2) if q.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[0], want_out, **tol)
    assert torch.equal(torch.isneginf(fast[1]), torch.isneginf(want_lse))
    seen = torch.isfinite(want_lse)
    torch.testing.assert_close(fast[1][seen], want_lse[seen], **tol)


@pytest.mark.parametrize("L,S", [(300, 300), (200, 350), (350, 200), (1, 1), (64, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.3, -0.3, 0.0])
def test_a_causal_mask_runs_as_one_causal_call(rng, L, S, dtype, scale):
    """Row r sees keys 0..r for every batch entry and head: one call with the fused kernel's own
    causal flag (top-left, as flex's q >= kv is when the lengths differ), equal to the chunked path;
    a scale <= 0 too (the flag alone gives NaN there)."""
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, S, device="cpu", BLOCK_SIZE=64)
    assert piece_kinds(bm, 2, 4, L, S, dtype) == ["CausalPiece"]
    q = torch.randn(2, 4, L, 16, generator=rng).to(dtype)
    k, v = (torch.randn(2, 2, S, 16, generator=rng).to(dtype) for _ in range(2))
    assert_matches_chunked(q, k, v, bm, scale)


@pytest.mark.parametrize("near_miss", ["one_hidden_pair", "one_extra_pair", "by_head", "bottom_right"])
def test_a_mask_that_is_almost_causal_keeps_its_tiles(rng, near_miss):
    """One pair off causal, a head that differs, or causal aligned to the last key: not the causal call."""
    L, S = 256, 256 if near_miss != "bottom_right" else 300
    masks = {
        "one_hidden_pair": lambda b, h, q, kv: (kv <= q) & ~((q == 200) & (kv == 3)),
        "one_extra_pair": lambda b, h, q, kv: (kv <= q) | ((q == 10) & (kv == 11)),
        "by_head": lambda b, h, q, kv: (kv <= q) & ((h == 0) | (kv > 0)),
        "bottom_right": lambda b, h, q, kv: kv <= q + (S - L),
    }
    bm = create_block_mask(masks[near_miss], None, 2 if near_miss == "by_head" else None, L, S, device="cpu",
                           BLOCK_SIZE=64)
    assert "CausalPiece" not in piece_kinds(bm, 1, 2, L, S)
    q = torch.randn(1, 2, L, 16, generator=rng)
    k, v = (torch.randn(1, 2, S, 16, generator=rng) for _ in range(2))
    assert_matches_chunked(q, k, v, bm)


@pytest.mark.parametrize("case", ["window", "bidirectional", "window_in_documents", "long_rows_short_keys"])
def test_a_band_runs_as_blocks_of_one_call_over_strided_keys(rng, case):
    """Rows that see keys r + a .. r + c - 1 over a run: blocks of BAND_ROWS rows in one call whose
    keys and values are overlapping views; the band's ragged ends in tile pieces; equal to the chunked path."""
    L, S = 700, 700
    ids = torch.arange(L) // 300
    masks = {
        "window": get_mask_fn("sliding_window", window_size=100),
        "bidirectional": lambda b, h, q, kv: (q - kv <= 40) & (kv - q <= 70),
        "window_in_documents": lambda b, h, q, kv: (ids[q] == ids[kv]) & (kv <= q) & (q - kv < 60),
        "long_rows_short_keys": lambda b, h, q, kv: (kv <= q - 100) & (q - kv < 150),
    }
    if case == "long_rows_short_keys":
        S = 500
    bm = create_block_mask(masks[case], None, None, L, S, device="cpu", BLOCK_SIZE=(128, 64))
    pieces = reference._make_pieces(bm, 2, 4, L, S, torch.float32)
    bands = [p for p in pieces if isinstance(p, reference.BandPiece)]
    assert bands and (len(bands) >= 2) == (case == "window_in_documents")
    rows = sorted((p.r0, p.r0 + p.blocks * reference.BAND_ROWS) if isinstance(p, reference.BandPiece)
                  else (p.r0, p.r1) for p in pieces)
    assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:]))   # no row twice
    # a query laid out [B, L, H, D] (strided) and grouped query heads
    q = torch.randn(2, L, 4, 16, generator=rng).transpose(1, 2)
    k, v = (torch.randn(2, S, 2, 16, generator=rng).transpose(1, 2) for _ in range(2))
    assert_matches_chunked(q, k, v, bm)
    assert_matches_chunked(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), bm)
    assert_matches_chunked(q, k, v, bm, scale=-0.2)


def test_a_band_that_differs_by_head_or_breaks_keeps_its_tiles(rng):
    """A window whose width differs by head is no band; one row off a window ends the run there."""
    L = 512
    by_head = create_block_mask(lambda b, h, q, kv: (kv <= q) & (q - kv < 64 + 32 * h), None, 2, L, L,
                                device="cpu", BLOCK_SIZE=64)
    assert piece_kinds(by_head, 1, 2, L, L) == ["TilePiece"]
    hole = create_block_mask(lambda b, h, q, kv: (kv <= q) & (q - kv < 64) & ~((q == 300) & (kv == 299)), None,
                             None, L, L, device="cpu", BLOCK_SIZE=64)
    bands = [p for p in reference._make_pieces(hole, 1, 2, L, L, torch.float32) if isinstance(p, reference.BandPiece)]
    assert bands and all(not (p.r0 <= 300 < p.r0 + p.blocks * reference.BAND_ROWS) for p in bands)
    for bm in (by_head, hole):
        q, k, v = (torch.randn(1, 2, L, 16, generator=rng) for _ in range(3))
        assert_matches_chunked(q, k, v, bm)
