"""Learned relative position bias (T5-style, clamped distance), from a captured table.

score_mod: score -> score + table[clamp(q - kv, -M, M) + M]          (table of 2M + 1 entries)
       or  score -> score + table[h, clamp(q - kv, -M, M) + M]       (table [num_heads, 2M + 1])
"""
import torch

from ._captured import follow_device
from .hints import ConstantBeyond
from ..core.hints import state_hint


def generate_relative_position_bias_score_mod(table):
    table = torch.as_tensor(table)
    if table.dim() not in (1, 2) or table.shape[-1] % 2 == 0 or not table.is_floating_point():
        raise ValueError("table must be a float tensor [2M + 1] or [num_heads, 2M + 1] (an odd number of "
                         f"distances, centred on 0), got {tuple(table.shape)} {table.dtype}")
    reach = table.shape[-1] // 2
    table_on = follow_device(table)

    # clamp(q - kv, -M, M) + M, written so that the compiled kernel sees an index that is never
    # negative (a max with 0 last) and reads the table without counting a negative one from its end
    if table.dim() == 1:
        def relative_position_bias(score, b, h, q_idx, kv_idx):
            return score + table_on(q_idx.device)[torch.clamp(q_idx - kv_idx + reach, max=2 * reach).clamp(min=0)]
    else:
        def relative_position_bias(score, b, h, q_idx, kv_idx):
            return score + table_on(q_idx.device)[h, torch.clamp(q_idx - kv_idx + reach, max=2 * reach).clamp(min=0)]

    relative_position_bias.table = table
    # beyond the reach the bias is the table's last entry: the planner runs those keys on
    # FlashInfer's plain kernel (far_bias.py)
    if reach >= 1:   # a one-entry table is one constant everywhere: no split to make
        state_hint(relative_position_bias, "constant_beyond",
                   ConstantBeyond(reach, lambda device: table_on(device)[..., 2 * reach]))
    return relative_position_bias
