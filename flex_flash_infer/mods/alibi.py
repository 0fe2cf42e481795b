"""ALiBi (Press et al.): a per-head linear penalty on distance.

score_mod: score -> score + slope[h] * (kv - q)     (slope read as float32)
slopes default to the paper's geometric sequence for num_heads heads.
"""
import math

import torch

from ._captured import follow_device


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes: 2^(-8 i / n) for a power of two n, interleaved otherwise."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    def power_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def generate_alibi_score_mod(slopes=None, num_heads=None):
    if (slopes is None) == (num_heads is None):
        raise ValueError("alibi needs exactly one of slopes= (a tensor [num_heads]) or num_heads=")
    # a tensor is kept as it is (a learned one, of any float dtype, is read as it is at each call)
    if slopes is None:
        slopes = alibi_slopes(num_heads)
    elif not isinstance(slopes, torch.Tensor):
        slopes = torch.tensor(slopes, dtype=torch.float32)
    if slopes.dim() != 1:
        raise ValueError(f"slopes must be 1-D [num_heads], got shape {tuple(slopes.shape)}")

    slopes_on = follow_device(slopes)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes_on(h.device)[h].float() * (kv_idx - q_idx)

    alibi.slopes = slopes
    return alibi
