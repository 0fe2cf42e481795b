"""Logit soft-capping (Gemma 2, Grok).

score_mod: score -> cap * tanh(score / cap)
"""
import numbers
from ..core.hints import state_hint


def generate_softcap_score_mod(cap: float):
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or cap <= 0:
        raise ValueError(f"cap must be a positive number, got {cap!r}")
    cap = float(cap)

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * (score / cap).tanh()

    softcap.__name__ = f"softcap_{cap:g}"
    state_hint(softcap, "logits_soft_cap", cap)   # FlashInfer's own soft cap computes the same (native_soft_cap.py)
    return softcap
