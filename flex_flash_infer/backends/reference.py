"""The reference backend: FlexAttention semantics in plain torch, on any device.

It is the correctness oracle and the CPU path. Work is chunked over query rows so memory
stays bounded (one [B, Hq, rows, KV] score block at a time); compute is float32 (float64
for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from .autograd import StandIns, anchored, learned_tensors, needs_grad
from .reference_pieces import (BAND_ROWS, BandPiece, CausalPiece, TilePiece, additive_mask, band_runs, is_causal,
                               row_intervals)
from ..masks.block_build import FULL, PARTIAL
from ..core.mask_eval import call_mask_mod, evaluate_mask_mod, evaluate_score_mod, index_grid
from ..core.trace import current_reads
from ..core.versions import KeptReads

DEFAULT_CHUNK_ELEMENTS = 1 << 24


def visible_pairs(block_mask, b_idx, h_idx, q_idx, kv_idx) -> torch.Tensor:
    """Exact FlexAttention visibility on a grid: full tiles, or partial tiles where mask_mod holds."""
    bq, bkv = block_mask.BLOCK_SIZE
    states = block_mask.states.to(q_idx.device)
    # Broadcast dims of size 1 in the tables apply to every batch entry / head.
    sb = b_idx if states.shape[0] > 1 else torch.zeros_like(b_idx)
    sh = h_idx if states.shape[1] > 1 else torch.zeros_like(h_idx)
    tile = states[sb.long(), sh.long(), (q_idx // bq).long(), (kv_idx // bkv).long()]
    in_mask = evaluate_mask_mod(block_mask.mask_mod, b_idx, h_idx, q_idx, kv_idx)
    return (tile == FULL) | ((tile == PARTIAL) & in_mask)


def reference_attention(query, key, value, block_mask=None, score_mod=None, scale=None,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, return_max: bool = False):
    """out [B, Hq, L, Ev] in query's dtype and natural-log lse [B, Hq, L] float32 (and, with
    return_max, each row's largest visible score after score_mod, float32 [B, Hq, L]).

    query [B, Hq, L, E]; key [B, Hkv, S, E]; value [B, Hkv, S, Ev]; Hq a multiple of Hkv
    (query head h reads key head h // (Hq // Hkv)). A row that sees no key gives 0, lse -inf
    and max -inf; a NaN in a row's scores (a NaN query, a NaN visible key or value) gives NaN,
    as torch does. Differentiable: every output keeps the autograd graph of its inputs, and of
    the tensors a score_mod captures.
    """
    if score_mod is None and not return_max and block_mask is not None:
        fast = tile_sparse_attention(query, key, value, block_mask, scale)
        if fast is not None:
            return fast
    outs, lses, maxes = [], [], []
    for r0, r1, c0, c1 in row_chunks(query, key, block_mask, chunk_elements):
        out, lse, row_max = attend_rows(query[:, :, r0:r1], key, value, block_mask, score_mod, scale, r0, c0, c1)
        outs.append(out)
        lses.append(lse)
        maxes.append(row_max)
    out, lse, row_max = torch.cat(outs, 2), torch.cat(lses, 2), torch.cat(maxes, 2)
    if not out.requires_grad and torch.is_grad_enabled():
        # every row is empty: zeros that still reach the inputs, as torch's outputs do, and the
        # tensors the score_mod reads (their gradient is 0, not missing)
        inputs = (query, key, value, *learned_tensors(score_mod, query.device))
        if needs_grad(*inputs):
            out, lse, row_max = anchored(inputs, out, lse, row_max)
    return (out, lse, row_max) if return_max else (out, lse)


def reference_gradients(query, key, value, captured, block_mask, score_mod, scale, grad_out, grad_lse, needs,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list:
    """The gradients of reference_attention's (out, lse) for grad_out and grad_lse, with respect to
    query, key, value and each captured tensor (what the score_mod reads), one entry per input
    (None where needs is False): attention recomputed under enable_grad one row chunk at a
    time, so only one chunk's graph is alive. The backward of the FlashInfer doors."""
    inputs = (query, key, value, *captured)
    with torch.enable_grad():
        k = key.detach().requires_grad_(needs[1])
        v = value.detach().requires_grad_(needs[2])
        # the tables as the score_mod reads them, cut from the user's graph (StandIns)
        stand_ins = [t.detach().requires_grad_(need) for t, need in zip(captured, needs[3:])]
        reading = StandIns(captured, stand_ins)
        grads = [None] * len(inputs)
        for r0, r1, c0, c1 in row_chunks(query, key, block_mask, chunk_elements):
            if c1 <= c0:
                continue   # no key visible: zero gradient for these rows
            q = query[:, :, r0:r1].detach().requires_grad_(needs[0])
            # each table twice: its stand-in (what the mod reads of it), and the table itself, for
            # a tensor derived from it that the mod keeps and the search did not find (a copy
            # made at the first call): the two paths are disjoint, their gradients add up
            wrt = [(i, t) for i, t in enumerate((q, k, v, *stand_ins)) if needs[i]]
            wrt += [(3 + j, t) for j, t in enumerate(captured) if needs[3 + j]]
            with reading:
                out, lse, _ = attend_rows(q, k, v, block_mask, score_mod, scale, r0, c0, c1)
            outputs, seeds = [out], [grad_out[:, :, r0:r1]]
            if grad_lse is not None:
                outputs.append(lse)
                seeds.append(grad_lse[:, :, r0:r1])
            # an output with no graph (the LSE of a score_mod that ignores the score) takes no seed
            live = [(o, s) for o, s in zip(outputs, seeds) if o.requires_grad]
            if not wrt or not live:
                continue
            # retain_graph: a tensor the score_mod computes from a table out of the search's sight
            # is read as it is, its graph behind it, which the next chunk needs again
            found = torch.autograd.grad([o for o, _ in live], [t for _, t in wrt], [s for _, s in live],
                                        allow_unused=True, retain_graph=True)
            for (i, _), g in zip(wrt, found):
                if g is None:
                    continue
                if i == 0:
                    if grads[0] is None:
                        grads[0] = torch.zeros_like(query)
                    grads[0][:, :, r0:r1] = g
                else:
                    grads[i] = g if grads[i] is None else grads[i] + g
    # q, k or v that got no gradient (nothing visible): zeros; a captured tensor the score_mod did
    # not use: None, as autograd leaves it (a zero .grad would still move it under weight decay)
    return [None if not need else (g if g is not None or i >= 3 else torch.zeros_like(t))
            for i, (need, g, t) in enumerate(zip(needs, grads, inputs))]


def row_chunks(query, key, block_mask, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """(r0, r1, c0, c1) per chunk of query rows: the rows, and the span of keys of their non-empty
    tiles (c1 <= c0 when no key is visible to any of them). One [B, Hq, rows, keys] score block
    per chunk keeps memory bounded."""
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    rows = max(1, chunk_elements // max(1, B * Hq * S))
    spans = _key_spans(block_mask, S) if block_mask is not None else None
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        c0, c1 = (0, S) if spans is None else _chunk_span(spans, block_mask.BLOCK_SIZE[0], r0, r1)
        yield r0, r1, c0, c1


def attend_rows(query, key, value, block_mask, score_mod, scale, r0: int, c0: int, c1: int):
    """(out [B, Hq, rows, Ev] in query's dtype, lse and row max [B, Hq, rows] float32) of the
    query rows [B, Hq, rows, E] at positions r0.. over keys c0..c1, in differentiable torch ops."""
    B, Hq, rows, E = query.shape
    Hkv = key.shape[1]
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    r1 = r0 + rows
    if c1 <= c0:   # no key visible to any row of this chunk
        return (query.new_zeros((B, Hq, rows, value.shape[-1])),
                query.new_full((B, Hq, rows), float("-inf"), dtype=torch.float32),
                query.new_full((B, Hq, rows), float("-inf"), dtype=torch.float32))
    group = Hq // Hkv
    k = key[:, :, c0:c1].to(compute).repeat_interleave(group, dim=1)
    v = value[:, :, c0:c1].to(compute).repeat_interleave(group, dim=1)
    b_idx, h_idx, _, kv_idx = index_grid(range(B), range(Hq), [0], range(c0, c1), query.device)
    q_idx = torch.arange(r0, r1, device=query.device, dtype=kv_idx.dtype).view(1, 1, -1, 1)
    scores = torch.matmul(query.to(compute), k.transpose(-1, -2)) * scale
    if score_mod is not None:
        scores = evaluate_score_mod(score_mod, scores, b_idx, h_idx, q_idx, kv_idx)
    if block_mask is not None:
        visible = visible_pairs(block_mask, b_idx, h_idx, q_idx, kv_idx)
        scores = scores.masked_fill(~visible, float("-inf"))
    # softmax with the row max taken out, in the form p = exp(score - lse): amax propagates NaN, so
    # a NaN score makes its row NaN (never a hidden 0); an empty row (max -inf) sums to 1 instead
    # of 0, and the where()s give it exact zeros in value and in gradient (logsumexp's backward is
    # NaN there); a row with a +inf score gets lse +inf and NaN only where torch has it (at the
    # +inf keys), so a masked key's gradient stays 0
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = row_max == float("-inf")
    shift = torch.where(torch.isfinite(row_max), row_max.detach(), 0.0)   # softmax ignores the shift
    shifted = scores - shift
    log_total = torch.log(torch.where(empty, 1.0, torch.exp(shifted).sum(dim=-1, keepdim=True)))
    # the weights from (score - shift) - log(total), not score - lse: lse = shift + log(total) rounds
    # to the shift's precision, and every weight of the row would carry that error (rows summing to
    # 1 only within the shift's ulp); log(total) is small, so its rounding is the weights' own
    out = torch.matmul(torch.exp(shifted - log_total), v)
    lse = torch.where(empty, float("-inf"), log_total + shift).squeeze(-1)
    return out.to(query.dtype), lse.to(torch.float32), row_max.squeeze(-1).to(torch.float32)


def _key_spans(block_mask, kv_len: int):
    """Per block row, [first, last + 1) key of its non-empty tiles over every (b, h): [nQ, 2]."""
    nonempty = (block_mask.states != 0).flatten(0, 1).any(0).cpu()  # [nQ, nKV]
    bkv = block_mask.BLOCK_SIZE[1]
    cols = torch.arange(nonempty.shape[1])
    first = torch.where(nonempty, cols, nonempty.shape[1]).amin(1) * bkv
    last = (torch.where(nonempty, cols, -1).amax(1) + 1) * bkv
    return torch.stack([first, last.clamp(max=kv_len)], 1).tolist()


def _chunk_span(spans, block_q: int, r0: int, r1: int):
    rows = spans[r0 // block_q:(r1 - 1) // block_q + 1]
    return min(a for a, _ in rows), max(b for _, b in rows)


# torch's fused CPU attention, which also returns the log-sum-exp
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# a query tile's key tiles are read in place (one slice) when at least this share of their span is non-empty
SLICE_SHARE = 0.5
# a query tile with partial tiles runs as two halves, each over the keys its rows see, when that
# leaves at most this share of the keys (a window: 2 x 319 of 2 x 384 keys at 256 / 128): the
# fused kernel's time follows its keys (measured on a 2-core EPYC: 64-row blocks 25% faster for a
# 256-token window than whole tiles)
SPLIT_SHARE = 0.85
# the pieces of a block mask (keys and additive masks per query tile) are kept for later calls up
# to this many bytes of masks; beyond it they are worked out at every call
PIECES_CACHE_BYTES = 64 << 20


def tile_sparse_attention(query, key, value, block_mask, scale):
    """(out, lse) of a call without score_mod and without gradients on the CPU, or None where
    that does not apply: per query tile, torch's fused CPU attention over the keys of its
    non-empty tiles only (one slice when they are dense in their span, else gathered), with
    an additive mask of -inf where tiles are partial or empty (a tile with partial ones in two
    halves, each over the keys its rows see). Exact like the chunked path (same visibility);
    mask_mod runs on partial tiles only, once per block mask while what it reads is unchanged.
    Inputs with NaN or inf take the chunked path, whose masking keeps a hidden key's NaN or inf
    score out of a row; a NaN or inf in a hidden key's value still reaches the rows of a chunk
    whose key span holds it (0 x NaN in the product with the values), as in torch's own
    flex_attention, whose eager form spans every key."""
    if (_FUSED_CPU is None or query.device.type != "cpu" or query.dtype not in FUSED_DTYPES
            or value.shape[-1] != query.shape[-1] or needs_grad(query, key, value) or not _all_finite(value)):
        return None
    E = query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    # every score finite: |q.k| * |scale| <= max|q| * max|k| * E * |scale| (a NaN or inf input makes
    # the bound so); the fused kernel gives 0 or a finite LSE where a score overflows to +-inf,
    # while the chunked path gives torch's NaN and -inf
    compute = torch.finfo(torch.float64 if query.dtype == torch.float64 else torch.float32)
    if not _largest(query) * _largest(key) * E * abs(scale) < compute.max / 4:
        return None
    # torch's fused CPU kernel reads the last dimension as unit-stride (torch's public
    # scaled_dot_product_attention copies such inputs first; its private op does not)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    B, Hq, L, _ = query.shape
    out = query.new_zeros(B, Hq, L, E)
    lse = query.new_full((B, Hq, L), float("-inf"), dtype=torch.float32)
    for piece in _pieces(block_mask, B, Hq, L, key.shape[2], query.dtype):
        piece.run(_FUSED_CPU, query, key, value, scale, out, lse)
    return out, lse


def _pieces(block_mask, B: int, Hq: int, L: int, S: int, dtype) -> list:
    """The pieces (reference_pieces) covering every query row that sees a key; kept on the block mask
    (with the backend plans, dropped when its tables or fields change) while what the mask_mod
    reads is unchanged: its expression and numbers, and the values of the tensors it reads,
    compared with a copy at each call (the reference is the oracle: a write through .data,
    numpy or an inference tensor moves no version counter, and torch's flex_attention evaluates
    the mask_mod anew at each call)."""
    cache = getattr(block_mask, "_plans", None)
    key = ("reference pieces", B, Hq, L, S, dtype)
    state = current_reads(block_mask.mask_mod, "mask_mod") if cache is not None else None
    if cache is not None:
        block_mask._fresh()
        kept = cache.get(key)
        if kept is not None and kept[0].holds(state):
            return kept[1]
    pieces = _make_pieces(block_mask, B, Hq, L, S, dtype)
    size = sum(piece.mask_bytes for piece in pieces)
    # a mask_mod that does not trace reads what no state records: worked out at every call (and
    # one reading a tensor off the CPU, or too much to copy, whose values the state cannot keep)
    if cache is not None and state is not None and size <= PIECES_CACHE_BYTES:
        kept = KeptReads(state)
        if kept.by_value:
            cache[key] = (kept, pieces)
    return pieces


def _make_pieces(block_mask, B, Hq, L, S, dtype) -> list:
    bq, bkv = block_mask.BLOCK_SIZE
    states = block_mask.states.cpu()
    # per tile over every (b, h), read once: which tiles any row sees, which are full for all
    flat = states.flatten(0, 1)
    seen_tiles = (flat != 0).any(0).tolist()
    full_tiles = (flat == FULL).all(0).tolist()
    tiles = []   # (r0, r1, keys, visible or None: all full) per query tile that sees keys
    for qt in range(min(states.shape[2], -(-L // bq))):
        r0, r1 = qt * bq, min(L, (qt + 1) * bq)
        kept = [kt for kt, seen in enumerate(seen_tiles[qt]) if seen and kt * bkv < S]
        if not kept:
            continue
        first, last = kept[0], kept[-1] + 1
        if len(kept) >= SLICE_SHARE * (last - first):
            kept = list(range(first, last))
            keys = torch.arange(first * bkv, min(S, last * bkv))
        else:
            keys = (torch.tensor(kept).view(-1, 1) * bkv + torch.arange(bkv)).flatten()
            keys = keys[keys < S]
        full = all(full_tiles[qt][kt] for kt in kept)
        tiles.append((r0, r1, keys, None if full else
                      _tile_row_visibility(block_mask, states[:, :, qt], kept, keys, B, Hq, r0, r1)))
    intervals = row_intervals(tiles, L)
    if L and is_causal(*intervals, S):
        return [CausalPiece()]
    runs = band_runs(*intervals)
    pieces = [BandPiece(r0, blocks, a, c, dtype) for r0, blocks, a, c in runs]
    # every other row in its query tile's pieces
    taken = [(p.r0, p.r0 + p.blocks * BAND_ROWS) for p in pieces]
    for r0, r1, keys, visible in tiles:
        for a, b in _rows_left(r0, r1, taken):
            if visible is None:
                pieces.append(TilePiece(a, b, _as_index(keys), None, None))
            else:
                rows = visible[..., a - r0:b - r0, :] if visible.shape[-2] > 1 else visible
                pieces += _split_rows(rows, keys, a, b, dtype)
    return pieces


def _rows_left(r0: int, r1: int, taken: list) -> list:
    """The ranges of rows r0..r1 outside every (t0, t1) in taken."""
    left = [(r0, r1)]
    for t0, t1 in taken:
        left = [part for a, b in left for part in ((a, min(b, t0)), (max(a, t1), b)) if part[1] > part[0]]
    return left


def _split_rows(visible, keys, r0: int, r1: int, dtype) -> list:
    """The pieces of one query tile's rows: whole, or two halves over the span of keys their rows see."""
    rows = r1 - r0
    halves = []
    if rows >= 2 and visible.shape[-2] == rows:   # (a mask the same on every row comes broadcast: whole)
        middle = rows // 2
        for a, b in ((0, middle), (middle, rows)):
            cols = visible[..., a:b, :].flatten(0, -2).any(0).nonzero().flatten()
            halves.append((a, b) + ((int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)))
    spans = sum(c1 - c0 for _, _, c0, c1 in halves)
    if not halves or spans > SPLIT_SHARE * 2 * keys.numel():
        halves = [(0, rows, 0, keys.numel())]
    pieces = []
    for a, b, c0, c1 in halves:
        if c1 <= c0:
            continue   # no row of this half sees a key: zeros and -inf as made
        part = visible[..., a:b, c0:c1] if visible.shape[-2] == rows else visible[..., c0:c1]
        mask = additive_mask(part, dtype)
        seen = part.any(-1)   # [B or 1, H or 1, rows]
        pieces.append(TilePiece(r0 + a, r0 + b, _as_index(keys[c0:c1]), mask, None if bool(seen.all()) else ~seen))
    return pieces


def _as_index(keys: torch.Tensor):
    """A slice for consecutive keys (a view of k and v), else the index tensor (a gather)."""
    if keys.numel() and int(keys[-1]) - int(keys[0]) + 1 == keys.numel():
        return slice(int(keys[0]), int(keys[-1]) + 1)
    return keys


def _largest(t: torch.Tensor) -> float:
    """The largest magnitude in t (inf or NaN when one is), in one pass."""
    if t.numel() == 0:
        return 0.0
    low, high = torch.aminmax(t)
    return max(abs(float(low)), abs(float(high)))


def _all_finite(t: torch.Tensor) -> bool:
    """True only if no element is NaN or inf: one summing pass, as a NaN or inf makes the sum NaN or
    inf (far cheaper than isfinite().all()); a sum that overflows says False too, which only sends
    the call the exact chunked way."""
    return bool(torch.isfinite(t.sum()))


def _tile_row_visibility(block_mask, row_states, tiles, keys, B, Hq, r0, r1) -> torch.Tensor:
    """Bool [B or 1, Hq or 1, rows, keys]: which keys each row of query tile rows r0..r1 sees, the
    keys being those of `tiles` (in order, the last one cut at the sequence end): full tiles
    visible, empty hidden, mask_mod evaluated on the keys of tiles partial for some (b, h) only."""
    bkv = block_mask.BLOCK_SIZE[1]
    cols = row_states[:, :, torch.tensor(tiles)].repeat_interleave(bkv, -1)[..., :keys.numel()]
    cols = cols.unsqueeze(2)                                     # [B or 1, H or 1, 1, keys]
    visible = cols == FULL
    partial = (cols == PARTIAL).flatten(0, 2).any(0).nonzero().flatten()
    if partial.numel() == 0:
        return visible
    b, h, q, kv = index_grid(range(B), range(Hq), range(r0, r1), keys[partial], keys.device)
    at = cols[..., partial]   # a tile partial for one (b, h) may be full or empty for another
    inside = (at == FULL) | ((at == PARTIAL) & call_mask_mod(block_mask.mask_mod, b, h, q, kv))
    shape = torch.broadcast_shapes(visible.shape, inside.shape[:-1] + (keys.numel(),))
    visible = visible.expand(shape).clone()
    visible[..., partial] = inside.expand(shape[:-1] + (partial.numel(),))
    return visible
