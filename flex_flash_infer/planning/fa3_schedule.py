"""A schedule for FlashInfer's Hopper ragged launch that knows each query head's window, written over
the one FlashInfer's plan() made.

FlashInfer's PrefillSM90Plan (scheduler.cuh) prices each work item (a query tile of one head of one
request) by the keys a causal tile reads, or by all the keys when planned as not causal, and hands
the items, head after head, to the CTA with the least price so far. Under windows that differ by head
neither price is the cost: the busiest of 132 CTAs gets 1.24x an even share at 8192 tokens with
128-row tiles priced flat, and 1.05x priced by each head's window (scripts/fa3_schedule_sim.py).

This reads the items the plan wrote to its page-locked buffer, prices each by its head's window, deals
them again, dearest first, to the least loaded CTA, and writes them back at the same offsets, then
copies them to the device as the plan did. The items are the plan's own, each once: only which CTA
runs which changes (the kernel runs every item alone: hopper/tile_scheduler.cuh).
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

# PrefillPlanSM90Info::ToVector(): the byte offsets of these int32 arrays in the int workspace, then
# same_schedule_for_all_heads
FIELDS = ("qo_tile_indices", "qo_indptr", "kv_indptr", "qo_len", "kv_len", "head_indices", "work_indptr",
          "batch_indices")
TILE_Q = 128   # the window modules' query tile at every head_dim (compile/patched_headers.py)
ROUNDS_FROM = 8   # items per CTA from which deal() hands them out by rounds


def _array(buffer: np.ndarray, offset: int, count: int) -> np.ndarray:
    """A writable int32 view of count entries at byte offset of the uint8 buffer."""
    return buffer[offset:offset + 4 * count].view(np.int32)


def _padded(num_bytes: int) -> int:
    return -(-num_bytes // 16) * 16   # FlashInfer's allocator aligns each array to 16 bytes


def read_items(pinned: torch.Tensor, plan_info, num_ctas: int):
    """(items {field: int32 copy}, work_indptr copy) of the plan in the page-locked buffer, or None
    when the plan shares one schedule among heads (no head in its items) or is not this layout:
    the arrays one after the other in FIELDS' order, int32, work_indptr of num_ctas + 1 entries."""
    info = [int(x) for x in plan_info]
    if len(info) != len(FIELDS) + 1 or info[-1] or pinned.dtype != torch.uint8:
        return None
    at = info[FIELDS.index("work_indptr")]
    if info[7] - at != _padded(4 * (num_ctas + 1)) or info[7] + 4 > pinned.numel():
        return None
    buffer = pinned.numpy()
    work_indptr = _array(buffer, at, num_ctas + 1).copy()
    total = int(work_indptr[-1])
    if work_indptr[0] != 0 or (np.diff(work_indptr) < 0).any():
        return None
    if any(info[i + 1] - info[i] != _padded(4 * total) for i in range(5)) or info[7] + 4 * total > pinned.numel():
        return None
    items = {name: _array(buffer, info[i], total).copy() for i, name in enumerate(FIELDS) if name != "work_indptr"}
    return items, work_indptr


def window_costs(items, window_left_by_head: np.ndarray, sink_len: int = 0) -> np.ndarray | None:
    """Each item's cost: its tile's fixed work (2 * TILE_Q, as FlashInfer's cost_function) and the
    keys its rows' windows reach (causal, aligned to the last key as FlashInfer aligns them), with
    streaming's sink keys where the window does not reach them. None when the items are not of
    TILE_Q-row tiles."""
    tile, qo_len, kv_len = (items[k].astype(np.int64) for k in ("qo_tile_indices", "qo_len", "kv_len"))
    first = tile * TILE_Q
    if (first >= qo_len).any():
        return None
    last = np.minimum(first + TILE_Q, qo_len) - 1
    shift = kv_len - qo_len
    window = window_left_by_head[items["head_indices"]]
    hi = np.minimum(kv_len, last + shift + 1)
    lo = np.clip(first + shift - window, 0, None)
    sinks = np.clip(np.minimum(lo, sink_len), 0, None)   # the sink keys left of the window
    return 2 * TILE_Q + np.maximum(hi - lo, 0) + sinks


