"""The per-head-window schedule written over FlashInfer's fa3 plan (planning/fa3_schedule.py), on
buffers laid out as FlashInfer 0.7's PrefillSM90Plan lays them (scheduler.cuh), made here by a port
of that plan: the same items, each once, and a busiest CTA no busier than the plan's."""
import heapq
import types

import numpy as np
import pytest
import torch

from flex_flash_infer.planning import fa3_schedule as fs


def fa3_plan(qo_lens, kv_lens, heads: int, num_ctas: int, tile: int = 128, causal: bool = False):
    """A stand-in wrapper whose page-locked and device int buffers hold what PrefillSM90Plan writes
    for these requests (ragged: kv_indptr counts keys): items head after head, requests by kv_len
    descending, tiles last first, each to the CTA with the least priced cost (2 * tile + keys)."""
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)])
    order = sorted(range(len(qo_lens)), key=lambda i: -kv_lens[i])
    heap = [(0, c) for c in range(num_ctas)]
    per_cta = [[] for _ in range(num_ctas)]
    for h in range(heads):
        for i in order:
            n = -(-qo_lens[i] // tile)
            for t in range(n - 1, -1, -1):
                cost, c = heapq.heappop(heap)
                keys = min(kv_lens[i], (t + 1) * tile + kv_lens[i] - qo_lens[i]) if causal else kv_lens[i]
                heapq.heappush(heap, (cost + 2 * tile + keys, c))
                per_cta[c].append((t, qo_indptr[i], kv_indptr[i], qo_lens[i], kv_lens[i], h, i))
    flat = [item for cta in per_cta for item in cta]
    columns = list(zip(*flat))
    work_indptr = np.concatenate([[0], np.cumsum([len(c) for c in per_cta])])
    pinned = torch.zeros(1 << 18, dtype=torch.uint8)
    offsets, at = [], 64
    arrays = {"qo_tile_indices": columns[0], "qo_indptr": columns[1], "kv_indptr": columns[2], "qo_len": columns[3],
              "kv_len": columns[4], "head_indices": columns[5], "work_indptr": work_indptr,
              "batch_indices": columns[6]}
    for name in fs.FIELDS:   # 16-byte aligned, in the plan's order
        values = np.asarray(arrays[name], dtype=np.int32)
        offsets.append(at)
        pinned.numpy()[at:at + 4 * values.size] = values.view(np.uint8)
        at += -(-4 * values.size // 16) * 16
    return types.SimpleNamespace(_pin_memory_int_workspace_buffer=pinned,
                                 _int_workspace_buffer=pinned.clone(), _plan_info=offsets + [0])


def _items(wrapper, num_ctas):
    items, work_indptr = fs.read_items(wrapper._pin_memory_int_workspace_buffer, wrapper._plan_info, num_ctas)
    rows = sorted(zip(*(items[k].tolist() for k in sorted(items))))
    return items, work_indptr, rows


@pytest.mark.parametrize("qo_lens,kv_lens,windows,num_ctas", [
    ([8192], [8192], [127, 255, 511, 1023] * 8, 132),          # the bench's per-head windows
    ([1000, 300], [1000, 300], [0, 63, 128, 999, 299, 5], 8),  # two requests, a head as wide as the keys
    ([600], [1100], [31, 400] * 3, 4),                          # fewer queries than keys
])
def test_the_same_items_dealt_by_each_heads_window(qo_lens, kv_lens, windows, num_ctas):
    wrapper = fa3_plan(qo_lens, kv_lens, len(windows), num_ctas)
    before, old_indptr, rows = _items(wrapper, num_ctas)
    old_costs = fs.window_costs(before, np.asarray(windows))
    assert fs.rebalance_by_head_windows(wrapper, windows, num_ctas)
    after, new_indptr, new_rows = _items(wrapper, num_ctas)
    assert new_rows == rows   # every item once, its fields as the plan wrote them
    assert new_indptr[0] == 0 and new_indptr[-1] == old_indptr[-1] and new_indptr.size == num_ctas + 1
    new_costs = fs.window_costs(after, np.asarray(windows))
    assert fs.busiest_over_even(new_costs, new_indptr) <= fs.busiest_over_even(old_costs, old_indptr)
    # what the device runs is what the page-locked buffer holds
    assert torch.equal(wrapper._int_workspace_buffer, wrapper._pin_memory_int_workspace_buffer)


def test_the_bench_case_balances_as_the_simulation_says():
    """8192 tokens, 32 heads cycling through windows 128..1024, 128-row tiles: FlashInfer's plan
    priced flat leaves the busiest CTA about 1.24x an even share (scripts/fa3_schedule_sim.py);
    dealt by window it is within 6%."""
    windows = [127, 255, 511, 1023] * 8
    wrapper = fa3_plan([8192], [8192], 32, 132)
    items, indptr, _ = _items(wrapper, 132)
    costs = fs.window_costs(items, np.asarray(windows))
    assert fs.busiest_over_even(costs, indptr) > 1.2
    fs.rebalance_by_head_windows(wrapper, windows, 132)
    items, indptr, _ = _items(wrapper, 132)
    assert fs.busiest_over_even(fs.window_costs(items, np.asarray(windows)), indptr) < 1.06


def test_a_deal_that_gains_little_leaves_the_plan():
    """12 items on 132 CTAs: no deal does better than one item per CTA; FlashInfer's plan stays."""
    wrapper = fa3_plan([200], [700], 6, 132)
    before = wrapper._pin_memory_int_workspace_buffer.clone()
    assert not fs.rebalance_by_head_windows(wrapper, [31, 400] * 3, 132)
    assert torch.equal(wrapper._pin_memory_int_workspace_buffer, before)


def test_plans_it_does_not_know_are_left_alone():
    wrapper = fa3_plan([300], [300], 4, 8)
    before = wrapper._pin_memory_int_workspace_buffer.clone()
    shared = types.SimpleNamespace(**vars(wrapper))
    shared._plan_info = list(wrapper._plan_info[:-1]) + [1]   # one schedule for every head
    assert not fs.rebalance_by_head_windows(shared, [10, 20, 30, 40], 8)
    assert not fs.rebalance_by_head_windows(wrapper, [10, 20], 8)   # fewer windows than heads
    assert not fs.rebalance_by_head_windows(types.SimpleNamespace(), [10, 20, 30, 40], 8)   # not FlashInfer's
    assert not fs.rebalance_by_head_windows(wrapper, [10, 20, 30, 40], 16)   # another CTA count than the plan's
    assert not fs.rebalance_by_head_windows(wrapper, [10, -1, 30, 40], 8)   # a window this does not price
    big_tiles = fa3_plan([300], [300], 4, 8, tile=64)   # tiles this does not price
    assert not fs.rebalance_by_head_windows(big_tiles, [10, 20, 30, 40], 8)
    assert torch.equal(wrapper._pin_memory_int_workspace_buffer, before)


def test_the_deal_is_written_only_where_keys_and_values_fit_in_l2():
    """Measured on the H100 (50 MB of L2): the deal won at 8192 tokens (8 KV heads, bf16, d128: 33.5 MB
    of keys and values) and lost at 32768 with d128 (134 MB); a GPU whose L2 size torch does not
    report keeps FlashInfer's schedule."""
    h100_l2 = 50 * 2 ** 20
    kv_bytes = lambda tokens, d: 2 * tokens * 8 * d * 2
    assert fs.keys_and_values_fit(kv_bytes(8192, 128), h100_l2)
    assert fs.keys_and_values_fit(kv_bytes(8192, 64), h100_l2)
    assert not fs.keys_and_values_fit(kv_bytes(32768, 128), h100_l2)
    assert not fs.keys_and_values_fit(kv_bytes(32768, 64), h100_l2)
    assert not fs.keys_and_values_fit(kv_bytes(8192, 128), 0)


@pytest.mark.parametrize("l2_mb,dealt", [(50, True), (2, True), (1, False), (0, False)])
def test_the_head_window_launch_is_dealt_where_its_keys_fit_the_reported_l2(monkeypatch, l2_mb, dealt):
    """planned_ragged asks the GPU's L2 size and deals the head-window launch again only where its
    keys and values fit (2 x 4096 keys x 2 KV heads x 64 x bf16 = 2 MiB here)."""
    import sys

    import fake_flashinfer
    from flexfuzz.simulated import simulated
    from flex_flash_infer.planning import ragged

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132, L2_cache_size=l2_mb * 2 ** 20))
    calls = []
    monkeypatch.setattr(ragged, "rebalance_by_head_windows", lambda *args: calls.append(args) or True)
    indptr = torch.tensor([0, 4096], dtype=torch.int32)
    with simulated():
        workspace = torch.zeros(1024, dtype=torch.uint8).to("cuda")
        ragged.planned_ragged(workspace, "fa3", indptr, indptr, (1, 4096, 4096, 8, 2, 64), torch.bfloat16, True,
                              window_left=4095, head_windows=[127, 255, 511, 1023] * 2)
    assert len(calls) == dealt and (not dealt or calls[0][2] == 132)
