"""A score_mod that is c * score folds into FlashInfer's sm_scale (planning/score_folding.py):
exactly the expressions that are, nothing else, and the folded plan gives the score_mod's result."""
import pytest
import torch

from dense_reference import rel_err
from flex_flash_infer import create_block_mask, get_mask_fn
from flex_flash_infer.backends.reference import reference_attention
from flex_flash_infer.planning.score_folding import fold_score_mod, score_scale_factor

temperature = 0.7
half = 0.5
table = torch.tensor([1.0, 2.0])
zero_d = torch.tensor(2.0)

FOLDED = [
    (lambda s, b, h, q, kv: s, 1.0),
    (lambda s, b, h, q, kv: s * 2, 2.0),
    (lambda s, b, h, q, kv: 3.0 * s, 3.0),
    (lambda s, b, h, q, kv: s / temperature, 1 / temperature),
    (lambda s, b, h, q, kv: -s, -1.0),
    (lambda s, b, h, q, kv: (s * 2) / 4 * half, 0.25),
    (lambda s, b, h, q, kv: -(s / -8), 0.125),
    (lambda s, b, h, q, kv: s.to(torch.float32) * 1.5, 1.5),
    (lambda s, b, h, q, kv: torch.mul(s, 0.25), 0.25),
]
NOT_FOLDED = [
    lambda s, b, h, q, kv: s + 1,                       # a shift changes the LSE
    lambda s, b, h, q, kv: s * q,                       # depends on the position
    lambda s, b, h, q, kv: s * s,
    lambda s, b, h, q, kv: torch.tanh(s),
    lambda s, b, h, q, kv: s * table[h],                # a table
    lambda s, b, h, q, kv: s * zero_d,                  # a 0-d tensor
    lambda s, b, h, q, kv: s * 0,                       # scale 0: FlashInfer refuses it
    lambda s, b, h, q, kv: s * float("inf"),
    lambda s, b, h, q, kv: s / 2 + s,
    lambda s, b, h, q, kv: 2 / s,
    lambda s, b, h, q, kv: s.to(torch.float64) * 2,     # computed in float64, as torch would
    lambda s, b, h, q, kv: s * True,
]


@pytest.mark.parametrize("mod,factor", FOLDED)
def test_a_multiple_of_the_score_folds_into_the_scale(mod, factor):
    assert score_scale_factor(mod) == pytest.approx(factor, rel=1e-12)
    assert fold_score_mod(mod, 0.125) == (None, pytest.approx(0.125 * factor, rel=1e-12))


@pytest.mark.parametrize("mod", NOT_FOLDED)
def test_anything_else_is_not_folded(mod):
    assert score_scale_factor(mod) is None
    assert fold_score_mod(mod, 0.125) == (mod, 0.125)


def test_a_captured_factor_is_read_when_planned():
    def make(t):
        return lambda s, b, h, q, kv: s / t
    assert score_scale_factor(make(2.0)) == 0.5 and score_scale_factor(make(4.0)) == 0.25
    # a product that leaves the float range is not folded
    tiny = make(1e-300)
    assert fold_score_mod(tiny, 1e10) == (tiny, 1e10)


@pytest.mark.parametrize("factor", [1.0, 1 / 0.7, -2.0])
@pytest.mark.parametrize("mask", ["causal", "sliding_window", "random"])
def test_the_folded_plan_gives_the_score_mods_result(flashinfer_on_cpu, rng, factor, mask):
    """Through the CPU model of FlashInfer: the plan runs the plain kernels (no variant) and its
    output and LSE are the reference's with the score_mod (a negative factor takes the negated
    query of a negative scale)."""
    from flex_flash_infer.backends import flashinfer_backend
    from random_masks import random_mask_mod

    B, Hq, Hkv, L, D = 2, 4, 2, 300, 16
    if mask == "random":
        mod, _ = random_mask_mod(B, Hq, L, L, rng)
    else:
        mod = get_mask_fn(mask, **({"window_size": 64} if mask == "sliding_window" else {}))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * factor

    bm = create_block_mask(mod, *((B, Hq) if mask == "random" else (None, None)), L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    assert not plan.plan.score_mod and plan.negate_query == (factor < 0)
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    ref_out, ref_lse = reference_attention(q, k, v, bm, score_mod=score_mod)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-6
    assert torch.allclose(lse.view(B, L, Hq).transpose(1, 2).double(), ref_lse.double(), atol=1e-5)


def test_flex_attention_with_a_temperature_keeps_its_gradients(flashinfer_on_cpu, rng):
    """Folding happens below the door: the backward still differentiates the user's score_mod."""
    from flex_flash_infer.api import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score / temperature

    bm = create_block_mask(get_mask_fn("causal"), None, None, 128, 128, device="cpu")
    q, k, v = (torch.randn(1, 2, 128, 16, generator=rng, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="flashinfer")
    ref = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="reference")
    assert rel_err(out, ref) < 1e-6
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all(rel_err(g, r) < 1e-6 for g, r in zip(grads, ref_grads))


def test_a_scale_float32_cannot_hold_is_neither_folded_nor_passed():
    """FlashInfer's kernels hold sm_scale as a float32, where 1e-300 is 0 (NaN rows on the GPU):
    such a product is not folded, and such a scale is refused by the FlashInfer backend by name."""
    from flex_flash_infer.backends.flashinfer_backend import scale_reason
    from flex_flash_infer.planning.score_folding import fold_score_mod

    def tiny(score, b, h, q_idx, kv_idx):
        return score * 1e-300

    assert fold_score_mod(tiny, 0.125)[0] is tiny
    for scale in (1e-300, 1e-40, 1e39):
        assert "float32" in scale_reason(scale)
    assert scale_reason(1e-30) is None and scale_reason(-0.5) is None
