"""Chunked causal (Llama-4 style local attention): causal within fixed chunks of chunk_size.

Predicate: visible(q, kv) = q >= kv and q // chunk_size == kv // chunk_size
"""
from ._params import positive_int


def generate_chunked_causal_mask_mod(chunk_size: int):
    chunk_size = positive_int("chunk_size", chunk_size)

    def chunked_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx // chunk_size == kv_idx // chunk_size)

    chunked_causal.__name__ = f"chunked_causal_{chunk_size}"
    return chunked_causal
