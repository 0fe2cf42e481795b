"""Sparse key columns: a band plus a few key positions that every later query may see.

Attamba's mask is a causal window (a band FlashInfer runs natively) plus the chunk-end keys
outside the window; StreamingLLM's is the same window plus the first sink_size keys. Those keys
are gathered into a compact tensor (S / chunk_size or sink_size of them) and attended with
pages of one key under a small bit mask; the two results merge by log-sum-exp. The column part's mask is the mask_mod at the gathered positions
minus what the band already covers, so no pair is counted twice.
"""
from __future__ import annotations

import torch

from .bands import VERIFY_CHUNK_ELEMENTS, Band, band_tile_states
from ..masks.block_build import EMPTY, PARTIAL
from ..core.mask_eval import INDEX_DTYPE, evaluate_mask_mod
from ..masks.tile_bounds import evaluated_tiles, row_invariant_tiles
from ..core.hints import stated_hint


def column_lowering(mask_mod, q_len: int, kv_len: int):
    """(bands, key positions) for masks that declare this structure, else None.

    The hint is (window_size, first, step, stop or None): a causal window band plus the key
    positions range(first, min(stop, kv_len), step)."""
    hint = stated_hint(mask_mod, "key_columns_hint")
    if hint is None or q_len != kv_len:
        return None
    window, first, step, stop = hint
    end = kv_len if stop is None else min(stop, kv_len)
    if first >= end:   # no column within the keys (torch.arange refuses a start past the end)
        return None
    positions = torch.arange(first, end, step)
    bands = [Band(0, q_len, 0, kv_len, causal=True, window_left=window - 1)]
    return bands, positions


MAX_COLUMN_SHARE = 8   # gather at most kv_len // 8 keys: beyond that the tiles route is as good


def find_window_columns(states: torch.Tensor, mask_mod, q_len: int, kv_len: int, block_q: int, block_kv: int,
                        chunk_elements: int = VERIFY_CHUNK_ELEMENTS):
    """(bands, key positions) for a mask that is a causal window plus a few key columns, found
    from the mask itself (a user's own attamba- or sink-style mask_mod needs no hint), or None.

    The last rows propose it: the shortest of their runs of visible keys ending at the diagonal
    is the window (one row's run can be lengthened by a column next to its window edge), and the
    keys the last row sees outside that window are the columns. Then it is verified exactly on
    every non-empty tile:
    the band must lie inside the mask, and every visible pair must be in the band or a column.
    """
    if q_len != kv_len or q_len < 2:
        return None
    device = states.device
    last = q_len - 1
    zero = torch.zeros(1, 1, dtype=INDEX_DTYPE, device=device)
    kv = torch.arange(kv_len, device=device, dtype=INDEX_DTYPE)
    rows = torch.arange(max(0, last - 7), last + 1, device=device, dtype=INDEX_DTYPE)
    seen = evaluate_mask_mod(mask_mod, zero, zero, rows.view(-1, 1), kv.view(1, -1))
    if not bool(seen[torch.arange(rows.numel(), device=device), rows.long()].all()):
        return None   # a row that does not see its own position
    if bool((seen & (kv.view(1, -1) > rows.view(-1, 1))).any()):
        return None   # not causal
    # each row's run of visible keys ending at its diagonal: from its last hidden key at or before
    # it (-1 when none), all rows at once (one host read, where a loop read each row twice)
    kv_row = kv.view(1, -1)
    last_hidden = torch.where(~seen & (kv_row <= rows.view(-1, 1)), kv_row, -1).amax(1)
    window = int((rows - last_hidden).min())
    positions = seen[-1, :last + 1 - window].nonzero().flatten()
    if positions.numel() == 0 or positions.numel() > kv_len // MAX_COLUMN_SHARE:
        return None
    band = Band(0, q_len, 0, kv_len, causal=True, window_left=window - 1)
    nq, nkv = states.shape
    band_states = band_tile_states(band, q_len, kv_len, block_q, block_kv, nq, nkv, device)
    if bool(((band_states != EMPTY) & (states == EMPTY)).any()):
        return None
    is_column = torch.zeros(kv_len, dtype=torch.bool, device=device)
    is_column[positions] = True
    nonempty = (states != EMPTY).nonzero()
    tiles = torch.cat([torch.zeros_like(nonempty), nonempty], 1)   # [b, h, q tile, kv tile]
    # a tile the band fills or misses whole, whose mask is the same on every row (the columns
    # below the window), is checked on its first row: every other row repeats it
    one_row = row_invariant_tiles(mask_mod, q_len, kv_len, block_q, block_kv, device)
    qt, kt = nonempty.unbind(1)
    same_rows = torch.zeros(qt.numel(), dtype=torch.bool, device=device) if one_row is None else (
        one_row[qt, kt] & (band_states[qt, kt] != PARTIAL))
    for _, _, (truth, q, k) in evaluated_tiles(mask_mod, tiles, same_rows, block_q, block_kv, q_len, kv_len,
                                               chunk_elements):
        valid = (q < q_len) & (k < kv_len)
        in_band = band.visible(q, k) & valid
        if bool((in_band & ~truth).any()) or bool((truth & ~in_band & ~is_column[k.clamp(max=kv_len - 1)]).any()):
            return None
    return [band], positions.cpu()


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


# rows per chunk of the prefix count: about this many (row, column) pairs evaluated at once
ROWS_PER_CHUNK_ELEMENTS = 1 << 24


def column_prefix_counts(compact_mod, q_len: int, num_columns: int, device) -> torch.Tensor | None:
    """int32 [q_len]: how many of the columns (in position order) each query row sees, when
    every row sees a prefix of them; None when some row sees a column after one it does not."""
    cols = torch.arange(num_columns, device=device, dtype=INDEX_DTYPE)
    zero = torch.zeros(1, 1, dtype=INDEX_DTYPE, device=device)
    counts = torch.empty(q_len, dtype=torch.int32, device=device)
    prefix = torch.ones((), dtype=torch.bool, device=device)
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, num_columns))
    for r0 in range(0, q_len, step):
        rows = torch.arange(r0, min(q_len, r0 + step), device=device, dtype=INDEX_DTYPE)
        seen = evaluate_mask_mod(compact_mod, zero, zero, rows.view(-1, 1), cols.view(1, -1))
        n = seen.sum(1)
        counts[r0:r0 + rows.numel()] = n.to(torch.int32)
        prefix = prefix & (seen == (cols.view(1, -1) < n.view(-1, 1))).all()
    return counts if bool(prefix) else None
