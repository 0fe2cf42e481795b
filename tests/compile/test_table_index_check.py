"""A compiled mod that may index a captured tensor past its end is refused before any kernel is
built: torch raises IndexError there, and the kernels check no upper bound (they would read
whatever follows the table). Indices the bounds prove in range compile as before."""
import pytest
import torch

from flex_flash_infer import PagedFlexAttention, create_block_mask, flex_attention
from flex_flash_infer.core.trace import TraceError
from flex_flash_infer.mods import generate_alibi_score_mod, generate_relative_position_bias_score_mod
from paged_cases import random_cache

L = 200


def _inputs(rng, H=2):
    return [torch.randn(1, H, L, 16, generator=rng) for _ in range(3)]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_a_score_mod_reading_past_its_table_is_refused_on_flashinfer(flashinfer_on_cpu, rng):
    bias = torch.randn(L, generator=rng)

    def off_by_a_window(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx - kv_idx + 100]      # reaches 299 in a table of 200

    q, k, v = _inputs(rng)
    bm = create_block_mask(_causal, None, None, L, L, device="cpu")
    with pytest.raises(TraceError, match=r"shape \(200,\).*\[-99, 299\].*IndexError"):
        flex_attention(q, k, v, score_mod=off_by_a_window, block_mask=bm, backend="flashinfer")
    with pytest.raises(IndexError):                     # the reference, as torch: IndexError
        flex_attention(q, k, v, score_mod=off_by_a_window, block_mask=bm, backend="reference")


def test_a_per_head_table_shorter_than_the_heads_is_refused(flashinfer_on_cpu, rng):
    q, k, v = _inputs(rng, H=4)
    bm = create_block_mask(_causal, None, None, L, L, device="cpu")
    with pytest.raises(TraceError, match=r"shape \(2,\)"):
        flex_attention(q, k, v, score_mod=generate_alibi_score_mod(slopes=torch.tensor([0.5, 0.25])), block_mask=bm,
                       backend="flashinfer")


def test_indices_proved_in_range_compile(flashinfer_on_cpu, rng):
    """Clamped distances, per-head values, a wrapped index: no refusal, and the reference's answer."""
    table = torch.randn(4, 2 * 64 + 1, generator=rng)
    per_position = torch.randn(L, generator=rng)

    def wrapped(score, b, h, q_idx, kv_idx):
        return score + per_position[(q_idx - kv_idx) % L] + per_position[kv_idx - L]

    q, k, v = _inputs(rng, H=4)
    bm = create_block_mask(_causal, None, None, L, L, device="cpu")
    for mod in (generate_relative_position_bias_score_mod(table), generate_alibi_score_mod(num_heads=4), wrapped):
        out = flex_attention(q, k, v, score_mod=mod, block_mask=bm, backend="flashinfer")
        ref = flex_attention(q, k, v, score_mod=mod, block_mask=bm, backend="reference")
        assert (out - ref).abs().max() < 1e-4


def test_a_paged_score_table_shorter_than_the_heads_is_refused(flashinfer_on_cpu, rng):
    per_head = torch.tensor([0.5, -0.5])                # two values for four query heads

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + per_head[h]

    q, k_cache, v_cache, qi, ki, idx, last = random_cache(rng, [300, 250], [1, 1], 16)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    with pytest.raises(TraceError, match=r"score_mod indexes a captured tensor of shape \(2,\)"):
        paged.plan(_causal, qi, ki, idx, last, 4, 2, 16, 16, dtype=torch.float64, score_mod=head_bias)
