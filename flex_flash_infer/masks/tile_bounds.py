"""Tile states from bounds: the traced mask_mod evaluated on each tile's index ranges at once.

Each node of the traced graph (trace.py) gets, per tile, an interval that holds its value for
every (q, kv) of the tile: q_idx in [first row, last row], kv_idx likewise, b and h exact,
captured numbers exact (their values at build time). A bool is bounded by (certainly true,
possibly true). A tile whose mask is certainly true is full (partial if it holds padded keys),
one that is certainly false is empty. An undecided tile (a causal diagonal, a window edge, a
document boundary, attamba's key columns) where nine sampled pairs show both a visible and a
hidden one is partial; only the rest are evaluated element by element, on one row where every
row of the tile provably holds the same values (_RowDependence). A 32768-token causal
mask has 65536 tiles: bounds decide all but the 256 on the diagonal, and samples settle those,
so no tile is evaluated in full (the element-wise build evaluates 1G pairs). The grid is
bounded a band of query tiles at a time, so a mask of any length takes this path in bounded
memory (a 1M-token causal mask: 2^26 tiles, of which the 8192 on the diagonal are sampled).

Every rule is sound (the interval contains every value the element-wise evaluation produces);
what it cannot bound (floats, a table read over a wide index range, int64 values beyond
int32, an integer power) is unknown, and unknown tiles are evaluated. Integer types follow
torch's: operands converted to the op's dtype, results wrapped to the node's (int8, int16, uint8
and int32 wrap; bool + bool is an or). The states equal the element-wise build's exactly.
"""
from __future__ import annotations

import torch

from .block_build import EMPTY, FULL, PARTIAL, ceil_div, classify_query_tiles, tile_elements
from ..compile.codegen import dtype_range, wrap_int
from ..core.mask_eval import INDEX_DTYPE, evaluate_mask_mod, mask_dependence
from ..core.notices import warn_once
from ..core.trace import Graph, Node, TraceError, trace

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
# a table read whose index spans a range gathers up to this many values to take its min / max
RANGE_GATHER_LIMIT = 1 << 25
# past this share of tiles left to evaluate, the element-wise build of every tile is as cheap
MAX_UNDECIDED_SHARE = 0.5
# bounds hold a few int64 tensors of one value per tile (per batch entry and head where the mask
# reads them): a grid of more tiles than this is bounded a band of query tiles at a time, so
# their memory stays a few tens of MiB at any length (a 1M-token mask has 2^26 tiles of 128)
BOUNDED_TILES_PER_CHUNK = 1 << 21


