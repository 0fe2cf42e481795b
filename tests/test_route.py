"""The planner's route for each kind of mask, decided on CPU exactly as on the GPU."""
import pytest

from flex_flash_infer import create_block_mask, get_mask_fn, route


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


def test_column_route_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(route, "ENABLE_COLUMN_LOWERING", False)
    assert route_of(get_mask_fn("attamba", window_size=256, chunk_size=128)).kind == "tiles"


def test_masks_that_read_h_or_b_never_take_bands():
    per_head = route_of(lambda b, h, q, kv: (q >= kv) & (q - kv < 64 * (h + 1)))
    assert per_head.kind == "tiles-per-head"
    per_batch = route_of(lambda b, h, q, kv: (q >= kv) & (q - kv < 64 * (b + 1)), B=2)
    assert per_batch.kind == "tiles"
