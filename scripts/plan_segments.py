"""Where a decode step's plan() spends its host time on this GPU host, piece by piece: the serving
path that issue 23 times (PagedFlexAttention.plan() for 64 requests x 8192 keys, page 16, 32/8
heads, d128, bf16, host tables, ids unchecked, back to back) split by wrapping its steps with
timers, and beside it each CUDA call it makes, timed alone (a host whose driver calls are slow
shows it there). The hosts of one machine kind differed 2x in this plan's time (sessions 39, 40)
while FlashInfer's own plan differed 1.15x: this says which piece moves.

    python scripts/plan_segments.py OUT.json [--calls 2000]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import time

import torch

import flex_flash_infer
from flex_flash_infer import paged
from flex_flash_infer.core import transfers
from flex_flash_infer.planning import paged_plan
from flex_flash_infer_bench.provenance import source_commit


def per_call_us(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of the mean host time of `calls` calls (microseconds), the GPU waited for
    before each round only (as a server's steps follow one another)."""
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) * 1e6 / calls)
    torch.cuda.synchronize()
    return statistics.median(out)


class Timers:
    """Wraps module functions; each wrapper adds its inclusive host time to its name's total."""

    def __init__(self):
        self.total = collections.Counter()
        self.calls = collections.Counter()
        self._undo = []

    def wrap(self, module, attr, name=None):
        inner = getattr(module, attr)
        name = name or attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - start
                self.calls[name] += 1
        setattr(module, attr, timed)
        self._undo.append((module, attr, inner))

    def undo(self):
        for module, attr, inner in reversed(self._undo):
            setattr(module, attr, inner)
        self._undo.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    import flashinfer

    batch, context, page, hq, hkv, d = 64, 8192, 16, 32, 8, 128
    pages_per = context // page
    gen = torch.Generator().manual_seed(0)
    host = (torch.arange(batch + 1, dtype=torch.int32), torch.arange(batch + 1, dtype=torch.int32) * pages_per,
            torch.randperm(batch * pages_per, generator=gen).to(torch.int32),
            torch.full((batch,), page, dtype=torch.int32))
    ids_host = host[2]
    qo, kv_indptr, _, last = host
    ids_dev = ids_host.cuda()
    rows = {}

    # the CUDA calls a plan makes, alone
    event = torch.cuda.Event()
    event.record()
    rows["torch.cuda.Event() + record()"] = per_call_us(lambda: torch.cuda.Event().record(), args.calls)
    rows["event.record() (one event again)"] = per_call_us(event.record, args.calls)
    rows["event.synchronize() (done)"] = per_call_us(event.synchronize, args.calls)
    rows["torch.cuda.current_stream()"] = per_call_us(torch.cuda.current_stream, args.calls)
    rows["torch.cuda.get_device_properties(0)"] = per_call_us(lambda: torch.cuda.get_device_properties(0), args.calls)
    rows["torch.cuda.get_device_capability(0)"] = per_call_us(lambda: torch.cuda.get_device_capability(0), args.calls)
    rows["ids.pin_memory() (32768 int32)"] = per_call_us(ids_host.pin_memory, args.calls)
    rows["to_device_queued(ids)"] = per_call_us(lambda: transfers.to_device_queued(ids_host, "cuda"), args.calls)
    rows["ids on the GPU .to(int32, copy=True)"] = per_call_us(lambda: ids_dev.to(torch.int32, copy=True), args.calls)
    rows["ids.numpy().min()/max()"] = per_call_us(lambda: (ids_host.numpy().min(), ids_host.numpy().max()), args.calls)
    rows["torch.empty(1) on the GPU"] = per_call_us(lambda: torch.empty(1, device="cuda"), args.calls)

    # FlashInfer's own decode plan of the step (what ours calls), host tables
    from flex_flash_infer.backends.flashinfer_backend import default_workspace
    own = flashinfer.BatchDecodeWithPagedKVCacheWrapper(default_workspace(torch.device("cuda")), "NHD",
                                                        use_tensor_cores=True, backend="fa2")
    common = dict(sm_scale=d ** -0.5, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                  o_data_type=torch.bfloat16)
    rows["flashinfer's own plan, host indptr, device ids"] = per_call_us(
        lambda: own.plan(kv_indptr, ids_dev, last, hq, hkv, d, page, **common), args.calls)

    # ours, whole and split
    mask = flex_flash_infer.get_mask_fn("causal")
    ours = flex_flash_infer.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=False)

    def plan():
        ours.plan(mask, *host, hq, hkv, d, page, dtype=torch.bfloat16)
    plan()
    rows["ours: plan(), whole"] = per_call_us(plan, args.calls)
    timers = Timers()
    timers.wrap(paged, "plan_paged")
    timers.wrap(paged, "_build_launches")
    timers.wrap(paged, "_after_its_last_plan_copied")
    timers.wrap(paged, "_note_plan_queued")
    timers.wrap(paged, "requests_filling_the_gpu")
    timers.wrap(paged, "use_tensor_core_decode")
    timers.wrap(paged_plan, "to_device_queued")
    timers.wrap(paged_plan, "request_lengths")
    timers.wrap(paged_plan, "_plan_from_flags")
    timers.wrap(paged_plan, "_hinted_flags")
    timers.wrap(flashinfer.BatchDecodeWithPagedKVCacheWrapper, "plan", "flashinfer decode plan")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.calls):
        plan()
    whole = (time.perf_counter() - start) * 1e6 / args.calls
    torch.cuda.synchronize()
    timers.undo()
    rows["ours: plan(), whole, timers on"] = whole
    for name, total in timers.total.items():
        rows[f"ours, inside: {name} (x{timers.calls[name] // args.calls})"] = total * 1e6 / args.calls

    # a server's whole step, back to back: plan() then run(), or plan() then the replay of a graph
    # captured once (use_cuda_graph=True); each output checked against the eager run's first. With
    # causal over 8192 keys the GPU's 0.5 ms bounds both; a 1024-key window's kernel is 0.08 ms
    gen_q = torch.Generator(device="cuda").manual_seed(1)
    cache = tuple(torch.randn(batch * pages_per, page, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen_q)
                  for _ in range(2))
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen_q)
    for label, step_mask in (("causal", mask), ("sliding_window(1024)",
                                                 flex_flash_infer.get_mask_fn("sliding_window", window_size=1024))):
        eager = flex_flash_infer.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=False)
        eager.plan(step_mask, *host, hq, hkv, d, page, dtype=torch.bfloat16)
        eager_out = eager.run(q, cache)
        graphed = flex_flash_infer.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=False,
                                                      use_cuda_graph=True, max_num_pages=batch * pages_per)
        graphed.plan(step_mask, *host, hq, hkv, d, page, dtype=torch.bfloat16)
        graphed.run(q, cache)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = graphed.run(q, cache)
        graphed.plan(step_mask, *host, hq, hkv, d, page, dtype=torch.bfloat16)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, eager_out), f"{label}: the replay differs from the eager run"

        def eager_step():
            eager.plan(step_mask, *host, hq, hkv, d, page, dtype=torch.bfloat16)
            eager.run(q, cache)

        def graph_step():
            graphed.plan(step_mask, *host, hq, hkv, d, page, dtype=torch.bfloat16)
            graph.replay()
        rows[f"{label}: use_cuda_graph plan()"] = per_call_us(
            lambda: graphed.plan(step_mask, *host, hq, hkv, d, page, dtype=torch.bfloat16), args.calls)
        rows[f"{label}: run() alone (host time, GPU not waited for)"] = per_call_us(lambda: eager.run(q, cache), 100)
        rows[f"{label}: graph.replay() alone (host time)"] = per_call_us(graph.replay, 100)
        rows[f"{label}: a step, plan() + run(), back to back"] = per_call_us(eager_step, 200)
        rows[f"{label}: a step, plan() + graph.replay(), back to back"] = per_call_us(graph_step, 200)

    for name, us in rows.items():
        print(f"{us:9.1f} us  {name}", flush=True)
    result = {"what": "a decode step's plan(), host time by piece (scripts/plan_segments.py)",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "flashinfer": flashinfer.__version__, "commit": source_commit(),
              "date": datetime.date.today().isoformat(), "cpu_count": __import__("os").cpu_count(),
              "rows_us": rows}
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
