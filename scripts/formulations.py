"""Issue 22's leads, measured before anything is built on them: the same sliding-window, prefix-LM
and streaming attention handed to FlashInfer's fa3 kernels in different shapes, beside the
library's own call and torch flex on FlashAttention-4, in one process, interleaved, each output
checked against the library's first. GPU only:  python scripts/formulations.py [OUT.json]

Window leads: FlashInfer's Hopper scheduler costs a window's query tiles as if causal (one request
of 8192 rows: the last tiles look 64x heavier than the first), and the window's first key tile
starts one early. Splitting the rows into requests whose keys start where their window starts
(ragged: copies of the keys; paged: a page table, no copy) shows what each is worth.
Per-head windows: the route's single calls and copies (before 2026-12-04) against ragged launches
writing in place (since), on streams, and the widest window alone for all heads (the floor of one
launch; the heads' widths as -inf scores inside that launch lost to the four launches and were
dropped: docs/benchmarks.md). Prefix-LM lead: its two launches (a full block, then the causal rows) one after the other, or on
two streams at once. Streaming: the window launch alone, i.e. what the sink columns cost.
"""
import functools
import json
import math
import sys

import torch
import flashinfer

from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer.wrapper import FlexFlashInfer
from flex_flash_infer_bench.masks import fa4_missing, time_interleaved
from flex_flash_infer_bench.provenance import source_commit

S, HQ, HKV, D, W = 8192, 32, 8, 128, 1024
dt = torch.bfloat16
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(S, HQ, D, device="cuda", dtype=dt, generator=gen)
k = torch.randn(S, HKV, D, device="cuda", dtype=dt, generator=gen)
v = torch.randn(S, HKV, D, device="cuda", dtype=dt, generator=gen)


def workspace():
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def i32(xs):
    return torch.tensor(xs, dtype=torch.int32, device="cuda")


def ours(mask_mod):
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask_mod, seq_len_q=S, seq_len_kv=S, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=dt)
    return lambda: flex(q, k, v)


