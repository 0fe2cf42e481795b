"""The reference backend: FlexAttention semantics in plain torch, on any device.

It is the correctness oracle and the CPU path. Work is chunked over query rows so memory
stays bounded (one [B, Hq, rows, KV] score block at a time); compute is float32 (float64
for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from .block_build import FULL, PARTIAL
from .mask_eval import evaluate_mask_mod, evaluate_score_mod, index_grid

DEFAULT_CHUNK_ELEMENTS = 1 << 24


def visible_pairs(block_mask, b_idx, h_idx, q_idx, kv_idx) -> torch.Tensor:
    """Exact FlexAttention visibility on a grid: full tiles, or partial tiles where mask_mod holds."""
    bq, bkv = block_mask.BLOCK_SIZE
    states = block_mask.states.to(q_idx.device)
    # Broadcast dims of size 1 in the tables apply to every batch entry / head.
    sb = b_idx if states.shape[0] > 1 else torch.zeros_like(b_idx)
    sh = h_idx if states.shape[1] > 1 else torch.zeros_like(h_idx)
    tile = states[sb.long(), sh.long(), (q_idx // bq).long(), (kv_idx // bkv).long()]
    in_mask = evaluate_mask_mod(block_mask.mask_mod, b_idx, h_idx, q_idx, kv_idx)
    return (tile == FULL) | ((tile == PARTIAL) & in_mask)


def reference_attention(query, key, value, block_mask=None, score_mod=None, scale=None,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, return_max: bool = False):
    """out [B, Hq, L, Ev] in query's dtype and natural-log lse [B, Hq, L] float32 (and, with
    return_max, each row's largest visible score after score_mod, float32 [B, Hq, L]).

    query [B, Hq, L, E]; key [B, Hkv, S, E]; value [B, Hkv, S, Ev]; Hq a multiple of Hkv
    (query head h reads key head h // (Hq // Hkv)). A row that sees no key gives 0, lse -inf
    and max -inf.
    """
    B, Hq, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    group = Hq // Hkv
    k = key.to(compute).repeat_interleave(group, dim=1)
    v = value.to(compute).repeat_interleave(group, dim=1)
    out = torch.empty((B, Hq, L, value.shape[-1]), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device)
    row_max = torch.full((B, Hq, L), float("-inf"), dtype=torch.float32, device=query.device)
    rows = max(1, chunk_elements // max(1, B * Hq * S))
    b_idx, h_idx, _, all_kv = index_grid(range(B), range(Hq), [0], range(S), query.device)
    # Keys of the non-empty tiles per block row: each row chunk scores only that span.
    spans = _key_spans(block_mask, S) if block_mask is not None else None
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        c0, c1 = (0, S) if spans is None else _chunk_span(spans, block_mask.BLOCK_SIZE[0], r0, r1)
        if c1 <= c0:  # no key visible to any row of this chunk
            out[:, :, r0:r1] = 0
            lse[:, :, r0:r1] = float("-inf")
            continue
        kv_idx = all_kv[..., c0:c1]
        q_idx = torch.arange(r0, r1, device=query.device, dtype=kv_idx.dtype).view(1, 1, -1, 1)
        scores = torch.matmul(query[:, :, r0:r1].to(compute), k[:, :, c0:c1].transpose(-1, -2)) * scale
        if score_mod is not None:
            scores = evaluate_score_mod(score_mod, scores, b_idx, h_idx, q_idx, kv_idx)
        if block_mask is not None:
            visible = visible_pairs(block_mask, b_idx, h_idx, q_idx, kv_idx)
            scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        seen = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(seen, row_lse, 0.0).unsqueeze(-1))
        probs = torch.where(seen.unsqueeze(-1), probs, 0.0)
        out[:, :, r0:r1] = torch.matmul(probs, v[:, :, c0:c1]).to(query.dtype)
        lse[:, :, r0:r1] = row_lse.to(torch.float32)
        if return_max:
            row_max[:, :, r0:r1] = scores.amax(dim=-1).to(torch.float32)
    return (out, lse, row_max) if return_max else (out, lse)


def _key_spans(block_mask, kv_len: int):
    """Per block row, [first, last + 1) key of its non-empty tiles over every (b, h): [nQ, 2]."""
    nonempty = (block_mask.states != 0).flatten(0, 1).any(0).cpu()  # [nQ, nKV]
    bkv = block_mask.BLOCK_SIZE[1]
    cols = torch.arange(nonempty.shape[1])
    first = torch.where(nonempty, cols, nonempty.shape[1]).amin(1) * bkv
    last = (torch.where(nonempty, cols, -1).amax(1) + 1) * bkv
    return torch.stack([first, last.clamp(max=kv_len)], 1).tolist()


def _chunk_span(spans, block_q: int, r0: int, r1: int):
    rows = spans[r0 // block_q:(r1 - 1) // block_q + 1]
    return min(a for a, _ in rows), max(b for _, b in rows)
