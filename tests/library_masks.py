"""The library's masks with example parameters, one list for every test that sweeps them."""
LIBRARY = [
    ("full", {}),
    ("causal", {}),
    ("sliding_window", {"window_size": 37}),
    ("attamba", {"window_size": 40, "chunk_size": 16}),
    ("streaming", {"sink_size": 4, "window_size": 33}),
    ("prefix_lm", {"prefix_len": 50}),
    ("chunked_causal", {"chunk_size": 48}),
    ("dilated_sliding_window", {"window_size": 30, "dilation": 3}),
]
