"""bench --profile's helpers: the kernel summary from profiler events and its one-line report
(the profiled rows of a whole case: test_bench_orchestration)."""
import types

import pytest
import torch

from flex_flash_infer_bench import profile

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(key, device_type, us, count):
    return types.SimpleNamespace(key=key, device_type=device_type, device_time_total=us, count=count)


def test_summarize_kernels_counts_gpu_events_per_call_longest_first():
    events = [_event("aten::index_select", CPU, 900.0, 10),   # a host op: its device time is its kernels'
              _event("merge_state_kernel", CUDA, 100.0, 10),
              _event("fa3_prefill_kernel", CUDA, 2500.0, 5),
              _event("Memcpy DtoD", CUDA, 50.0, 5)]
    busy, kernels = profile.summarize_kernels(events, calls=5)
    assert busy == pytest.approx((100.0 + 2500.0 + 50.0) / 1e3 / 5)
    assert [k[0] for k in kernels] == ["fa3_prefill_kernel", "merge_state_kernel", "Memcpy DtoD"]
    assert kernels[0][1] == pytest.approx(0.5) and kernels[1][2] == 2


def test_describe_says_busy_and_host_time_or_the_failure():
    row = {"gpu_busy_ms": 0.25, "host_ms": 0.6, "kernels": [("fa3_prefill_kernel", 0.2, 1.0)]}
    assert "GPU busy 0.250 ms, host 0.600 ms" in profile.describe(row)
    assert "fa3_prefill_kernel 0.200x1" in profile.describe(row)
    assert "profile failed: RuntimeError" in profile.describe({"profile_error": "RuntimeError: no CUPTI"})
    assert profile.describe({"ms": 1.0}) == ""


def test_host_profile_ranks_the_slow_function_with_its_calls():
    import time

    def slow_part():
        time.sleep(0.01)

    def step():
        for _ in range(3):
            slow_part()

    rows = profile.host_profile(step)
    names = [where for where, *_ in rows]
    slow = rows[next(i for i, n in enumerate(names) if n.endswith("(slow_part)"))]
    outer = rows[next(i for i, n in enumerate(names) if n.endswith("(step)"))]
    assert slow[1] >= 25 and slow[3] == 3 and rows[0][1] >= slow[1]
    assert outer[1] >= 25 and outer[2] < 5   # step's time is its callee's, not its own
