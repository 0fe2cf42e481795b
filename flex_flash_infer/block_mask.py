"""BlockMask: FlexAttention's block-sparse description of a mask, with torch's field names."""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Callable

import torch

from .masks.block_build import (EMPTY, FULL, PARTIAL, ceil_div, classify_query_tiles, ordered_indices,
                                states_from_tables)
from .masks.tile_bounds import classify_tiles
from .core.mask_eval import as_mask_mod, evaluate_mask_mod, index_grid, mask_dependence
from .core.compiling import outside_compiled_graphs
from .core.notices import warn_once
from .core.trace import ReadsMemo, current_reads
from .core.versions import KeptReads
from .mods.combinators import noop_mask
from .core.validation import check_device, check_positive_int, check_scale


def _block_sizes(BLOCK_SIZE) -> tuple[int, int]:
    def is_int(s):
        return isinstance(s, numbers.Integral) and not isinstance(s, bool)

    if is_int(BLOCK_SIZE):
        sizes = (int(BLOCK_SIZE), int(BLOCK_SIZE))
    elif isinstance(BLOCK_SIZE, (tuple, list)) and len(BLOCK_SIZE) == 2 and all(is_int(s) for s in BLOCK_SIZE):
        sizes = tuple(int(s) for s in BLOCK_SIZE)
    else:   # a float is never rounded: (16, 2.7) is a mistake, not a 2
        raise TypeError(f"BLOCK_SIZE must be an int or a (q_block, kv_block) pair of ints, got {BLOCK_SIZE!r}")
    if min(sizes) < 1:
        raise ValueError(f"BLOCK_SIZE must be positive, got {BLOCK_SIZE!r}")
    return sizes


def _sliced_mask_mod(b, h, q_idx, kv_idx):
    raise RuntimeError("this BlockMask was sliced (block_mask[...]): set its mask_mod first, with the query "
                       "positions it now stands for (as torch's decoding idiom does), e.g. "
                       "sliced.mask_mod = lambda b, h, q, kv: mask_mod(b, h, q + offset, kv)")


_TABLE_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


class _Contents:
    """Stands in for the write counter of an inference tensor (made under torch.inference_mode(),
    which keeps none): a copy of its values when seen, compared with the tensor's values at the
    next check, so a table refilled in place inside inference_mode (a decoding loop) is noticed
    too. A compare per check for such a table (on a GPU a sync), a copy when it changed."""
    __slots__ = ("values",)

    def __init__(self, t: torch.Tensor):
        self.values = t.clone()

    def holds(self, t: torch.Tensor) -> bool:
        a = self.values
        return a.shape == t.shape and a.dtype == t.dtype and a.device == t.device and bool(torch.equal(a, t))


def _versions(tables) -> tuple:
    """Each table's in-place write counter (torch bumps _version on every in-place write, a view's
    writes included): the cheap way to notice tables refilled in place. An inference tensor keeps
    no counter: its values stand in for it (_Contents)."""
    out = []
    for t in tables:
        if t is None:
            out.append(None)
        elif t.is_inference():
            out.append(_Contents(t))
        else:
            try:
                out.append(t._version)
            except RuntimeError:
                out.append(_Contents(t))
    return tuple(out)


def _unchanged(tables, versions) -> bool:
    """Whether each table is as _versions saw it (the same tables, by identity, are the caller's
    check): its counter, or its values for one that keeps none (no copy made to compare)."""
    for t, seen in zip(tables, versions):
        if isinstance(seen, _Contents):
            if not seen.holds(t):
                return False
        elif t is not None and t._version != seen:
            return False
    return True