class _Bounds:
    """Interval evaluation of one graph; int nodes give (lo, hi) int64 tensors or None
    (unknown), bool nodes (certain, possible) bool tensors, float nodes None. Each op takes its
    operands converted to its dtype as torch converts them (a Python int wraps to an int8
    operand's type) and its result wrapped to its own (an int8 sum past 127 wraps to -128): an
    interval that crosses a wrap point is that dtype's whole range."""

    def __init__(self, graph: Graph, inputs: dict, device):
        self.inputs = inputs
        self.scalars = {name: (kind, value) for name, kind, value in graph.scalars}
        self.tables = _OnDevice(dict(graph.tensors), device)   # copied when first read (an index's table)
        self.device = device
        self.memo = {}

    def unknown_bool(self):
        return (torch.zeros((), dtype=torch.bool, device=self.device),
                torch.ones((), dtype=torch.bool, device=self.device))

    def exact(self, value, kind):
        if kind == "float":
            return None
        t = torch.tensor(value, dtype=torch.bool if kind == "bool" else torch.int64, device=self.device)
        return t, t

    def of(self, node: Node):
        if id(node) not in self.memo:
            self.memo[id(node)] = self._eval(node)
        return self.memo[id(node)]

    def ints(self, node: Node):
        """The node's bounds as int64 (bools as 0 / 1), or None."""
        r = self.of(node)
        if node.kind == "bool":
            return r[0].long(), r[1].long()
        return r if node.kind == "int" else None

    def operand(self, node: Node, dtype: torch.dtype):
        """The node's bounds as an operand of an op computed in dtype (int64 intervals, bools as
        0 / 1), or None: a number known at trace time converted exactly, else its interval wrapped."""
        if dtype.is_floating_point or node.kind == "float":
            return None
        if node.tier < 2 and isinstance(node.value, (bool, int)):
            value = int(wrap_int(int(node.value), dtype))
            if not INT32_MIN <= value <= INT32_MAX:
                # unknown, as an interval past int32 is: a product with it could pass int64 and
                # wrap back into range, a partial tile then bounded as full
                return None
            v = torch.tensor(value, dtype=torch.int64, device=self.device)
            return v, v
        return _as_dtype(self.ints(node), dtype)

    def settle(self, node: Node, r):
        """An int result for this node's dtype: wrapped to it (None where unknown or, for int64,
        past int32, which keeps the interval arithmetic within int64), a bool where the node is one
        (non-zero)."""
        r = _as_dtype(r, node.dtype)
        if r is None:
            return self.unknown_bool() if node.kind == "bool" else None
        return _nonzero(*r) if node.kind == "bool" else r

    def _eval(self, node: Node):
        op, a, kind = node.op, node.args, node.kind
        if op == "input":
            return self.inputs[node.attr]
        if op == "const":
            return self.settle(node, self.exact(node.attr, "int")) if kind != "float" else None
        if op == "scalar":
            k, v = self.scalars[node.attr]
            return self.settle(node, self.exact(v, "int")) if kind != "float" else None
        if kind == "float":
            return None
        if op == "cast":
            return self.settle(node, self.operand(a[0], node.dtype))
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            x, y = self.operand(a[0], node.compute), self.operand(a[1], node.compute)
            if x is None or y is None:
                return self.unknown_bool()
            return _compare(op, x, y)
        if op in ("and", "or", "xor", "not") and kind == "bool":
            return _logic(op, *[self.of(x) for x in a])
        if op == "where":
            c = self.of(a[0])
            t, f = (self.of(x) if kind == "bool" else self.operand(x, node.dtype) for x in a[1:])
            if t is None or f is None:
                return self.settle(node, None)
            return _select(c, t, f, kind == "bool")
        if op == "load":
            return self.settle(node, self._load(node))
        args = [self.operand(x, node.dtype) for x in a]
        if op == "pow" or any(x is None for x in args):
            return self.settle(node, None)
        return self.settle(node, _arith(op, args))

    def _load(self, node: Node):
        """A captured table read: exact where every index is exact, the min / max over the range
        where one index spans a short one, unknown elsewhere (None: some element unknown)."""
        table = self.tables[node.attr]
        idx = [self.ints(x) for x in node.args]
        if any(i is None for i in idx):
            return None
        shape = torch.broadcast_shapes(*[i[0].shape for i in idx], *[i[1].shape for i in idx])
        lo = [i[0].expand(shape) for i in idx]
        hi = [i[1].expand(shape) for i in idx]
        if any(bool((l < 0).any()) or bool((h >= n).any()) for l, h, n in zip(lo, hi, table.shape)):
            return None   # a negative or out-of-range index: left to the element-wise build
        spans = [int((h - l).max()) if h.numel() else 0 for l, h in zip(lo, hi)]
        wide = [d for d, s in enumerate(spans) if s > 0]
        if not wide:   # gathered first, widened after: a large captured table is never copied
            v = table[tuple(lo)].to(torch.int64)
            return v, v
        d = wide[0]
        width = spans[d] + 1
        if len(wide) > 1:
            return None
        # a table sorted along the read dimension (document ids) has its extremes at the ends of
        # each range: two reads instead of a gather of every range, checked where the table is
        # no larger than that gather
        gather = max(1, lo[d].numel()) * width
        if table.numel() <= gather:
            steps = table.to(torch.int64).diff(dim=d)
            if bool((steps >= 0).all()) or bool((steps <= 0).all()):
                ends = table[tuple(lo)].to(torch.int64), table[tuple(hi)].to(torch.int64)
                return torch.minimum(*ends), torch.maximum(*ends)
        if gather > RANGE_GATHER_LIMIT:
            return None
        step = torch.arange(width, device=lo[d].device)
        along = torch.minimum(lo[d].unsqueeze(-1) + step, hi[d].unsqueeze(-1))   # repeats hi past the range
        index = tuple(along if k == d else lo[k].unsqueeze(-1) for k in range(len(lo)))
        gathered = table[index].to(torch.int64)
        return gathered.amin(-1), gathered.amax(-1)


