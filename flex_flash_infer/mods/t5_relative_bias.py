"""T5's bucketed relative-position bias (Raffel et al., 2020): short distances get a bucket each,
longer ones logarithmically wider buckets up to max_distance, and every distance beyond it the
last bucket of its side.

score_mod: score -> score + table[h, bucket(kv - q)]     (table [num_heads, num_buckets] or [num_buckets];
                                                          a T5 layer's relative_attention_bias.weight.T)
bucket(r) with n = num_buckets, halved when bidirectional (a key after the query then adds n):
    d = |r| if bidirectional else max(-r, 0);   e = n // 2
    bucket = d                                                                 if d < e
           = min(e + int(log(d / e) / log(max_distance / e) * (n - e)), n - 1)  otherwise   (float32)

It reads the table through a bucket index over q - kv clamped to +-max_distance, the buckets
computed once when the mod is made with torch's own float32 arithmetic (a bucket edge moves if
log is rounded otherwise): two reads per score in the kernel, the table read as it is at each
call (a learned one after an optimizer step), and beyond max_distance the split of far_bias.py.
"""
import math

import torch

from ._captured import follow_device
from .hints import ConstantBeyond
from ..core.hints import state_hint


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
    # the table is read through the buckets at each call (two reads per score), never gathered
    # into a copy when the mod is made: a learned table is read as it is after an optimizer step
    table_on, buckets_on = follow_device(table), follow_device(buckets.int())
    reach = max_distance

    def bucket(q_idx, kv_idx):
        # clamp(q - kv, -M, M) + M, never negative (see relative_position_bias); the bucket read
        # clamped at 0 too, a bound the kernel's code can see (a table's values it cannot), so
        # the table read needs no check for a negative index
        return buckets_on(q_idx.device)[torch.clamp(q_idx - kv_idx + reach, max=2 * reach).clamp(min=0)].clamp(min=0)

    if table.dim() == 1:
        def t5_relative_bias(score, b, h, q_idx, kv_idx):
            return score + table_on(q_idx.device)[bucket(q_idx, kv_idx)]
    else:
        def t5_relative_bias(score, b, h, q_idx, kv_idx):
            return score + table_on(q_idx.device)[h, bucket(q_idx, kv_idx)]

    t5_relative_bias.table = table
    t5_relative_bias.buckets = buckets   # the bucket of each q - kv in -max_distance..max_distance
    # beyond max_distance (keys before the query) every distance has the last bucket of its side:
    # the planner runs those keys on FlashInfer's plain kernel (far_bias.py)
    if not torch.compiler.is_compiling():   # made inside a compiled function: no hint (hints.state_hint)
        far_bucket = int(buckets[2 * reach])
        state_hint(t5_relative_bias, "constant_beyond",
                   ConstantBeyond(reach, lambda device: table_on(device)[..., far_bucket]))
    return t5_relative_bias
