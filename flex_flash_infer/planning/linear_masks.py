"""Exact visible key intervals of a mask that is a conjunction of unit-slope comparisons.

A user's own causal, sliding-window or key-range mask_mod (`q_idx >= kv_idx`, `(q_idx - kv_idx
< 1024) & (kv_idx <= q_idx)`, `kv_idx >= 3`) shows every row as one key interval whose ends are
lines of slope 0 or 1 in the query position. Read off its traced expression, that interval is
known for every row at once. Three uses: find_bands checks bands row by row against it (O(rows))
instead of element by element over every partial tile; prepare() gives such a mask the band_hint
a library mask carries (linear_bands, with_linear_band_hint: no tile tables); and a paged cache
runs it on FlashInfer's own causal / window flags when it is exactly those at every position
(paged_flags).

Anything else -- `|`, `where`, casts, products, b or h, a captured tensor, an expression that
could overflow its integer type -- gives None, and the caller verifies element by element as
before. The analysis follows torch's integer semantics exactly, so a row interval it returns is
what evaluating the mask would give.
"""
from __future__ import annotations

import torch

from ..core.trace import current_reads, trace
from ..core.hints import around_users_mod, state_hint, stated_hint

_FLIP = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt", "eq": "eq"}
_RANGE = {torch.int32: (-(1 << 31), (1 << 31) - 1), torch.int64: (-(1 << 63), (1 << 63) - 1)}


class _NotLinear(Exception):
    pass


def _constraints(mask_mod, q_len: int, kv_len: int):
    """The mask's (kind, slope, offset) constraints, or None when it is not linear."""
    if q_len <= 0 or kv_len <= 0:
        return None
    try:
        graph = trace(mask_mod, "mask_mod")
    except Exception:   # a mod that cannot be traced (TraceError or its own error) is evaluated instead
        return None
    if graph.tensors:
        return None
    constraints = []
    try:
        _conjunction(graph.output, (q_len - 1, kv_len - 1), constraints)
    except _NotLinear:
        return None
    return constraints


def _intervals(constraints, q_len: int, kv_len: int):
    """(lo, hi, lo_flat, lo_diag, hi_flat, hi_diag) int64 [q_len]: each row's exact keys lo..hi,
    and the constant and the slope-1 (kv - q fixed) bounds whose max / min they are (the diagonal
    ones -2^62 / 2^62 where the mask has none)."""
    q = torch.arange(q_len, dtype=torch.int64)
    lo_flat = torch.zeros(q_len, dtype=torch.int64)
    hi_flat = torch.full((q_len,), kv_len - 1, dtype=torch.int64)
    lo_diag = torch.full((q_len,), -(1 << 62), dtype=torch.int64)
    hi_diag = torch.full((q_len,), 1 << 62, dtype=torch.int64)
    rows = torch.ones(q_len, dtype=torch.bool)
    for kind, slope, offset in constraints:
        if kind == "lo":      # kv >= slope * q + offset
            if slope:
                lo_diag = torch.maximum(lo_diag, q + offset)
            else:
                lo_flat = torch.clamp(lo_flat, min=offset)
        elif kind == "hi":    # kv <= slope * q + offset
            if slope:
                hi_diag = torch.minimum(hi_diag, q + offset)
            else:
                hi_flat = torch.clamp(hi_flat, max=offset)
        else:                 # rows: slope * q + offset >= 0 (slope is +1, -1 or 0)
            rows &= (slope * q + offset) >= 0
    lo, hi = torch.maximum(lo_flat, lo_diag), torch.minimum(hi_flat, hi_diag)
    lo = torch.where(rows, lo, torch.full_like(lo, kv_len))   # a row outside the row bounds is empty
    return lo, hi, lo_flat, lo_diag, hi_flat, hi_diag


def exact_row_intervals(mask_mod, q_len: int, kv_len: int):
    """(lo, hi) int64 [q_len]: row q sees exactly keys lo[q] <= kv <= hi[q] (none where lo > hi),
    or None when the mask is not a conjunction of unit-slope comparisons of q_idx and kv_idx."""
    constraints = _constraints(mask_mod, q_len, kv_len)
    return None if constraints is None else _intervals(constraints, q_len, kv_len)[:2]


