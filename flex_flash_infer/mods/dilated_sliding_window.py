"""Dilated sliding window (bidirectional, as in attention-gym and Longformer's dilated heads).

Predicate: visible(q, kv) = |q - kv| <= window_size and |q - kv| % dilation == 0
"""
from ._params import positive_int


def generate_dilated_sliding_window_mask_mod(window_size: int, dilation: int):
    window_size = positive_int("window_size", window_size)
    dilation = positive_int("dilation", dilation)

    def dilated_sliding_window(b, h, q_idx, kv_idx):
        distance = (q_idx - kv_idx).abs()
        return (distance <= window_size) & (distance % dilation == 0)

    dilated_sliding_window.__name__ = f"dilated_sliding_window_w{window_size}_d{dilation}"
    return dilated_sliding_window
