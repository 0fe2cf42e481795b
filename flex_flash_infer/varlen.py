"""A packed variable-length batch as one FlashInfer ragged launch.

When every sequence's plan is one native band over the whole sequence (full, causal or a
causal window) with the same flags, the batch is exactly FlashInfer's ragged prefill with
qo_indptr = cu_seqlens_q and kv_indptr = cu_seqlens_kv: one launch instead of one per
sequence (faster than one plan per sequence, level with FlashInfer's own ragged call).
Exact on the CPU model of FlashInfer (tests/backends/test_flashinfer_glue.py).
"""
from __future__ import annotations

import torch

from .backends.flashinfer_backend import LN2, _is_hopper, announce_first_use, default_workspace
from .planning.ragged import planned_ragged


def _effective(causal: bool, window_left: int, q_len: int, kv_len: int):
    """The flags as they act on one q_len x kv_len request: a window that reaches every key the
    causal mask allows is no window, and with one query facing one key causal is the same as full
    (with one key and several queries, bottom-right causal shows it to the last query only)."""
    if not causal:
        return False, window_left   # (a window without causal does not occur in bands)
    longest = kv_len - 1            # bottom-right aligned: the farthest key a query may see
    window = -1 if window_left < 0 or window_left >= longest else window_left
    return (q_len > 1 or kv_len > 1 or window >= 0), window


def single_band_flags(segments, plans):
    """(causal, window_left) under which one ragged launch equals every sequence's own plan (plans:
    each segment's plan.AttentionPlan, None for one without keys; each a single band over its whole
    sequence), else None."""
    bands = []
    for seg, plan in zip(segments, plans):
        # exactly bands: key columns of any kind (the merge kernel's counts or the paged launch)
        # are work the single launch would drop
        if plan is None or seg.score_mod is not None or plan.route != "bands":
            return None
        if len(plan.bands) != 1:
            return None
        band = plan.bands[0]
        if (band.q_start, band.q_end, band.kv_start, band.kv_end) != (0, seg.q1 - seg.q0, 0, seg.kv1 - seg.kv0):
            return None
        bands.append(band)
    for flags in {(b.causal, b.window_left) for b in bands}:
        if all(_effective(*flags, b.q_end, b.kv_end) == _effective(b.causal, b.window_left, b.q_end, b.kv_end)
               for b in bands):
            return flags
    return None


class RaggedBatch:
    """Runs the whole packed batch in one ragged prefill; run() gives (out, natural-log lse)."""

    def __init__(self, offsets_q, offsets_kv, flags, num_qo_heads, num_kv_heads, head_dim, dtype, scale, device,
                 workspace=None):
        announce_first_use()   # the sequences' own plans, which said it, are not made when this serves
        causal, window_left = flags
        device = torch.device(device)
        workspace = default_workspace(device) if workspace is None else workspace
        self.negate_query, scale = scale < 0, abs(scale)   # a negative sm_scale gives NaN (FlashInferPlan)
        # the offsets as host tables (FlashInfer's plan() reads them there)
        qo_indptr, kv_indptr = (torch.tensor(o, dtype=torch.int32) for o in (offsets_q, offsets_kv))
        shape = (len(offsets_q) - 1, offsets_q[-1], offsets_kv[-1], num_qo_heads, num_kv_heads, head_dim)
        self.wrapper = planned_ragged(workspace, "fa3" if _is_hopper(device) else "fa2", qo_indptr, kv_indptr, shape,
                                      dtype, causal, window_left, sm_scale=scale)

    def run(self, q, k, v, return_lse: bool):
        if self.negate_query:
            q = -q
        if not return_lse:
            return self.wrapper.run(q, k, v), None
        out, lse = self.wrapper.run(q, k, v, return_lse=True)
        return out, lse * LN2
