"""Plan, then run: what a mask becomes on FlashInfer, decided once, as an immutable value.

plan_attention() chooses the route (route.py) and plans everything the launches need (bands,
key columns, splits, tile tables) on the host, in pure torch; the FlashInfer backend builds its
runners from the result in one pass (flashinfer_backend.FlashInferPlan). print() of a plan shows
the route and each launch with what it covers; BlockMask.plan() gives one without a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bands import Band, band_launches, band_tile_states, plain_band_launch
from ..masks.block_build import EMPTY, PARTIAL
from .columns import column_prefix_counts, column_states, compact_mask_mod
from .far_bias import plan_split
from .native_soft_cap import native_soft_cap
from .planner import GATHER_TILE, TilePlan, plan_causal_diagonal, plan_tiles, plan_tiles_head_major
from .route import Route, choose_route
from .score_folding import fold_score_mod, score_scale_factor
from ..core.trace import trace

ROUTES = ("bands", "bands+columns", "bands-per-head", "tiles", "tiles-causal", "tiles-per-head",
          "tiles-per-head-causal")
# the routes a caller may ask for (kernel_options={"ROUTE": ...}); a tiles route turns causal by itself
FORCEABLE_ROUTES = ("bands", "bands+columns", "bands-per-head", "tiles", "tiles-per-head")


@dataclass(frozen=True)
class ColumnPlan:
    """Key columns beside the bands (attamba's chunk ends, streaming's sinks): their positions,
    the mask over them that the bands leave, and either the rows' column counts (one Triton
    kernel attends and merges them) or tiles of one-key pages (a FlashInfer launch, then merge_state)."""
    positions: torch.Tensor
    mask_mod: object
    counts: torch.Tensor | None = None
    tiles: TilePlan | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """route: one of ROUTES. shape: (batch, q_len, kv_len, query heads, key heads, head_dim).
    band_kernel: how the bands run ('plain', 'soft-cap', 'score-mod' or 'far-split').
    head_bands: bands-per-head, ((query heads, key heads, bands), ...). tiles: the tile plan of
    the tiles routes (head_major: every head in one launch set). score_mod: the tiles and
    columns run a compiled score_mod variant (on tiles, unless soft_cap: a soft cap over whole
    tiles of 128 alone, which Hopper's tile-gather kernel runs as FlashInfer's own).
    score_factor: the score_mod was c * score and runs as FlashInfer's own scale times c (no
    variant), else None."""
    route: str
    shape: tuple
    block_size: tuple
    bands: tuple = ()
    band_kernel: str | None = None
    soft_cap: float | None = None
    far_split: tuple | None = None      # (near bands, far bands, ConstantBeyond hint)
    columns: ColumnPlan | None = None
    head_bands: tuple = ()
    tiles: TilePlan | None = None
    head_major: bool = False
    score_mod: bool = False
    score_factor: float | None = None

    def launches(self) -> list:
        """One line per kernel launch or merge (a per-band or per-batch-entry call counts once,
        with its count), numbered as tile_map() numbers them."""
        return [text for text, _ in self._entries()]

    def tile_map(self) -> torch.Tensor:
        """int64 [query tiles, key tiles] of batch entry 0 and query head 0: the number (from 1,
        as launches() lists them) of the launch that computes each tile; 0 where none does."""
        batch, q_len, kv_len = self.shape[:3]
        bq, bkv = self.block_size
        owners = torch.zeros(-(-q_len // bq), -(-kv_len // bkv), dtype=torch.int64)
        for n, (_, paint) in enumerate(self._entries(), 1):
            if paint is not None:
                covered = paint(owners.shape).cpu()
                owners[covered & (owners == 0)] = n
        return owners

    def _entries(self) -> list:
        """(line, paint) per launch or merge; paint(shape) gives bool [nq, nkv] of the tiles of
        batch entry 0, head 0 that the launch computes (None for a merge)."""
        batch, q_len, kv_len = self.shape[:3]
        bq, bkv = self.block_size
        entries = []

        def bands_paint(bands):
            def paint(shape):
                covered = torch.zeros(shape, dtype=torch.bool)
                for band in bands:
                    covered |= band_tile_states(band, q_len, kv_len, bq, bkv, *shape, "cpu") != EMPTY
                return covered
            return paint

        if self.bands:
            if self.far_split is not None:
                near, far, hint = self.far_split
                entries.append((_band_line(f"compiled score_mod prefill (keys within {hint.reach} of the query)", near,
                                           len(band_launches(near, batch, q_len, kv_len))), bands_paint(near)))
                far_calls = batch if len(far) == 1 and far[0].window_left < 0 else batch * len(far)
                entries.append((_band_line("FlashInfer prefill (keys beyond the reach: a constant bias, added to "
                                           "the LSE), merged by log-sum-exp", far, far_calls), bands_paint(far)))
            elif self.band_kernel == "score-mod":
                entries.append((_band_line("compiled score_mod prefill", self.bands,
                                           len(band_launches(self.bands, batch, q_len, kv_len))), bands_paint(self.bands)))
            else:
                kernel = "FlashInfer prefill" + (f" with its logits soft cap {self.soft_cap:g}" if self.soft_cap else "")
                entries.append((_band_line(kernel, self.bands, _plain_calls(self.bands, batch, q_len, kv_len)),
                                bands_paint(self.bands)))
        if self.columns is not None:
            columns = self.columns
            n = columns.positions.numel()
            if columns.counts is not None:
                def paint(shape):
                    # each row sees a prefix of the columns: a tile's rows see its longest one
                    counts = torch.nn.functional.pad(columns.counts.cpu().long(), (0, shape[0] * bq - q_len))
                    per_tile = torch.arange(n).view(1, -1) < counts.view(shape[0], bq).amax(1, keepdim=True)
                    covered = torch.zeros(shape, dtype=torch.bool)
                    covered[:, columns.positions.cpu().long() // bkv] |= per_tile
                    return covered
                entries.append((f"{n} key columns (gathered keys beside the bands), attended and merged into the "
                                f"bands' rows by one Triton kernel", paint))
            else:
                key_tiles = columns.positions.cpu().long() // bkv
                entries += _tile_entries(f"{n} key columns as one-key pages", columns.tiles, self.score_mod,
                                         lambda pages: key_tiles[pages % n])
                entries.append(("merge_state: the columns joined to the bands by log-sum-exp", None))
        for heads, kv_heads, bands in self.head_bands:
            entries.append((_band_line(f"query heads {_heads(heads)} (key heads {_heads(kv_heads)}): FlashInfer "
                                       f"prefill", bands, _plain_calls(bands, batch, q_len, kv_len)),
                            bands_paint(bands) if 0 in heads else None))
        if self.tiles is not None:
            what = "tiles of every head (head-major requests)" if self.head_major else "tiles"
            nkv = -(-kv_len // bkv)
            entries += _tile_entries(what, self.tiles, self.score_mod, lambda pages: pages % nkv, self.soft_cap)
        return entries

    def __str__(self) -> str:
        batch, q_len, kv_len, hq, hkv, d = self.shape
        head = (f"AttentionPlan: route {self.route}; batch {batch}, Q_LEN {q_len}, KV_LEN {kv_len}, "
                f"heads {hq}/{hkv}, head_dim {d}, BLOCK_SIZE {tuple(self.block_size)}")
        if self.score_factor is not None:
            head += f"; score_mod folded into the scale (x {self.score_factor:g})"
        lines = [f"  {n}. {line}" for n, line in enumerate(self.launches(), 1)]
        return "\n".join([head] + (lines or ["  no launch: no query sees a key (zeros, LSE -inf)"]))

    __repr__ = __str__


def _heads(heads) -> str:
    heads = list(heads)
    return str(heads[0]) if len(heads) == 1 else f"{heads[0]}..{heads[-1]}" if heads == list(
        range(heads[0], heads[-1] + 1)) else ",".join(map(str, heads))


def _band(band: Band) -> str:
    shape = "causal" if band.causal else "full"
    if band.window_left >= 0:
        shape += f", window {band.window_left + 1}"
    return f"queries {band.q_start}..{band.q_end} x keys {band.kv_start}..{band.kv_end} ({shape})"


def _band_line(kernel: str, bands, calls: int) -> str:
    calls = "one launch" if calls == 1 else f"{calls} launches"
    return f"{kernel}, {calls}: " + "; ".join(_band(b) for b in bands)


def _plain_calls(bands, batch: int, q_len: int, kv_len: int) -> int:
    """Launches of FlashInfer's plain kernels (flashinfer_backend._BandRunner): one ragged launch,
    one single call for one band over everything, else one call per (batch entry, band)."""
    if plain_band_launch(bands, batch, q_len, kv_len) is not None:
        return 1
    whole = batch == 1 and len(bands) == 1 and bands[0].q_start == 0 and bands[0].q_end == q_len
    return 1 if whole else batch * len(bands)


def _tile_entries(what: str, tiles: TilePlan, score_mod: bool, key_tile, soft_cap: float | None = None) -> list:
    """(line, paint) per launch of a tile plan, and the merge that joins them. key_tile: the key
    tile of each page id (of batch entry 0 and head 0, whose requests come first). The pages are
    the launch's key tiles: on Hopper, with tiles of 128 keys, the whole tiles' launch gathers them
    on the ragged kernel (backends/tile_gather.py)."""
    variant = (f", FlashInfer's logits soft cap {soft_cap:g} where the Hopper gather kernel runs it, else "
               f"compiled" if soft_cap is not None else ", compiled score_mod" if score_mod else "")
    requests = tiles.qo_len.numel()

    def paint_of(launch):
        def paint(shape):
            nq = shape[0]
            pages = launch.kv_indices[:int(launch.kv_indptr[nq])].cpu().long()   # requests 0..nq-1: b 0, head 0
            real = ~launch.dummy[:pages.numel()].cpu()
            covered = torch.zeros(shape, dtype=torch.bool)
            covered[launch.tile_request[:pages.numel()].cpu()[real], key_tile(pages[real])] = True
            return covered
        return paint

    entries = []
    if tiles.full is not None:
        kind = "causal: each request's diagonal tile last" if tiles.causal else "unmasked"
        entries.append((f"{what}: whole-tile prefill ({kind}{variant}) over {int((~tiles.full.dummy).sum())} full tiles, "
                        f"{requests} requests", paint_of(tiles.full)))
    if tiles.partial is not None:
        entries.append((f"{what}: paged prefill with a bit mask{variant} over {int((~tiles.partial.dummy).sum())} "
                        f"partial tiles, {requests} requests", paint_of(tiles.partial)))
    if len(entries) == 2:
        entries.append(("merge_state: the two joined by log-sum-exp", None))
    return entries or [(f"{what}: no tile to launch (zeros, LSE -inf)", None)]


def plan_attention(block_mask, batch: int, q_len: int, kv_len: int, num_qo_heads: int, num_kv_heads: int,
                   head_dim: int, device, score_mod=None, merge_kernel: bool = False,
                   route: str | None = None, scale: float | None = None) -> AttentionPlan:
    """The plan of one problem. merge_kernel: the Triton column-merge kernel can run here (the
    key columns then take it, without a score_mod). route: one of FORCEABLE_ROUTES to take
    instead of the planner's choice (for debugging: the tiles routes serve every mask), or None.
    scale: the call's (None: 1/sqrt(head_dim)); a score_mod that is c * score folds into it when
    the product is a scale FlashInfer's kernels take (plan.score_factor = c)."""
    device = torch.device(device)
    block_q, block_kv = block_mask.BLOCK_SIZE
    shape = (batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim)
    base = 1.0 / math.sqrt(head_dim) if scale is None else scale
    factor = None
    if score_mod is not None and fold_score_mod(score_mod, base)[0] is None:
        score_mod, factor = None, score_scale_factor(score_mod)
    common = dict(shape=shape, block_size=(block_q, block_kv), score_factor=factor)
    forced, route = route, choose_route(block_mask, batch, num_qo_heads, q_len, kv_len, device)
    if score_mod is not None and route.head_bands is not None:
        # the bands-per-head launches take no score_mod variant: the tiles route's do
        route = Route("tiles-per-head", True)
    if forced is not None:
        route = _forced(route, forced, score_mod is not None)
    if score_mod is not None:
        # a mod no kernel takes raises here as the call would (after a forced route's own
        # check): a plan shown is a plan that runs
        trace(score_mod, "score_mod")
    if route.bands:
        columns = None
        if route.kind == "bands+columns":
            columns = _plan_columns(route, block_mask, batch, q_len, num_qo_heads, device,
                                    merge_kernel and score_mod is None)
        kind = "bands+columns" if columns is not None else "bands"
        bands = tuple(route.bands)
        if score_mod is None:
            return AttentionPlan(kind, bands=bands, band_kernel="plain", columns=columns, **common)
        cap = native_soft_cap(score_mod, num_qo_heads)
        if cap is not None:   # FlashInfer's own soft-capped kernels
            return AttentionPlan(kind, bands=bands, band_kernel="soft-cap", soft_cap=cap, columns=columns,
                                 score_mod=True, **common)
        split = plan_split(score_mod, route.bands, num_qo_heads)
        return AttentionPlan(kind, bands=bands, band_kernel="far-split" if split else "score-mod", far_split=split,
                             columns=columns, score_mod=True, **common)
    if route.head_bands is not None:
        groups = tuple((tuple(h), tuple(kv), tuple(b)) for h, kv, b in head_band_groups(
            route.head_bands, num_qo_heads // num_kv_heads))
        return AttentionPlan("bands-per-head", head_bands=groups, **common)
    states = block_mask.states.to(device)   # the tiles routes (a band route never builds a lazy mask's tables)
    if route.per_head:
        head_states = states.transpose(0, 1).expand(num_qo_heads, states.shape[0], *states.shape[2:])
        tiles = plan_tiles_head_major(head_states, batch, q_len, block_q, block_kv, num_qo_heads // num_kv_heads,
                                      kv_len)
        head_major = True
    else:
        head_states = states[:, 0]
        tiles = plan_causal_diagonal(head_states, block_mask.mask_mod, 0, batch, q_len, kv_len, block_q, block_kv) \
            or plan_tiles(head_states, batch, q_len, block_q, block_kv, kv_len)
        head_major = False
    kind = "tiles-per-head" if route.per_head else "tiles"
    # a soft cap where only whole tiles of the gather kernel's width launch (no bit-masked partial
    # launch to compile it into): the Hopper tile-gather kernel's own soft cap may run it
    # (FlashInferPlan decides, and runs the compiled score_mod where it does not)
    cap = (native_soft_cap(score_mod, num_qo_heads)
           if score_mod is not None and tiles.partial is None and block_kv == GATHER_TILE else None)
    return AttentionPlan(kind + ("-causal" if tiles.causal else ""), tiles=tiles, head_major=head_major,
                         score_mod=score_mod is not None, soft_cap=cap, **common)


def _forced(chosen: Route, wanted: str, has_score_mod: bool) -> Route:
    """The route asked for: a tiles route always (tiles-per-head for any mask, tiles for one the
    same for every head), a bands route only where the planner found it."""
    if wanted not in FORCEABLE_ROUTES:
        raise ValueError(f"kernel_options['ROUTE'] must be one of {FORCEABLE_ROUTES}, got {wanted!r}")
    if wanted == "tiles-per-head":
        return Route("tiles-per-head", True)
    if wanted == "tiles":
        if chosen.per_head:
            raise ValueError("kernel_options['ROUTE']='tiles' but this mask differs per head; use 'tiles-per-head'")
        return Route("tiles", False)
    if chosen.kind == "bands+columns" and wanted == "bands":
        raise ValueError("kernel_options['ROUTE']='bands' but this mask needs key columns beside its bands: "
                         "use 'bands+columns' or a tiles route")
    if chosen.kind != wanted:
        why = " (a score_mod runs per-head masks on tiles)" if has_score_mod and wanted == "bands-per-head" else ""
        serves = "'tiles-per-head' serves" if chosen.per_head else "the tiles routes ('tiles', 'tiles-per-head') serve"
        raise ValueError(f"kernel_options['ROUTE']={wanted!r} but the planner found no such lowering of this mask "
                         f"(it chose {chosen.kind!r}){why}; {serves} every mask")
    return chosen


def _plan_columns(route, block_mask, batch, q_len, num_qo_heads, device, merge_kernel: bool) -> ColumnPlan | None:
    """The key columns' plan, or None when the bands already cover everything they would add."""
    positions = route.positions
    compact = compact_mask_mod(block_mask.mask_mod, route.bands, positions)
    if merge_kernel:
        counts = column_prefix_counts(compact, q_len, positions.numel(), device)
        if counts is not None:
            return ColumnPlan(positions, compact, counts=counts)
    block_q = block_mask.BLOCK_SIZE[0]
    states = column_states(compact, q_len, positions.numel(), block_q, device)
    if not bool((states == PARTIAL).any()):
        return None
    return ColumnPlan(positions, compact, tiles=plan_tiles(states, batch, q_len, block_q, 1))


def head_band_groups(head_bands, group_size: int):
    """[(query heads, their key heads, bands)]: query heads with equal bands share one band launch.
    A launch needs the same number of its query heads on each of its key heads (GQA); a set of
    heads that is not so regular is split into one launch per key head."""
    by_bands = {}
    for head, bands in enumerate(head_bands):
        by_bands.setdefault(tuple(bands), []).append(head)
    groups = []
    for bands, heads in by_bands.items():
        per_kv = {}
        for head in heads:
            per_kv.setdefault(head // group_size, []).append(head)
        if len({len(h) for h in per_kv.values()}) == 1:
            kv_heads = sorted(per_kv)
            groups.append(([h for kv in kv_heads for h in per_kv[kv]], kv_heads, list(bands)))
        else:
            groups += [(per_kv[kv], [kv], list(bands)) for kv in sorted(per_kv)]
    return groups
