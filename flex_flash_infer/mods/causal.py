"""Causal attention, top-left aligned as in torch FlexAttention.

Predicate: visible(q, kv) = q >= kv
"""


def generate_causal_mask_mod():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal
