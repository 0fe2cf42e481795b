"""The pieces of the reference backend's CPU tile path: each runs some query rows through torch's
fused CPU attention and writes their output and log-sum-exp.

A TilePiece is one query tile's rows (or half of them) over the keys of its non-empty tiles, with
an additive mask where tiles are partial. When every query row sees one interval of keys, the
same for every batch entry and head, two shapes have a faster form than one call per query tile:
- causal (row r sees keys 0..r): one call of the fused kernel with its own causal flag, which
  skips the hidden keys itself (the per-tile form ran each diagonal tile's rows over all their
  keys with an additive mask, built anew at every call once those masks passed the bytes kept);
- a band (row r sees keys r + a .. r + c - 1 for constant a and c over a run of rows, as a
  sliding window has once past its first keys): the run's rows in blocks of BAND_ROWS, each over
  the keys its rows see, all blocks in one call whose keys and values are overlapping strided
  views of the caller's tensors (no copy). A block computes BAND_ROWS x (BAND_ROWS - 1 + c - a)
  pairs where its rows see BAND_ROWS x (c - a); with one call per block the kernel's time per
  call ruled out blocks this small (bench --cpu, "The reference backend on the CPU").
"""
from __future__ import annotations

import torch

# rows of one block of a band's batched call: the fastest of 8, 16, 32 and 64 for a 256-token
# window on a 2-core CPU (fewer rows compute fewer hidden pairs, but the kernel's work items shrink;
# docs/benchmarks.md, "The reference backend on the CPU")
BAND_ROWS = 32
# a run of band rows shorter than this many blocks is left to the per-tile pieces
MIN_BAND_BLOCKS = 2


def additive_mask(visible: torch.Tensor, dtype) -> torch.Tensor:
    """The fused kernel's attn_mask for a bool visibility: 0 where visible, -inf elsewhere."""
    return torch.zeros((), dtype=dtype).masked_fill(~visible, float("-inf"))


def row_intervals(tiles, L: int):
    """(start, end, one) of the query rows: int64 [L] start and end of the key interval each row
    sees (start == end: none), and bool [L] one: whether that is all the row sees, for every
    batch entry and head (False where its visible keys are not one interval or differ by batch
    entry or head). `tiles`: (r0, r1, keys, visible or None) per query tile that sees keys,
    visible a bool [B or 1, H or 1, rows or 1, keys] (None: every row sees all of `keys`)."""
    start = torch.zeros(L, dtype=torch.int64)
    end = torch.zeros(L, dtype=torch.int64)
    one = torch.ones(L, dtype=torch.bool)
    for r0, r1, keys, visible in tiles:
        if visible is None:
            if int(keys[-1]) - int(keys[0]) + 1 == keys.numel():
                start[r0:r1], end[r0:r1] = int(keys[0]), int(keys[-1]) + 1
            else:
                one[r0:r1] = False
            continue
        rows = (r1 - r0, keys.numel())
        v = visible[0, 0].expand(rows)
        alike = (visible == visible[:1, :1]).flatten(0, 1).all(0).expand(rows).all(-1)
        count = v.sum(-1)
        seen = count > 0
        first = v.to(torch.uint8).argmax(-1)
        last = keys.numel() - 1 - v.flip(-1).to(torch.uint8).argmax(-1)
        # one interval of tile positions, and those positions' keys consecutive
        interval = (last - first + 1 == count) & (keys[last] - keys[first] == last - first)
        one[r0:r1] = alike & (interval | ~seen)
        start[r0:r1] = torch.where(seen, keys[first], 0)
        end[r0:r1] = torch.where(seen, keys[last] + 1, 0)
    return start, end, one


def is_causal(start: torch.Tensor, end: torch.Tensor, one: torch.Tensor, S: int) -> bool:
    """Row r sees keys 0..r (all S keys past the last one) and nothing else: the fused kernel's causal flag."""
    rows = torch.arange(start.numel())
    return bool(one.all()) and bool((start == 0).all()) and bool((end == (rows + 1).clamp(max=S)).all())


