"""Per-head temperature: each head's scores multiplied by its own factor.

score_mod: score -> score * per_head_scale[h]     (per_head_scale read as float32)
"""
import torch

from ._captured import follow_device


def generate_temperature_score_mod(per_head_scale):
    # a tensor is kept as it is (a learned one, of any float dtype, is read as it is at each call)
    scale = per_head_scale if isinstance(per_head_scale, torch.Tensor) else torch.tensor(per_head_scale,
                                                                                          dtype=torch.float32)
    if scale.dim() != 1:
        raise ValueError(f"per_head_scale must be 1-D [num_heads], got shape {tuple(scale.shape)}")

    scale_on = follow_device(scale)

    def temperature(score, b, h, q_idx, kv_idx):
        return score * scale_on(h.device)[h].float()

    temperature.per_head_scale = scale
    return temperature