def _check_tables(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) -> None:
    """Refuse malformed tables where they are given, not at first use deep in the planner."""
    if (full_kv_num_blocks is None) != (full_kv_indices is None):
        given, missing = (("full_kv_num_blocks", "full_kv_indices") if full_kv_indices is None
                          else ("full_kv_indices", "full_kv_num_blocks"))
        raise ValueError(f"full_kv_num_blocks and full_kv_indices must be given together or both left out "
                         f"(None): {given} was given but {missing} is None")
    expected = {"kv_num_blocks": (3, "[B, H, num_q_blocks]"),
                "kv_indices": (4, "[B, H, num_q_blocks, num_kv_blocks]"),
                "full_kv_num_blocks": (3, "[B, H, num_q_blocks]"),
                "full_kv_indices": (4, "[B, H, num_q_blocks, num_kv_blocks]")}
    tables = dict(zip(_TABLE_NAMES, (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)))
    for name, table in tables.items():
        dims, shape = expected[name]
        if table is None and name.startswith("full_"):
            continue
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{name} must be an integer tensor {shape}, got {type(table).__name__}")
        if table.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions, {shape} (B or H of 1 broadcast over the "
                             f"batch or the heads), got shape {tuple(table.shape)}")
        if table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (torch.int32), got {table.dtype}")
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        if tables[num] is not None and tuple(tables[num].shape) != tuple(tables[idx].shape[:3]):
            raise ValueError(f"{num} {tuple(tables[num].shape)} must be {idx}'s shape without its last "
                             f"dimension, [B, H, num_q_blocks] = {tuple(tables[idx].shape[:3])}")
    if full_kv_num_blocks is not None and full_kv_num_blocks.shape != kv_num_blocks.shape:
        raise ValueError(f"full_kv_num_blocks {tuple(full_kv_num_blocks.shape)} and kv_num_blocks "
                         f"{tuple(kv_num_blocks.shape)} must have the same [B, H, num_q_blocks]")


