"""Plan, then run (issue 21): BlockMask.plan() returns an immutable, printable plan of the route
and its launches; the FlashInfer backend runs exactly that plan; kernel_options ROUTE forces a
route and BACKEND a backend, and every forced route gives the planner's answer."""
import dataclasses

import pytest
import torch

from dense_reference import dense_attention
from flex_flash_infer import create_block_mask, create_mask, flex_attention, get_mask_fn
from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod

L = 1024


def _dense(q, k, v, mask_mod):
    return dense_attention(q, k, v, create_mask(mask_mod, 1, q.shape[1], q.shape[2], k.shape[2], device="cpu").bool())


def _mask(name):
    g = torch.Generator().manual_seed(1)
    table = torch.rand(8, 8, generator=g) < 0.4
    return {
        "causal": get_mask_fn("causal"),
        "window": get_mask_fn("sliding_window", window_size=200),
        "streaming": get_mask_fn("streaming", sink_size=4, window_size=200),
        "attamba": get_mask_fn("attamba", window_size=128, chunk_size=64),
        "prefix": get_mask_fn("prefix_lm", prefix_len=300),
        "per_head_window": lambda b, h, q, kv: (kv <= q) & (q - kv < 100 * (h + 1)),
        "random_tiles": lambda b, h, q, kv: (table[q // 128, kv // 128] | (q // 128 == kv // 128)) & (kv <= q),
        "per_head_random": lambda b, h, q, kv: ((q * 3 + kv * 5 + h) % 7 == 0) | ((h == 0) & (kv <= q)),
    }[name]


@pytest.mark.parametrize("name,route,launches", [
    ("causal", "bands", 1), ("window", "bands", 1), ("streaming", "bands+columns", 2),
    ("attamba", "bands+columns", 2), ("prefix", "bands", 1), ("per_head_window", "bands-per-head", 4),
    ("random_tiles", "tiles-causal", 1), ("per_head_random", "tiles-per-head", 3)])
def test_a_plan_names_its_route_and_each_launch(name, route, launches):
    heads = 4 if name.startswith("per_head") else None
    bm = create_block_mask(_mask(name), None, heads, L, L, device="cpu")
    plan = bm.plan(4, 2, head_dim=64)
    assert plan.route == route and len(plan.launches()) == launches
    text = str(plan)
    assert text.startswith(f"AttentionPlan: route {route}; batch 1, Q_LEN {L}, KV_LEN {L}, heads 4/2, head_dim 64")
    assert len(text.splitlines()) == launches + 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.route = "tiles"


def test_a_plan_shows_what_each_launch_covers():
    bm = create_block_mask(_mask("prefix"), None, None, L, L, device="cpu")
    assert "queries 0..300 x keys 0..300 (full); queries 300..1024 x keys 0..1024 (causal)" in str(bm.plan(2, 2))
    bm = create_block_mask(_mask("window"), None, None, L, L, device="cpu")
    assert "(causal, window 200)" in str(bm.plan(2, 2))
    assert "logits soft cap 20" in str(bm.plan(2, 2, score_mod=generate_softcap_score_mod(20)))
    causal = create_block_mask(_mask("causal"), None, None, L, L, device="cpu")
    split = causal.plan(2, 2, score_mod=generate_relative_position_bias_score_mod(torch.randn(2, 65)))
    assert split.band_kernel == "far-split" and "keys within 32 of the query" in str(split)
    tiles = create_block_mask(_mask("random_tiles"), None, None, L, L, device="cpu").plan(2, 2)
    full = int((tiles.tiles.full.dummy == 0).sum())
    assert f"over {full} full tiles" in str(tiles)
    nothing = create_block_mask(lambda b, h, q, kv: kv < 0, None, None, L, L, device="cpu").plan(2, 2)
    assert "no tile to launch" in str(nothing)


def test_a_score_mod_that_multiplies_the_score_shows_as_the_scale():
    causal = create_block_mask(_mask("causal"), None, None, L, L, device="cpu")
    folded = causal.plan(2, 2, score_mod=lambda s, b, h, q, kv: s / 2)
    assert folded.score_factor == 0.5 and folded.band_kernel == "plain"
    assert "score_mod folded into the scale (x 0.5)" in str(folded)
    assert "compiled" not in str(folded)
    # a product FlashInfer's float32 scale cannot hold runs the compiled variant instead
    kept = causal.plan(2, 2, score_mod=lambda s, b, h, q, kv: s * 1e-40, scale=1.0)
    assert kept.score_factor is None and kept.band_kernel == "score-mod"


def test_a_score_mod_no_kernel_takes_is_refused_by_plan_as_by_the_call():
    """plan() showed a compiled score_mod launch for a mod with Python control flow, which the call
    then refused: a plan shown is a plan that runs."""
    from flex_flash_infer.core.trace import TraceError

    def branches(s, b, h, q, kv):
        if q > kv:
            return s
        return -s

    causal = create_block_mask(_mask("causal"), None, None, L, L, device="cpu")
    with pytest.raises(TraceError, match="control flow"):
        causal.plan(2, 2, score_mod=branches)


def test_a_bit_mask_past_flashinfers_int32_offsets_is_refused(flashinfer_on_cpu, monkeypatch):
    """FlashInfer finds a request's bits by int32 offsets: a partial launch of more than 2^31 bits
    (47,104 tokens of partial tiles, found by a hunt) had them wrap, silently (the limit scaled down)."""
    from flex_flash_infer.planning import planner

    monkeypatch.setattr(planner, "MAX_MASK_BITS", 10_000)
    bm = create_block_mask(lambda b, h, q, kv: (q - kv) % 3 != 0, None, None, L, L, device="cpu", BLOCK_SIZE=32)
    q = torch.randn(1, 2, L, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"partial tiles' launch would need a bit mask of [\d,]+ bits, more than "
                                         r"the 10,000 .*backend='reference'"):
        flex_attention(q, q, q, block_mask=bm, backend="flashinfer")
    monkeypatch.setattr(planner, "MAX_MASK_BITS", 2**31 - 1)   # the same call within the limit runs
    flex_attention(q, q, q, block_mask=bm, backend="flashinfer")


@pytest.mark.parametrize("score_mod", [None, lambda s, b, h, q, kv: s * 0.75, lambda s, b, h, q, kv: s + kv * 0.01])
def test_the_backend_runs_the_plan_the_block_mask_shows(flashinfer_on_cpu, score_mod):
    for name in ("causal", "streaming", "per_head_window", "random_tiles", "per_head_random"):
        bm = create_block_mask(_mask(name), None, 4 if name.startswith("per_head") else None, L, L, device="cpu")
        q, k, v = (torch.randn(1, 4, L, 16, dtype=torch.float64) for _ in range(3))
        flex_attention(q, k, v, block_mask=bm, score_mod=score_mod, enable_gqa=False, backend="flashinfer")
        ran = next(iter(bm._plans.values())).plan
        assert str(ran) == str(bm.plan(4, 4, head_dim=16, score_mod=score_mod)), name


@pytest.mark.parametrize("name", ["causal", "streaming", "attamba", "prefix", "per_head_window", "random_tiles"])
@pytest.mark.parametrize("route", ["tiles", "tiles-per-head", None])
def test_every_forced_route_gives_the_same_answer(flashinfer_on_cpu, name, route):
    heads = 4 if name.startswith("per_head") else None
    if route == "tiles" and heads:
        pytest.skip("a per-head mask has no single-map tiles route (tested below)")
    bm = create_block_mask(_mask(name), None, heads, L, L, device="cpu")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, L, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, L, 16, generator=g, dtype=torch.float64) for _ in range(2))
    options = None if route is None else {"ROUTE": route}
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, kernel_options=options,
                              backend="flashinfer")
    ran = [p.plan.route for key, p in bm._plans.items() if key[-1] == route][0]
    assert route is None or ran.startswith(route)
    want, want_lse = _dense(q, k, v, _mask(name))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)   # the CPU model keeps float32 LSE
    torch.testing.assert_close(lse, want_lse.float())


