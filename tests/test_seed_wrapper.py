"""The seed's FlexFlashInfer wrapper on CPU: its names, its layout, its plan-once life cycle."""
import pytest
import torch

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import FlexFlashInfer, get_mask_fn


def seq_inputs(L, S, H, Hkv, D, rng, dtype=torch.float32):
    return (torch.randn(L, H, D, generator=rng, dtype=dtype), torch.randn(S, Hkv, D, generator=rng, dtype=dtype),
            torch.randn(S, Hkv, D, generator=rng, dtype=dtype))


def oracle(q, k, v, dense, **kw):
    out, lse = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dense, **kw)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def prepare(flex, mask_fn, L=300, S=300, H=4, Hkv=2, D=16, **kw):
    return flex.prepare(mask_fn=mask_fn, seq_len_q=L, seq_len_kv=S, num_qo_heads=H, num_kv_heads=Hkv,
                        head_dim=D, block_size_row=64, block_size_col=64, dtype=torch.float32, **kw)


@pytest.mark.parametrize("mask_fn,dense", [
    (lambda q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= 256), dense_predicate("sliding_window", 300, 300, window_size=257)),
    (get_mask_fn("causal"), dense_predicate("causal", 300, 300)),
    (get_mask_fn("sliding_window", window_size=50), dense_predicate("sliding_window", 300, 300, window_size=50)),
    (get_mask_fn("attamba", window_size=40, chunk_size=32), dense_predicate("attamba", 300, 300, window_size=40, chunk_size=32)),
    (lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % (h + 2) == 0, None),
])
def test_seed_masks_two_and_four_argument_forms(rng, mask_fn, dense):
    flex = prepare(FlexFlashInfer(device="cpu"), mask_fn)
    q, k, v = seq_inputs(300, 300, 4, 2, 16, rng)
    out, lse = flex(q, k, v, return_lse=True)
    if dense is None:  # per-head mask
        qi, ki = torch.arange(300).view(-1, 1), torch.arange(300).view(1, -1)
        dense = torch.stack([(qi - ki) % (h + 2) == 0 for h in range(4)])[None]
    ref_out, ref_lse = oracle(q, k, v, dense)
    assert rel_err(out, ref_out) < 2e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)
    assert out.shape == (300, 4, 16) and lse.shape == (300, 4)


def test_score_mod_and_scale(rng):
    bias = torch.randn(4, generator=rng)

    def score_mod(score, b, h, q, kv):
        return score + bias[h]

    flex = prepare(FlexFlashInfer(device="cpu"), get_mask_fn("causal"), L=100, S=140, score_mod=score_mod, scale=0.5)
    q, k, v = seq_inputs(100, 140, 4, 2, 16, rng)
    ref, _ = oracle(q, k, v, dense_predicate("causal", 100, 140), scale=0.5,
                    score_fn=lambda s, b, h, qi, ki: s + bias.double()[h])
    assert rel_err(flex(q, k, v), ref) < 2e-5


def test_call_before_prepare_is_a_clear_error():
    with pytest.raises(RuntimeError, match="prepare"):
        FlexFlashInfer(device="cpu")(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.zeros(4, 1, 8))


def test_second_prepare_replaces_and_failed_prepare_or_call_keeps_the_first(rng):
    flex = prepare(FlexFlashInfer(device="cpu"), get_mask_fn("causal"))
    q, k, v = seq_inputs(300, 300, 4, 2, 16, rng)
    causal_out = flex(q, k, v)
    with pytest.raises(ValueError, match="num_qo_heads"):
        prepare(flex, get_mask_fn("full"), H=3)                       # 3 heads is not a multiple of 2
    assert torch.equal(flex(q, k, v), causal_out)                      # still the causal plan
    with pytest.raises(ValueError, match="q must have shape"):
        flex(q[:10], k, v)
    with pytest.raises(TypeError, match="dtype"):
        flex(q.double(), k.double(), v.double())
    assert torch.equal(flex(q, k, v), causal_out)                      # a bad call changes nothing
    prepare(flex, get_mask_fn("full"))
    assert rel_err(flex(q, k, v), oracle(q, k, v, None)[0]) < 2e-5     # the new plan replaced it