class _OnDevice(dict):
    """Captured tables, each copied to the device the first time an interval reads it."""

    def __init__(self, tables: dict, device):
        super().__init__(tables)
        self.device, self.moved = device, set()

    def __getitem__(self, name):
        t = super().__getitem__(name)
        if name not in self.moved:
            t = t.to(self.device)
            self[name] = t
            self.moved.add(name)
        return t


def _as_dtype(r, dtype: torch.dtype):
    """An exact int interval converted to an integer or bool dtype: unchanged within its range,
    wrapped where the whole interval lies in one period of 2^bits, the dtype's whole range where
    it crosses a wrap point; None for int64 past int32 (unknown: no exact bound is kept there)."""
    if r is None:
        return None
    lo, hi = r
    if dtype == torch.bool:
        certain, possible = _nonzero(lo, hi)
        return certain.long(), possible.long()
    # one host read for both ends (a GPU sync each)
    low, high = (torch.stack([lo.min(), hi.max()]).tolist() if lo.numel() and hi.numel()
                 else (0, 0))
    if dtype == torch.int64:
        return None if low < INT32_MIN or high > INT32_MAX else r
    dmin, dmax = dtype_range(dtype)
    if low >= dmin and high <= dmax:
        return r
    span = dmax - dmin + 1
    period_lo, period_hi = torch.div(lo - dmin, span, rounding_mode="floor"), torch.div(hi - dmin, span, rounding_mode="floor")
    one_period = period_lo == period_hi
    return (torch.where(one_period, lo - period_lo * span, dmin),
            torch.where(one_period, hi - period_hi * span, dmax))


def _nonzero(lo, hi):
    return (lo > 0) | (hi < 0), ~((lo == 0) & (hi == 0))


def _compare(op, x, y):
    (a0, a1), (b0, b1) = x, y
    if op in ("gt", "ge"):   # a > b is b < a
        (a0, a1), (b0, b1) = (b0, b1), (a0, a1)
        op = "lt" if op == "gt" else "le"
    if op == "lt":
        return a1 < b0, a0 < b1
    if op == "le":
        return a1 <= b0, a0 <= b1
    same = (a0 == a1) & (b0 == b1) & (a0 == b0)
    overlap = (a0 <= b1) & (b0 <= a1)
    return (same, overlap) if op == "eq" else (~overlap, ~same)


def _logic(op, x, y=None):
    if op == "not":
        return ~x[1], ~x[0]
    (x0, x1), (y0, y1) = x, y
    if op == "and":
        return x0 & y0, x1 & y1
    if op == "or":
        return x0 | y0, x1 | y1
    # xor: certain when one is certainly true and the other certainly false; possible unless
    # both are certainly equal
    return (x0 & ~y1) | (~x1 & y0), ~((x0 & y0) | (~x1 & ~y1))


def _select(c, t, f, is_bool):
    (c0, c1), (t0, t1), (f0, f1) = c, t, f
    both_lo = (t0 & f0) if is_bool else torch.minimum(t0, f0)
    both_hi = (t1 | f1) if is_bool else torch.maximum(t1, f1)
    lo = torch.where(c0, t0, torch.where(~c1, f0, both_lo))
    hi = torch.where(c0, t1, torch.where(~c1, f1, both_hi))
    return lo, hi


