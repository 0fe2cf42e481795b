"""Linear decay with distance (a RetNet / ALiBi-like recency bias with one rate).

score_mod: score -> score - gamma * (q - kv)
"""
import numbers


def generate_causal_decay_score_mod(gamma: float):
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a number, got {gamma!r}")
    gamma = float(gamma)

    def causal_decay(score, b, h, q_idx, kv_idx):
        return score - gamma * (q_idx - kv_idx)

    causal_decay.__name__ = f"causal_decay_{gamma:g}"
    return causal_decay
