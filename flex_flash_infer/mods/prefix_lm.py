"""Prefix-LM: the first prefix_len keys are visible to every query, the rest causally.

Predicate: visible(q, kv) = kv < prefix_len or q >= kv
"""
from ._params import non_negative_int
from ..core.hints import state_hint


def generate_prefix_lm_mask_mod(prefix_len: int):
    prefix_len = non_negative_int("prefix_len", prefix_len)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)

    def bands(q_len, kv_len):
        """Lowering hint (bands.hinted_bands), for the packed tokens (q_len == kv_len): the
        prefix rows see the prefix, the rows after it are one causal band."""
        if q_len != kv_len:
            return None
        p = min(prefix_len, q_len)
        return [band for band in ((0, p, 0, p, False, -1), (p, q_len, 0, q_len, True, -1)) if band[0] < band[1]]

    state_hint(prefix_lm, "band_hint", bands)

    prefix_lm.__name__ = f"prefix_lm_{prefix_len}"
    return prefix_lm