def _adjusted_states(states: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """The tile states cropped to the upper-left nq x nkv tiles; tiles beyond the old tables
    (a longer length) are empty, as torch's kernels never visit a key tile its tables lack."""
    cropped = states[..., :nq, :nkv]
    if cropped.shape[-2:] == (nq, nkv):
        return cropped
    grown = torch.zeros(states.shape[:-2] + (nq, nkv), dtype=states.dtype, device=states.device)
    grown[..., :cropped.shape[-2], :cropped.shape[-1]] = cropped
    return grown


class BlockMask:
    """Which key tiles each query tile visits, split into partial tiles (mask_mod applied)
    and full tiles (every pair visible), as torch.nn.attention.flex_attention.BlockMask.

    Tables: kv_num_blocks / full_kv_num_blocks [B, H, nQ] int32 and kv_indices /
    full_kv_indices [B, H, nQ, nKV] int32 (the first num entries of each row are valid).
    B or H of size 1 broadcast over the batch or the heads.

    The tables may be refilled in place, or mask_mod, seq_lengths or BLOCK_SIZE set anew, between
    calls (as torch's kernels read them on every call): what was derived from them (tile states,
    backend plans, the q tables) is dropped when the next call sees the change (_fresh).
    """
    _seen = None              # what _states / _plans / _twin were derived from (_signature)
    _twin = None              # the torch BlockMask of these tables, for as_tuple and the q tables
    _compute_q_blocks = True  # torch's from_kv_blocks(compute_q_blocks=): False leaves q_* None

    def __init__(self, seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks=None,
                 full_kv_indices=None, BLOCK_SIZE=128, mask_mod: Callable | None = None):
        _check_tables(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
        self._plans = {}  # backend plans built for this mask, keyed by problem shape
        self.seq_lengths = seq_lengths
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.BLOCK_SIZE = _block_sizes(BLOCK_SIZE)
        self.mask_mod = mask_mod
        self._states = None
        self._tables_from = None   # the mask_mod the tables were computed from, when known
        self._seen = self._signature()

    def _signature(self) -> tuple:
        tables = tuple(getattr(self, name) for name in _TABLE_NAMES)
        return tables, _versions(tables), self._mask_mod, self._seq_lengths, self.BLOCK_SIZE

    def _fresh(self) -> "BlockMask":
        """Drop what was derived from the tables, mask_mod, seq_lengths or BLOCK_SIZE when any of
        them changed since (a table replaced or written in place, a field set anew): a few
        attribute reads per call, no tensor op. Tables that changed no longer come from the
        mask_mod, so its lowering hints stop standing in for them."""
        seen = self._seen
        if seen is None:   # a LazyBlockMask before its build: nothing derived from tables yet
            return self
        tables, versions, mask_mod, seq_lengths, block = seen
        now = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices)
        same_tables = all(a is b for a, b in zip(tables, now)) and _unchanged(now, versions)
        if (same_tables and mask_mod is self._mask_mod and seq_lengths == self._seq_lengths
                and block == self.BLOCK_SIZE):
            return self
        self._plans.clear()
        self._twin = None
        if not same_tables or block != self.BLOCK_SIZE:
            # tables read at another tile size no longer state the mask_mod's tiles: they rule
            self._states = None
            self._tables_from = None
        self._seen = self._signature()
        return self

    @property
    def tables_match_mask_mod(self) -> bool:
        """Whether the tables were computed from this very mask_mod (create_block_mask), so a
        lowering hint the mask_mod states may stand in for them. False after mask_mod is set
        anew or the tables are changed, or for tables given directly: then the tables rule, as
        in torch (full tiles skip the mask_mod), and the planner reads them."""
        self._fresh()
        if self._tables_from is None or self._tables_from is not self.mask_mod:
            return False
        # and with the values it read then (a document mask's ids rewritten since: the tables
        # hold the old documents, and torch reads them so)
        then = getattr(self, "_tables_reads", None)
        return then is None or then.same_as(current_reads(self.mask_mod, "mask_mod", reads_memo(self)))

    # mask_mod and seq_lengths may be set after construction, as torch's decoding idiom does
    # (block_mask[:, :, tile].mask_mod = ...): a plan built for the old values is dropped
    @property
    def mask_mod(self) -> Callable:
        return self._mask_mod

    @mask_mod.setter
    def mask_mod(self, mask_mod) -> None:
        self._mask_mod = noop_mask if mask_mod is None else as_mask_mod(mask_mod)
        self._plans.clear()
        self._twin = None

    @property
    def seq_lengths(self) -> tuple[int, int]:
        return self._seq_lengths

    @seq_lengths.setter
    def seq_lengths(self, seq_lengths) -> None:
        if not (isinstance(seq_lengths, (tuple, list)) and len(seq_lengths) == 2
                and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in seq_lengths)):
            raise ValueError(f"seq_lengths must be a (Q_LEN, KV_LEN) pair of positive ints, got {seq_lengths!r}")
        self._seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self._plans.clear()
        self._twin = None

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_states(cls, states: torch.Tensor, seq_lengths, BLOCK_SIZE, mask_mod) -> "BlockMask":
        kv_num, kv_idx = ordered_indices(states == PARTIAL)
        full_num, full_idx = ordered_indices(states == FULL)
        mask = cls(seq_lengths, kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE, mask_mod)
        mask._states = states
        mask._tables_from = mask.mask_mod   # from_states' callers computed states from this mask_mod
        mask._tables_reads = current_reads(mask.mask_mod, "mask_mod")   # ... with these values
        return mask

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                       BLOCK_SIZE=128, mask_mod=None, seq_lengths=None, compute_q_blocks: bool = True) -> "BlockMask":
        """As torch's from_kv_blocks. compute_q_blocks=False leaves q_num_blocks / q_indices (and
        full_q_*) None, as torch does; when True they are computed on first use (the planner
        needs none of them: only torch's backward reads them)."""
        if not isinstance(compute_q_blocks, bool):
            raise TypeError(f"compute_q_blocks must be a bool, got {compute_q_blocks!r}")
        _check_tables(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
        bq, bkv = _block_sizes(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * bq, kv_indices.shape[-1] * bkv)
        mask = cls(seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                   (bq, bkv), mask_mod)
        mask._compute_q_blocks = compute_q_blocks
        return mask

    @classmethod
    def from_torch(cls, torch_block_mask) -> "BlockMask":
        """Convert a torch.nn.attention.flex_attention.BlockMask."""
        t = torch_block_mask
        mask = cls(t.seq_lengths, t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks,
                   t.full_kv_indices, t.BLOCK_SIZE, t.mask_mod)
        mask._compute_q_blocks = getattr(t, "q_indices", True) is not None
        return mask._settle_padded_query_tiles()

    def _settle_padded_query_tiles(self) -> "BlockMask":
        """torch evaluates a length that is not a multiple of the query block with the padded
        rows too, which leaves the last query tile's fully visible tiles partial (a causal mask
        of 1000 tokens then looked like a window plus key columns to the planner). Partial tiles
        of that row that are fully visible (or hidden) on its real rows become full (or empty):
        the same attention, since a partial tile shows exactly what mask_mod shows."""
        (q_len, kv_len), (bq, bkv) = self.seq_lengths, self.BLOCK_SIZE
        states = self.states
        if q_len % bq == 0 or self.mask_mod is None or not bool((states[:, :, -1] == PARTIAL).any()):
            return self
        # the settled tiles come from what the mask_mod reads now: kept while that holds
        # (_from_torch_cached converts again), so a mask that does not trace stays as it is
        reads = current_reads(self.mask_mod, "mask_mod")
        if reads is None:
            return self
        kept = KeptReads(reads)
        if not kept.complete:   # values too large to keep a copy of: torch's own tables, unsettled
            return self
        try:   # a mask_mod that cannot be asked at b = 1 or h = 1 (a table of one entry) stays as it is
            uses_b, uses_h = mask_dependence(self.mask_mod, 2, 2, q_len, kv_len, self.device)
        except Exception:
            return self
        if (uses_b and states.shape[0] == 1) or (uses_h and states.shape[1] == 1):
            return self   # a table broadcast over b or h: its partial tiles hold for every b or h
        exact = torch.zeros_like(states)
        nq = states.shape[2]
        classify_query_tiles(self.mask_mod, exact, nq - 1, nq, q_len, kv_len, bq, bkv, 1 << 22)
        last = states[:, :, -1]
        settled = states.clone()
        settled[:, :, -1] = torch.where((last == PARTIAL) & (exact[:, :, -1] != PARTIAL), exact[:, :, -1], last)
        kv_num, kv_idx = ordered_indices(settled == PARTIAL)
        full_num, full_idx = ordered_indices(settled == FULL)
        mask = BlockMask(self.seq_lengths, kv_num, kv_idx, full_num, full_idx, self.BLOCK_SIZE, self.mask_mod)
        mask._states = settled
        mask._compute_q_blocks = self._compute_q_blocks
        mask._settled_reads = kept
        return mask

    def to_torch(self):
        """Convert to a torch.nn.attention.flex_attention.BlockMask."""
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

        # the keyword only when it says something: torch releases before it had none
        extra = {} if self._compute_q_blocks else {"compute_q_blocks": False}
        return TorchBlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, seq_lengths=self.seq_lengths, **extra)

    def _torch_twin(self):
        """to_torch(), kept until the tables or fields change: as_tuple runs on every call of
        torch's flex_attention, and the q tables are a transpose of the whole tile map. Under
        torch.compile (torch's own flex_attention compiled) the twin made by an eager call is taken
        as it is: write counters cannot be read while dynamo traces (each read broke the graph and
        rebuilt the twin at every call); without one, the twin is made inside the graph."""
        if torch.compiler.is_compiling():
            return self._twin if self._twin is not None else self.to_torch()
        self._fresh()
        if self._twin is None:
            self._twin = self.to_torch()
        return self._twin

    def as_tuple(self, flatten: bool = True) -> tuple:
        """torch's BlockMask.as_tuple: what torch's own flex_attention passes its kernels, so this
        mask can be given to torch.nn.attention.flex_attention.flex_attention too."""
        return self._torch_twin().as_tuple(flatten)

    # torch's generated tables for its backward (the key tiles' lists of query tiles), None after
    # from_kv_blocks(compute_q_blocks=False) as in torch
    @property
    def q_num_blocks(self):
        return self._torch_twin().q_num_blocks

    @property
    def q_indices(self):
        return self._torch_twin().q_indices

    @property
    def full_q_num_blocks(self):
        return self._torch_twin().full_q_num_blocks

    @property
    def full_q_indices(self):
        return self._torch_twin().full_q_indices

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """A new BlockMask for other lengths, as torch's _adjust (which torch's length-mismatch
        error asks for): the tile map cropped to its upper-left corner, the same mask_mod. Right
        only for a mask_mod whose answer at a position does not depend on the lengths (causal
        does; a mask aligned to the sequence end does not). Tiles a longer length adds are
        empty: torch's kernels never visit key tiles its tables lack. torch builds the cropped
        rows with a count that can list a key tile past the new end (its to_dense then fails);
        here the rows are rebuilt from the cropped tile map, so they are always exact."""
        new_q_len = check_positive_int("new_q_len", new_q_len)
        new_kv_len = check_positive_int("new_kv_len", new_kv_len)
        bq, bkv = self.BLOCK_SIZE
        states = _adjusted_states(self.states, ceil_div(new_q_len, bq), ceil_div(new_kv_len, bkv))
        kv_num, kv_idx = ordered_indices(states == PARTIAL)
        full = None if self.full_kv_num_blocks is None else ordered_indices(states == FULL)
        mask = BlockMask((new_q_len, new_kv_len), kv_num, kv_idx, *(full or (None, None)), self.BLOCK_SIZE,
                         self.mask_mod)
        mask._states = states.contiguous()
        mask._compute_q_blocks = self._compute_q_blocks
        return mask

    # ----- views --------------------------------------------------------------------------
    @property
    def states(self) -> torch.Tensor:
        """int8 [B, H, nQ, nKV]: 0 empty, 1 partial (mask_mod applied), 2 full."""
        self._fresh()
        if self._states is None:
            states = states_from_tables(self.kv_num_blocks, self.kv_indices,
                                        self.full_kv_num_blocks, self.full_kv_indices)
            # tables made for longer sequences (a torch mask whose seq_lengths were set shorter):
            # the tiles past the sequences hold no position
            (q_len, kv_len), (bq, bkv) = self.seq_lengths, self.BLOCK_SIZE
            self._states = states[:, :, :-(-q_len // bq), :-(-kv_len // bkv)]
        return self._states

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kv_indices.shape[:-2]) + self.seq_lengths

    def numel(self) -> int:
        """Elements of the mask, B * H * Q_LEN * KV_LEN (sparsity not counted), as torch's."""
        return math.prod(self.shape)

    def __getitem__(self, index) -> "BlockMask":
        """The tables of the selected batch entries, heads and query tiles, as torch's BlockMask
        slicing (an int keeps its dimension, of size 1): decoding code slices the query tile of
        the current position, block_mask[:, :, pos // BLOCK_SIZE[0]], then sets the result's
        mask_mod (its positions shifted) and seq_lengths. Until its mask_mod is set, using the
        slice raises, since the old mask_mod would see the wrong query positions."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(f"a BlockMask is indexed by (batch, head, query tile), got {len(index)} indices")
        sizes = self.kv_num_blocks.shape[:3]
        index = tuple(slice(i % n, i % n + 1) if isinstance(i, int) and -n <= i < n else i
                      for i, n in zip((*index, slice(None), slice(None), slice(None))[:3], sizes))
        if any(isinstance(i, int) for i in index):
            raise IndexError(f"BlockMask index {index} is out of range for (B, H, nQ) = {tuple(sizes)}")

        def take(table):
            return None if table is None else table[index]

        sliced = BlockMask(self.seq_lengths, take(self.kv_num_blocks), take(self.kv_indices),
                           take(self.full_kv_num_blocks), take(self.full_kv_indices), self.BLOCK_SIZE,
                           _sliced_mask_mod)
        sliced._compute_q_blocks = self._compute_q_blocks
        return sliced

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to_dense(self) -> torch.Tensor:
        """int32 [B, H, nQ, nKV]: 1 where the tile is computed (partial or full)."""
        return (self.states != EMPTY).to(torch.int32)

    def sparsity(self) -> float:
        """Percentage of the mask not computed, as torch's: 100 * (1 - listed tiles * tile area /
        numel()). A tail tile counts whole, so lengths that are not multiples of BLOCK_SIZE give
        less than the share of tiles skipped (below 0 for a dense mask), as in torch."""
        computed = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            computed += int(self.full_kv_num_blocks.sum())
        bq, bkv = self.BLOCK_SIZE
        return 100 * (1 - computed * bq * bkv / self.numel())

    def to(self, device) -> "BlockMask":
        self._fresh()
        moved = BlockMask(self.seq_lengths, *(None if t is None else t.to(device) for t in (
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices)),
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod)
        if self._states is not None:
            moved._states = self._states.to(device)
        moved._compute_q_blocks = self._compute_q_blocks
        # the same tables from the same mask_mod: its lowering hint still stands for them (the
        # route, key columns included, must not change with the device)
        if self._tables_from is self.mask_mod:
            moved._tables_from, moved._tables_reads = moved.mask_mod, getattr(self, "_tables_reads", None)
        return moved

    def plan(self, num_qo_heads: int | None = None, num_kv_heads: int | None = None, head_dim: int = 128,
             batch: int | None = None, score_mod=None, device=None, route: str | None = None,
             scale: float | None = None):
        """How this mask runs on FlashInfer (plan.AttentionPlan: the route and each launch with
        what it covers), planned on the host as a call with these heads and head_dim would plan
        it; print() it. Heads and batch default to the mask's own (1 where it broadcasts); route
        forces one, as flex_attention's kernel_options={"ROUTE": ...} does; scale is the call's
        (a score_mod that multiplies the score folds into it)."""
        from .backends.column_merge import kernel_available
        from .planning.plan import plan_attention

        B, H = self.shape[:2]
        num_qo_heads = check_positive_int("num_qo_heads", H if num_qo_heads is None else num_qo_heads)
        num_kv_heads = check_positive_int("num_kv_heads", num_qo_heads if num_kv_heads is None else num_kv_heads)
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        batch = check_positive_int("batch", B if batch is None else batch)
        if B not in (1, batch) or H not in (1, num_qo_heads):
            raise ValueError(f"this block mask has (B, H) = ({B}, {H}): batch must be {B} and num_qo_heads {H} "
                             f"(or the mask 1 there, to broadcast), got batch={batch}, num_qo_heads={num_qo_heads}")
        head_dim = check_positive_int("head_dim", head_dim)
        device = self.device if device is None else check_device("device", device)
        q_len, kv_len = self.seq_lengths
        return plan_attention(self, batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, device, score_mod,
                              kernel_available(torch.device(device), head_dim), route, check_scale(scale))

    def to_string(self, grid_size=(20, 20), limit: int = 4) -> str:
        """Tile map per (batch, head): '█' full, '▒' partial or mixed, ' ' empty. grid_size is a
        (rows, columns) pair or one int for both, as torch's; -1 prints every tile."""
        states = self.states.cpu()
        B, H, nq, nkv = states.shape
        if isinstance(grid_size, numbers.Integral) and not isinstance(grid_size, bool):
            grid_size = (nq, nkv) if grid_size == -1 else (grid_size, grid_size)
        if not (isinstance(grid_size, (tuple, list)) and len(grid_size) == 2 and all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in grid_size)):
            raise ValueError(f"grid_size must be a positive int, a (rows, columns) pair of them, or -1 "
                             f"(every tile), got {grid_size!r}")
        rows_per, cols_per = max(1, ceil_div(nq, grid_size[0])), max(1, ceil_div(nkv, grid_size[1]))
        lines = [repr(self)]
        for n, (b, h) in enumerate((b, h) for b in range(B) for h in range(H)):
            if n >= limit:
                lines.append(f"... {B * H - limit} more (batch, head) maps")
                break
            lines.append(f"b={b}, h={h}:")
            for r in range(0, nq, rows_per):
                row = ""
                for c in range(0, nkv, cols_per):
                    cell = states[b, h, r:r + rows_per, c:c + cols_per]
                    row += "█" if bool((cell == FULL).all()) else (" " if bool((cell == EMPTY).all()) else "▒")
                lines.append("|" + row + "|")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"sparsity={self.sparsity():.2f}%, mask_mod={getattr(self.mask_mod, '__name__', 'mask_mod')})")