def _arith(op, args):
    if op in ("add", "sub", "mul", "min", "max"):
        (a0, a1), (b0, b1) = args
        if op == "add":
            return a0 + b0, a1 + b1
        if op == "sub":
            return a0 - b1, a1 - b0
        if op == "min":
            return torch.minimum(a0, b0), torch.minimum(a1, b1)
        if op == "max":
            return torch.maximum(a0, b0), torch.maximum(a1, b1)
        corners = torch.stack(torch.broadcast_tensors(a0 * b0, a0 * b1, a1 * b0, a1 * b1))
        return corners.amin(0), corners.amax(0)
    (a0, a1) = args[0]
    if op == "neg":
        return -a1, -a0
    if op == "abs":
        spans_zero = (a0 <= 0) & (a1 >= 0)
        return torch.where(spans_zero, 0, torch.minimum(a0.abs(), a1.abs())), torch.maximum(a0.abs(), a1.abs())
    if op == "bitnot":
        return -a1 - 1, -a0 - 1
    if op in ("floordiv", "mod"):
        c0, c1 = args[1]
        if not (bool((c0 == c1).all()) and bool((c0 != 0).all())):
            return None   # only by a known divisor
        e0, e1 = torch.div(a0, c0, rounding_mode="floor"), torch.div(a1, c0, rounding_mode="floor")
        if op == "floordiv":
            return torch.minimum(e0, e1), torch.maximum(e0, e1)
        # within one period the remainder grows with the value; across periods it spans them all
        one_period = e0 == e1
        r0, r1 = torch.remainder(a0, c0), torch.remainder(a1, c0)
        whole_lo, whole_hi = torch.where(c0 > 0, 0, c0 + 1), torch.where(c0 > 0, c0 - 1, 0)
        return torch.where(one_period, r0, whole_lo), torch.where(one_period, r1, whole_hi)
    return None   # bitwise and / or / xor of ints, and anything else: unknown


class _RowDependence:
    """Per tile, whether a node's value may change with q_idx inside the tile (b, h and kv_idx
    fixed): False is a proof that every row of the tile holds the same values. A node is row
    invariant when its bounds pin it to one value, or when it is built only from row-invariant
    values (a where with a decided condition, from its chosen branch alone)."""

    def __init__(self, bounds: _Bounds, q_varies: torch.Tensor):
        self.bounds, self.q_varies, self.memo = bounds, q_varies, {}
        self.never = torch.zeros((), dtype=torch.bool, device=bounds.device)

    def of(self, node: Node) -> torch.Tensor:
        if id(node) not in self.memo:
            self.memo[id(node)] = self._eval(node)
        return self.memo[id(node)]

    def _eval(self, node: Node) -> torch.Tensor:
        op, a = node.op, node.args
        if op == "input":
            return self.q_varies if node.attr == "q_idx" else self.never
        if op in ("const", "scalar"):
            return self.never
        if op == "where":   # a decided condition reads one branch only
            c0, c1 = self.bounds.of(a[0])
            dc, dt, df = (self.of(x) for x in a)
            varies = torch.where(c0, dt, torch.where(~c1, df, dc | dt | df))
        else:   # (a decided operand of and / or is pinned, so it adds nothing here)
            varies = self.never
            for child in (x for x in a if isinstance(x, Node)):
                varies = varies | self.of(child)
        r = self.bounds.of(node)
        if node.kind in ("bool", "int") and r is not None:
            varies = varies & (r[0] != r[1])   # one value over the tile
        return varies


