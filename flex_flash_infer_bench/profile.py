"""Where a benchmark row's time goes (`bench --profile`): the host's time to issue one call, the
GPU kernels one call runs (torch.profiler), and the same call replayed from a CUDA graph; and
where a host-side step goes (cProfile; `bench --decode` profiles one plan()).

A route of several launches can be bound by the host (Python and launch work) rather than by its
kernels: then host_ms is near ms, the kernels' busy time is well below ms, and the graph replay,
which has no host work, runs faster than the call itself.
"""
from __future__ import annotations

import time

import torch


def host_ms_per_call(fn, calls: int = 20) -> float:
    """Host time to issue one call, back to back, without waiting for the GPU (run() never syncs)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued * 1e3 / calls


def summarize_kernels(events, calls: int, top: int = 8):
    """(GPU busy ms per call, [(kernel, ms per call, launches per call)] longest first) from
    torch.profiler's key_averages(): only the events that ran on the GPU count."""
    kernels = []
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        total_us = getattr(e, "device_time_total", None)
        if total_us is None:   # torch before 2.4 named it after CUDA
            total_us = e.cuda_time_total
        kernels.append((e.key[:90], total_us / 1e3 / calls, e.count / calls))
    kernels.sort(key=lambda k: -k[1])
    return sum(k[1] for k in kernels), kernels[:top]


def kernel_times(fn, calls: int = 5):
    """summarize_kernels of `calls` calls of fn under torch.profiler (CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return summarize_kernels(prof.key_averages(), calls)


def graphed(fn):
    """fn captured once into a CUDA graph on first use; later calls replay it and return the
    captured output (refreshed by each replay). The inputs fn closes over must stay in place."""
    state = {}

    def replay():
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # capture needs its warm-up off the default stream
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = fn()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]

    return replay


def host_profile(fn, top: int = 12) -> list:
    """[(function, cumulative ms, own ms, calls)] of one call of fn under cProfile, the longest
    first: where a host-side step (a decode plan(), say) spends its time, down to FlashInfer's
    Python. Own time includes the tensor operators and indexing a function runs (C slots, which
    cProfile does not list as calls), and any GPU sync they wait on."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats   # {(file, line, name): (calls, prim, tottime, cumtime, callers)}
    rows = [(f"{'/'.join(file.rsplit('/', 2)[-2:])}:{line}({name})", cum * 1e3, own * 1e3, calls)
            for (file, line, name), (calls, _, own, cum, _) in stats.items()]
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def profile_row(row: dict, fn) -> dict:
    """Adds host_ms, gpu_busy_ms and kernels to a timed row; a profiler failure is noted, not raised."""
    try:
        row["host_ms"] = host_ms_per_call(fn)
        row["gpu_busy_ms"], row["kernels"] = kernel_times(fn)
    except Exception as e:
        row["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def describe(row: dict) -> str:
    """One line for the table: busy GPU time and host time against the call's time, top kernels."""
    if "profile_error" in row:
        return f"profile failed: {row['profile_error']}"
    if "gpu_busy_ms" not in row:
        return ""
    top = ", ".join(f"{name[:40]} {ms:.3f}x{n:g}" for name, ms, n in row["kernels"][:4])
    return f"GPU busy {row['gpu_busy_ms']:.3f} ms, host {row['host_ms']:.3f} ms per call: {top}"