def deal(costs: np.ndarray, num_ctas: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, work_indptr): the items dealt dearest first to the CTA with the least cost so far
    (longest processing time first), listed CTA by CTA. Past ROUNDS_FROM items per CTA they go out
    num_ctas at a time, a round's dearest to the least loaded (a plan of 8192 items within a few
    milliseconds); with fewer, one at a time, where a round would force an item on a CTA already
    far ahead (a few items of very different costs)."""
    ranked = np.argsort(-costs, kind="stable")
    owner = np.empty(costs.size, dtype=np.int64)
    if costs.size <= ROUNDS_FROM * num_ctas:
        heap = [(0, c) for c in range(num_ctas)]
        for i in ranked.tolist():
            load, c = heapq.heappop(heap)
            owner[i] = c
            heapq.heappush(heap, (load + int(costs[i]), c))
    else:
        loads = np.zeros(num_ctas, dtype=np.int64)
        for start in range(0, ranked.size, num_ctas):
            items = ranked[start:start + num_ctas]
            takers = np.argsort(loads, kind="stable")[:items.size]
            owner[items] = takers
            loads[takers] += costs[items]
    order = np.argsort(owner, kind="stable")
    work_indptr = np.zeros(num_ctas + 1, dtype=np.int32)
    np.cumsum(np.bincount(owner, minlength=num_ctas), out=work_indptr[1:])
    return order, work_indptr


def busiest_over_even(costs: np.ndarray, work_indptr: np.ndarray, order=None) -> float:
    """The busiest CTA's cost over an even share (1.0: perfectly balanced)."""
    listed = costs if order is None else costs[order]
    summed = np.concatenate([[0], np.cumsum(listed)])
    loads = summed[work_indptr[1:]] - summed[work_indptr[:-1]]
    return float(loads.max() / (summed[-1] / (work_indptr.size - 1)))


# the least gain (busiest CTA over an even share, before / after) worth a schedule other than FlashInfer's
MIN_GAIN = 1.02


def keys_and_values_fit(key_bytes: int, l2_bytes: int) -> bool:
    """Whether the launch's keys and values (key_bytes, both) fit the GPU's L2 cache, where the deal
    is worth writing. FlashInfer deals a head's tiles out in turn, so the CTAs running at one time
    read neighbouring keys; ours hands each CTA tiles of many heads at once. Where the keys stay in
    L2 that costs nothing and the balance wins; where they do not, it measured slower on the H100
    (docs/benchmarks.md, session 35), so FlashInfer's schedule stays."""
    return 0 < key_bytes <= l2_bytes


def rebalance_by_head_windows(wrapper, window_left_by_head, num_ctas: int, sink_len: int = 0) -> bool:
    """Deal a planned fa3 ragged wrapper's items again by each query head's window (window_left per
    head; kv_len or more for none; sink_len: streaming's sinks in the same launch). False, and the
    plan left as it was, where the wrapper is not FlashInfer 0.7's layout (its plan info and
    page-locked buffer), its items are not this launch's, or the new deal gains under MIN_GAIN."""
    pinned = getattr(wrapper, "_pin_memory_int_workspace_buffer", None)
    device = getattr(wrapper, "_int_workspace_buffer", None)
    plan_info = getattr(wrapper, "_plan_info", None)
    if pinned is None or device is None or plan_info is None:
        return False
    read = read_items(pinned, plan_info, num_ctas)
    if read is None:
        return False
    items, work_indptr = read
    windows = np.asarray(window_left_by_head, dtype=np.int64)
    if items["head_indices"].size == 0 or items["head_indices"].max() >= windows.size:
        return False
    if (windows < 0).any():
        return False
    costs = window_costs(items, windows, sink_len)
    if costs is None:
        return False
    order, new_indptr = deal(costs, num_ctas)
    if busiest_over_even(costs, work_indptr) < MIN_GAIN * busiest_over_even(costs, new_indptr, order):
        return False
    info = [int(x) for x in plan_info]
    buffer = pinned.numpy()
    for i, name in enumerate(FIELDS):
        if name == "work_indptr":
            _array(buffer, info[i], num_ctas + 1)[:] = new_indptr
        else:
            _array(buffer, info[i], order.size)[:] = items[name][order]
    # FlashInfer's plan copied the same region on this stream; this copy follows it there
    end = max(info[i] + 4 * (num_ctas + 1 if name == "work_indptr" else order.size) for i, name in enumerate(FIELDS))
    device[:end].copy_(pinned[:end], non_blocking=True)
    return True