class LazyBlockMask(BlockMask):
    """A BlockMask whose tile tables are built on first use: a library mask that states its own
    bands (a lowering hint) plans without them, so prepare() skips the build (it is most of a
    hinted plan's host time); reading any table, states or to_dense builds them once."""
    _TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "_states")
    # (_tables_from is set in __init__ and kept: the built tables come from the same mask_mod)

    def __init__(self, build: Callable[[], BlockMask], batch_heads, seq_lengths, BLOCK_SIZE, mask_mod, device):
        self._plans = {}
        self.seq_lengths = seq_lengths
        self.BLOCK_SIZE = _block_sizes(BLOCK_SIZE)
        self.mask_mod = mask_mod
        self._tables_from = self.mask_mod   # build() computes them from this mask_mod
        self._tables_reads = current_reads(self.mask_mod, "mask_mod")
        self._build = build
        self._batch_heads = tuple(batch_heads)
        self._device = torch.device(device)

    def __getattr__(self, name):
        # only reached for attributes not set yet: the tables before the build
        if name in LazyBlockMask._TABLES and "_build" in self.__dict__:
            built = self.__dict__.pop("_build")()
            for table in LazyBlockMask._TABLES:
                setattr(self, table, getattr(built, table))
            self._seen = self._signature()   # from here on, in-place changes of the tables are noticed
            return getattr(self, name)
        raise AttributeError(name)

    @property
    def built(self) -> bool:
        return "_build" not in self.__dict__

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._batch_heads + self.seq_lengths

    @property
    def device(self) -> torch.device:
        return self._device


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@outside_compiled_graphs("create_block_mask")
def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False,
                      chunk_elements: int | None = None) -> BlockMask:
    """Build a BlockMask from a mask_mod, tile by tile, without the dense mask.

    B or H of None mean 1 (broadcast over batch or heads). device defaults to CUDA when
    available, else CPU (torch >= 2.10's rule). BLOCK_SIZE is an int or a (q, kv) pair.
    _compile=True (torch's flag) evaluates the mask in fused torch.compile kernels: seconds of
    compiling on the first call per mask_mod and shape, then much faster builds of long masks.
    """
    mask_mod = as_mask_mod(mask_mod)
    B = 1 if B is None else check_positive_int("B", B)
    H = 1 if H is None else check_positive_int("H", H)
    Q_LEN, KV_LEN = check_positive_int("Q_LEN", Q_LEN), check_positive_int("KV_LEN", KV_LEN)
    bq, bkv = _block_sizes(BLOCK_SIZE)
    device = check_device("device", _default_device() if device is None else device)
    kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    states = classify_tiles(mask_mod, B, H, Q_LEN, KV_LEN, bq, bkv, torch.device(device), compile=bool(_compile),
                            **kwargs)
    return BlockMask.from_states(states, (Q_LEN, KV_LEN), (bq, bkv), mask_mod)


