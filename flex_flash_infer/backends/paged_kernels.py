"""Compiled mods on a paged KV cache: a score_mod inside the kernels of both launches and, for a
mask_mod that differs across query heads, the mask evaluated inside the partial launch's fa2
kernel (FlashInfer's bit mask is one for all heads).

They are the tiles route's variants (tile_kernels.TileVariants, variant_paged.py) with the page
size of the cache: request r of a launch is a serving request, its pages are the pages the plan
listed for that launch, and each listed page carries the key position it holds in the request."""
from __future__ import annotations

import torch

from ..core.transfers import to_device_queued
from .tile_kernels import TileVariants


def paged_variants(score_mod, mask_graph, plan, heads, dtype, scale, page_size: int, device, hopper: bool):
    """TileVariants for a PagedPlan (raises TraceError when score_mod cannot be compiled)."""
    hq, hkv, head_dim = heads
    requests = plan.qo_indptr.numel() - 1
    # every query position of a request is below its key count: both bounds are the longest request
    shape = (requests, plan.max_kv_len, plan.max_kv_len, hq, hkv, head_dim)
    return TileVariants(score_mod, mask_graph, shape, dtype, scale, page_size, device, hopper)


def paged_request_tables(plan, spec) -> list[torch.Tensor]:
    """variant_paged's five int32 tables for one launch: first query position, batch entry (the
    request), head offset (0: all heads run together), the request's first listed page, and the
    key position of each listed page (-1 for a dummy page)."""
    requests = plan.qo_indptr.numel() - 1
    device = spec.kv_indices.device   # the others may lie on the host (a plan from a mask's flags)
    tables = (plan.q_start, torch.arange(requests, device=device), torch.zeros(requests, device=device),
              spec.kv_indptr[:-1], spec.kv_positions)
    return [to_device_queued(t, device, torch.int32).contiguous() for t in tables]
