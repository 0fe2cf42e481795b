"""Full (bidirectional) attention.

Predicate: visible(q, kv) = True
"""
from ..core.hints import state_hint



def generate_full_mask_mod():
    def full(b, h, q_idx, kv_idx):
        return (q_idx >= 0) | (kv_idx >= 0)

    state_hint(full, "band_hint", lambda q_len, kv_len: [(0, q_len, 0, kv_len, False, -1)])   # bands.hinted_bands
    return full