def linear_bands(mask_mod, q_len: int, kv_len: int):
    """The bands (q_start, q_end, kv_start, kv_end, causal, window_left) that are exactly a linear
    mask, as bands.Band takes them, or None (not linear, or rows whose first key moves with the
    row while the last does not: a window without causality, left to find_bands). A run of rows
    whose last key moves with the row is one causal band, its first key the larger of a constant
    (kv_start) and a diagonal (the window); a run whose ends are both constant is a full band."""
    constraints = _constraints(mask_mod, q_len, kv_len)
    if constraints is None:
        return None
    lo, hi, lo_flat, lo_diag, hi_flat, hi_diag = _intervals(constraints, q_len, kv_len)
    seen = lo <= hi
    hi_moves = hi_diag <= hi_flat
    if bool((seen & ~hi_moves & (lo_diag > lo_flat)).any()):
        return None
    kind = torch.where(seen, hi_moves.long(), torch.full_like(lo, -1))
    edges = (torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1).tolist()
    bands = []
    for a, b in zip([0] + edges, edges + [q_len]):
        k = int(kind[a])
        if k == 0:      # both ends constant
            bands.append((a, b, int(lo[a]), int(hi[b - 1]) + 1, False, -1))
        elif k == 1:    # causal, delta = hi - q; a window where a diagonal bounds the first key too
            window = int(hi_diag[a] - lo_diag[a]) if int(lo_diag[a]) > -(1 << 61) else -1
            bands.append((a, b, int(lo_flat[a]), int(hi[b - 1]) + 1, True, window))
    return bands


# the attributes by which a mask states how it lowers (mods/): a mask carrying one is planned by it
LOWERING_HINTS = ("band_hint", "document_ids", "key_columns_hint")
MEMO_LENGTHS = 64
KEPT_STAND_INS = 64   # a caller's kept hinted stand-ins (one per sequence of a packed batch)


def with_linear_band_hint(mask_mod, q_len: int, kv_len: int, kept: dict | None = None):
    """mask_mod carrying the band_hint a library mask states about itself, read off its expression,
    when it has no hint and is linear at these lengths (else mask_mod itself): the planners then
    take a user's own causal or window mask as they take the library's (no tile tables, FlashInfer's
    own flags on a paged cache). The hint answers other lengths too, remembered per length. kept:
    {mask_mod: its hinted stand-in} of a caller that gives the same mask_mod again (FlexFlashInfer's
    stand-ins), so its bands are worked out once."""
    if any(stated_hint(mask_mod, hint) is not None for hint in LOWERING_HINTS):
        return mask_mod
    hinted = kept.get(mask_mod) if kept is not None else None
    if hinted is None:
        bands = linear_bands(mask_mod, q_len, kv_len)
        if bands is None:
            return mask_mod
        hinted = _hinted(mask_mod, {(q_len, kv_len): bands})
        if kept is not None and len(kept) < KEPT_STAND_INS:
            kept[mask_mod] = hinted
    return hinted if stated_hint(hinted, "band_hint")(q_len, kv_len) is not None else mask_mod


def _hinted(mask_mod, memo: dict):
    """A stand-in for mask_mod stating the band_hint of memo's bands, worked out at other lengths
    when asked."""
    # the bands hold for the numbers the mask read when they were worked out: a global or closure
    # number changed since works them out again
    memo_reads = [current_reads(mask_mod, "mask_mod")]

    def users_mask(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx)

    def band_hint(q, kv):
        now = current_reads(mask_mod, "mask_mod")
        if now is None or not now.same_as(memo_reads[0]):
            memo.clear()
            memo_reads[0] = now
        if (q, kv) not in memo:
            if len(memo) >= MEMO_LENGTHS:
                memo.clear()
            memo[(q, kv)] = linear_bands(mask_mod, q, kv)
        return memo[(q, kv)]

    users_mask.__name__ = getattr(mask_mod, "__name__", "mask_mod")
    state_hint(users_mask, "band_hint", band_hint)
    return around_users_mod(users_mask)


def paged_flags(mask_mod) -> tuple[bool, int] | None:
    """(causal, window_left) when the mask is, at every position a cache can hold (0 .. 2^31 - 1),
    exactly FlashInfer's own mask on a paged cache: full, causal (`kv <= q`), or a causal window
    (`q - kv <= window_left`), the queries being the newest tokens. None for anything else: a key
    or row bound, a shifted diagonal, a window without causality, a mask that is not linear, one
    with a band hint of its own (paged_plan reads that), or values that could overflow."""
    if any(stated_hint(mask_mod, hint) is not None for hint in LOWERING_HINTS):
        return None
    constraints = _constraints(mask_mod, 1 << 31, 1 << 31)
    if constraints is None:
        return None
    first, last = None, None   # the diagonal bounds: kv >= q + first, kv <= q + last
    for kind, slope, offset in constraints:
        if kind == "rows":
            if slope == -1 or offset < 0:   # a row bound, or a constant False
                return None
        elif slope == 0:
            if kind == "hi" or offset > 0:  # a key bound that binds at some length
                return None
        elif kind == "lo":
            first = offset if first is None else max(first, offset)
        else:
            last = offset if last is None else min(last, offset)
    if last is None:
        return (False, -1) if first is None else None
    if last != 0 or (first is not None and first > 0):
        return None
    return True, -1 if first is None else -first


