"""T5's bucketed relative-position bias: the buckets at known distances, the table it runs as, the
generated code, and the split beyond max_distance through the plan (CPU model of the kernels)."""
import math
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
from flex_flash_infer.planning import far_bias
from flex_flash_infer.backends import flashinfer_backend
from flex_flash_infer.backends import score_mod_kernels
from flex_flash_infer.mods import generate_t5_relative_bias_score_mod, t5_buckets
from test_codegen import check_score_mod


def _t5_bucket(rel: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
    """T5's bucket of one kv - q, written out here from its definition (half the buckets for keys
    after the query when bidirectional; the first half of a side exact, the rest log-spaced up to
    max_distance, in float32 as T5 computes it): the oracle for the library's t5_buckets."""
    n = num_buckets // 2 if bidirectional else num_buckets
    side = n if bidirectional and rel > 0 else 0
    distance = abs(rel) if bidirectional else max(-rel, 0)
    exact = n // 2
    if distance < exact:
        return side + distance
    log_part = torch.log(torch.tensor(distance, dtype=torch.float32) / exact) / math.log(max_distance / exact)
    return side + min(exact + int((log_part * (n - exact)).item()), n - 1)


def test_buckets_at_known_distances():
    """32 buckets, max_distance 128: 16 a side, 8 exact, then log-wide up to 128 (kv - q given)."""
    r = torch.tensor([0, -1, -7, -8, -11, -12, -16, -127, -128, -5000, 1, 7, 8, 5000])
    both = t5_buckets(r, 32, 128, True).tolist()
    # past the exact ones: 8 + int(log(d / 8) / log(16) * 8): d = 11 -> 8, 12 -> 9, 16 -> 10
    assert both[:7] == [0, 1, 7, 8, 8, 9, 10]
    assert both[7] == 15 and both[8] == 15 and both[9] == 15         # up to and beyond max_distance
    assert both[10:] == [17, 23, 24, 31]                              # keys after the query: 16 more
    one = t5_buckets(r, 32, 128, False).tolist()                      # causal: 32 buckets, one side
    assert one[:4] == [0, 1, 7, 8] and one[9] == 31 and one[10:] == [0, 0, 0, 0]


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40), (8, 500)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_of_every_distance(num_buckets, max_distance, bidirectional):
    rel = torch.arange(-1200, 1201)
    want = torch.tensor([_t5_bucket(int(x), num_buckets, max_distance, bidirectional) for x in rel])
    assert torch.equal(t5_buckets(rel, num_buckets, max_distance, bidirectional), want)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_the_mod_adds_the_bucket_of_each_distance(bidirectional):
    table = torch.randn(4, 32)
    mod = generate_t5_relative_bias_score_mod(table, max_distance=64, bidirectional=bidirectional)
    q = torch.arange(300).view(1, -1, 1)
    kv = torch.arange(300).view(1, 1, -1)
    h = torch.arange(4).view(-1, 1, 1)
    score = torch.randn(4, 300, 300)
    got = mod(score, torch.zeros(()), h, q, kv)
    buckets = torch.tensor([_t5_bucket(r, 32, 64, bidirectional) for r in range(-299, 300)])
    assert torch.equal(got, score + table[h, buckets[kv - q + 299]])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="table"):
        generate_t5_relative_bias_score_mod(torch.arange(32))                    # not float
    with pytest.raises(ValueError, match="buckets"):
        generate_t5_relative_bias_score_mod(torch.randn(4, 3))                   # odd, bidirectional
    with pytest.raises(ValueError, match="max_distance"):
        generate_t5_relative_bias_score_mod(torch.randn(4, 32), max_distance=8)  # within the exact ones


def test_generated_code_matches_torch(rng):
    check_score_mod(generate_t5_relative_bias_score_mod(torch.randn(8, 32), max_distance=64), rng)


@pytest.mark.parametrize("name,params", [("causal", {}), ("full", {})])
def test_through_the_plan_with_the_split_beyond_max_distance(monkeypatch, name, params):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    B, H, Hkv, L, D = 1, 4, 2, 400, 16
    mod = generate_t5_relative_bias_score_mod(torch.randn(H, 32, dtype=torch.float64), max_distance=64)
    mask = get_mask_fn(name, **params)
    bm = create_block_mask(mask, B, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, H, Hkv, D, torch.float64, D ** -0.5, "cpu", score_mod=mod)
    # causal bands split at max_distance; a full band is not causal and runs the variant throughout
    assert isinstance(plan.band_runner, far_bias.FarSplitBands) == (name == "causal")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    out, _ = plan.run(q.transpose(1, 2).reshape(B * L, H, D), k.transpose(1, 2), v.transpose(1, 2))
    ref, _ = dense_attention(q, k, v, create_mask(mask, B, 1, L, L, device="cpu"), score_fn=mod)
    assert rel_err(out.view(B, L, H, D).transpose(1, 2), ref) < 1e-6
