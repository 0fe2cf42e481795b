"""flex_attention and the reference backend against the independent float64 oracle, on CPU."""

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import and_masks, create_block_mask, create_mask, flex_attention, get_mask_fn, or_masks
from test_masks import LIBRARY

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def qkv(B, H, Hkv, L, S, D, dtype, rng, Dv=None):
    return (torch.randn(B, H, L, D, generator=rng, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=rng, dtype=dtype),
            torch.randn(B, Hkv, S, Dv or D, generator=rng, dtype=dtype))


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_err(out, ref_out) < TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse.double()[seen], ref_lse[seen], rtol=1e-5, atol=1e-5)
    assert (out[~seen] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,params", LIBRARY)
def test_every_library_mask_with_gqa_and_odd_lengths(rng, dtype, name, params):
    B, H, Hkv, L, S, D = 2, 4, 2, 173, 211, 16
    q, k, v = qkv(B, H, Hkv, L, S, D, dtype, rng)
    bm = create_block_mask(get_mask_fn(name, **params), None, None, L, S, device="cpu", BLOCK_SIZE=(32, 48))
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    assert_matches(out, lse, *dense_attention(q, k, v, dense_predicate(name, L, S, **params)), dtype)


def test_document_mask_with_random_documents(rng):
    lengths = torch.randint(1, 60, (8,), generator=rng)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    S = int(offsets[-1])
    mod = get_mask_fn("document", offsets=offsets)
    q, k, v = qkv(1, 2, 2, S, S, 8, torch.float64, rng)
    out, lse = flex_attention(q, k, v, block_mask=create_block_mask(mod, 1, 1, S, S, "cpu", 16), return_lse=True)
    dense = dense_predicate("document", S, S, document_ids=mod.document_ids.numpy())
    assert_matches(out, lse, *dense_attention(q, k, v, dense), torch.float64)


def test_combinators_per_batch_and_per_head_masks_with_captured_tensors(rng):
    B, H, L, S, D = 3, 4, 150, 130, 8
    keep = torch.rand(B, H, L, S, generator=rng) < 0.6
    keep[:, :, 5] = False                         # rows that see nothing: out 0, lse -inf
    window = torch.randint(10, 100, (H,), generator=rng)

    def captured(b, h, q, kv):
        return keep[b, h, q, kv]

    def per_head_window(b, h, q, kv):
        return (q - kv).abs() < window[h]

    mod = or_masks(and_masks(captured, per_head_window), and_masks(get_mask_fn("causal"), captured))
    q, k, v = qkv(B, H, H, L, S, D, torch.float64, rng)
    bm = create_block_mask(mod, B, H, L, S, device="cpu", BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True)
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    dense = (keep & ((qi - ki).abs() < window.view(1, -1, 1, 1))) | ((qi >= ki) & keep)
    assert_matches(out, lse, *dense_attention(q, k, v, dense), torch.float64)


def test_score_mods_with_captured_tensors_and_scale(rng):
    B, H, Hkv, L, S, D = 2, 4, 1, 90, 120, 16
    head_bias = torch.randn(H, generator=rng, dtype=torch.float64)
    table = torch.randn(64, generator=rng, dtype=torch.float64)

    def score_mod(score, b, h, q, kv):
        rel = torch.clamp(q - kv, -32, 31) + 32
        return 5.0 * torch.tanh((score + head_bias[h] + table[rel]) / 5.0)

    q, k, v = qkv(B, H, Hkv, L, S, D, torch.float64, rng)
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, S, device="cpu", BLOCK_SIZE=32)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=0.3, enable_gqa=True,
                              return_lse=True)
    ref = dense_attention(q, k, v, dense_predicate("causal", L, S), scale=0.3, score_fn=score_mod)
    assert_matches(out, lse, *ref, torch.float64)


def test_no_block_mask_is_full_attention_and_value_dim_may_differ(rng):
    q, k, v = qkv(1, 2, 2, 70, 50, 16, torch.float32, rng, Dv=24)
    out = flex_attention(q, k, v)
    assert out.shape == (1, 2, 70, 24)
    assert rel_err(out, dense_attention(q, k, v)[0]) < TOL[torch.float32]


@pytest.mark.parametrize("name,params", [("causal", {}), ("sliding_window", {"window_size": 40}),
                                         ("attamba", {"window_size": 32, "chunk_size": 16})])
def test_matches_torch_flex_attention_on_cpu(rng, name, params):
    B, H, L, D = 1, 2, 256, 16
    mod = get_mask_fn(name, **params)
    q, k, v = qkv(B, H, H, L, L, D, torch.float32, rng)

    def softcap(score, b, h, qi, ki):
        return 20 * torch.tanh(score / 20)

    torch_bm = torch_flex.create_block_mask(mod, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    expected = torch_flex.flex_attention(q, k, v, score_mod=softcap, block_mask=torch_bm)
    ours = flex_attention(q, k, v, score_mod=softcap,
                          block_mask=create_block_mask(mod, None, None, L, L, device="cpu", BLOCK_SIZE=64))
    from_torch_mask = flex_attention(q, k, v, score_mod=softcap, block_mask=torch_bm)  # torch BlockMask accepted
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(from_torch_mask, expected) < 1e-5


def test_create_mask_agrees_with_torch(rng):
    mod = get_mask_fn("streaming", sink_size=3, window_size=20)
    assert torch.equal(create_mask(mod, 1, 1, 77, 90, device="cpu"),
                       torch_flex.create_mask(mod, 1, 1, 77, 90, device="cpu"))
