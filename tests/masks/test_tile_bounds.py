"""Tile states from bounds (tile_bounds.py) equal the element-wise build's, for library masks,
captured tables and random mask expressions, and leave only the tiles a mask's edges cross
undecided."""
import random

import pytest
import torch

from flex_flash_infer.masks import tile_bounds as tile_bounds_module
from flex_flash_infer.masks.tile_bounds import classify_tiles
from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.masks.block_build import tile_elements
from flex_flash_infer.masks.tile_bounds import classify_by_bounds, tile_analysis, tile_bounds
from flex_flash_infer.core.trace import trace
from random_masks import random_bool_expression, random_table


def both_builds(mask_mod, B, H, L, S, bq, bkv, monkeypatch):
    monkeypatch.setattr(tile_bounds_module, "USE_BOUNDS", False)
    elementwise = classify_tiles(mask_mod, B, H, L, S, bq, bkv, "cpu")
    by_bounds = classify_by_bounds(mask_mod, B, H, L, S, bq, bkv, torch.device("cpu"), 1 << 20)
    return elementwise, by_bounds


LIBRARY = [("full", {}), ("causal", {}), ("sliding_window", {"window_size": 100}),
           ("attamba", {"window_size": 64, "chunk_size": 32}), ("streaming", {"sink_size": 4, "window_size": 90}),
           ("prefix_lm", {"prefix_len": 130}), ("document", {"offsets": [0, 77, 300, 301, 650]}),
           ("chunked_causal", {"chunk_size": 50}), ("dilated_sliding_window", {"window_size": 120, "dilation": 3})]


@pytest.mark.parametrize("name,params", LIBRARY)
@pytest.mark.parametrize("shape", [(650, 650, 64, 64), (650, 777, 128, 64), (300, 650, 32, 128)])
def test_library_masks_match_the_elementwise_build(monkeypatch, name, params, shape):
    L, S, bq, bkv = shape
    if name == "document" and L != S:
        pytest.skip("the document mask is defined on the packed tokens (q_len == kv_len)")
    mask_mod = get_mask_fn(name, **params)
    elementwise, by_bounds = both_builds(mask_mod, 2, 3, L, S, bq, bkv, monkeypatch)
    assert by_bounds is not None, "bounds and samples settle most tiles of every library mask"
    assert torch.equal(by_bounds, elementwise)
    assert_row_invariance_holds(mask_mod, 2, 3, L, S, bq, bkv)


def test_causal_leaves_only_the_diagonal_undecided():
    graph = trace(get_mask_fn("causal"), "mask_mod")
    certain, possible = tile_bounds(graph, 1, 1, 4096, 4096, 128, 128, torch.device("cpu"))
    undecided = possible & ~certain
    assert torch.equal(undecided[0, 0], torch.eye(32, dtype=torch.bool))
    assert torch.equal(certain[0, 0], torch.ones(32, 32).tril(-1).bool())


