"""The tiles route's full tiles on FlashInfer's ragged (TMA) kernel, each request gathering its key
tiles from the whole key tensor, on Hopper.

The tiles route lists each query tile's key tiles as pages of a paged launch (planning/planner.py).
FlashInfer's Hopper paged kernel loads its pages a row at a time with cp.async into key tiles of 96
(head_dim 128), where its ragged kernel loads whole tiles of 128 keys with the TMA, which ran the
bench's random tiles faster (docs/benchmarks.md, session 32). This runs FlashInfer's ragged kernel (its DefaultAttention variant, its fa3
parameters) built against a copy of its headers in which the producer reads each request's key tiles
from a table (compile/patched_headers.py, "tile_gather"): the same launch as the paged one, with the
same requests, tile lists and masks. Each request's kv_len is the keys it lists, so FlashInfer's
causal mask (bottom right) and the last tile's length apply as they do to a paged request's pages.
Only the module's ragged kernel may run: its paged kernels (built with it, never called) read their
key tiles in FlashInfer's own way, and its tile sizes are changed beside them.
"""
from __future__ import annotations

import hashlib

import torch

from ..compile import lean_modules, patched_headers
from ..compile.native_copy import FLASHINFER_SCALARS, FLASHINFER_TENSORS
from ..planning.planner import GATHER_TILE as TILE   # the module's key tile: a block mask's must be as wide
from ..planning.ragged import planned_ragged
from . import own_modules
STARTS, TILES = "ffi_tile_start", "ffi_tiles"
_DECL = "#include<flashinfer/attention/hopper/variants.cuh>\n" + patched_headers.MARKERS["tile_gather"] + "\n"
# the tables first, so that they take run()'s first extra arguments whichever of FlashInfer's own
# optional tensors its wrapper fills itself (as head_windows' module)
_TENSORS = ([STARTS, TILES, *FLASHINFER_TENSORS[0]], ["int32_t", "int32_t", *FLASHINFER_TENSORS[1]])
_SCALARS = FLASHINFER_SCALARS


def jit_args(dtype, head_dim: int, soft_cap: bool = False) -> list:
    """FlashInfer's gen_customize_batch_prefill_module arguments: its fa3 DefaultAttention, no window;
    with soft_cap, FlashInfer's logits soft cap (its DefaultAttention<true>, the cap a run argument).
    The module's name hashes its code, parameters and patches: a changed one never loads a stale build."""
    lean_modules.install()
    variant = f"DefaultAttention<{'true' if soft_cap else 'false'}>"
    parts = (_DECL, _TENSORS, _SCALARS, patched_headers.patch_hash("tile_gather")) + ((variant,) if soft_cap else ())
    code = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    uri = f"ffi_tilegather{'_softcap' if soft_cap else ''}_{code}_{str(dtype).split('.')[-1]}_d{head_dim}"
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim, *_TENSORS, *_SCALARS, variant, _DECL, 0, False,
            soft_cap]


def serves(dtype, head_dim: int, block_kv: int) -> bool:
    """16-bit, a head_dim whose key tile the patches make 128, key tiles of that width, and
    FlashInfer's headers here take the patches (the caller checks Hopper)."""
    return (dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128) and block_kv == TILE
            and patched_headers.include_root("tile_gather") is not None)


def listed_kv_indptr(launch, block_kv: int) -> torch.Tensor:
    """int32 [requests + 1], on the host: the requests' kv_indptr as the kernel sees them, each
    request's listed tiles side by side (its last tile as long as its last page)."""
    counts = (launch.kv_indptr[1:] - launch.kv_indptr[:-1]).long().cpu()
    keys = torch.where(counts > 0, (counts - 1) * block_kv + launch.last_page_len.long().cpu(), 0)
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    indptr[1:] = keys.cumsum(0)
    assert int(indptr[-1]) <= torch.iinfo(torch.int32).max, "built_launch keeps launches within int32"
    return indptr.to(torch.int32)


class TileGatherLaunch:
    """One launch over a tile plan's full tiles (with the causal diagonal where the plan has one):
    run(q, (k_pages, v_pages)) gives base-2 (out, lse), as the paged wrapper it stands for."""

    def __init__(self, tile_plan, launch, shape, dtype, scale: float, workspace, soft_cap: float | None = None):
        """soft_cap: FlashInfer's logits soft cap on the scaled scores (its soft-capped module), or None."""
        head_dim = shape[-1]
        # the module holds nothing of a plan (its tables come at run time): its planned wrapper
        # may be shared like FlashInfer's own
        self.wrapper = planned_ragged(workspace, "fa3", tile_plan.qo_indptr.cpu(), listed_kv_indptr(launch, TILE), shape,
                                      dtype, tile_plan.causal, jit_args=jit_args(dtype, head_dim, soft_cap is not None),
                                      balance_window=False, shared_module=True)
        self.starts = launch.kv_indptr[:-1].to(workspace.device, torch.int32).contiguous()
        self.tiles = launch.kv_indices.to(workspace.device, torch.int32).contiguous()
        self.scale = float(scale)
        self.soft_cap = 0.0 if soft_cap is None else float(soft_cap)

    def run(self, q, kv_pages, return_lse: bool = True):
        """q [N, Hq, D]; kv_pages: keys and values as pages [tiles, 128, Hkv, D] (page id = tile id)."""
        k_pages, v_pages = kv_pages
        return self.wrapper.run(q, k_pages.flatten(0, 1), v_pages.flatten(0, 1), self.starts, self.tiles,
                                None, None, None, None, self.soft_cap, self.scale, 1.0, 0, return_lse=return_lse)


def built_launch(tile_plan, launch, block_kv: int, shape, dtype, scale: float, workspace,
                 soft_cap: float | None = None):
    """A TileGatherLaunch, or None when its module does not serve (key tiles of 128, a dtype and
    head_dim it takes, headers that take the patches) or does not build here (said once; the
    first ask compiles it where it is neither prebuilt nor cached, about a minute): the caller runs
    FlashInfer's paged kernel (with a soft cap, the compiled score_mod)."""
    head_dim, capped = shape[-1], soft_cap is not None
    if not serves(dtype, head_dim, block_kv) or not own_modules.builds(
            jit_args(dtype, head_dim, capped),
            f"the tile-gather kernel ({dtype}, head_dim {head_dim}{', soft cap' if capped else ''})",
            "whole tiles run on FlashInfer's paged kernel" + (" (a compiled soft cap)" if capped else "")):
        return None
    # the listed keys' offsets are FlashInfer's int32 (past 2^31 - 1 they would wrap: about 16
    # million tiles, a whole mask at half a million tokens); the paged launch counts pages instead
    if int(launch.kv_indptr[-1]) * TILE > torch.iinfo(torch.int32).max:
        return None
    return TileGatherLaunch(tile_plan, launch, shape, dtype, scale, workspace, soft_cap)