def _conjunction(node, box, out):
    if node.op == "and" and node.kind == "bool":
        for arg in node.args:
            if getattr(arg, "kind", None) != "bool":
                raise _NotLinear
            _conjunction(arg, box, out)
        return
    if node.op == "const" and node.kind == "bool":
        if not node.value:
            out.append(("rows", 0, -1))   # False: no row sees anything
        return
    if node.op == "not" and node.args[0].op in ("lt", "le", "gt", "ge"):
        inner = node.args[0]
        negated = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}[inner.op]
        _comparison(negated, inner, box, out)
        return
    if node.op in _FLIP:
        _comparison(node.op, node, box, out)
        return
    raise _NotLinear


def _comparison(op, node, box, out):
    if node.compute not in _RANGE:
        raise _NotLinear
    left, right = (_linear(arg, box) for arg in node.args)
    for form in (left, right):   # both sides converted to the compute dtype: they must fit it
        _fits(form, box, node.compute)
    # left - right  OP  0, as a * q + b * kv + c  OP  0 (exact: Python integers)
    a, b, c = left[0] - right[0], left[1] - right[1], left[2] - right[2]
    if abs(c) >= 1 << 62:   # the offsets become int64 tensor arithmetic: keep them far from its ends
        raise _NotLinear
    if b == -1:
        a, b, c, op = -a, 1, -c, _FLIP[op]
    if b == 0:
        if a == 0:
            if not _holds(op, c):
                out.append(("rows", 0, -1))
            return
        if a not in (1, -1) or op == "eq":
            raise _NotLinear
        # a * q + c OP 0 as a * q + c' >= 0
        if op in ("ge", "gt"):
            out.append(("rows", a, c - (op == "gt")))
        else:   # le / lt: -a * q - c >= 0 (lt: > 0)
            out.append(("rows", -a, -c - (op == "lt")))
        return
    if b != 1 or -a not in (0, 1):
        raise _NotLinear
    # kv + a * q + c OP 0  <=>  kv OP slope * q + offset
    slope, offset = -a, -c
    if op in ("ge", "eq"):
        out.append(("lo", slope, offset))
    if op == "gt":
        out.append(("lo", slope, offset + 1))
    if op in ("le", "eq"):
        out.append(("hi", slope, offset))
    if op == "lt":
        out.append(("hi", slope, offset - 1))


def _holds(op, c):
    return {"ge": c >= 0, "gt": c > 0, "le": c <= 0, "lt": c < 0, "eq": c == 0}[op]


def _linear(node, box):
    """(a, b, c): node is a * q_idx + b * kv_idx + c, every step within its integer type."""
    if node.op == "input" and node.kind == "int" and node.attr in ("q_idx", "kv_idx"):
        return (1, 0, 0) if node.attr == "q_idx" else (0, 1, 0)
    if node.op in ("const", "scalar") and node.kind == "int" and isinstance(node.value, int) \
            and not isinstance(node.value, bool):
        # a scalar is a Python int the mod captured (a window size): its value now, as a plan's is
        return (0, 0, node.value)
    if node.op in ("add", "sub") and node.kind == "int" and node.dtype in _RANGE:
        x, y = (_linear(arg, box) for arg in node.args)
        sign = 1 if node.op == "add" else -1
        form = (x[0] + sign * y[0], x[1] + sign * y[1], x[2] + sign * y[2])
        for part in (x, y, form):
            _fits(part, box, node.dtype)
        return form
    if node.op == "neg" and node.kind == "int" and node.dtype in _RANGE:
        x = _linear(node.args[0], box)
        form = (-x[0], -x[1], -x[2])
        _fits(form, box, node.dtype)
        return form
    raise _NotLinear


def _fits(form, box, dtype):
    """The form's values over 0 <= q <= box[0], 0 <= kv <= box[1] lie in dtype's range."""
    low, high = _RANGE[dtype]
    a, b, c = form
    smallest = c + min(0, a * box[0]) + min(0, b * box[1])
    largest = c + max(0, a * box[0]) + max(0, b * box[1])
    if smallest < low or largest > high:
        raise _NotLinear
