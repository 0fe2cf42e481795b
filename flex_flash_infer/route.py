"""Which FlashInfer route a planned problem takes (pure torch: plot() and tests use it on CPU).

  bands          the mask is a few native FlashInfer requests (bands.py)
  bands+columns  a causal window band plus gathered key columns (columns.py): attamba and streaming
                 by their hint, any other mask of that shape found and verified from the mask itself
  tiles          whole tiles on fa3, partial tiles on fa2 with a bit mask, merged
                 (tiles-causal: partial tiles are only causal diagonals: one causal fa3 launch)
  tiles-per-head the same, for a mask that differs per head (every head in one launch set)
  bands-per-head every head's mask is a few native requests: heads with the same bands run as
                 one band launch over those heads (FLEX_FLASH_INFER_HEAD_BANDS=0 turns it off: then
                 such masks take tiles-per-head, 1.9x slower on an H200)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .bands import find_bands, hinted_bands
from .columns import column_lowering, find_window_columns
from .mask_eval import mask_dependence

# The window band + key columns route (attamba, streaming) passed the GPU tests on an H100
# (2026-11-25); FLEX_FLASH_INFER_COLUMNS=0 turns it off (then those masks take the tiles route).
ENABLE_COLUMN_LOWERING = os.environ.get("FLEX_FLASH_INFER_COLUMNS", "1") != "0"
# Per-head masks whose heads each lower to bands (per-head window sizes, say): its GPU tests
# passed on an H100 (2026-11-25, twice). Timed on an H200 (2026-12-01, per-head windows of
# 128..1024 keys at 8192 tokens) it took 0.934 ms against the tiles-per-head route's 0.890 ms:
# its four fa3 launches took 0.233 ms in all, the head gathers and scatters around them 0.65 ms
# (torch.profiler, run 10). Since then evenly spaced heads go to FlashInfer as strided views (GPU
# tests passed on the H200, 2026-12-02, run 11a), and run 14 timed it at 0.403 ms against 0.782
# for tiles-per-head (torch flex 0.312), so it is the default; FLEX_FLASH_INFER_HEAD_BANDS=0
# turns it off.
ENABLE_HEAD_BANDS = os.environ.get("FLEX_FLASH_INFER_HEAD_BANDS", "1") != "0"


@dataclass
class Route:
    kind: str
    per_head: bool
    bands: list | None = None
    positions: torch.Tensor | None = None   # gathered key positions of the column route
    head_bands: list | None = None          # bands-per-head: each query head's bands


def choose_route(block_mask, batch: int, num_qo_heads: int, q_len: int, kv_len: int, device) -> Route:
    """The route of a block mask; its tile states are read only where a route needs them (a
    hinted library mask with one map for every batch entry and head never does: a LazyBlockMask
    then stays unbuilt)."""
    tiles = []

    def tile_states():
        if not tiles:
            tiles.append(block_mask.states.to(device))
        return tiles[0]

    block_q, block_kv = block_mask.BLOCK_SIZE
    uses_b, uses_h = mask_dependence(block_mask.mask_mod, batch, num_qo_heads, q_len, kv_len, device)
    map_b, map_h = block_mask.shape[:2]
    # a block mask built with explicit B or H (torch's create_block_mask(mod, B, H, ...) idiom) of
    # a mod that uses neither holds equal copies: plan it once (tables made elsewhere may differ)
    per_head = uses_h or not (map_h == 1 or bool((tile_states() == tile_states()[:, :1]).all()))
    same_for_all = not per_head and not uses_b and (map_b == 1 or bool((tile_states() == tile_states()[:1]).all()))
    # a mask_mod's own lowering hint stands for the tables only when they were computed from it
    # (after `block_mask.mask_mod = other` the tables rule, as in torch, and are read)
    hints = block_mask.tables_match_mask_mod
    if same_for_all:
        lowered = column_lowering(block_mask.mask_mod, q_len, kv_len) if ENABLE_COLUMN_LOWERING and hints else None
        if lowered is not None:
            return Route("bands+columns", False, lowered[0], lowered[1].to(device))
        bands = (hints and hinted_bands(block_mask.mask_mod, q_len, kv_len)) or find_bands(
            tile_states()[0, 0], block_mask.mask_mod, q_len, kv_len, block_q, block_kv)
        if bands:
            return Route("bands", False, bands)
        found = find_window_columns(tile_states()[0, 0], block_mask.mask_mod, q_len, kv_len, block_q, block_kv) \
            if ENABLE_COLUMN_LOWERING else None
        if found is not None:
            return Route("bands+columns", False, found[0], found[1].to(device))
    if per_head and ENABLE_HEAD_BANDS and not uses_b and (map_b, map_h) == (1, num_qo_heads):
        per_head_bands = []
        for head in range(num_qo_heads):
            bands = find_bands(tile_states()[0, head], _at_head(block_mask.mask_mod, head), q_len, kv_len, block_q, block_kv)
            if not bands:
                break
            per_head_bands.append(bands)
        else:
            return Route("bands-per-head", True, head_bands=per_head_bands)
    return Route("tiles-per-head" if per_head else "tiles", per_head)


def _at_head(mask_mod, head: int):
    """The mask of one query head, for the band finder (which evaluates h = 0)."""
    def at_head(b, h, q_idx, kv_idx):
        return mask_mod(b, torch.full_like(h, head), q_idx, kv_idx)

    return at_head
