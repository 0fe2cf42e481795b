"""A score_mod that is FlashInfer's own logits soft cap, cap * tanh(score / cap), runs FlashInfer's
soft-capped kernels on the band routes instead of a compiled variant.

Both kernels spend the same two exp2-unit instructions per score (tanh.approx and the softmax's
exp2), but the soft cap built into FlashInfer folds the scale and the cap into the softmax's own
multiply, and a causal band keeps the ragged kernel's lead over the single call: faster than the
compiled variant and than FlashInfer's single soft-capped call (docs/benchmarks.md).

The library's generate_softcap_score_mod says so with a `logits_soft_cap` attribute (the cap); a
user's own score_mod with the same formula and no attribute runs the compiled variant. The
attribute is checked against the score_mod on random scores when planned.
"""
from __future__ import annotations

import numbers

import torch

from ..core.mask_eval import INDEX_DTYPE
from ..core.hints import stated_hint


def soft_cap_holds(score_mod, cap: float, num_heads: int, samples: int = 256) -> bool:
    """score_mod(score, b, h, q, kv) == cap * tanh(score / cap) on random inputs, on the CPU;
    scores span well past the cap, where tanh saturates."""
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(samples, generator=gen) * 4 * cap
    b = torch.zeros(samples, dtype=INDEX_DTYPE)
    h = torch.randint(0, num_heads, (samples,), generator=gen, dtype=INDEX_DTYPE)
    q = torch.randint(0, 1 << 16, (samples,), generator=gen, dtype=INDEX_DTYPE)
    kv = torch.randint(0, 1 << 16, (samples,), generator=gen, dtype=INDEX_DTYPE)
    expected = cap * torch.tanh(score / cap)
    try:
        got = score_mod(score, b, h, q, kv)
    except Exception:
        return False
    return (isinstance(got, torch.Tensor) and got.shape == expected.shape
            and torch.allclose(got.float(), expected, rtol=1e-5, atol=1e-5 * cap))


def native_soft_cap(score_mod, num_heads: int) -> float | None:
    """The cap when the score_mod carries a logits_soft_cap attribute that holds, else None (the
    compiled variant runs it)."""
    cap = stated_hint(score_mod, "logits_soft_cap")
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not cap > 0:
        return None
    return float(cap) if soft_cap_holds(score_mod, float(cap), num_heads) else None