def band_runs(start: torch.Tensor, end: torch.Tensor, one: torch.Tensor) -> list:
    """[(r0, blocks, a, c)]: runs of BAND_ROWS-row blocks whose every row r sees keys r + a .. r + c - 1 only."""
    L = start.numel()
    rows = torch.arange(L)
    a, c = start - rows, end - rows
    good = one & (end > start)
    # where (a, c) changes, or a row is not a band's: run boundaries
    breaks = torch.ones(L + 1, dtype=torch.bool)
    breaks[1:L] = (a[1:] != a[:-1]) | (c[1:] != c[:-1]) | ~good[1:] | ~good[:-1]
    bounds = breaks.nonzero().flatten().tolist()
    runs = []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        blocks = (r1 - r0) // BAND_ROWS
        if blocks >= MIN_BAND_BLOCKS and bool(good[r0]):
            runs.append((r0, blocks, int(a[r0]), int(c[r0])))
    return runs


class TilePiece:
    """Rows r0..r1 over `keys` (a slice: a view of k and v; or an index tensor: a gather), with an
    additive mask or None; `unseen`: bool [.., rows] of rows that see no key, or None."""

    def __init__(self, r0: int, r1: int, keys, mask, unseen):
        self.r0, self.r1, self.keys, self.mask, self.unseen = r0, r1, keys, mask, unseen
        self.mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()

    def run(self, fused, query, key, value, scale, out, lse):
        r0, r1 = self.r0, self.r1
        k, v = key[:, :, self.keys], value[:, :, self.keys]
        o, s = fused(query[:, :, r0:r1], k, v, 0.0, False, attn_mask=self.mask, scale=scale)
        if self.unseen is not None:   # a row that sees no key: 0 and -inf, where the fused kernel gives 0 and 0
            s = s.masked_fill(self.unseen, float("-inf"))
            o = o.masked_fill(self.unseen.unsqueeze(-1), 0.0)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, s


class CausalPiece:
    """Every row in one call of the fused kernel with its causal flag. It relies on two things the
    private op does in torch 2.13 and no public contract states: the flag aligns top-left when the
    lengths differ (flex's q >= kv), and fewer key heads than query heads are read as GQA; a torch
    that changed either would give wrong answers, not an error, so tests/backends/
    test_reference_tiles.py pins both (lengths unequal both ways, grouped heads)."""
    mask_bytes = 0

    def run(self, fused, query, key, value, scale, out, lse):
        # with its causal flag the fused kernel gives NaN for a scale <= 0 (the flag's -inf times
        # the scale): scale * q.k is |scale| * (-q).k, and a scale of 0 makes every score 0 as 1 * 0.k
        if scale <= 0:
            query, scale = (-query, -scale) if scale < 0 else (torch.zeros_like(query), 1.0)
        o, s = fused(query, key, value, 0.0, True, scale=scale)
        out.copy_(o)
        lse.copy_(s)


class BandPiece:
    """Rows r0 .. r0 + blocks * BAND_ROWS of a band (row r sees keys r + a .. r + c - 1) in one call."""

    def __init__(self, r0: int, blocks: int, a: int, c: int, dtype):
        self.r0, self.blocks, self.a = r0, blocks, a
        self.span = BAND_ROWS - 1 + c - a
        i = torch.arange(BAND_ROWS).view(-1, 1)
        j = torch.arange(self.span).view(1, -1)
        visible = (j >= i) & (j < i + (c - a))
        self.mask = additive_mask(visible, dtype)
        self.mask_bytes = self.mask.numel() * self.mask.element_size()

    def run(self, fused, query, key, value, scale, out, lse):
        n, b = self.blocks, BAND_ROWS
        r0, r1 = self.r0, self.r0 + n * b
        H = query.shape[1]
        for bi in range(query.shape[0]):
            q = query[bi, :, r0:r1].unflatten(1, (n, b)).transpose(0, 1)    # [n, H, b, E], a view
            k, v = (self._blocks_of(t, bi) for t in (key, value))
            o, s = fused(q, k, v, 0.0, False, attn_mask=self.mask, scale=scale)
            out[bi, :, r0:r1] = o.transpose(0, 1).reshape(H, n * b, -1)
            lse[bi, :, r0:r1] = s.transpose(0, 1).reshape(H, n * b)

    def _blocks_of(self, t, bi: int):
        """[blocks, heads, span, D]: block j's keys start (r0 + j * BAND_ROWS + a), overlapping views of t."""
        sB, sH, sS, sD = t.stride()
        return t.as_strided((self.blocks, t.shape[1], self.span, t.shape[3]), (BAND_ROWS * sS, sH, sS, sD),
                            t.storage_offset() + bi * sB + (self.r0 + self.a) * sS)