def test_a_route_the_mask_cannot_take_is_refused_with_the_planners_choice(flashinfer_on_cpu):
    q = torch.randn(1, 4, L, 16, dtype=torch.float64)
    k = v = torch.randn(1, 2, L, 16, dtype=torch.float64)
    tiles = create_block_mask(_mask("random_tiles"), None, None, L, L, device="cpu")
    with pytest.raises(ValueError, match=r"ROUTE'\]='bands' but the planner found no such lowering.*chose 'tiles'"):
        flex_attention(q, k, v, block_mask=tiles, enable_gqa=True, kernel_options={"ROUTE": "bands"}, backend="flashinfer")
    streaming = create_block_mask(_mask("streaming"), None, None, L, L, device="cpu")
    with pytest.raises(ValueError, match="needs key columns"):
        flex_attention(q, k, v, block_mask=streaming, enable_gqa=True, kernel_options={"ROUTE": "bands"}, backend="flashinfer")
    per_head = create_block_mask(_mask("per_head_window"), None, 4, L, L, device="cpu")
    with pytest.raises(ValueError, match="differs per head; use 'tiles-per-head'"):
        flex_attention(q, k, v, block_mask=per_head, enable_gqa=True, kernel_options={"ROUTE": "tiles"},
                       backend="flashinfer")
    with pytest.raises(ValueError, match=r"kernel_options\['ROUTE'\] must be one of"):
        flex_attention(q, k, v, block_mask=tiles, enable_gqa=True, kernel_options={"ROUTE": "fast"}, backend="flashinfer")
    # the object stays usable: the planner's own route still runs
    out = flex_attention(q, k, v, block_mask=tiles, enable_gqa=True, backend="flashinfer")
    torch.testing.assert_close(out, _dense(q, k, v, _mask("random_tiles"))[0])


