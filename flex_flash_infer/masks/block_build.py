"""Classify (query tile, key tile) pairs as empty / partial / full element by element, and the
block tables built from tile states.

tile_bounds.classify_tiles decides most tiles from the traced mask_mod's bounds and leaves the
rest to this module's evaluation: a mask that does not trace, or the query tiles that bounds
leave mostly undecided, are evaluated on a bounded chunk of query tiles at a time, so peak memory is
O(number of tiles) plus one chunk of about `chunk_elements` booleans, never O(Q_LEN * KV_LEN).
"""
from __future__ import annotations

import torch

from ..core.mask_eval import INDEX_DTYPE, call_mask_mod, evaluate_mask_mod, index_grid

EMPTY, PARTIAL, FULL = 0, 1, 2


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tile_counts(mask_mod, b, h, q, kv, q_valid, kv_valid, block_q: int, block_kv: int):
    """Visible pairs per tile of one chunk, int32 [B or 1, H or 1, q tiles, kv tiles]. The mod's
    result keeps its broadcast b and h dims (counted once, expanded later); padding is masked
    only when the chunk has any (q_valid / kv_valid are None otherwise)."""
    out = call_mask_mod(mask_mod, b, h, q, kv)
    nq, nkv = q.shape[-2], kv.shape[-1]
    if out.dim() > 4 or any(n not in (1, want) for n, want in zip(out.shape[-2:], (nq, nkv)[2 - min(2, out.dim()):])):
        raise ValueError(f"mask_mod {getattr(mask_mod, '__name__', mask_mod)!r} returned shape {tuple(out.shape)}, "
                         f"which does not broadcast to the index grid [B, H, {nq}, {nkv}]")
    out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
    out = out.expand(out.shape[0], out.shape[1], nq, nkv)
    if q_valid is not None:
        out = out & q_valid.view(-1, 1)
    if kv_valid is not None:
        out = out & kv_valid.view(1, -1)
    # the contiguous key dimension first: a fast inner reduction, then the tile's rows
    per_row = out.reshape(out.shape[0], out.shape[1], nq, nkv // block_kv, block_kv).sum(-1, dtype=torch.int32)
    return per_row.view(out.shape[0], out.shape[1], nq // block_q, block_q, nkv // block_kv).sum(3)


_compiled_tile_counts = None


def _compiled():
    global _compiled_tile_counts
    if _compiled_tile_counts is None:
        _compiled_tile_counts = torch.compile(_tile_counts, dynamic=False)
    return _compiled_tile_counts


def classify_query_tiles(mask_mod, states: torch.Tensor, qt0: int, qt1: int, Q_LEN: int, KV_LEN: int, block_q: int,
                         block_kv: int, chunk_elements: int, compile: bool = False, mask_copies: int = 1) -> None:
    """Fill states[:, :, qt0:qt1] (int8 [B, H, nQ, nKV]; B or H of 1 where the mask reads neither)
    element by element, a chunk of about chunk_elements pairs at a time. mask_copies: how many
    (b, h) the mod's result holds per pair (its b and h dims), which a chunk's size accounts for."""
    device = states.device
    counts_of = _compiled() if compile else _tile_counts
    chunk_elements = max(1, chunk_elements // mask_copies)
    B, H, _, nkv = states.shape
    # Query tiles per chunk, and key tiles per chunk when one query tile row is already too big.
    kv_tiles_per_chunk = max(1, min(nkv, chunk_elements // max(1, block_q * block_kv)))
    q_tiles_per_chunk = max(1, chunk_elements // max(1, block_q * kv_tiles_per_chunk * block_kv))
    b_idx, h_idx = torch.arange(B, device=device), torch.arange(H, device=device)
    rows_in_tile = torch.clamp(Q_LEN - torch.arange(states.shape[2], device=device) * block_q, max=block_q)
    full_count = (rows_in_tile * block_kv).to(torch.int32).view(1, 1, -1, 1)
    for c0 in range(qt0, qt1, q_tiles_per_chunk):
        c1 = min(qt1, c0 + q_tiles_per_chunk)
        q_raw = torch.arange(c0 * block_q, c1 * block_q, device=device, dtype=INDEX_DTYPE)
        q_valid = q_raw < Q_LEN if c1 * block_q > Q_LEN else None
        for kt0 in range(0, nkv, kv_tiles_per_chunk):
            kt1 = min(nkv, kt0 + kv_tiles_per_chunk)
            kv_raw = torch.arange(kt0 * block_kv, kt1 * block_kv, device=device, dtype=INDEX_DTYPE)
            kv_valid = kv_raw < KV_LEN if kt1 * block_kv > KV_LEN else None
            grid = index_grid(b_idx, h_idx, q_raw.clamp(max=Q_LEN - 1), kv_raw.clamp(max=KV_LEN - 1), device)
            counts = counts_of(mask_mod, *grid, q_valid, kv_valid, block_q, block_kv)
            tile = torch.where(counts == full_count[:, :, c0:c1], FULL, torch.where(counts > 0, PARTIAL, EMPTY))
            states[:, :, c0:c1, kt0:kt1] = tile.to(torch.int8)


def tile_elements(mask_mod, b, h, q_tile, kv_tile, block_q: int, block_kv: int, q_len: int, kv_len: int):
    """The mask on a list of P tiles: bool [P, block_q, block_kv], False on padding.

    b and h are per-tile index tensors [P] or ints; q_tile / kv_tile are tile indices [P]. The
    mod only ever sees in-range positions (padding is clamped, then masked out).
    Returns (visible, q positions [P, block_q, 1], kv positions [P, 1, block_kv]).
    """
    device = q_tile.device
    q = (q_tile.long() * block_q).view(-1, 1, 1) + torch.arange(block_q, device=device).view(1, -1, 1)
    kv = (kv_tile.long() * block_kv).view(-1, 1, 1) + torch.arange(block_kv, device=device).view(1, 1, -1)

    def per_tile(x):
        return torch.as_tensor(x, dtype=INDEX_DTYPE, device=device).reshape(-1, 1, 1)

    visible = evaluate_mask_mod(mask_mod, per_tile(b), per_tile(h), q.clamp(max=q_len - 1).to(INDEX_DTYPE),
                                kv.clamp(max=kv_len - 1).to(INDEX_DTYPE))
    return visible & (q < q_len) & (kv < kv_len), q, kv


# tiles ordered per step of ordered_indices: its int64 counts and slots stay about 32 MiB each
ORDER_CHUNK_TILES = 1 << 22


def ordered_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks [..., nQ], indices [..., nQ, nKV]) with the selected tiles first, ascending,
    then the others, ascending (a stable sort of each row, done by counting in O(tiles) and a
    chunk of rows at a time, so a grid of 2^26 tiles needs no int64 copy of itself)."""
    nkv = selected.shape[-1]
    flat = selected.reshape(-1, nkv)
    num = torch.empty(flat.shape[0], dtype=torch.int32, device=selected.device)
    order = torch.empty(flat.shape, dtype=torch.int32, device=selected.device)
    columns = torch.arange(nkv, device=selected.device)
    rows_per_chunk = max(1, ORDER_CHUNK_TILES // max(1, nkv))
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[r0:r0 + rows_per_chunk]
        before = chunk.cumsum(-1)            # selected tiles up to and including each column
        count = before[:, -1:]
        # a selected tile goes to the slot of its rank among the selected; another after all of
        # them, at its rank among the others
        slot = torch.where(chunk, before - 1, count + columns - before)
        order[r0:r0 + rows_per_chunk].scatter_(-1, slot, columns.to(torch.int32).expand_as(slot))
        num[r0:r0 + rows_per_chunk] = count.view(-1)
    return num.view(selected.shape[:-1]), order.view(selected.shape)


def states_from_tables(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) -> torch.Tensor:
    """Rebuild the int8 tile states from FlexAttention's (num, indices) tables."""
    nkv = kv_indices.shape[-1]
    states = torch.zeros(kv_indices.shape, dtype=torch.int8, device=kv_indices.device)
    for num, idx, value in ((kv_num_blocks, kv_indices, PARTIAL), (full_kv_num_blocks, full_kv_indices, FULL)):
        if num is None:
            continue
        listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
        safe = torch.where(listed, idx.long(), nkv)
        scratch = torch.zeros(states.shape[:-1] + (nkv + 1,), dtype=torch.int8, device=states.device)
        scratch.scatter_(-1, safe, listed.to(torch.int8))
        states = torch.where(scratch[..., :nkv].bool(), torch.tensor(value, dtype=torch.int8, device=states.device), states)
    return states