def fa4(mask_mod, heads=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    bm = create_block_mask(mask_mod, None, heads, S, S, device="cuda")
    compiled = torch.compile(functools.partial(flex_attention, kernel_options={"BACKEND": "FLASH"}), dynamic=False)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    return lambda: compiled(qh, kh, vh, block_mask=bm, enable_gqa=True)[0].transpose(0, 1)


def ragged_window_chunks(rows_per_request, exact_start=True, with_copy=False):
    """Requests of rows_per_request query rows, each with its own copy of the keys its window
    reaches (exact_start: from the first visible key; else from the tile-aligned one)."""
    starts = list(range(0, S, rows_per_request))
    spans = []
    for r0 in starts:
        lo = max(0, r0 - (W - 1)) if exact_start else max(0, (r0 - W) // 128 * 128)
        spans.append((lo, r0 + rows_per_request))
    idx = torch.cat([torch.arange(a, b, device="cuda") for a, b in spans])
    kd, vd = k[idx].contiguous(), v[idx].contiguous()
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa3")
    qo = i32(starts + [S])
    kvl = [0]
    for a, b in spans:
        kvl.append(kvl[-1] + b - a)
    wrapper.plan(qo, i32(kvl), HQ, HKV, D, causal=True, window_left=W - 1, q_data_type=dt, kv_data_type=dt)
    if with_copy:
        return lambda: wrapper.run(q, k[idx], v[idx])
    return lambda: wrapper.run(q, kd, vd)


def paged_window_chunks(rows_per_request, page_size):
    """The same requests over one paged copy of k/v (made once, as a server's cache is): each
    request's page list starts at its window's first page; no copies per call."""
    kc = k.view(S // page_size, page_size, HKV, D)
    vc = v.view(S // page_size, page_size, HKV, D)
    starts = list(range(0, S, rows_per_request))
    indptr, indices = [0], []
    for r0 in starts:
        lo = max(0, r0 - (W - 1)) // page_size
        hi = (r0 + rows_per_request) // page_size
        indices += list(range(lo, hi))
        indptr.append(len(indices))
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="fa3")
    wrapper.plan(i32(starts + [S]), i32(indptr), i32(indices), i32([page_size] * len(starts)), HQ, HKV, D, page_size,
                 causal=True, window_left=W - 1, q_data_type=dt, kv_data_type=dt)
    return lambda: wrapper.run(q, (kc, vc))


def paged_one(page_size, window_left):
    kc = k.view(S // page_size, page_size, HKV, D)
    vc = v.view(S // page_size, page_size, HKV, D)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="fa3")
    wrapper.plan(i32([0, S]), i32([0, S // page_size]), i32(list(range(S // page_size))), i32([page_size]), HQ, HKV,
                 D, page_size, causal=True, window_left=window_left, q_data_type=dt, kv_data_type=dt)
    return lambda: wrapper.run(q, (kc, vc))


def ragged_one(window_left):
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa3")
    wrapper.plan(i32([0, S]), i32([0, S]), HQ, HKV, D, causal=True, window_left=window_left, q_data_type=dt,
                 kv_data_type=dt)
    return lambda: wrapper.run(q, k, v)


def prefix_launches(prefix, streams: bool):
    """The prefix block (full) and the causal rows after it, each a ragged launch writing its rows
    of one output in place: one after the other, or the block on a side stream at the same time."""
    side = torch.cuda.Stream()
    out = torch.empty_like(q)
    rest = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa3")
    rest.plan(i32([0, S - prefix]), i32([0, S]), HQ, HKV, D, causal=True, q_data_type=dt, kv_data_type=dt)
    block = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa3")
    block.plan(i32([0, prefix]), i32([0, prefix]), HQ, HKV, D, causal=False, q_data_type=dt, kv_data_type=dt)

    def run():
        main = torch.cuda.current_stream()
        stream = side if streams else main
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            block.run(q[:prefix], k[:prefix], v[:prefix], out=out[:prefix])
        rest.run(q[prefix:], k, v, out=out[prefix:])
        main.wait_stream(stream)
        return out

    return run


def per_head_window_launches(windows, streams: bool):
    """The bands-per-head route's launches (query heads i, i+4, ... share window i and read key
    heads 0..7), one after the other or each on its own stream."""
    side = [torch.cuda.Stream() for _ in windows]
    out = torch.empty_like(q)
    n = len(windows)

    def run():
        main = torch.cuda.current_stream()
        for i, w in enumerate(windows):
            stream = side[i] if streams else main
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                out[:, i::n] = flashinfer.single_prefill_with_kv_cache(q[:, i::n], k, v, causal=True,
                                                                        window_left=w - 1)
        if streams:
            for stream in side:
                main.wait_stream(stream)
        return out

    return run


def per_head_window_ragged_in_place(windows):
    """The bands-per-head route since 2026-12-04 on Hopper: per group a ragged launch planned
    once, writing its heads (a strided view) of one output in place; the LSE copied in."""
    n = len(windows)
    out = torch.empty_like(q)
    lse = torch.empty(S, HQ, dtype=torch.float32, device="cuda")
    wrappers = []
    for w in windows:
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend="fa3")
        wrapper.plan(i32([0, S]), i32([0, S]), HQ // n, HKV, D, causal=True, window_left=w - 1, q_data_type=dt,
                     kv_data_type=dt, disable_split_kv=True)
        wrappers.append(wrapper)

    def run():
        for i, wrapper in enumerate(wrappers):
            _, lse[:, i::n] = wrapper.run(q[:, i::n], k, v, out=out[:, i::n], return_lse=True)
        return out

    return run


def per_head_windows_mask(windows=(128, 256, 512, 1024)):
    table = torch.tensor(windows, device="cuda")

    def per_head_windows(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < table[h % len(windows)])

    return per_head_windows


groups = {
    "sliding_window": (get_mask_fn("sliding_window", window_size=W), {
        "ours": None, "fa4": None,
        "ragged 1 request": lambda: ragged_one(W - 1),
        "ragged 8 requests, key copies made once": lambda: ragged_window_chunks(1024),
        "ragged 8 requests, key copies per call": lambda: ragged_window_chunks(1024, with_copy=True),
        "ragged 64 requests, key copies made once": lambda: ragged_window_chunks(128),
        "ragged 64 requests, tile-aligned copies": lambda: ragged_window_chunks(128, exact_start=False),
        "paged 1 request, page 128": lambda: paged_one(128, W - 1),
        "paged 1 request, page 1": lambda: paged_one(1, W - 1),
        "paged 64 requests, page 1": lambda: paged_window_chunks(128, 1),
        "paged 64 requests, page 128": lambda: paged_window_chunks(128, 128),
        "paged 8 requests, page 1": lambda: paged_window_chunks(1024, 1),
    }),
    "causal": (get_mask_fn("causal"), {
        "ours": None, "fa4": None,
        "ragged 1 request": lambda: ragged_one(-1),
        "paged 1 request, page 128": lambda: paged_one(128, -1),
        "paged 1 request, page 1": lambda: paged_one(1, -1),
    }),
    "prefix_lm": (get_mask_fn("prefix_lm", prefix_len=2048), {
        "ours": None, "fa4": None,
        "two launches, one after the other": lambda: prefix_launches(2048, streams=False),
        "two launches on two streams": lambda: prefix_launches(2048, streams=True),
    }),
    "per_head_windows": (per_head_windows_mask(), {
        "ours": None, "fa4": None,
        "four launches, one after the other": lambda: per_head_window_launches((128, 256, 512, 1024), False),
        "four launches on four streams": lambda: per_head_window_launches((128, 256, 512, 1024), True),
        "four ragged launches writing in place": lambda: per_head_window_ragged_in_place((128, 256, 512, 1024)),
        "widest window alone (differs: the floor)": lambda: ragged_one(1023),
    }),
    "streaming": (get_mask_fn("streaming", sink_size=4, window_size=W), {
        "ours": None, "fa4": None,
        "window launch alone (no sinks)": lambda: ragged_one(W - 1),
    }),
}

results = []
for case, (mask_mod, makers) in groups.items():
    fns, reference = {}, None
    for name, make in makers.items():
        try:
            if name == "ours":
                fns[name] = ours(mask_mod)
            elif name == "fa4":
                if fa4_missing():
                    continue
                fns[name] = fa4(mask_mod, HQ if case == "per_head_windows" else None)
            else:
                fns[name] = make()
        except Exception as e:
            results.append({"case": case, "impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    reference = fns["ours"]().float()
    checked = {}
    for name, fn in fns.items():
        try:
            out = fn().float()
            err = ((out - reference).norm() / reference.norm()).item()
        except Exception as e:
            results.append({"case": case, "impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        # the sink-less window and the prefix block alone differ from the mask on purpose
        if err > 2e-2 and "no sinks" not in name and "differs" not in name:
            results.append({"case": case, "impl": name, "error": f"rel_err {err:.3e} against ours"})
            continue
        checked[name] = fn
        results.append({"case": case, "impl": name, "rel_err_vs_ours": err})
    times, errors = time_interleaved(checked, rounds=20)
    for r in results:
        if r["case"] == case and r["impl"] in times:
            r["ms"] = times[r["impl"]]
        if r["case"] == case and r["impl"] in errors:
            r["error"] = errors[r["impl"]]
    print(f"\n{case}")
    for r in results:
        if r["case"] == case:
            print(f"  {r['impl']:44s} " + (f"{r['ms']:.4f} ms  (rel {r['rel_err_vs_ours']:.1e})" if "ms" in r
                                            else r.get("error", "")), flush=True)
    torch.cuda.empty_cache()

if len(sys.argv) > 1:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
               "commit": source_commit(), "shape": {"S": S, "HQ": HQ, "HKV": HKV, "D": D, "window": W},
               "rows": results}, open(sys.argv[1], "w"), indent=1)
