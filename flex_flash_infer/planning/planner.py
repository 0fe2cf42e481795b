"""Turn tile states into FlashInfer launch descriptions (pure torch: runs and is tested on CPU).

Layout the launches assume: queries flattened to [B * Q_LEN, Hq, D]; keys and values padded
to whole tiles and viewed as pages [B * nKV, block_kv, Hkv, D], page id = b * nKV + key tile.
One request per (batch entry, query tile). Two launches, merged by log-sum-exp:
  * full:    the full tiles of each request, on the unmasked fa3 kernel (on Hopper with key tiles
             of GATHER_TILE, its ragged kernel gathering them: backends/tile_gather.py);
  * partial: the partial tiles, on the fa2 kernel with a bit mask over those tiles only.
A request without partial tiles gets one dummy page whose mask bits are all zero, because
FlashInfer's masked path needs at least one page per request; it contributes nothing.

Causal diagonal (plan_causal_diagonal): when every request's only partial tile is its own
diagonal tile and that tile is exactly causal (a causal mask intersected with tile-level
sparsity: block-sparse causal, random tiles, local + global tiles), the diagonal tile becomes
the last page of the request and the whole plan is one causal fa3 launch: FlashInfer aligns a
causal mask to the bottom right, so every earlier page is fully visible and the last one is
lower-triangular. No fa2 launch and no merge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.block_build import FULL, PARTIAL, ceil_div, tile_elements

MASK_CHUNK_ELEMENTS = 1 << 24
# key tiles this wide run their whole tiles on Hopper's ragged kernel gathering each request's tiles
# (backends/tile_gather.py, whose patched kernel takes key tiles of this width and no other)
GATHER_TILE = 128
# FlashInfer finds each request's bits in a launch's mask by int32 offsets (its mask_indptr, and
# qo_len * kv_len per request): past this many bits they wrap and requests read others' bits
MAX_MASK_BITS = 2**31 - 1


def check_mask_bits(total: int, launch: str) -> None:
    """Refuse a bit mask FlashInfer's int32 offsets cannot address (silently wrong otherwise)."""
    if total > MAX_MASK_BITS:
        raise ValueError(
            f"{launch} would need a bit mask of {total:,} bits, more than the {MAX_MASK_BITS:,} FlashInfer's "
            "32-bit mask offsets address (requests would read other requests' bits): split the call into "
            "fewer query rows, or run it with backend='reference'")


@dataclass
class PagedLaunch:
    """Arguments of one paged-prefill launch: CSR over requests of page ids."""
    kv_indptr: torch.Tensor       # int32 [requests + 1]
    kv_indices: torch.Tensor      # int32 [pages]: b * nKV + key tile
    last_page_len: torch.Tensor   # int32 [requests]: block_kv, or 0 for a request with no pages
    tile_request: torch.Tensor    # int64 [pages]: the request of each listed tile
    tile_rank: torch.Tensor       # int64 [pages]: position of the tile inside its request
    dummy: torch.Tensor           # bool [pages]: filler page of a request with no tile of this kind


@dataclass
class TilePlan:
    qo_indptr: torch.Tensor       # int32 [requests + 1]
    qo_len: torch.Tensor          # int32 [requests]
    full: PagedLaunch | None      # None when no tile is full
    partial: PagedLaunch | None   # None when no tile is partial
    num_kv_tiles: int
    causal: bool = False          # the full launch is causal: its last page per request is the diagonal tile
    head_major_batch: int = 0     # > 0: requests are (query head, batch entry, query tile), see plan_tiles_head_major


