"""Compiled mods on the tiles route: a score_mod on the full-tile (fa3) and partial-tile (fa2)
launches, and, for the paged cache of a per-head mask (paged.py), a mask_mod evaluated inside
the fa2 kernel (FlashInfer's variant_owns_mask) instead of a bit mask.
The variants and their request tables are described in variant_paged.py.
"""
from __future__ import annotations

import hashlib

import torch

from ..masks.block_build import ceil_div
from ..masks.tile_bounds import check_table_indices
from ..compile.codegen import position_bound_for
from ..core.trace import Graph, trace
from ..compile.variant import graph_values
from ..compile.variant_paged import fa2_paged_variant, fa3_paged_score_mod_variant


def request_tables(plan, launch, key_positions: torch.Tensor, head: int | None, q_len: int, block_q: int):
    """The five int32 tables of variant_paged for one launch of a TilePlan.

    key_positions[t]: the first key position of page t of a batch entry (t * block_kv for key
    tiles, the gathered position for key columns); head: the query head of a one-head group."""
    device = launch.kv_indices.device
    requests = plan.qo_len.numel()
    nq = ceil_div(q_len, block_q)
    r = torch.arange(requests, device=device)
    row = r // nq
    if plan.head_major_batch:   # requests are (query head, batch entry, query tile)
        req_b, req_h0 = row % plan.head_major_batch, row // plan.head_major_batch
    else:
        req_b, req_h0 = row, torch.full_like(row, head or 0)
    page_kv0 = key_positions.to(device)[launch.kv_indices.long() % plan.num_kv_tiles]
    page_kv0 = torch.where(launch.dummy, -1, page_kv0)
    tables = ((r % nq) * block_q, req_b, req_h0, launch.kv_indptr[:-1], page_kv0)
    return [t.to(torch.int32).contiguous() for t in tables]


class TileVariants:
    """The compiled variants of one plan: jit arguments of the full and partial launches and, for
    each, the kernel arguments that follow the tables (captured tensors, the scale, numbers, strides)."""

    def __init__(self, score_mod, mask_graph, shape, dtype, scale, page_size: int, device, hopper: bool):
        batch, q_len, kv_len, hq, hkv, head_dim = shape
        # score_mod: the function, or its trace when the caller has it
        self.score_graph = (None if score_mod is None else score_mod if isinstance(score_mod, Graph)
                            else trace(score_mod, "score_mod"))
        self.mask_graph = mask_graph
        check_table_indices(self.score_graph, batch, hq, q_len, kv_len, "cpu", "score_mod")
        check_table_indices(mask_graph, batch, hq, q_len, kv_len, "cpu", "mask_mod")
        bound = position_bound_for(batch, hq, q_len, kv_len)
        self.copies = []   # the KernelCopies of the captured tensors, refreshed before each run
        self.partial_args = self._kernel_args([self.score_graph, mask_graph], scale, kv_len, device)
        dtype_name = str(dtype).split(".")[-1]

        def jit_args(spec):
            uri = f"ffi_paged_{hashlib.sha256(spec.decl.encode()).hexdigest()[:16]}_{dtype_name}_d{head_dim}"
            return spec.jit_args(uri, dtype, head_dim, torch.int32, False)

        self.full_jit_args = None
        self.full_args = self._kernel_args([self.score_graph], scale, kv_len, device)    # full tiles read no mask
        if self.score_graph is not None:
            full = (fa3_paged_score_mod_variant(self.score_graph, page_size, bound) if hopper
                    else fa2_paged_variant(self.score_graph, None, page_size, bound))
            self.full_jit_args = jit_args(full)
            self.full_backend = "fa3" if hopper else "fa2"
        self.partial_jit_args = jit_args(fa2_paged_variant(self.score_graph, mask_graph, page_size, bound))
        self.owns_mask = mask_graph is not None

    def refresh(self) -> None:
        """Bring the kernels' copies of captured tensors up to date (KernelCopies.refresh)."""
        for copies in self.copies:
            copies.refresh()

    def _kernel_args(self, graphs, scale, kv_len, device):
        """What follows the tables, in jit order: the graphs' captured tensors, the scale, the key
        count, then each graph's numbers and its tensors' strides (variant_paged.paged_arguments)."""
        # the score_mod's tables are read as they are at each call; the mask's as planned (the
        # pages' states came from them, and the doors raise when they were written since)
        values = [graph_values(g, device, live=g is not self.mask_graph) for g in graphs]
        self.copies += [ts for ts, _ in values]
        return [t for ts, _ in values for t in ts] + [float(scale), int(kv_len)] + [v for _, vs in values for v in vs]
