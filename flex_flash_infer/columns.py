"""Sparse key columns: a band plus a few key positions that every later query may see.

Attamba's mask is a causal window (a band FlashInfer runs natively) plus the chunk-end keys
outside the window; StreamingLLM's is the same window plus the first sink_size keys. Those keys
are gathered into a compact tensor (S / chunk_size or sink_size of them) and attended with
pages of one key under a small bit mask; the two results merge by log-sum-exp. The column part's mask is the mask_mod at the gathered positions
minus what the band already covers, so no pair is counted twice.
"""
from __future__ import annotations

import torch

from .bands import Band
from .block_build import EMPTY, PARTIAL
from .mask_eval import INDEX_DTYPE, evaluate_mask_mod


def column_lowering(mask_mod, q_len: int, kv_len: int):
    """(bands, key positions) for masks that declare this structure, else None.

    The hint is (window_size, first, step, stop or None): a causal window band plus the key
    positions range(first, min(stop, kv_len), step)."""
    hint = getattr(mask_mod, "key_columns_hint", None)
    if hint is None or q_len != kv_len:
        return None
    window, first, step, stop = hint
    positions = torch.arange(first, kv_len if stop is None else min(stop, kv_len), step)
    if positions.numel() == 0:
        return None
    bands = [Band(0, q_len, 0, kv_len, causal=True, window_left=window - 1)]
    return bands, positions


def compact_mask_mod(mask_mod, bands, positions: torch.Tensor):
    """mask_mod over compact key index m (= positions[m]), minus the pairs the bands cover."""
    on_device = {}

    def columns(b, h, q_idx, m_idx):
        pos = on_device.get(q_idx.device)
        if pos is None:
            pos = on_device.setdefault(q_idx.device, positions.to(q_idx.device, INDEX_DTYPE))
        kv = pos[m_idx.long()]
        covered = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for band in bands:
            covered = covered | band.visible(q_idx, kv)
        return mask_mod(b, h, q_idx, kv) & ~covered

    return columns


def column_states(compact_mod, q_len: int, num_columns: int, block_q: int, device) -> torch.Tensor:
    """int8 [1, nQ, M]: PARTIAL where a query tile sees a gathered key, else EMPTY."""
    nq = -(-q_len // block_q)
    rows = torch.arange(nq * block_q, device=device, dtype=INDEX_DTYPE)
    cols = torch.arange(num_columns, device=device, dtype=INDEX_DTYPE)
    zero = torch.zeros(1, 1, dtype=INDEX_DTYPE, device=device)
    states = torch.empty((nq, num_columns), dtype=torch.int8, device=device)
    per_chunk = max(1, (1 << 24) // max(1, block_q * num_columns))
    for t0 in range(0, nq, per_chunk):
        t1 = min(nq, t0 + per_chunk)
        q = rows[t0 * block_q:t1 * block_q]
        seen = evaluate_mask_mod(compact_mod, zero, zero, q.clamp(max=q_len - 1).view(-1, 1), cols.view(1, -1))
        seen = seen & (q < q_len).view(-1, 1)
        states[t0:t1] = torch.where(seen.view(t1 - t0, block_q, -1).any(1), PARTIAL, EMPTY).to(torch.int8)
    return states.unsqueeze(0)
