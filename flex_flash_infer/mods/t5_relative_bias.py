"""T5's bucketed relative-position bias (Raffel et al., 2020): short distances get a bucket each,
longer ones logarithmically wider buckets up to max_distance, and every distance beyond it the
last bucket of its side.

score_mod: score -> score + table[h, bucket(kv - q)]     (table [num_heads, num_buckets] or [num_buckets];
                                                          a T5 layer's relative_attention_bias.weight.T)
bucket(r) with n = num_buckets, halved when bidirectional (a key after the query then adds n):
    d = |r| if bidirectional else max(-r, 0);   e = n // 2
    bucket = d                                                                 if d < e
           = min(e + int(log(d / e) / log(max_distance / e) * (n - e)), n - 1)  otherwise   (float32)

It runs as a relative-position table over q - kv clamped to +-max_distance
(relative_position_bias.py), built once when the mod is made, with torch's own float32 arithmetic
(a bucket edge moves if log is rounded otherwise): one table read per score in the kernel, the
same compiled module as any per-head table, and beyond max_distance the split of far_bias.py.
"""
import math

import torch

from .relative_position_bias import generate_relative_position_bias_score_mod


def t5_buckets(relative_position: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool):
    """T5's bucket of each kv - q (an integer tensor), as the docstring above states."""
    n = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional:
        side = (relative_position > 0).long() * n
        distance = relative_position.abs()
    else:
        side = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    exact = n // 2
    # clamp(min=1): the log branch is only taken from `exact` on; it keeps log(0) out of the rest
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (n - exact)
    far = (exact + scaled.long()).clamp(max=n - 1)
    return side + torch.where(distance < exact, distance, far)


def generate_t5_relative_bias_score_mod(table, max_distance: int = 128, bidirectional: bool = True):
    table = torch.as_tensor(table)
    if table.dim() not in (1, 2) or not table.is_floating_point():
        raise ValueError("table must be a float tensor [num_heads, num_buckets] or [num_buckets] (a T5 layer's "
                         f"relative_attention_bias.weight.T), got {tuple(table.shape)} {table.dtype}")
    num_buckets = table.shape[-1]
    n = num_buckets // 2 if bidirectional else num_buckets
    if n < 2 or (bidirectional and num_buckets % 2):
        raise ValueError(f"table must hold at least {4 if bidirectional else 2} buckets"
                         f"{', an even number' if bidirectional else ''}, got {num_buckets}")
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance <= n // 2:
        raise ValueError(f"max_distance must be an int above {n // 2} (the exact buckets), got {max_distance!r}")
    q_minus_kv = torch.arange(-max_distance, max_distance + 1)
    buckets = t5_buckets(-q_minus_kv, num_buckets, max_distance, bidirectional)
    mod = generate_relative_position_bias_score_mod(table[..., buckets])
    mod.__name__ = "t5_relative_bias"
    mod.buckets = buckets   # the bucket of each q - kv in -max_distance..max_distance
    return mod
