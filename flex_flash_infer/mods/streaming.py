"""StreamingLLM: attention sinks (the first sink_size keys) plus a causal sliding window.

Predicate: visible(q, kv) = q >= kv and (kv < sink_size or q - kv < window_size)
"""
from ._params import non_negative_int, positive_int
from ..core.hints import state_hint


def generate_streaming_mask_mod(sink_size: int, window_size: int):
    sink_size = non_negative_int("sink_size", sink_size)
    window_size = positive_int("window_size", window_size)

    def streaming(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((kv_idx < sink_size) | (q_idx - kv_idx < window_size))

    streaming.__name__ = f"streaming_s{sink_size}_w{window_size}"
    # lowering hint (columns.py): a causal window band plus the sink keys 0 .. sink_size-1
    state_hint(streaming, "key_columns_hint", (window_size, 0, 1, sink_size))
    return streaming