def test_document_ids_read_over_a_tile_bound_it_by_their_min_and_max():
    """doc[q] == doc[kv] & q >= kv with sorted ids: tiles inside one document (or two disjoint
    ones) are decided; only the diagonal and the tiles a document boundary crosses are evaluated."""
    offsets = [0, 1000, 1700, 4096]
    graph = trace(get_mask_fn("document", offsets=offsets), "mask_mod")
    certain, possible = tile_bounds(graph, 1, 1, 4096, 4096, 128, 128, torch.device("cpu"))
    undecided = (possible & ~certain)[0, 0]
    boundary = {i // 128 for i in (999, 1000, 1699, 1700)}   # tiles holding a boundary
    off_diagonal = undecided & ~torch.eye(32, dtype=torch.bool)
    for qt, kt in off_diagonal.nonzero().tolist():   # a boundary in its rows or in its keys
        assert qt in boundary or kt in boundary, (qt, kt)
    assert 0 < int(off_diagonal.sum()) <= 2 * 2 * 32


def test_tiles_whose_samples_agree_are_evaluated_in_full(monkeypatch):
    """One visible pair away from the sampled points, and one hidden pair in an otherwise
    visible tile that bounds cannot prove full: both tiles must come out partial."""
    def needle(b, h, q_idx, kv_idx):
        hole = (q_idx == 70) & (kv_idx == 75)            # inside tile (1, 1), off its samples
        pin = (q_idx == 10) & (kv_idx == 140)            # inside tile (0, 2), off its samples
        return ((q_idx // 64 == kv_idx // 64) & ~hole) | pin

    elementwise, by_bounds = both_builds(needle, 1, 1, 256, 256, 64, 64, monkeypatch)
    assert by_bounds is not None and torch.equal(by_bounds, elementwise)
    assert by_bounds[0, 0, 1, 1] == 1 and by_bounds[0, 0, 0, 2] == 1 and by_bounds[0, 0, 2, 2] == 2


def test_a_mask_that_reads_h_keeps_its_heads_when_its_bounds_are_unknown(monkeypatch):
    """Bitwise ops leave the bound unknown (a scalar): the tiles must still differ by head
    (a random expression found this)."""
    def per_head(b, h, q_idx, kv_idx):
        return torch.abs(q_idx) >= torch.where(h == 1, b % 64 + q_idx * 0, ((q_idx ^ b) & kv_idx) + q_idx * 0)

    elementwise, by_bounds = both_builds(per_head, 2, 3, 680, 91, 16, 64, monkeypatch)
    assert by_bounds is not None and torch.equal(by_bounds, elementwise)


def test_per_head_tables_and_batch_dependence(monkeypatch, rng):
    windows = torch.tensor([16, 40, 100, 7])
    keep = torch.rand(4, 11, 11, generator=rng) < 0.5

    def per_head_windows(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < windows[h % 4]) | keep[b % 4, q_idx // 64, kv_idx // 64]

    elementwise, by_bounds = both_builds(per_head_windows, 3, 5, 700, 650, 64, 64, monkeypatch)
    assert by_bounds is not None and torch.equal(by_bounds, elementwise)


def test_a_mask_that_does_not_trace_takes_the_elementwise_build(monkeypatch):
    def branchy(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx if True else None   # traces: a constant branch

    def untraceable(b, h, q_idx, kv_idx):
        return torch.logical_and(q_idx >= kv_idx, torch.ones_like(q_idx, dtype=torch.bool).cumsum(-1) > 0)

    assert classify_by_bounds(untraceable, 1, 1, 300, 300, 64, 64, torch.device("cpu"), 1 << 20) is None
    elementwise, _ = both_builds(untraceable, 1, 1, 300, 300, 64, 64, monkeypatch)
    monkeypatch.setattr(tile_bounds_module, "USE_BOUNDS", True)
    assert torch.equal(classify_tiles(untraceable, 1, 1, 300, 300, 64, 64, "cpu"), elementwise)
    assert classify_by_bounds(branchy, 1, 1, 300, 300, 64, 64, torch.device("cpu"), 1 << 20) is not None


def test_values_past_int32_are_left_to_the_elementwise_build(monkeypatch):
    """q * kv wraps in the int32 build: bounds must not decide tiles on the unwrapped product."""
    def product(b, h, q_idx, kv_idx):
        return q_idx * kv_idx * 3000 > 5

    elementwise, by_bounds = both_builds(product, 1, 1, 1500, 1500, 128, 128, monkeypatch)
    assert by_bounds is None or torch.equal(by_bounds, elementwise)


def test_a_constant_past_int32_is_left_to_the_elementwise_build():
    """q * 2^62 in int64 wraps to 0 at every tile end (q = 0, 4, 8): the bounds' corner products
    passed int64 too and said the tile's rows all equal, a partial tile FULL (found by a hunt)."""
    def wraps(b, h, q_idx, kv_idx):
        return (q_idx.to(torch.int64) * (1 << 62)) == 0   # torch wraps: true where q % 4 == 0

    by_bounds = classify_tiles(wraps, 1, 1, 9, 16, 16, 16, "cpu")
    elementwise = classify_tiles(wraps, 1, 1, 9, 16, 16, 16, "cpu", use_bounds=False)
    assert elementwise.flatten().tolist() == [1] and torch.equal(by_bounds, elementwise)


# ---- property test: random mask expressions ----------------------------------------------------
@pytest.mark.parametrize("seed", range(60))
def test_random_masks_match_the_elementwise_build(monkeypatch, rng, seed):
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)) + seed)
    source = random_bool_expression(r, 4)
    T = torch.rand(12, 12, generator=rng) < 0.5
    D = random_table(r, rng)
    w = r.randint(0, 600)
    mask_mod = eval(f"lambda b, h, q, kv: ({source}) | (q < 0)", {"torch": torch, "T": T, "D": D, "w": w})
    L, S = r.randint(1, 700), r.randint(1, 700)
    bq, bkv = r.choice([16, 64, 128]), r.choice([16, 64, 128])
    elementwise, by_bounds = both_builds(mask_mod, 2, 3, L, S, bq, bkv, monkeypatch)
    assert by_bounds is None or torch.equal(by_bounds, elementwise), source
    assert_row_invariance_holds(mask_mod, 2, 3, L, S, bq, bkv)


def assert_row_invariance_holds(mask_mod, B, H, L, S, bq, bkv):
    """Every tile the analysis calls row invariant holds the same row on all its rows."""
    try:
        graph = trace(mask_mod, "mask_mod")
    except Exception:
        return
    _, _, one_row = tile_analysis(graph, B, H, L, S, bq, bkv, torch.device("cpu"))
    tiles = one_row.nonzero()
    if tiles.shape[0] == 0:
        return
    bt, ht, qt, kt = tiles.unbind(1)
    visible, q, _ = tile_elements(mask_mod, bt, ht, qt, kt, bq, bkv, L, S)
    rows_in_range = (q < L)                              # [P, bq, 1]
    same = (visible == visible[:, :1]) | ~rows_in_range  # padded rows hold nothing to compare
    assert bool(same.all()), tiles[~same.flatten(1).all(1)][:3]


@pytest.mark.parametrize("name,params", LIBRARY)
def test_bounds_in_bands_of_query_tiles_give_the_same_states(monkeypatch, name, params):
    """A grid past BOUNDED_TILES_PER_CHUNK is bounded a band of query tiles at a time (a 1M-token
    mask has 2^26 tiles): bands of 3 query tiles give the element-wise states, per head too, and
    a band whose tiles bounds leave mostly undecided is evaluated element by element alone."""
    windows = torch.tensor([16, 40, 100, 7])

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < windows[h % 4])

    mask_mod = get_mask_fn(name, **params)
    monkeypatch.setattr(tile_bounds_module, "BOUNDED_TILES_PER_CHUNK", 3 * 11)
    for mod, H in ((mask_mod, 1), (per_head, 4)):
        elementwise, by_bounds = both_builds(mod, 2, H, 650, 650, 64, 64, monkeypatch)
        assert by_bounds is not None and torch.equal(by_bounds, elementwise)
    monkeypatch.setattr(tile_bounds_module, "MAX_UNDECIDED_SHARE", 0.0)   # every band element by element
    elementwise, by_bounds = both_builds(per_head, 1, 4, 650, 650, 64, 64, monkeypatch)
    assert torch.equal(by_bounds, elementwise)


def test_a_million_tokens_take_the_bounds(monkeypatch):
    """Past 2^24 tiles the build stays on bounds (it fell back to element by element there, half
    an hour for a million tokens): the diagonal tiles alone are sampled, no pair evaluated."""
    calls = []
    real = tile_bounds_module.evaluated_tiles
    monkeypatch.setattr(tile_bounds_module, "evaluated_tiles", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    monkeypatch.setattr(tile_bounds_module, "classify_query_tiles", lambda *a, **k: pytest.fail("element-wise build"))
    n = 1 << 20
    states = classify_tiles(get_mask_fn("causal"), 1, 1, n, n, 256, 128, "cpu")   # 2^25 tiles
    assert states.shape == (1, 1, 4096, 8192)
    assert torch.equal(states[0, 0, :2, :5], torch.tensor([[1, 1, 0, 0, 0], [2, 2, 1, 1, 0]], dtype=torch.int8))
    assert int((states == 1).sum()) == 8192 and int((states == 2).sum()) == 4096 * 4095
    assert sum(calls) == 0   # the diagonal's tiles are all settled by samples


def test_attamba_columns_below_the_window_are_known_from_one_row():
    """Below its window attamba's mask is the chunk-end keys alone: the same on every row of a
    tile, so those tiles are evaluated on one row (and verified that way by the column finder)."""
    L = 2048
    mask_mod = get_mask_fn("attamba", window_size=256, chunk_size=128)
    graph = trace(mask_mod, "mask_mod")
    certain, possible, one_row = tile_analysis(graph, 1, 1, L, L, 128, 128, torch.device("cpu"))
    below = torch.ones(16, 16).tril(-3).bool()           # key tiles at least 256 keys before the rows
    assert bool(one_row[0, 0][below].all())
    assert not bool(one_row[0, 0].diagonal().any())      # the causal diagonal differs row to row
    assert_row_invariance_holds(mask_mod, 1, 1, L, L, 128, 128)


def test_a_failure_inside_the_bounds_costs_speed_not_the_build(monkeypatch):
    """Should the interval rules ever raise on a graph, the build warns and evaluates element
    by element: the same states, never an error the element-wise build would not raise."""
    def broken(*args, **kwargs):
        raise RuntimeError("a rule this graph was not written for")

    monkeypatch.setattr(tile_bounds_module, "tile_analysis", broken)
    monkeypatch.setattr("flex_flash_infer.core.notices._warned", set())
    mask_mod = get_mask_fn("sliding_window", window_size=50)
    with pytest.warns(UserWarning, match="tile bounds failed"):
        states = classify_tiles(mask_mod, 1, 1, 300, 300, 64, 64, "cpu")
    monkeypatch.setattr(tile_bounds_module, "USE_BOUNDS", False)
    assert torch.equal(states, classify_tiles(mask_mod, 1, 1, 300, 300, 64, 64, "cpu"))


def test_use_bounds_false_builds_element_by_element_for_that_call_only(monkeypatch):
    """classify_tiles(use_bounds=False) (the plan benchmark's element-wise column) never asks the
    bounds, gives the same states, and leaves the module's default as it was."""
    mask_mod = get_mask_fn("sliding_window", window_size=50)
    default = tile_bounds_module.USE_BOUNDS
    by_default = classify_tiles(mask_mod, 1, 1, 300, 300, 64, 64, "cpu")

    def asked(*args, **kwargs):
        raise AssertionError("use_bounds=False asked the bounds")

    monkeypatch.setattr(tile_bounds_module, "classify_by_bounds", asked)
    assert torch.equal(classify_tiles(mask_mod, 1, 1, 300, 300, 64, 64, "cpu", use_bounds=False), by_default)
    assert tile_bounds_module.USE_BOUNDS == default
