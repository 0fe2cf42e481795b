"""Prefix-LM: the first prefix_len keys are visible to every query, the rest causally.

Predicate: visible(q, kv) = kv < prefix_len or q >= kv
"""
from ._params import non_negative_int


def generate_prefix_lm_mask_mod(prefix_len: int):
    prefix_len = non_negative_int("prefix_len", prefix_len)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)

    prefix_lm.__name__ = f"prefix_lm_{prefix_len}"
    return prefix_lm
