"""Causal sliding window: each query sees itself and the window_size - 1 keys before it.

Predicate: visible(q, kv) = q >= kv and q - kv < window_size
"""
from ._params import positive_int
from ..core.hints import state_hint


def generate_sliding_window_mask_mod(window_size: int):
    window_size = positive_int("window_size", window_size)

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window_size)

    def bands(q_len, kv_len):
        """Lowering hint (bands.hinted_bands): one causal band with a left window, when no row
        runs past the last key (those rows' windows are clipped: found from the mask instead)."""
        return [(0, q_len, 0, q_len, True, window_size - 1)] if q_len <= kv_len else None

    state_hint(sliding_window, "band_hint", bands)

    sliding_window.__name__ = f"sliding_window_{window_size}"
    return sliding_window