def full_block_mask(B: int, Q_LEN: int, KV_LEN: int, device, BLOCK_SIZE=128) -> BlockMask:
    """The mask of plain attention, built from the shape alone (tail key tile partial)."""
    bq, bkv = _block_sizes(BLOCK_SIZE)
    nq, nkv = ceil_div(Q_LEN, bq), ceil_div(KV_LEN, bkv)
    states = torch.full((1, 1, nq, nkv), FULL, dtype=torch.int8, device=device)
    if KV_LEN % bkv:
        states[..., -1] = PARTIAL
    return BlockMask.from_states(states, (Q_LEN, KV_LEN), (bq, bkv), noop_mask)


def create_mask(mod_fn, B, H, Q_LEN, KV_LEN, device=None) -> torch.Tensor:
    """The dense bool mask [B, H, Q_LEN, KV_LEN] of a mask_mod, or of a score_mod (visible
    where the score_mod does not give -inf), as torch's create_mask."""
    from .core.mask_eval import count_positional_args

    B = 1 if B is None else check_positive_int("B", B)
    H = 1 if H is None else check_positive_int("H", H)
    Q_LEN, KV_LEN = check_positive_int("Q_LEN", Q_LEN), check_positive_int("KV_LEN", KV_LEN)
    device = check_device("device", _default_device() if device is None else device)
    grid = index_grid(range(B), range(H), range(Q_LEN), range(KV_LEN), device)
    if count_positional_args(mod_fn) == 5:
        score = torch.zeros((B, H, Q_LEN, KV_LEN), device=device)
        return mod_fn(score, *grid).expand(B, H, Q_LEN, KV_LEN) != float("-inf")
    return evaluate_mask_mod(as_mask_mod(mod_fn), *grid).clone()


