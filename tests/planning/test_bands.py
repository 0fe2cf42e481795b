"""Interval lowering: which masks become native FlashInfer requests, checked against dense truth."""
import pytest
import torch

from dense_reference import dense_predicate
from flex_flash_infer import create_block_mask, get_mask_fn
from flex_flash_infer.planning.bands import Band, band_tile_states, find_bands
from flex_flash_infer.masks.tile_bounds import classify_tiles


def bands_for(mod, L, S, block=128):
    bm = create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=block)
    bq, bkv = bm.BLOCK_SIZE
    return find_bands(bm.states[0, 0], bm.mask_mod, L, S, bq, bkv)


def union(bands, L, S):
    q, kv = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    out = torch.zeros(L, S, dtype=torch.bool)
    for band in bands:
        out |= band.visible(q, kv)
    return out


@pytest.mark.parametrize("name,params,L,S,count", [
    ("full", {}, 1000, 1000, 1),
    ("full", {}, 300, 517, 1),
    ("causal", {}, 1024, 1024, 1),
    ("causal", {}, 1000, 1000, 1),
    ("causal", {}, 300, 900, 1),
    ("sliding_window", {"window_size": 256}, 2048, 2048, 1),
    ("sliding_window", {"window_size": 100}, 999, 999, 1),
    ("prefix_lm", {"prefix_len": 512}, 2048, 2048, 2),
    # a last query tile of one row looks "full" on its own; it still continues the band
    ("causal", {}, 129, 129, 1),
    ("causal", {}, 257, 300, 1),
    ("sliding_window", {"window_size": 100}, 129, 129, 1),
    ("sliding_window", {"window_size": 30}, 385, 385, 1),
])
def test_native_patterns_lower_to_exact_bands(name, params, L, S, count):
    bands = bands_for(get_mask_fn(name, **params), L, S)
    assert bands is not None and len(bands) == count
    assert torch.equal(union(bands, L, S), dense_predicate(name, L, S, **params))


def test_a_users_own_causal_window_needs_no_hint():
    def my_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= 300)

    bands = bands_for(my_window, 1500, 1500)
    assert bands == [Band(0, 1500, 0, 1500, True, 300)]


@pytest.mark.parametrize("name,params", [("attamba", {"window_size": 256, "chunk_size": 128}),
                                         ("streaming", {"sink_size": 4, "window_size": 256}),
                                         ("dilated_sliding_window", {"window_size": 200, "dilation": 2})])
def test_patterns_kernels_cannot_express_are_not_lowered(name, params):
    assert bands_for(get_mask_fn(name, **params), 1024, 1024) is None


def test_causal_with_more_queries_than_keys_is_not_lowered():
    # Rows q >= S see every key but earlier rows do not: FlashInfer's bottom-right causal
    # would disagree with FlexAttention's top-left causal here.
    bands = bands_for(get_mask_fn("causal"), 900, 300)
    assert bands is None or torch.equal(union(bands, 900, 300), dense_predicate("causal", 900, 300))


def test_one_wrong_element_in_a_partial_tile_defeats_lowering():
    def almost_causal(b, h, q, kv):
        return (q >= kv) & ~((q == 700) & (kv == 650))

    assert bands_for(almost_causal, 1024, 1024) is None


@pytest.mark.parametrize("trial", range(60))
def test_analytic_band_tile_states_match_evaluation(rng, trial):
    L = int(torch.randint(50, 700, (1,), generator=rng))
    S = int(torch.randint(50, 700, (1,), generator=rng))
    bq, bkv = [int(x) for x in torch.tensor([16, 32, 64])[torch.randint(0, 3, (2,), generator=rng)]]
    q_start = int(torch.randint(0, L, (1,), generator=rng)) // bq * bq
    q_end = min(L, q_start + int(torch.randint(1, L, (1,), generator=rng)))
    kv_start = int(torch.randint(0, S, (1,), generator=rng))
    kv_end = int(torch.randint(kv_start + 1, S + 1, (1,), generator=rng))
    causal = bool(torch.randint(0, 2, (1,), generator=rng))
    window = int(torch.randint(0, 300, (1,), generator=rng)) if bool(torch.randint(0, 2, (1,), generator=rng)) else -1
    band = Band(q_start, q_end, kv_start, kv_end, causal, window)
    truth = classify_tiles(lambda b, h, q, kv: band.visible(q, kv), 1, 1, L, S, bq, bkv, torch.device("cpu"))[0, 0]
    got = band_tile_states(band, L, S, bq, bkv, truth.shape[0], truth.shape[1], torch.device("cpu"))
    t0, t1 = q_start // bq, -(-q_end // bq)
    assert torch.equal(got[t0:t1], truth[t0:t1]), band


def test_document_hint_is_one_causal_band_per_document(rng):
    lengths = torch.randint(1, 300, (9,), generator=rng)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])
    mod = get_mask_fn("document", offsets=offsets)
    from flex_flash_infer.planning.bands import hinted_bands

    bands = hinted_bands(mod, total, total)
    assert len(bands) == 9
    ids = mod.document_ids.numpy()
    assert torch.equal(union(bands, total, total), dense_predicate("document", total, total, document_ids=ids))
    assert hinted_bands(mod, total, total + 1) is None


@pytest.mark.parametrize("name,params", [("full", {}), ("causal", {}), ("sliding_window", {"window_size": 37}),
                                         ("sliding_window", {"window_size": 1000}), ("prefix_lm", {"prefix_len": 90}),
                                         ("prefix_lm", {"prefix_len": 0}), ("prefix_lm", {"prefix_len": 5000})])
def test_library_band_hints_are_exactly_their_predicates(rng, name, params):
    """full, causal, sliding_window and prefix_lm state their bands (no search, no verification
    at plan time): the bands' union is the predicate on random shapes, or the hint says None."""
    from flex_flash_infer.planning.bands import hinted_bands

    mod = get_mask_fn(name, **params)
    for _ in range(20):
        L, S = (int(x) for x in torch.randint(1, 400, (2,), generator=rng))
        if bool(torch.rand(1, generator=rng) < 0.3):
            S = L
        bands = hinted_bands(mod, L, S)
        if bands is None:
            continue
        # each a real request: rows and keys inside the sequences, rows of different bands disjoint
        assert all(0 <= b.q_start < b.q_end <= L and 0 <= b.kv_start < b.kv_end <= S for b in bands), (L, S, bands)
        assert all(a.q_end <= b.q_start for a, b in zip(bands, bands[1:])), (L, S, bands)
        assert torch.equal(union(bands, L, S), dense_predicate(name, L, S, **params)), (L, S, bands)
    assert hinted_bands(mod, 300, 300) is not None   # the packed-tokens case always has one


def test_a_users_own_causal_has_no_hint_and_is_found():
    from flex_flash_infer.planning.bands import hinted_bands

    def my_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    assert hinted_bands(my_causal, 1000, 1000) is None
    assert bands_for(my_causal, 1000, 1000) == hinted_bands(get_mask_fn("causal"), 1000, 1000)
