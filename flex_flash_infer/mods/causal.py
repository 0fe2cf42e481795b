"""Causal attention, top-left aligned as in torch FlexAttention.

Predicate: visible(q, kv) = q >= kv
"""
from ..core.hints import state_hint



def generate_causal_mask_mod():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def bands(q_len, kv_len):
        """Lowering hint (bands.hinted_bands): rows up to the last key are one causal band, the
        rows past it see every key."""
        m = min(q_len, kv_len)
        return [(0, m, 0, m, True, -1)] + ([(kv_len, q_len, 0, kv_len, False, -1)] if q_len > kv_len else [])

    state_hint(causal, "band_hint", bands)
    return causal