def _launch(selected: torch.Tensor, block_kv: int, fill_empty: bool, tail: int | None = None) -> PagedLaunch:
    """selected: bool [B, nQ, nKV] -> CSR over the B * nQ requests. tail: the keys in the last key
    tile when fewer than block_kv: a request listing that tile (last, tiles ascending) gets it as
    its last page's length, so that a full tile's padded keys are not attended."""
    B, nq, nkv = selected.shape
    if fill_empty:
        empty_rows = ~selected.any(-1)
        filler = torch.zeros_like(selected)
        filler[..., 0] = empty_rows
        listed = selected | filler
    else:
        filler = torch.zeros_like(selected)
        listed = selected
    flat = listed.reshape(B * nq, nkv)
    counts = flat.sum(-1)
    indptr = torch.zeros(B * nq + 1, dtype=torch.int64, device=selected.device)
    indptr[1:] = counts.cumsum(0)
    request, tile = flat.nonzero(as_tuple=True)  # row-major: grouped by request, tiles ascending
    page = (request // nq) * nkv + tile
    rank = torch.arange(request.numel(), device=selected.device) - indptr[request]
    last_len = torch.where(counts > 0, block_kv, 0)
    if tail is not None and tail < block_kv:
        last_tile = torch.full((B * nq,), -1, dtype=torch.int64, device=selected.device)
        last_tile.scatter_reduce_(0, request, tile, "amax")
        last_len = torch.where(last_tile == nkv - 1, tail, last_len)
    return PagedLaunch(
        kv_indptr=indptr.to(torch.int32),
        kv_indices=page.to(torch.int32),
        last_page_len=last_len.to(torch.int32),
        tile_request=request,
        tile_rank=rank,
        dummy=filler.reshape(B * nq, nkv)[request, tile],
    )


def plan_tiles(states: torch.Tensor, batch: int, q_len: int, block_q: int, block_kv: int,
               kv_len: int | None = None) -> TilePlan:
    """states: int8 [Bm, nQ, nKV] for one head group (Bm is 1 or batch). kv_len: the keys, where
    the last key tile may be full though padded (tables made by hand or by torch)."""
    states = states.expand(batch, *states.shape[1:])
    _, nq, nkv = states.shape
    q_tile = torch.arange(nq, device=states.device)
    qo_len = torch.clamp(q_len - q_tile * block_q, max=block_q).repeat(batch)
    qo_indptr = torch.zeros(batch * nq + 1, dtype=torch.int64, device=states.device)
    qo_indptr[1:] = qo_len.cumsum(0)
    full_sel, part_sel = states == FULL, states == PARTIAL
    return TilePlan(
        qo_indptr=qo_indptr.to(torch.int32),
        qo_len=qo_len.to(torch.int32),
        full=_launch(full_sel, block_kv, fill_empty=False, tail=None if kv_len is None else kv_len - (nkv - 1) * block_kv)
        if bool(full_sel.any()) else None,
        partial=_launch(part_sel, block_kv, fill_empty=True) if bool(part_sel.any()) else None,
        num_kv_tiles=nkv,
    )


def plan_tiles_head_major(states: torch.Tensor, batch: int, q_len: int, block_q: int, block_kv: int,
                          group_size: int, kv_len: int | None = None) -> TilePlan:
    """Every query head of a per-head mask in one launch set: states int8 [Hq, Bm, nQ, nKV].

    Requests are (h, b, query tile), in that order, over queries laid out head-major
    [Hq * B * Q_LEN, 1, D]; pages are [Hkv * B * nKV, block_kv, 1, D], page id
    (h // group_size * B + b) * nKV + key tile, so GQA heads share their key head's pages.
    """
    hq = states.shape[0]
    stacked = states.expand(hq, batch, *states.shape[2:]).reshape(hq * batch, *states.shape[2:])
    plan = plan_tiles(stacked, hq * batch, q_len, block_q, block_kv, kv_len)
    nkv = plan.num_kv_tiles
    for launch in (plan.full, plan.partial):
        if launch is not None:
            page = launch.kv_indices.long()
            row, tile = page // nkv, page % nkv
            head, b = row // batch, row % batch
            launch.kv_indices = (((head // group_size) * batch + b) * nkv + tile).to(torch.int32)
    plan.head_major_batch = batch
    return plan


def plan_causal_diagonal(states: torch.Tensor, mask_mod, head: int, batch: int, q_len: int, kv_len: int,
                         block_q: int, block_kv: int) -> TilePlan | None:
    """One causal launch over full tiles + the diagonal tile, or None when the mask is not of
    that shape (see the module docstring). states: int8 [Bm, nQ, nKV] for one head group."""
    if block_q != block_kv or q_len != kv_len:
        return None
    states = states.expand(batch, *states.shape[1:])
    _, nq, nkv = states.shape
    diag = torch.eye(nq, dtype=torch.bool, device=states.device).expand_as(states)
    partial, full = states == PARTIAL, states == FULL
    above = torch.ones(nq, nq, dtype=torch.bool, device=states.device).triu(1)
    if not torch.equal(partial, diag) or bool((full & above).any()):
        return None
    causal = None
    tile = torch.arange(nq, device=states.device)
    for b in range(batch):  # B * nQ tiles of block_q x block_kv elements, one batch entry at a time
        visible, q, kv = tile_elements(mask_mod, b, head, tile, tile, block_q, block_kv, q_len, kv_len)
        causal = (q >= kv) & (q < q_len) & (kv < kv_len) if causal is None else causal
        if not torch.equal(visible, causal):
            return None
    plan = plan_tiles(torch.where(partial, FULL, states), batch, q_len, block_q, block_kv)
    launch = plan.full
    has_pages = launch.kv_indptr[1:] > launch.kv_indptr[:-1]
    keys_in_diagonal = torch.clamp(kv_len - tile * block_kv, max=block_kv).repeat(batch)
    launch.last_page_len = torch.where(has_pages, keys_in_diagonal, 0).to(torch.int32)
    plan.causal = True
    return plan


def partial_tile_mask(plan: TilePlan, mask_mod, head: int, q_len: int, kv_len: int,
                      block_q: int, block_kv: int, chunk_elements: int = MASK_CHUNK_ELEMENTS) -> torch.Tensor:
    """Flat bool mask of the partial launch in FlashInfer's layout: for each request, a
    row-major [qo_len, pages * block_kv] matrix over its concatenated pages."""
    launch = plan.partial
    device = launch.kv_indices.device
    nq = ceil_div(q_len, block_q)
    pages_per_request = (launch.kv_indptr[1:] - launch.kv_indptr[:-1]).long()
    request_elems = plan.qo_len.long() * pages_per_request * block_kv
    total = int(request_elems.sum())
    check_mask_bits(total, "the partial tiles' launch")
    offset = torch.zeros_like(request_elems)
    offset[1:] = request_elems.cumsum(0)[:-1]
    out = torch.zeros(total, dtype=torch.bool, device=device)
    rows = torch.arange(block_q, device=device)
    cols = torch.arange(block_kv, device=device)
    tiles_per_chunk = max(1, chunk_elements // (block_q * block_kv))
    for p0 in range(0, launch.kv_indices.numel(), tiles_per_chunk):
        sl = slice(p0, p0 + tiles_per_chunk)
        req, rank = launch.tile_request[sl], launch.tile_rank[sl]
        b, q_tile, h = req // nq, req % nq, head
        if plan.head_major_batch:  # requests are (head, batch entry, query tile)
            h, b = b // plan.head_major_batch, b % plan.head_major_batch
        kv_tile = launch.kv_indices[sl].long() % plan.num_kv_tiles
        visible, _, _ = tile_elements(mask_mod, b, h, q_tile, kv_tile, block_q, block_kv, q_len, kv_len)
        visible = visible & ~launch.dummy[sl].view(-1, 1, 1)
        row_ok = rows.view(1, -1, 1) < plan.qo_len[req].view(-1, 1, 1)
        stride = (pages_per_request[req] * block_kv).view(-1, 1, 1)
        dst = offset[req].view(-1, 1, 1) + rows.view(1, -1, 1) * stride + (rank * block_kv).view(-1, 1, 1) + cols.view(1, 1, -1)
        keep = row_ok.expand_as(dst)
        out[dst[keep]] = visible[keep]
    return out
