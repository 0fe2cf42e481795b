"""Which FlashInfer route a planned problem takes (pure torch: plot() and tests use it on CPU).

  bands          the mask is a few native FlashInfer requests (bands.py)
  bands+columns  a causal window band plus gathered key columns (columns.py): attamba and streaming
                 by their hint, any other mask of that shape found and verified from the mask itself
  tiles          whole tiles on fa3, partial tiles on fa2 with a bit mask, merged
                 (tiles-causal: partial tiles are only causal diagonals: one causal fa3 launch)
  tiles-per-head the same, for a mask that differs per head (every head in one launch set)
  bands-per-head every head's mask is a few native requests: heads with the same bands run as
                 one band launch over those heads (about twice as fast as tiles-per-head for
                 per-head windows)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bands import find_bands, hinted_bands
from .columns import column_lowering, find_window_columns
from ..core.mask_eval import mask_dependence
from ..masks.block_build import EMPTY, FULL
from ..masks.tile_bounds import classify_tiles


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
        lowered = column_lowering(block_mask.mask_mod, q_len, kv_len) if hints else None
        if lowered is not None:
            return Route("bands+columns", False, lowered[0], lowered[1].to(device))
        bands = (hints and hinted_bands(block_mask.mask_mod, q_len, kv_len)) or find_bands(
            tile_states()[0, 0], block_mask.mask_mod, q_len, kv_len, block_q, block_kv)
        if bands:
            return Route("bands", False, bands)
        # the column finder reads the mask_mod alone: tables made otherwise (a FULL tile the mask
        # partly hides, an EMPTY one it shows, a mask_mod assigned afterwards) must say the same
        found = None
        if hints or _tables_agree(tile_states()[0, 0], block_mask.mask_mod, q_len, kv_len, block_q, block_kv, device):
            found = find_window_columns(tile_states()[0, 0], block_mask.mask_mod, q_len, kv_len, block_q, block_kv)
        if found is not None:
            return Route("bands+columns", False, found[0], found[1].to(device))
    if per_head and not uses_b and (map_b, map_h) == (1, num_qo_heads):
        per_head_bands = []
        for head in range(num_qo_heads):
            bands = find_bands(tile_states()[0, head], _at_head(block_mask.mask_mod, head), q_len, kv_len, block_q, block_kv)
            if not bands:
                break
            per_head_bands.append(bands)
        else:
            return Route("bands-per-head", True, head_bands=per_head_bands)
    return Route("tiles-per-head" if per_head else "tiles", per_head)


def _tables_agree(states, mask_mod, q_len: int, kv_len: int, block_q: int, block_kv: int, device) -> bool:
    """Whether tile states made elsewhere say what the mask_mod says: a FULL tile fully visible,
    an EMPTY one hidden (a PARTIAL one is masked, so any tile may be listed PARTIAL)."""
    own = classify_tiles(mask_mod, 1, 1, q_len, kv_len, block_q, block_kv, device)[0, 0]
    if own.shape != states.shape:
        return False
    made = states.to(own.device)
    return not bool((((made == FULL) & (own != FULL)) | ((made == EMPTY) & (own != EMPTY))).any())


def _at_head(mask_mod, head: int):
    """The mask of one query head, for the band finder (which evaluates h = 0)."""
    def at_head(b, h, q_idx, kv_idx):
        return mask_mod(b, torch.full_like(h, head), q_idx, kv_idx)

    return at_head
