"""Packed documents: causal attention within each document, nothing across documents.

Predicate: visible(q, kv) = doc(q) == doc(kv) and q >= kv
where doc(i) is the document of token i, given either as per-token ids or as offsets
(cumulative lengths [0, len0, len0 + len1, ..., total], as FlashAttention's cu_seqlens).
"""
from __future__ import annotations

import torch

from ._captured import follow_device
from ..core.hints import state_hint


def document_ids_from_offsets(offsets) -> torch.Tensor:
    """Per-token document ids from cumulative offsets [0, ..., total] (int64, length total)."""
    offsets = torch.as_tensor(offsets)
    if offsets.dim() != 1 or offsets.numel() < 2 or offsets.is_floating_point():
        raise ValueError("offsets must be a 1-D integer sequence [0, len0, len0+len1, ..., total]")
    offsets = offsets.long()
    if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must start at 0 and never decrease, got {offsets.tolist()[:8]}...")
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)


def generate_document_mask_mod(offsets=None, document_ids=None):
    if (offsets is None) == (document_ids is None):
        raise ValueError("document mask needs exactly one of offsets= or document_ids=")
    if document_ids is None:
        ids = document_ids_from_offsets(offsets)
    else:
        ids = torch.as_tensor(document_ids)
        if ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"document_ids must be a 1-D integer tensor, got shape {tuple(ids.shape)}")
    ids_on = follow_device(ids)

    def document(b, h, q_idx, kv_idx):
        # the ids follow the device the mask is evaluated on (a copy made again after the ids
        # were rewritten in place: the next batch packed into the same buffer)
        doc = ids_on(q_idx.device)
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    if not torch.compiler.is_compiling():   # made inside a compiled function: no data-dependent name
        document.__name__ = f"document_{int(ids.max()) + 1 if ids.numel() else 0}docs"
    state_hint(document, "document_ids", ids)
    return document
