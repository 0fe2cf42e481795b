"""Attamba chunk mask (the seed's definition): a causal window plus every earlier chunk end.

Predicate: visible(q, kv) = q >= kv and ((kv + 1) % chunk_size == 0 or q - kv < window_size)
"""
from ._params import positive_int
from ..core.hints import state_hint


def generate_attamba_mask_mod(window_size: int, chunk_size: int):
    window_size = positive_int("window_size", window_size)
    chunk_size = positive_int("chunk_size", chunk_size)

    def attamba(b, h, q_idx, kv_idx):
        chunk_end = (kv_idx + 1) % chunk_size == 0
        return (q_idx >= kv_idx) & (chunk_end | (q_idx - kv_idx < window_size))

    attamba.__name__ = f"attamba_w{window_size}_c{chunk_size}"
    # lowering hint (columns.py): a causal window band plus key columns chunk-1, 2*chunk-1, ...
    state_hint(attamba, "key_columns_hint", (window_size, chunk_size - 1, chunk_size, None))
    return attamba