_converted: dict = {}   # id(torch mask) -> (weakref to it, what it was converted from, our BlockMask)


def _torch_signature(t) -> tuple:
    tables = (t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks, t.full_kv_indices)
    return tables, _versions(tables), t.mask_mod, t.seq_lengths, t.BLOCK_SIZE


def _same_signature(seen: tuple, tables, mask_mod, seq_lengths, block) -> bool:
    return (all(x is y for x, y in zip(seen[0], tables)) and _unchanged(tables, seen[1]) and seen[2] is mask_mod
            and tuple(seen[3]) == tuple(seq_lengths) and seen[4] == block)


def _from_torch_cached(torch_mask):
    """One conversion per torch BlockMask object, so its FlashInfer plan is built once too, made
    again when the mask's mask_mod, seq_lengths, BLOCK_SIZE or tables were set anew or its tables
    written in place since (torch's kernels read all of them on every call)."""
    key = id(torch_mask)
    entry = _converted.get(key)
    t = torch_mask
    if entry is not None and entry[0]() is t and _same_signature(
            entry[1], (t.kv_num_blocks, t.kv_indices, t.full_kv_num_blocks, t.full_kv_indices), t.mask_mod,
            t.seq_lengths, t.BLOCK_SIZE):
        settled = getattr(entry[2], "_settled_reads", None)
        # tiles settled from the mask's values: converted again once those changed
        if settled is None or settled.holds(current_reads(entry[2].mask_mod, "mask_mod")):
            return entry[2]
    signature = _torch_signature(torch_mask)
    if len(_converted) > 256:
        _converted.clear()
    mask = BlockMask.from_torch(torch_mask)

    def forget(ref, key=key):   # the torch mask is gone: so is its conversion
        if _converted.get(key, (None,))[0] is ref:
            del _converted[key]

    _converted[key] = (weakref.ref(torch_mask, forget), signature, mask)
    return mask


