"""Interval lowering: find where a mask is exactly what FlashInfer's kernels do natively.

A Band is one FlashInfer request: query rows [q_start, q_end) against keys [kv_start, kv_end),
either all visible, or causal (bottom-right aligned, as FlashInfer aligns it), optionally with
a left window. Its visible set, in global positions, with delta = kv_end - q_end:

    kv_start <= kv < kv_end  and  (not causal or kv <= q + delta)
                             and  (window_left < 0 or kv >= q + delta - window_left)

find_bands() infers bands from the tile states plus the mask on two probe rows per query
tile, with no hint from the mask's name, then verifies them exactly: every tile's state must
match the band's, and every partial tile's bits must match element for element. So a user's
own causal or sliding-window mask_mod is lowered as surely as the library's. When the mask is a
conjunction of unit-slope comparisons (linear_masks.py), its probe rows and the check come from
its exact row intervals instead of evaluating elements. A query tile whose
rows change pattern inside it (a prefix-LM prefix that is not a multiple of the tile) is split
row by row into a few runs, and the tiles it shares between bands are checked element by element.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.block_build import EMPTY, FULL, PARTIAL, tile_elements
from ..core.mask_eval import INDEX_DTYPE, evaluate_mask_mod
from .linear_masks import exact_row_intervals
from ..core.hints import stated_hint

VERIFY_CHUNK_ELEMENTS = 1 << 24
MAX_RUNS_PER_SPLIT_TILE = 4
MAX_SPLIT_TILES = 16


@dataclass(frozen=True)
class Band:
    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    causal: bool = False
    window_left: int = -1

    @property
    def delta(self) -> int:
        return self.kv_end - self.q_end

    def visible(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        keep = (kv >= self.kv_start) & (kv < self.kv_end) & (q >= self.q_start) & (q < self.q_end)
        if self.causal:
            keep = keep & (kv <= q + self.delta)
        if self.window_left >= 0:
            keep = keep & (kv >= q + self.delta - self.window_left)
        return keep


def band_tile_states(band: Band, q_len: int, kv_len: int, block_q: int, block_kv: int, nq: int, nkv: int,
                     device) -> torch.Tensor:
    """Exact tile states int8 [nq, nkv] of one band's visible set, in classify_tiles' convention."""
    qt = torch.arange(nq, device=device).view(-1, 1)
    kt = torch.arange(nkv, device=device).view(1, -1)
    q0 = torch.clamp(qt * block_q, min=band.q_start)
    q1 = torch.clamp(torch.clamp((qt + 1) * block_q, max=q_len), max=band.q_end) - 1  # last row, inclusive
    k0 = kt * block_kv
    k1 = (kt + 1) * block_kv - 1  # last key, inclusive (may be padding)
    d, w = band.delta, band.window_left
    # The band is kv - q in [d - w, d] (each side only when windowed / causal) on its key range;
    # over the tile's rectangle of rows and keys, kv - q takes every value in
    # [keys_lo - q1, keys_hi - q0], so the tile meets the band exactly when that interval meets it.
    keys_lo = torch.clamp(k0, min=band.kv_start)
    keys_hi = torch.clamp(k1, max=min(band.kv_end, kv_len) - 1)
    nonempty = (q1 >= q0) & (keys_hi >= keys_lo)
    if band.causal:
        nonempty = nonempty & (keys_lo - q1 <= d)
    if w >= 0:
        nonempty = nonempty & (keys_hi - q0 >= d - w)
    rows_exist = q1 >= q0
    whole_rows = (qt * block_q >= band.q_start) & (torch.clamp((qt + 1) * block_q, max=q_len) <= band.q_end)
    full = rows_exist & whole_rows & (k1 < min(band.kv_end, kv_len)) & (k0 >= band.kv_start)
    if band.causal:
        full = full & (k1 <= q0 + d)
    if w >= 0:
        full = full & (k0 >= q1 + d - w)
    return torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)


def _row_intervals(states, mask_mod, rows, q_len, kv_len, block_kv, device,
                   chunk_elements: int = VERIFY_CHUNK_ELEMENTS):
    """(lo, hi, count) of the visible keys of each probe row (rows[i] lies in a query tile whose
    key tile states are states[i]): full tiles count from their states, only partial tiles are
    evaluated, on that row alone. lo is nkv * block_kv and hi -1 for a row that sees nothing."""
    nkv = states.shape[1]
    none_lo = nkv * block_kv
    tile_start = torch.arange(nkv, device=device) * block_kv
    tile_keys = torch.clamp(kv_len - tile_start, max=block_kv)   # in-range keys of each key tile
    full = states == FULL
    count = (full * tile_keys).sum(1)
    lo = torch.where(full, tile_start, none_lo).amin(1)
    hi = torch.where(full, tile_start + tile_keys - 1, -1).amax(1)
    row_of, tile_of = (states == PARTIAL).nonzero(as_tuple=True)
    zero = torch.zeros(1, 1, dtype=INDEX_DTYPE, device=device)
    step = torch.arange(block_kv, device=device)
    per_chunk = max(1, chunk_elements // block_kv)
    for p0 in range(0, row_of.numel(), per_chunk):
        r, t = row_of[p0:p0 + per_chunk], tile_of[p0:p0 + per_chunk]
        kv = tile_start[t].view(-1, 1) + step
        q = rows[r].view(-1, 1).to(INDEX_DTYPE)
        bits = evaluate_mask_mod(mask_mod, zero, zero, q, kv.clamp(max=kv_len - 1).to(INDEX_DTYPE)) & (kv < kv_len)
        count = count.index_add(0, r, bits.sum(1))
        lo = lo.scatter_reduce(0, r, torch.where(bits, kv, none_lo).amin(1), "amin")
        hi = hi.scatter_reduce(0, r, torch.where(bits, kv, -1).amax(1), "amax")
    return lo, hi, count


def _exact_probes(lo, hi, rows, none_lo):
    """_row_intervals' (lo, hi, count) of the probe rows, read from a linear mask's exact intervals."""
    lo, hi = lo[rows], hi[rows]
    seen = lo <= hi
    return (torch.where(seen, lo, none_lo), torch.where(seen, hi, -1),
            torch.where(seen, hi - lo + 1, 0))


def _tile_band(first, last, lo0, hi0, lo1, hi1):
    """What one query tile's first and last rows ([lo, hi] visible keys each) suggest, as a key
    that equal neighbouring tiles share: ("full", kv_start, kv_end), ("causal", delta, kv_start)
    or ("window", delta, window_left); None when neither fits."""
    if lo0 == lo1 and hi0 == hi1:
        return ("full", lo1, hi1 + 1)
    delta = hi1 - last
    if hi0 - first != delta:
        return None
    if lo0 == lo1:
        return ("causal", delta, lo1)
    return ("window", delta, hi1 - lo1)


def _key_fits(key, first, last, lo0, hi0, lo1, hi1) -> bool:
    """Whether a query tile's probe rows are what a neighbour's key predicts. A tile of one row
    (the tail of a sequence) proposes "full" by itself, though it continues a causal band."""
    kind, a, b = key
    if kind == "full":
        return (lo0, hi0, lo1, hi1) == (a, b - 1, a, b - 1)
    if hi0 != first + a or hi1 != last + a:
        return False
    if kind == "causal":
        return lo0 == lo1 == b
    return lo0 == max(0, first + a - b) and lo1 == max(0, last + a - b)


def _band_of(key, q_start: int, q_end: int, kv_len: int) -> Band | None:
    """The band a run of query tiles [q_start, q_end) with one key stands for, or None if it
    would read past the keys or leave its first row with nothing to see."""
    kind, a, b = key
    if kind == "full":
        return Band(q_start, q_end, a, b)
    delta = a
    kv_start, window = (b, -1) if kind == "causal" else (max(0, q_start + delta - b), b)
    if q_end + delta > kv_len or q_start + delta < kv_start:
        return None
    return Band(q_start, q_end, kv_start, q_end + delta, True, window)


def find_bands(states: torch.Tensor, mask_mod, q_len: int, kv_len: int, block_q: int, block_kv: int,
               verify_chunk_elements: int = VERIFY_CHUNK_ELEMENTS) -> list[Band] | None:
    """Bands covering every non-empty query tile of a [nQ, nKV] state map, or None."""
    device = states.device
    nq = states.shape[0]
    first_rows = torch.arange(nq, device=device) * block_q
    last_rows = torch.clamp(first_rows + block_q, max=q_len) - 1
    # both probe rows of every tile in one evaluation, and everything the loop below reads in one
    # host copy (an .item() per tile was a GPU sync per tile: 512 of them at 32768 tokens)
    probes = torch.cat([first_rows, last_rows])
    exact = exact_row_intervals(mask_mod, q_len, kv_len)   # None unless the mask is linear (linear_masks.py)
    if exact is not None:
        lo, hi, n = _exact_probes(*exact, probes.cpu(), states.shape[1] * block_kv)
        lo, hi, n = lo.to(device), hi.to(device), n.to(device)
    else:
        lo, hi, n = _row_intervals(torch.cat([states, states]), mask_mod, probes, q_len, kv_len, block_kv, device)
    table = torch.stack([lo[:nq], hi[:nq], n[:nq], lo[nq:], hi[nq:], n[nq:], first_rows, last_rows,
                         (states != EMPTY).any(1).long()]).tolist()
    # A tile whose probe rows agree can still hide a band edge between them; verification names
    # the query tiles that failed, which are then split row by row (a few rounds at most).
    split_tiles: set[int] = set()
    for _ in range(3):
        segments = _segments(states, mask_mod, q_len, kv_len, block_kv, table, split_tiles)
        bands = None if segments is None else _merge_segments(segments, kv_len)
        if not bands:
            return None
        bands = _absorb_clipped_windows(bands)
        failed = _verify(bands, states, mask_mod, q_len, kv_len, block_q, block_kv, verify_chunk_elements, exact)
        if not failed:
            return bands
        if failed <= split_tiles or len(failed | split_tiles) > MAX_SPLIT_TILES:
            return None   # splitting many tiles row by row would cost about a dense evaluation
        split_tiles |= failed
    return None


def _segments(states, mask_mod, q_len, kv_len, block_kv, table, split_tiles):
    """Runs of query rows, each with the key its probe rows suggest, None between non-empty
    ones; tiles in split_tiles, or whose probe rows suggest no key, are split row by row."""
    lo0, hi0, n0, lo1, hi1, n1, first_rows, last_rows, nonempty_tiles = table
    segments: list[tuple | None] = []
    for i in range(len(first_rows)):
        if not nonempty_tiles[i]:
            segments.append(None)
            continue
        probe = (first_rows[i], last_rows[i], lo0[i], hi0[i], lo1[i], hi1[i])
        contiguous = n0[i] == hi0[i] - lo0[i] + 1 and n1[i] == hi1[i] - lo1[i] + 1 and n0[i] > 0 and n1[i] > 0
        key = _tile_band(*probe) if contiguous and i not in split_tiles else None
        if key is not None:
            segments.append((probe, key))
            continue
        # a band edge inside this tile (a prefix length, say, that is not a multiple of block_q)
        split = _split_tile(states[i], mask_mod, first_rows[i], last_rows[i], q_len, kv_len, block_kv, states.device)
        if split is None:
            return None
        segments.extend(split)
    return segments


def _merge_segments(segments, kv_len: int) -> list[Band] | None:
    """Consecutive segments whose keys agree (or fit the first one's) become one band each."""
    bands: list[Band] = []
    i = 0
    while i < len(segments):
        if segments[i] is None:
            i += 1
            continue
        key = segments[i][1]
        j = i
        while j + 1 < len(segments) and segments[j + 1] is not None and (
                segments[j + 1][1] == key or _key_fits(key, *segments[j + 1][0])):
            j += 1
        band = _band_of(key, segments[i][0][0], segments[j][0][1] + 1, kv_len)
        if band is None:
            return None
        bands.append(band)
        i = j + 1
    return bands


def _split_tile(tile_states, mask_mod, first: int, last: int, q_len, kv_len, block_kv, device):
    """The rows of one query tile as runs that each follow one key ((probe, key) pairs), from
    every row's visible keys; None when a row is not one contiguous run of keys."""
    rows = torch.arange(first, last + 1, device=device)
    lo, hi, n = _row_intervals(tile_states.expand(rows.numel(), -1), mask_mod, rows, q_len, kv_len, block_kv, device)
    lo, hi, n = torch.stack([lo, hi, n]).tolist()
    if any(c == 0 or c != h - l + 1 for l, h, c in zip(lo, hi, n)):
        return None
    # greedy: each run as long as one key (taken from its end rows) fits every row of it
    runs, start = [], 0
    while start < len(lo):
        end, key = start, ("full", lo[start], hi[start] + 1)
        for stop in range(start + 1, len(lo)):
            longer = _tile_band(first + start, first + stop, lo[start], hi[start], lo[stop], hi[stop])
            inside = range(stop - 1, stop + 1) if longer == key else range(start, stop + 1)
            if longer is None or not all(
                    _key_fits(longer, first + r, first + r, lo[r], hi[r], lo[r], hi[r]) for r in inside):
                break
            end, key = stop, longer
        runs.append(((first + start, first + end, lo[start], hi[start], lo[end], hi[end]), key))
        start = end + 1
    # a few band edges per tile; more (a row per band, say) is better served by the tiles route
    return runs if len(runs) <= MAX_RUNS_PER_SPLIT_TILE else None


def _absorb_clipped_windows(bands: list[Band]) -> list[Band]:
    """A causal band whose rows all reach key 0 followed by a window band of the same delta
    is one window band: the window only clips the later rows (the start of a sliding window)."""
    merged: list[Band] = []
    for band in bands:
        prev = merged[-1] if merged else None
        if (prev is not None and prev.causal and prev.window_left < 0 and prev.kv_start == 0
                and band.causal and band.window_left >= 0 and prev.q_end == band.q_start
                and prev.delta == band.delta and prev.q_end - 1 + prev.delta - band.window_left <= 0):
            merged[-1] = Band(prev.q_start, band.q_end, 0, band.kv_end, True, band.window_left)
        else:
            merged.append(band)
    return merged


def _verify(bands, states, mask_mod, q_len, kv_len, block_q, block_kv, chunk_elements, exact=None) -> set[int]:
    """The query tiles where the bands are not exactly the mask (empty: they are): tile states
    first, then every row against the mask's exact intervals when its expression gives them
    (linear_masks.py; exact: those (lo, hi) intervals, or None), else every partial tile element
    by element."""
    nq, nkv = states.shape
    expected = torch.zeros_like(states)
    for band in bands:
        t0, t1 = band.q_start // block_q, -(-band.q_end // block_q)
        expected[t0:t1] = band_tile_states(band, q_len, kv_len, block_q, block_kv, nq, nkv, states.device)[t0:t1]
    # a query tile that two bands share has no one band's states: its every tile is checked
    # element by element below instead
    shared = torch.zeros(nq, dtype=torch.bool, device=states.device)
    for edge in {b for band in bands for b in (band.q_start, band.q_end) if b % block_q and b < q_len}:
        shared[edge // block_q] = True
    wrong = ((expected != states).any(1) & ~shared).nonzero().flatten().tolist()
    if wrong:
        return set(wrong)
    if exact is not None:
        failed_rows = _rows_unlike(bands, *exact, kv_len)
        if failed_rows is not None:
            return set((failed_rows // block_q).tolist())
    tiles = ((states == PARTIAL) | shared.view(-1, 1)).nonzero()
    per_chunk = max(1, chunk_elements // (block_q * block_kv))
    failed = set()
    for p0 in range(0, tiles.shape[0], per_chunk):
        qt, kt = tiles[p0:p0 + per_chunk].unbind(1)
        truth, q, kv = tile_elements(mask_mod, 0, 0, qt, kt, block_q, block_kv, q_len, kv_len)
        valid = (q < q_len) & (kv < kv_len)
        lowered = torch.zeros_like(truth)
        for band in bands:
            lowered |= band.visible(q, kv)
        mismatch = (truth != (lowered & valid)).flatten(1).any(1)
        if bool(mismatch.any()):
            failed |= set(qt[mismatch].tolist())
    return failed


def _rows_unlike(bands, lo, hi, kv_len):
    """The rows whose keys under the bands differ from [lo, hi] (lo > hi: none), or None when
    two bands share a row (their union is left to the element check)."""
    q_len = lo.shape[0]
    band_lo = torch.full((q_len,), kv_len, dtype=torch.int64)
    band_hi = torch.full((q_len,), -1, dtype=torch.int64)
    for band in bands:
        rows = torch.arange(band.q_start, band.q_end, dtype=torch.int64)
        first = torch.full_like(rows, band.kv_start)
        last = torch.full_like(rows, band.kv_end - 1)
        if band.causal:
            last = torch.minimum(last, rows + band.delta)
        if band.window_left >= 0:
            first = torch.maximum(first, rows + band.delta - band.window_left)
        seen = first <= last
        if bool((seen & (band_lo[band.q_start:band.q_end] <= band_hi[band.q_start:band.q_end])).any()):
            return None
        band_lo[band.q_start:band.q_end] = torch.where(seen, first, band_lo[band.q_start:band.q_end])
        band_hi[band.q_start:band.q_end] = torch.where(seen, last, band_hi[band.q_start:band.q_end])
    mask_empty, band_empty = lo > hi, band_lo > band_hi
    differ = (mask_empty != band_empty) | (~mask_empty & ((lo != band_lo) | (hi != band_hi)))
    return differ.nonzero().flatten()


def hinted_bands(mask_mod, q_len: int, kv_len: int) -> list[Band] | None:
    """Bands a library mask states about itself (a user's own mask_mod has none and is lowered by
    find_bands): full, causal, sliding_window and prefix_lm carry a band_hint(q_len, kv_len);
    the document mask is one causal band per document (exactly its predicate when both
    sequences are the packed tokens)."""
    hint = stated_hint(mask_mod, "band_hint")
    if hint is not None:
        bands = hint(q_len, kv_len)
        return None if bands is None else [Band(*band) for band in bands]
    ids = stated_hint(mask_mod, "document_ids")
    if ids is None or not (q_len == kv_len == ids.numel()):
        return None
    ids = ids.cpu()
    if ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):
        return None  # documents must be contiguous runs for one band each
    starts = torch.cat([torch.tensor([0]), (ids[1:] != ids[:-1]).nonzero().flatten() + 1]).tolist()
    ends = starts[1:] + [q_len]
    return [Band(s, e, s, e, causal=True) for s, e in zip(starts, ends)]


@dataclass
class BandLaunch:
    """One ragged launch. Its indptrs count from the first row of q_rows and of kv_rows: a
    launch must be handed exactly those rows (inputs()), even when q_rows is every query (one
    band of one batch entry whose keys start past 0 still reads only its own keys)."""
    causal: bool
    window_left: int
    q_rows: slice        # rows of the flattened [B * Q_LEN] queries this launch reads and writes
    kv_rows: slice       # rows of the flattened [B * KV_LEN] keys
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    req_q0: torch.Tensor
    req_kv0: torch.Tensor
    req_b: torch.Tensor

    def inputs(self, q, k, v):
        """This launch's rows of q [B * Q_LEN, Hq, D] and of the flattened k, v [B * KV_LEN, Hkv, D]
        (views: slices along the first dimension)."""
        return q[self.q_rows], k[self.kv_rows], v[self.kv_rows]

    def writes_all(self, batch: int, q_len: int) -> bool:
        """Whether this launch writes every query row (so its output is the whole result)."""
        return self.q_rows == slice(0, batch * q_len)


def band_launches(bands, batch: int, q_len: int, kv_len: int) -> list[BandLaunch]:
    """One launch for all (b, band) requests when the bands tile both sequences with one set of
    flags; otherwise one single-request launch per (b, band)."""
    def i32(values):
        return torch.tensor(values, dtype=torch.int32)

    flags = {(b.causal, b.window_left) for b in bands}
    tiles = all(a.q_end == b.q_start and a.kv_end == b.kv_start for a, b in zip(bands, bands[1:]))
    if (len(flags) == 1 and tiles and bands[0].q_start == 0 and bands[-1].q_end == q_len
            and bands[0].kv_start == 0 and bands[-1].kv_end == kv_len):
        requests = [(b, band) for b in range(batch) for band in bands]
        qo = [0] + [b * q_len + band.q_end for b, band in requests]
        kv = [0] + [b * kv_len + band.kv_end for b, band in requests]
        causal, window = flags.pop()
        return [BandLaunch(causal, window, slice(0, batch * q_len), slice(0, batch * kv_len), i32(qo), i32(kv),
                           i32([band.q_start for _, band in requests]), i32([band.kv_start for _, band in requests]),
                           i32([b for b, _ in requests]))]
    launches = []
    for b in range(batch):
        for band in bands:
            launches.append(BandLaunch(
                band.causal, band.window_left,
                slice(b * q_len + band.q_start, b * q_len + band.q_end),
                slice(b * kv_len + band.kv_start, b * kv_len + band.kv_end),
                i32([0, band.q_end - band.q_start]), i32([0, band.kv_end - band.kv_start]),
                i32([band.q_start]), i32([band.kv_start]), i32([b])))
    return launches


def plain_band_launch(bands, batch: int, q_len: int, kv_len: int, windowed: bool = False):
    """The one ragged launch that runs every (batch entry, band) request of FlashInfer's plain
    kernels, or None when they run as single-sequence calls. One band without a window over a
    whole sequence (causal or full) takes the batch ragged kernel rather than the single call:
    measured faster (docs/benchmarks.md); a windowed band keeps the single call, where FlashInfer's
    ragged kernel under its causal schedule was slower (on Hopper the library's own window kernel
    runs such a band instead: backends/head_windows.py), unless windowed (a caller that needs the
    launch to write into its buffer)."""
    launches = band_launches(bands, batch, q_len, kv_len)
    one_band = len(bands) == 1 and (bands[0].window_left < 0 or windowed)
    if len(launches) == 1 and launches[0].writes_all(batch, q_len) and (len(bands) > 1 or batch > 1 or one_band):
        return launches[0]
    return None
