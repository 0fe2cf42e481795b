"""Facts a score_mod may declare about itself, which the planner checks on samples and uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ConstantBeyond:
    """score_mod(score, b, h, q, kv) == score + values(device)[h] wherever q - kv >= reach.
    values returns a float tensor [heads] or [1] on that device, read when planned, as the compiled
    variant reads its captured tensors."""
    reach: int
    values: Callable[[torch.device], torch.Tensor]

    def __post_init__(self):
        if isinstance(self.reach, bool) or not isinstance(self.reach, int) or self.reach < 1:
            raise ValueError(f"ConstantBeyond: reach must be a positive int, got {self.reach!r}")
        if not callable(self.values):
            raise ValueError("ConstantBeyond: values must be a function of a device returning the per-head "
                             f"constants, got {type(self.values).__name__}")