def check_block_mask(block_mask, batch: int, heads: int, q_len: int, kv_len: int, device):
    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "kv_num_blocks"):
            block_mask = _from_torch_cached(block_mask)
        else:
            raise TypeError(f"block_mask must be a BlockMask from create_block_mask, got {type(block_mask).__name__}")
    block_mask._fresh()   # the plans cached on it hold only while its tables and fields are unchanged
    if block_mask.seq_lengths != (q_len, kv_len):
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN) = {block_mask.seq_lengths} but query/key have "
            f"({q_len}, {kv_len}); rebuild it with create_block_mask(..., Q_LEN={q_len}, KV_LEN={kv_len})")
    check_tables_cover(block_mask)
    mb, mh = block_mask.shape[:2]
    if mb not in (1, batch) or mh not in (1, heads):
        raise ValueError(f"block_mask has (B, H) = ({mb}, {mh}); expected B in (1, {batch}) and H in (1, {heads})")
    if block_mask.device != torch.device(device) and not (
            block_mask.device.type == torch.device(device).type == "cuda"):
        raise ValueError(f"block_mask is on {block_mask.device} but query is on {device}; use block_mask.to(device)")
    if (mb < batch or mh < heads) and block_mask.mask_mod is not None:
        _say_broadcast_tables(block_mask, batch, heads, device)
    return block_mask