def _analyse(graph: Graph, B: int, H: int, Q_LEN: int, KV_LEN: int, block_q: int, block_kv: int, device,
             q_tiles=None):
    """The bounds of graph over the tile grid (its query tiles q_tiles = (first, end), all by
    default), and the shape its tile results take."""
    nq, nkv = -(-Q_LEN // block_q), -(-KV_LEN // block_kv)
    qt0, qt1 = q_tiles or (0, nq)

    def positions(first_tile, n, block, length, shape):
        first = (torch.arange(n, device=device, dtype=torch.int64) + first_tile) * block
        return first.view(shape), torch.clamp(first + block - 1, max=length - 1).view(shape)

    b = torch.arange(B, device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int64).view(1, -1, 1, 1)
    inputs = {"b": (b, b), "h": (h, h), "q_idx": positions(qt0, qt1 - qt0, block_q, Q_LEN, (1, 1, -1, 1)),
              "kv_idx": positions(0, nkv, block_kv, KV_LEN, (1, 1, 1, -1))}
    # the graph's inputs, not the bounds' shape, say whether tiles differ by b or h: a bound left
    # unknown is a scalar even where the mask reads h
    used = _inputs_read(graph.output)
    shape = (B if "b" in used else 1, H if "h" in used else 1, qt1 - qt0, nkv)
    return _Bounds(graph, inputs, device), shape


def tile_bounds(graph: Graph, B: int, H: int, Q_LEN: int, KV_LEN: int, block_q: int, block_kv: int, device,
                q_tiles=None):
    """(certainly visible, possibly visible): bool [B or 1, H or 1, nQ, nKV] over each tile's
    in-range positions (padded rows and keys excluded); of the query tiles q_tiles = (first, end)
    alone where given."""
    bounds, shape = _analyse(graph, B, H, Q_LEN, KV_LEN, block_q, block_kv, device, q_tiles)
    certain, possible = bounds.of(graph.output)
    return certain.expand(shape), possible.expand(shape)


def box_bounds(graph: Graph, b: torch.Tensor, h: torch.Tensor, q_range, kv_range, device):
    """(certainly visible, possibly visible) of boxes of positions other than a tile grid (a
    paged cache's pages): b and h exact int64 indices, q_range and kv_range (first, last) int64
    tensors, all broadcastable, every position of a box in range and first <= last."""
    return _Bounds(graph, {"b": (b, b), "h": (h, h), "q_idx": q_range, "kv_idx": kv_range}, device).of(graph.output)


def tile_analysis(graph: Graph, B: int, H: int, Q_LEN: int, KV_LEN: int, block_q: int, block_kv: int, device,
                  q_tiles=None):
    """tile_bounds, and whether each tile's mask is the same on every row (bool, same shape):
    such a tile is known from one row."""
    bounds, shape = _analyse(graph, B, H, Q_LEN, KV_LEN, block_q, block_kv, device, q_tiles)
    certain, possible = bounds.of(graph.output)
    first_tile = q_tiles[0] if q_tiles else 0
    rows = torch.clamp(Q_LEN - (torch.arange(shape[2], device=device) + first_tile) * block_q, max=block_q)
    varies = _RowDependence(bounds, (rows > 1).view(1, 1, -1, 1)).of(graph.output)
    return certain.expand(shape), possible.expand(shape), (~varies).expand(shape)


def query_tile_chunks(nq: int, tiles_per_query_tile: int):
    """(first, end) bands of query tiles of about BOUNDED_TILES_PER_CHUNK tiles each."""
    step = max(1, BOUNDED_TILES_PER_CHUNK // max(1, tiles_per_query_tile))
    return [(qt0, min(nq, qt0 + step)) for qt0 in range(0, nq, step)]


def row_invariant_tiles(mask_mod, Q_LEN: int, KV_LEN: int, block_q: int, block_kv: int, device):
    """bool [nQ, nKV]: tiles whose mask is the same on every row (of a mask that reads neither b
    nor h), or None when the mask does not trace."""
    try:
        graph = trace(mask_mod, "mask_mod")
    except TraceError:
        return None
    nq, nkv = -(-Q_LEN // block_q), -(-KV_LEN // block_kv)
    try:
        return torch.cat([tile_analysis(graph, 1, 1, Q_LEN, KV_LEN, block_q, block_kv, device, chunk)[2][0, 0]
                          for chunk in query_tile_chunks(nq, nkv)])
    except Exception:   # as in classify_by_bounds: the caller checks every row instead
        return None


def evaluated_tiles(mask_mod, tiles, same_rows, block_q: int, block_kv: int, Q_LEN: int, KV_LEN: int,
                    chunk_elements: int):
    """Evaluate the listed tiles (rows of [b, h, q tile, kv tile]) in chunks: on their first row
    where same_rows says every row is alike, on all rows elsewhere. Yields (tiles of the chunk,
    rows read: 1 or block_q, tile_elements' (visible, q, kv) for them)."""
    for group, rows_read in ((tiles[same_rows], 1), (tiles[~same_rows], block_q)):
        per_chunk = max(1, chunk_elements // (rows_read * block_kv))
        for t0 in range(0, group.shape[0], per_chunk):
            chunk = group[t0:t0 + per_chunk]
            bt, ht, qt, kt = chunk.unbind(1)
            first = qt * block_q // rows_read   # the tile's first row as a tile of rows_read rows
            yield chunk, rows_read, tile_elements(mask_mod, bt, ht, first, kt, rows_read, block_kv, Q_LEN, KV_LEN)


def _inputs_read(node: Node) -> set:
    """Names of the inputs (b, h, q_idx, kv_idx) the expression reads."""
    seen, names, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op == "input":
            names.add(n.attr)
        stack.extend(a for a in n.args if isinstance(a, Node))
    return names


def _settle_by_samples(mask_mod, tiles, states, whole_keys, Q_LEN, KV_LEN, block_q, block_kv):
    """Mark PARTIAL the undecided tiles that a few sampled pairs already prove partial (one
    visible and one hidden, or one visible in a tile with padded keys); return the others.
    The samples are the corners, edge midpoints and centre of the tile's in-range positions:
    a causal diagonal or a column every chunk (attamba) shows both values there."""
    if tiles.shape[0] == 0:
        return tiles
    bt, ht, qt, kt = (c.view(-1, 1) for c in tiles.unbind(1))
    q0, kv0 = qt * block_q, kt * block_kv
    q1, kv1 = torch.clamp(q0 + block_q - 1, max=Q_LEN - 1), torch.clamp(kv0 + block_kv - 1, max=KV_LEN - 1)
    q_at = torch.cat([q0, (q0 + q1) // 2, q1], 1).repeat_interleave(3, 1)   # 3 x 3 points per tile
    kv_at = torch.cat([kv0, (kv0 + kv1) // 2, kv1], 1).repeat(1, 3)
    seen = evaluate_mask_mod(mask_mod, bt.to(INDEX_DTYPE), ht.to(INDEX_DTYPE), q_at.to(INDEX_DTYPE),
                             kv_at.to(INDEX_DTYPE))
    visible, hidden = seen.any(1), (~seen).any(1)
    partial = visible & (hidden | ~whole_keys[kt.view(-1)])
    at = tuple(c.view(-1) for c in (bt, ht, qt, kt))
    states[at] = torch.where(partial, PARTIAL, states[at])   # no host sync; the one below remains
    return tiles[~partial]


# Decide most tiles from the traced mask's bounds over each tile, evaluating only the undecided
# ones element by element; masks that do not trace take the chunked element-wise build.
USE_BOUNDS = True
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# On a GPU a chunk of 2^28 booleans (256 MiB) keeps the launches few and the memory small; a
# compiled build never materializes its chunk, so it takes larger ones.
CUDA_CHUNK_ELEMENTS = 1 << 28
COMPILED_CHUNK_ELEMENTS = 1 << 30


def classify_tiles(
    mask_mod, B: int, H: int, Q_LEN: int, KV_LEN: int, block_q: int, block_kv: int,
    device, chunk_elements: int | None = None, compile: bool = False, use_bounds: bool = True,
) -> torch.Tensor:
    """Tile states int8 [B, H, nQ, nKV]: 0 empty, 1 partial, 2 full.

    A tile is full when every in-range (q, kv) pair in it is visible and it has no padded
    keys; padded query rows (Q_LEN not a multiple of block_q) do not count, since no kernel
    computes them. Padded keys do count (they must be masked), so a key tail tile is at most
    partial. compile=True evaluates each chunk in one fused kernel (torch.compile, as
    FlexAttention's create_block_mask(_compile=True)): a first call per mask_mod and shape pays
    the compile time, later calls never write the chunk's mask to memory. use_bounds=False
    evaluates every tile element by element, as USE_BOUNDS = False does for all calls (the plan
    benchmark times the two builds against each other without touching the module's default).
    """
    device = torch.device(device)
    if chunk_elements is None:
        chunk_elements = (COMPILED_CHUNK_ELEMENTS if compile else CUDA_CHUNK_ELEMENTS) if device.type == "cuda" \
            else DEFAULT_CHUNK_ELEMENTS
    if not compile and use_bounds and USE_BOUNDS:
        states = classify_by_bounds(mask_mod, B, H, Q_LEN, KV_LEN, block_q, block_kv, device, chunk_elements)
        if states is not None:
            return states
    uses_b, uses_h = mask_dependence(mask_mod, B, H, Q_LEN, KV_LEN, device)
    states = torch.empty((B, H, ceil_div(Q_LEN, block_q), ceil_div(KV_LEN, block_kv)), dtype=torch.int8, device=device)
    classify_query_tiles(mask_mod, states, 0, states.shape[2], Q_LEN, KV_LEN, block_q, block_kv, chunk_elements,
                         compile, (B if uses_b else 1) * (H if uses_h else 1))
    return states


def classify_by_bounds(mask_mod, B: int, H: int, Q_LEN: int, KV_LEN: int, block_q: int, block_kv: int,
                       device, chunk_elements: int) -> torch.Tensor | None:
    """Tile states int8 [B, H, nQ, nKV] as classify_tiles defines them, or None when
    the mask does not trace. A band of query tiles at a time (query_tile_chunks) is bounded,
    sampled and its undecided tiles evaluated; a band whose tiles bounds and samples mostly leave
    undecided is evaluated element by element, which is as cheap there."""
    try:
        graph = trace(mask_mod, "mask_mod")
    except TraceError:
        return None
    used = _inputs_read(graph.output)
    bh = (B if "b" in used else 1), (H if "h" in used else 1)
    nq, nkv = -(-Q_LEN // block_q), -(-KV_LEN // block_kv)
    whole_keys = torch.ones(nkv, dtype=torch.bool, device=device)
    if KV_LEN % block_kv:
        whole_keys[-1] = False   # padded keys must be masked: that tile is partial at most
    states = torch.empty((*bh, nq, nkv), dtype=torch.int8, device=device)
    for qt0, qt1 in query_tile_chunks(nq, bh[0] * bh[1] * nkv):
        try:
            certain, possible, one_row = tile_analysis(graph, B, H, Q_LEN, KV_LEN, block_q, block_kv, device,
                                                       (qt0, qt1))
        except Exception as e:   # a gap in the interval rules must cost speed, never a build
            warn_once(f"flex_flash_infer: tile bounds failed on mask_mod {getattr(mask_mod, '__name__', mask_mod)!r} "
                      f"({type(e).__name__}: {e}); its block mask is built element by element")
            return None
        states[:, :, qt0:qt1] = torch.where(certain, torch.where(whole_keys, FULL, PARTIAL), EMPTY)
        tiles = (possible & ~certain).nonzero()
        tiles[:, 2] += qt0
        tiles = _settle_by_samples(mask_mod, tiles, states, whole_keys, Q_LEN, KV_LEN, block_q, block_kv)
        if tiles.shape[0] > MAX_UNDECIDED_SHARE * certain.numel():
            classify_query_tiles(mask_mod, states, qt0, qt1, Q_LEN, KV_LEN, block_q, block_kv, chunk_elements,
                                 mask_copies=bh[0] * bh[1])
            continue
        # tiles whose every row is the same (attamba's key columns below its window, say) from one row
        bt, ht, qt, kt = tiles.unbind(1)
        same_rows = one_row[bt, ht, qt - qt0, kt]
        for chunk, rows_read, (visible, _, _) in evaluated_tiles(mask_mod, tiles, same_rows, block_q, block_kv,
                                                                 Q_LEN, KV_LEN, chunk_elements):
            bt, ht, qt, kt = chunk.unbind(1)
            rows = torch.clamp(Q_LEN - qt * block_q, max=block_q)
            count = visible.flatten(1).sum(1) * (rows if rows_read == 1 else 1)
            states[bt, ht, qt, kt] = torch.where(count == rows * block_kv, FULL,
                                                 torch.where(count > 0, PARTIAL, EMPTY)).to(torch.int8)
    return states.expand(B, H, *states.shape[2:]).contiguous()


def check_table_indices(graph: Graph | None, B: int, H: int, Q_LEN: int, KV_LEN: int, device, what: str) -> None:
    """Raise TraceError when a table the graph reads may be indexed outside [-size, size) at a
    position of this call (b < B, h < H, q_idx < Q_LEN, kv_idx < KV_LEN): torch raises IndexError
    there, and a compiled kernel, which checks no upper bound, would read outside the table. An
    index the bounds cannot follow (computed from the score or a float) is left unchecked.
    device: where to evaluate (the CPU: a few scalar ops, no GPU syncs; tables read in an index
    are copied there)."""
    if graph is None or not graph.tensors:
        return

    def span(n):
        return (torch.zeros((), dtype=torch.int64, device=device),
                torch.full((), max(n, 1) - 1, dtype=torch.int64, device=device))

    lengths = {"b": B, "h": H, "q_idx": Q_LEN, "kv_idx": KV_LEN}
    bounds = _Bounds(graph, {name: span(n) for name, n in lengths.items()}, device)
    shapes = {name: tuple(t.shape) for name, t in graph.tensors}
    seen, stack = set(), [graph.output]
    while stack:
        node = stack.pop()
        if id(node) in seen or not isinstance(node, Node):
            continue
        seen.add(id(node))
        stack.extend(a for a in node.args if isinstance(a, Node))
        if node.op != "load":
            continue
        shape = shapes[node.attr]
        for dim, index in enumerate(node.args):
            r = bounds.ints(index)
            if r is None:
                continue
            lo, hi, n = int(r[0].min()), int(r[1].max()), shape[dim]
            read = _inputs_read(index)
            if (lo < -n or hi >= n) and len(read) == 1:
                # an index of one position (kv - doc_start[doc[kv]]): its intervals treat kv and a
                # function of kv as independent; its exact values over that position's range decide
                name = read.pop()
                points = torch.arange(lengths[name], dtype=torch.int64, device=device)
                exact = _Bounds(graph, {**{k: span(m) for k, m in lengths.items()}, name: (points, points)},
                                device).ints(index)
                if exact is not None:
                    lo, hi = int(exact[0].min()), int(exact[1].max())
            if lo < -n or hi >= n:
                raise TraceError(
                    f"the {what} indexes a captured tensor of shape {tuple(shape)} along dimension {dim} with values "
                    f"that reach [{lo}, {hi}] at the positions of this call (b < {B}, h < {H}, q_idx < {Q_LEN}, "
                    f"kv_idx < {KV_LEN}); torch raises IndexError outside [-{n}, {n - 1}], and a FlashInfer kernel "
                    f"would read outside the tensor: clamp the index (torch.clamp) or size the tensor for every "
                    f"position")
