"""FlashInfer's merge_state takes the larger of two log-sum-exps with fmaxf and clamps their
differences with it too, so a NaN LSE (a NaN query row, or a NaN key the row sees) gets weight 0:
the merged output stays NaN (0 * NaN) but the merged LSE becomes the other part's number. Every
merge of the library's routes goes through these, which put the NaN back (an [rows, heads]
elementwise pass).

FlashInfer's fa2 kernels merge the same way inside a launch when they split a request's keys
across thread blocks (split-KV): a row that sees a NaN key came back with a NaN output but a
finite LSE (the GPU fuzzer, tiles route, H200). Every prefill plan of the library passes
disable_split_kv=True (fa3 has no split; fa2 then runs one block per query tile and head)."""
from __future__ import annotations

import torch


def merge_state(merge, out_a, lse_a, out_b, lse_b):
    """merge(out_a, lse_a, out_b, lse_b) -> (out, lse), with lse NaN where either part's is."""
    lost = torch.isnan(lse_a) | torch.isnan(lse_b)
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    return out, lse.masked_fill_(lost, float("nan"))


def merge_state_in_place(merge_in_place, out, lse, out_other, lse_other) -> None:
    """merge_in_place(out, lse, out_other, lse_other), keeping lse NaN where either part's was."""
    lost = torch.isnan(lse) | torch.isnan(lse_other)
    merge_in_place(out, lse, out_other, lse_other)
    lse.masked_fill_(lost, float("nan"))