def _say_broadcast_tables(block_mask, batch: int, heads: int, device) -> None:
    """Warn when a B=1 / H=1 map serves a mask_mod that reads b / h: every entry then runs entry
    0's tile map and the mask_mod decides only inside its partial tiles, as in torch's kernels
    (torch's eager CPU path applies the mask_mod everywhere). Asked once per mask_mod and shape."""
    key = (block_mask.mask_mod, batch, heads)
    if getattr(block_mask, "_broadcast_asked", None) == key:
        return
    try:
        uses_b, uses_h = mask_dependence(block_mask.mask_mod, batch, heads, *block_mask.seq_lengths, device)
    except Exception:   # a mod that fails here fails with its own error where it is evaluated
        return
    block_mask._broadcast_asked = key
    mb, mh = block_mask.shape[:2]
    for name, uses, mapped, size in (("B", uses_b, mb, batch), ("H", uses_h, mh, heads)):
        if uses and mapped == 1 < size:
            index = name.lower()
            warn_once(f"flex_flash_infer: block_mask was built with {name}=1 ({name}=None) but its mask_mod reads "
                      f"{index}: every {'batch entry' if name == 'B' else 'head'} runs the tile map of {index} = 0 "
                      f"and the mask_mod decides only inside its partial tiles, as in torch's kernels; build it "
                      f"with create_block_mask(mask_mod, {name}={size}, ...) if the tiles differ")


def check_tables_cover(block_mask) -> None:
    """The tile tables have a row per query tile and room for every key tile of seq_lengths (a
    table cut shorter, by slicing or given directly, would leave rows or keys out silently)."""
    if isinstance(block_mask, LazyBlockMask) and not block_mask.built:
        return   # built from its mask_mod for exactly its lengths
    (q_len, kv_len), (bq, bkv) = block_mask.seq_lengths, block_mask.BLOCK_SIZE
    need = (-(-q_len // bq), -(-kv_len // bkv))
    have = tuple(block_mask.kv_indices.shape[-2:])
    if block_mask.kv_num_blocks.shape[-1] != have[0] or have[0] < need[0] or have[1] < need[1]:
        raise ValueError(
            f"block_mask's tables cover {have[0]} query tiles and {have[1]} key tiles (kv_indices "
            f"{tuple(block_mask.kv_indices.shape)}, kv_num_blocks {tuple(block_mask.kv_num_blocks.shape)}) but its "
            f"seq_lengths {block_mask.seq_lengths} with BLOCK_SIZE {block_mask.BLOCK_SIZE} need {need[0]} and "
            f"{need[1]}; set seq_lengths to the lengths the tables describe (a sliced mask: the rows of its "
            f"tiles), or rebuild the mask with create_block_mask")


def reads_memo(mask) -> ReadsMemo:
    """The mask's memo of its mods' last traces (core/trace.ReadsMemo), which the calls that check
    what those mods read at every call share: kept on the mask, which holds its mask_mod (and its
    plans the score_mods) anyway."""
    memo = getattr(mask, "_reads_memo", None)
    if memo is None:
        memo = mask._reads_memo = ReadsMemo()
    return memo