def test_kernel_options_backend():
    q = k = v = torch.randn(1, 2, 64, 16)
    bm = create_block_mask(_mask("causal"), None, None, 64, 64, device="cpu")
    out = flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "REFERENCE"})
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=bm, backend="reference"))
    # torch's own values pick among torch's kernels: here they leave the choice to backend=
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "FLASH"}), out)
    with pytest.raises(ValueError, match=r"kernel_options\['BACKEND'\] must be one of \('FLASHINFER', 'REFERENCE'\)"):
        flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "CUDNN"})
    with pytest.raises(ValueError, match="disagree"):
        flex_attention(q, k, v, block_mask=bm, backend="reference", kernel_options={"BACKEND": "FLASHINFER"})
    with pytest.raises(ValueError, match="picks a FlashInfer route, but"):
        flex_attention(q, k, v, block_mask=bm, kernel_options={"ROUTE": "tiles"})
    with pytest.raises(TypeError, match="kernel_options must be a dict"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=["ROUTE"])
    # torch's tuning keys change nothing
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm, kernel_options={"BLOCK_M": 64}), out)


def test_plan_arguments_are_checked():
    bm = create_block_mask(_mask("causal"), None, None, 256, 256, device="cpu")
    with pytest.raises(ValueError, match=r"num_qo_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        bm.plan(6, 4)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        bm.plan(4, 2, head_dim=0)
    assert bm.plan(4, 2).route == "bands"   # still usable


def test_a_forced_route_a_per_head_mask_cannot_take_advises_one_it_can():
    """The advice in the error works when followed: a per-head mask forced to 'bands' is pointed to
    'tiles-per-head' (it was pointed to 'tiles' too, which then refused)."""
    import re

    from flex_flash_infer import create_block_mask

    mask = create_block_mask(lambda b, h, q, kv: (kv <= q) & ((q - kv) % (h + 2) == 0), None, 4, 256, 256,
                             device="cpu")
    with pytest.raises(ValueError) as error:
        mask.plan(4, 2, route="bands")
    advised = sorted(set(re.findall(r"'(tiles[a-z-]*)'", str(error.value))))
    assert advised == ["tiles-per-head"], str(error.value)
    assert mask.plan(4, 2, route=advised[0]).route.startswith("tiles-per-head")
