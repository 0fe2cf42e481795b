"""Issue 22's streaming lead, timed: streaming's sink keys inside the window kernel's one launch,
against the library's route (the window on the exact-start kernel, then the sinks attended and
merged by the column-merge Triton kernel, which reads q and the output again: about 0.07 ms of
0.37 at 8192 tokens on an H100, docs/benchmarks.md).

The kernel is the head-window module's (FlashInfer's fa3 DefaultAttention against its headers
patched by compile/patched_headers.py) with more patches, made here and used nowhere else: after
the window's first key tile, the producer and the consumer go on to the sink tiles (0 ..
ceil(sink_len / CTA_KV) - 1) instead of stopping, and the window's left mask spares keys below
sink_len. The producer (mainloop.cuh, ragged TMA loads) and the consumer (mainloop_mma.cuh) take
the same jump, from the same window start, so their pipelines stay in step. Only the module's
ragged kernel may run (as for the head-window module: the paged producer does not jump).

    python scripts/ab_sink_window.py OUT.json [--seq-lens 8192 32768] [--cases 4:1024 4:256]

First a correctness pass at small sizes (every row against float32, sinks wider than a key tile,
a window of one key, queries before the sinks end), then each case checked and timed interleaved.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer import FlexFlashInfer, get_mask_fn
from flex_flash_infer.backends import head_windows
from flex_flash_infer.backends.flashinfer_backend import default_workspace
from flex_flash_infer.compile import lean_modules, patched_headers
from flex_flash_infer.planning.ragged import planned_ragged
from flex_flash_infer_bench.provenance import source_commit

H = "attention/hopper"
# the producer's and the consumer's next key tile: after the window's first tile (ffi_sink_from),
# the last sink tile; locals of both functions
_NEXT = "(({k}) == ffi_sink_from ? ffi_sink_tiles - 1 : ({k}) - 1)"
_SETUP = """{i}const int ffi_sink_len = static_cast<int>({p}.additional_params.ffi_sink_len);
{i}const int ffi_sink_tiles = (ffi_sink_len + CTA_KV - 1) / CTA_KV;
{i}int ffi_sink_from = -1;   // the window's first key tile, after which the sink tiles come
{i}if constexpr (LEFT_SLIDING_WINDOW) {{
{i}  if (ffi_sink_tiles > 0) {{
{i}    if (swa_begin_kv_tile_idx > ffi_sink_tiles) ffi_sink_from = swa_begin_kv_tile_idx;
{i}    swa_begin_kv_tile_idx = 0;   // the loops run to tile 0, jumping the gap
{i}  }}
{i}}}
"""
SINK_PATCHES = patched_headers.PATCH_SETS["head_windows"] + (
    # producer: set up after its window start, then jump in its load loop
    (f"{H}/mainloop.cuh", "    }\n\n    int lane_predicate = cute::elect_one_sync();\n    if (lane_predicate) {\n",
     "    }\n" + _SETUP.format(i="    ", p="mainloop_params")
     + "\n    int lane_predicate = cute::elect_one_sync();\n    if (lane_predicate) {\n", 1),
    (f"{H}/mainloop.cuh", "for (; kv_tile_idx > swa_begin_kv_tile_idx; --kv_tile_idx) {",
     "for (; kv_tile_idx > swa_begin_kv_tile_idx; kv_tile_idx = " + _NEXT.format(k="kv_tile_idx") + ") {", 1),
    (f"{H}/mainloop.cuh", "tKgK(_, kv_tile_idx - 1)", "tKgK(_, " + _NEXT.format(k="kv_tile_idx") + ")", 1),
    # consumer: the same set-up at its start, the same jump in every loop, sinks spared the window
    (f"{H}/mainloop_mma.cuh", "  tiled_mma_pv.accumulate_ = GMMA::ScaleOut::Zero;\n",
     _SETUP.format(i="  ", p="mainloop_params") + "  tiled_mma_pv.accumulate_ = GMMA::ScaleOut::Zero;\n", 1),
    (f"{H}/mainloop_mma.cuh", "    int result = kv_tile_idx - 1;\n",
     "    int result = " + _NEXT.format(k="kv_tile_idx") + ";\n", 1),
    (f"{H}/mainloop_mma.cuh", "for (; kv_tile_idx > swa_begin_kv_tile_idx; --kv_tile_idx) {",
     "for (; kv_tile_idx > swa_begin_kv_tile_idx; kv_tile_idx = " + _NEXT.format(k="kv_tile_idx") + ") {", 1),
    (f"{H}/mainloop_mma.cuh", "(kv_tile_idx - 1) * CTA_KV", _NEXT.format(k="kv_tile_idx") + " * CTA_KV", 1),
    (f"{H}/mainloop_mma.cuh", "if (kv_idx < col_limit_left(qo_idx)) {",
     "if (kv_idx < col_limit_left(qo_idx) && kv_idx >= ffi_sink_len) {", 3),
)
patched_headers.PATCH_SETS["window_sinks"] = SINK_PATCHES
patched_headers.MARKERS["window_sinks"] = "// flex_flash_infer ab_sink_window: headers patched for window_sinks"
_DECL = "#include<flashinfer/attention/hopper/variants.cuh>\n" + patched_headers.MARKERS["window_sinks"] + "\n"
_SCALARS = (head_windows._SCALARS[0] + ["ffi_sink_len"], head_windows._SCALARS[1] + ["int64_t"])


def jit_args(dtype, head_dim: int) -> list:
    lean_modules.install()
    code = hashlib.sha256(repr((_DECL, head_windows._TENSORS, _SCALARS, patched_headers.patch_hash("window_sinks"))
                               ).encode()).hexdigest()[:16]
    uri = f"ffi_sinkwin_{code}_{str(dtype).split('.')[-1]}_d{head_dim}"
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim, *head_windows._TENSORS, *_SCALARS,
            "DefaultAttention<false>", _DECL, 0, True]


def one_launch(q, k, v, sink_len: int, window: int):
    """Streaming (sink_len sinks, window keys) over one sequence in one launch; q [S, Hq, D]."""
    S, hq, D = q.shape
    indptr = torch.tensor([0, S], dtype=torch.int32)
    wrapper = planned_ragged(default_workspace(q.device), "fa3", indptr, indptr, (1, S, S, hq, k.shape[1], D),
                             q.dtype, True, window - 1, jit_args=jit_args(q.dtype, D))
    table = torch.full((hq,), window - 1, dtype=torch.int32, device=q.device)
    return lambda: wrapper.run(q, k, v, table, None, None, None, None, 0.0, D ** -0.5, 1.0, 0, sink_len)


def ours(q, k, v, sink_len: int, window: int):
    S, hq, D = q.shape
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=get_mask_fn("streaming", sink_size=sink_len, window_size=window), seq_len_q=S,
                 seq_len_kv=S, num_qo_heads=hq, num_kv_heads=k.shape[1], head_dim=D, dtype=q.dtype)
    return lambda: flex(q, k, v)


def inputs(S, D, seed=bench.SEED):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(S, h, D, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (32, 8, 8)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--cases", nargs="+", default=["4:1024", "4:256"], help="sink_len:window")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    import flashinfer

    if patched_headers.include_root("window_sinks") is None:
        raise SystemExit("FlashInfer's headers here do not take the window_sinks patches")
    D = args.head_dim
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
              "commit": source_commit(), "date": datetime.date.today().isoformat(), "head_dim": D,
              "checks": [], "rows": []}
    # every row of small problems: sinks inside and beyond one key tile, windows of one key and of
    # most of the keys, queries before the sinks end
    for S, sink_len, window in ((777, 4, 100), (1000, 200, 64), (600, 4, 1), (2000, 130, 300), (300, 4, 250)):
        q, k, v = inputs(S, D, seed=S + sink_len)
        mask = get_mask_fn("streaming", sink_size=sink_len, window_size=window)
        rows = torch.arange(S, device="cuda")
        ref = bench.reference_rows(q, k, v, mask, rows)
        err = bench.rel_error(one_launch(q, k, v, sink_len, window)()[rows], ref)
        result["checks"].append({"seq_len": S, "sink_len": sink_len, "window": window, "rel_err": err})
        print(f"check S={S} sinks={sink_len} window={window}: rel_err {err:.2e}", flush=True)
        if not err < bench.TOLERANCE:
            json.dump(result, open(args.out, "w"), indent=1)
            raise SystemExit(f"one launch wrong at S={S} sinks={sink_len} window={window}: {err}")
    for S in args.seq_lens:
        q, k, v = inputs(S, D)
        rows = torch.sort(torch.randperm(S, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
                          [:bench.CHECK_ROWS]).values
        for case in args.cases:
            sink_len, window = (int(x) for x in case.split(":"))
            ref = bench.reference_rows(q, k, v, get_mask_fn("streaming", sink_size=sink_len, window_size=window), rows)
            case_rows, checked = [], {}
            for name, make in (("ours", ours), ("one_launch", one_launch)):
                row = {"seq_len": S, "sink_len": sink_len, "window": window, "impl": name}
                case_rows.append(row)
                try:
                    call = make(q, k, v, sink_len, window)
                except Exception as e:
                    row["error"] = f"plan: {type(e).__name__}: {e}"[:300]
                    continue
                if bench.check(row, call, lambda out: bench.rel_error(out[rows], ref)):
                    checked[name] = call
            times, errors = bench.time_interleaved(checked, rounds=args.rounds)
            for row in case_rows:
                row["ms"] = times.get(row["impl"])
                if row["impl"] in errors:
                    row["error"] = errors[row["impl"]]
                print(f"S={S:6d} sinks={sink_len} window={window:5d} {row['impl']:12s} "
                      f"{row.get('ms') or float('nan'):8.3f} ms  rel_err {row.get('rel_err', float('nan')):.2e} "
                      f"{row.get('error', '')}", flush=True)
            result["rows"] += case_rows
            json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
