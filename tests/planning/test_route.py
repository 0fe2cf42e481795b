"""The planner's route for each kind of mask, decided on CPU exactly as on the GPU."""
import pytest

from flex_flash_infer import create_block_mask, get_mask_fn
from flex_flash_infer.planning import route


def route_of(mod, B=1, H=4, L=1024, S=1024, heads_in_mask=None):
    bm = create_block_mask(mod, None, heads_in_mask, L, S, device="cpu")
    return route.choose_route(bm, B, H, L, S, "cpu")


@pytest.mark.parametrize("name,params,kind", [
    ("full", {}, "bands"), ("causal", {}, "bands"), ("sliding_window", {"window_size": 256}, "bands"),
    ("prefix_lm", {"prefix_len": 256}, "bands"), ("document", {"offsets": [0, 100, 1024]}, "bands"),
    ("attamba", {"window_size": 256, "chunk_size": 128}, "bands+columns"),
    ("streaming", {"sink_size": 4, "window_size": 256}, "bands+columns"),
    ("streaming", {"sink_size": 0, "window_size": 256}, "bands"),
    ("dilated_sliding_window", {"window_size": 64, "dilation": 2}, "tiles"),
])
def test_library_masks(name, params, kind):
    assert route_of(get_mask_fn(name, **params)).kind == kind


@pytest.mark.parametrize("name,params,first_positions", [
    ("attamba", {"window_size": 256, "chunk_size": 128}, [127, 255]), ("streaming", {"sink_size": 4, "window_size": 256}, [0, 1, 2, 3])])
def test_column_route_gathers_the_hinted_keys(name, params, first_positions):
    r = route_of(get_mask_fn(name, **params))
    assert r.kind == "bands+columns" and r.positions.tolist()[:len(first_positions)] == first_positions
    assert r.bands[0].causal and r.bands[0].window_left == params["window_size"] - 1


def test_masks_that_read_h_or_b_never_take_bands():
    per_head = route_of(lambda b, h, q, kv: (q >= kv) & (q - kv < 64 * (h + 1)))
    assert per_head.kind == "tiles-per-head"
    per_batch = route_of(lambda b, h, q, kv: (q >= kv) & (q - kv < 64 * (b + 1)), B=2)
    assert per_batch.kind == "tiles"


@pytest.mark.parametrize("name,params,kind", [("sliding_window", {"window_size": 256}, "bands"),
                                              ("streaming", {"sink_size": 4, "window_size": 256}, "bands+columns")])
def test_explicit_batch_and_heads_of_a_mask_that_reads_neither_keep_its_route(name, params, kind):
    """create_block_mask(mod, B, H, ...) with B and H given, as torch users often write it: equal
    copies per batch entry and head, planned once (before, this fell to the tiles routes, and a
    score_mod on it to the reference backend)."""
    bm = create_block_mask(get_mask_fn(name, **params), 2, 4, 1024, 1024, device="cpu")
    r = route.choose_route(bm, 2, 4, 1024, 1024, "cpu")
    assert r.kind == kind and not r.per_head


@pytest.mark.parametrize("prefix", [300, 129, 1000])
def test_prefix_lm_with_a_prefix_inside_a_query_tile_is_two_bands(prefix):
    """The band edge at the prefix's end need not fall on a tile boundary (a prompt of any length)."""
    r = route_of(get_mask_fn("prefix_lm", prefix_len=prefix))
    assert r.kind == "bands" and [b.causal for b in r.bands] == [False, True]
    full, causal = r.bands   # the row at the prefix's end sees the same keys under either band
    assert (full.q_start, full.kv_start, full.kv_end) == (0, 0, prefix) and full.q_end in (prefix - 1, prefix)
    assert (causal.q_start, causal.q_end, causal.kv_end) == (full.q_end, 1024, 1024)


def test_tables_that_differ_per_head_stay_per_head():
    """A block mask whose tables differ per head although its mask_mod does not read h (tables
    made elsewhere) keeps the per-head route."""
    bm = create_block_mask(get_mask_fn("causal"), 1, 2, 512, 512, device="cpu")
    states = bm.states.clone()
    states[0, 1] = 0
    states[0, 1, :, 0] = 2
    other = type(bm).from_states(states, (512, 512), bm.BLOCK_SIZE, bm.mask_mod)
    assert route.choose_route(other, 1, 2, 512, 512, "cpu").per_head


@pytest.mark.parametrize("name,params", [("attamba", {"window_size": 256, "chunk_size": 128}),
                                         ("attamba", {"window_size": 100, "chunk_size": 48}),
                                         ("streaming", {"sink_size": 4, "window_size": 256})])
def test_a_users_own_window_plus_columns_mask_is_found_without_a_hint(name, params):
    hinted = get_mask_fn(name, **params)

    def users_own(b, h, q_idx, kv_idx):   # the same predicate, written by hand: no hint attribute
        return hinted(b, h, q_idx, kv_idx)

    found, declared = route_of(users_own), route_of(hinted)
    assert found.kind == declared.kind == "bands+columns"
    assert found.bands == declared.bands
    # the found columns are those the last row sees outside its window; the hint may list more
    assert set(found.positions.tolist()) <= set(declared.positions.tolist())


@pytest.mark.parametrize("mod", [
    lambda b, h, q, kv: (q >= kv) & ((kv < 300) | (q - kv < 40)),                    # 300 sinks: too many
    lambda b, h, q, kv: (q >= kv) & (((q - kv) < 64) | ((kv % 128 == 0) & (q < 900))),  # columns end early
    lambda b, h, q, kv: (q >= kv) & ((q - kv) % 3 == 0),                             # dilated
    lambda b, h, q, kv: (q - kv).abs() < 64,                                         # not causal
], ids=["many_sinks", "columns_end_early", "dilated", "symmetric"])
def test_other_masks_do_not_take_the_column_route(mod):
    assert route_of(mod).kind == "tiles"
