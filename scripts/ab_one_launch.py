"""Issue 22's two-launch leads, timed: masks the library runs as two launches, each in one launch of
FlashInfer's own fa3 kernel built against its headers patched here (experiments: these patch sets
live in this script alone, used nowhere else), against the library's route, interleaved in one
process, every output checked against float32 first. (Prefix-LM as one causal launch whose limit
is max(q + 1, prefix) was timed here on an H200 on 2026-12-06, 0.98-1.01x of our two launches,
and removed: docs/benchmarks.md.)

  * sinks: streaming's sink keys inside the window kernel's launch. The library runs the window
    (the exact-start head-window kernel), then attends the sinks and merges them in with the
    column-merge Triton kernel, which reads q and the output again (about 0.07 ms of 0.37 at 8192
    tokens on an H100, docs/benchmarks.md). Patched: after the window's first key tile the
    producer (mainloop.cuh, ragged TMA loads) and the consumer (mainloop_mma.cuh) both go on to
    the sink tiles (0 .. ceil(sink_len / CTA_KV) - 1), from the same window start, so their
    pipelines stay in step; the window's left mask spares keys below sink_len.

Only the module's ragged kernel may run (the paged producer is not patched for the jump).

    python scripts/ab_one_launch.py OUT.json [--seq-lens 8192 32768] [--experiments sinks]

First a correctness pass at small sizes (every row against float32: sinks wider than a key tile, a
window of one key, queries before the sinks end), then each case checked and timed interleaved.
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
_SETUP = """{i}const int ffi_sink_len = static_cast<int>(mainloop_params.additional_params.ffi_sink_len);
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
    (f"{H}/mainloop.cuh", "    }\n\n    int lane_predicate = cute::elect_one_sync();\n    if (lane_predicate) {\n",
     "    }\n" + _SETUP.format(i="    ") + "\n    int lane_predicate = cute::elect_one_sync();\n    if (lane_predicate) {\n", 1),
    (f"{H}/mainloop.cuh", "for (; kv_tile_idx > swa_begin_kv_tile_idx; --kv_tile_idx) {",
     "for (; kv_tile_idx > swa_begin_kv_tile_idx; kv_tile_idx = " + _NEXT.format(k="kv_tile_idx") + ") {", 1),
    (f"{H}/mainloop.cuh", "tKgK(_, kv_tile_idx - 1)", "tKgK(_, " + _NEXT.format(k="kv_tile_idx") + ")", 1),
    (f"{H}/mainloop_mma.cuh", "  tiled_mma_pv.accumulate_ = GMMA::ScaleOut::Zero;\n",
     _SETUP.format(i="  ") + "  tiled_mma_pv.accumulate_ = GMMA::ScaleOut::Zero;\n", 1),
    (f"{H}/mainloop_mma.cuh", "    int result = kv_tile_idx - 1;\n", "    int result = " + _NEXT.format(k="kv_tile_idx") + ";\n", 1),
    (f"{H}/mainloop_mma.cuh", "for (; kv_tile_idx > swa_begin_kv_tile_idx; --kv_tile_idx) {",
     "for (; kv_tile_idx > swa_begin_kv_tile_idx; kv_tile_idx = " + _NEXT.format(k="kv_tile_idx") + ") {", 1),
    (f"{H}/mainloop_mma.cuh", "(kv_tile_idx - 1) * CTA_KV", _NEXT.format(k="kv_tile_idx") + " * CTA_KV", 1),
    (f"{H}/mainloop_mma.cuh", "if (kv_idx < col_limit_left(qo_idx)) {",
     "if (kv_idx < col_limit_left(qo_idx) && kv_idx >= ffi_sink_len) {", 3),
)
EXPERIMENTS = {   # name -> (patches, tensors, the scalar it adds)
    "sinks": (SINK_PATCHES, head_windows._TENSORS, "ffi_sink_len"),
}
for _name, (_patches, _, _) in EXPERIMENTS.items():
    patched_headers.PATCH_SETS[f"ab_{_name}"] = _patches
    patched_headers.MARKERS[f"ab_{_name}"] = f"// flex_flash_infer ab_one_launch: headers patched for ab_{_name}"


def jit_args(experiment: str, dtype, head_dim: int) -> list:
    _, tensors, scalar = EXPERIMENTS[experiment]
    decl = "#include<flashinfer/attention/hopper/variants.cuh>\n" + patched_headers.MARKERS[f"ab_{experiment}"] + "\n"
    scalars = (head_windows._SCALARS[0] + [scalar], head_windows._SCALARS[1] + ["int64_t"])
    lean_modules.install()
    windowed = True   # FlashInfer generates the module with its window on (a template argument)
    code = hashlib.sha256(repr((decl, tensors, scalars, windowed, patched_headers.patch_hash(f"ab_{experiment}"))
                               ).encode()).hexdigest()[:16]
    uri = f"ffi_ab{experiment}_{code}_{str(dtype).split('.')[-1]}_d{head_dim}"
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim, *tensors, *scalars, "DefaultAttention<false>",
            decl, 0, windowed]


def one_launch(experiment: str, q, k, v, a: int, b: int):
    """sinks (a sinks, window b) over one sequence in one launch; q [S, Hq, D]."""
    S, hq, D = q.shape
    indptr = torch.tensor([0, S], dtype=torch.int32)
    wrapper = planned_ragged(default_workspace(q.device), "fa3", indptr, indptr, (1, S, S, hq, k.shape[1], D),
                             q.dtype, True, b - 1, jit_args=jit_args(experiment, q.dtype, D))
    table = torch.full((hq,), b - 1, dtype=torch.int32, device=q.device)
    return lambda: wrapper.run(q, k, v, table, None, None, None, None, 0.0, D ** -0.5, 1.0, 0, a)


def mask_of(experiment: str, a: int, b: int):
    return get_mask_fn("streaming", sink_size=a, window_size=b)


def ours(experiment: str, q, k, v, a: int, b: int):
    S, hq, D = q.shape
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask_of(experiment, a, b), seq_len_q=S, seq_len_kv=S, num_qo_heads=hq,
                 num_kv_heads=k.shape[1], head_dim=D, dtype=q.dtype)
    return lambda: flex(q, k, v)


def inputs(S, D, seed=bench.SEED):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(S, h, D, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (32, 8, 8)]


CHECKS = {"sinks": ((777, 4, 100), (1000, 200, 64), (600, 4, 1), (2000, 130, 300), (300, 4, 250))}
CASES = {"sinks": ((4, 1024), (4, 256))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    import flashinfer

    D = args.head_dim
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
              "commit": source_commit(), "date": datetime.date.today().isoformat(), "head_dim": D,
              "checks": [], "rows": []}

    def save():
        json.dump(result, open(args.out, "w"), indent=1)

    for experiment in args.experiments:
        if patched_headers.include_root(f"ab_{experiment}") is None:
            print(f"{experiment}: FlashInfer's headers here do not take its patches", flush=True)
            continue
        wrong = False
        for S, a, b in CHECKS[experiment]:
            q, k, v = inputs(S, D, seed=S + a)
            rows = torch.arange(S, device="cuda")
            err = bench.rel_error(one_launch(experiment, q, k, v, a, b)()[rows], bench.reference_rows(
                q, k, v, mask_of(experiment, a, b), rows))
            result["checks"].append({"experiment": experiment, "seq_len": S, "a": a, "b": b, "rel_err": err})
            print(f"check {experiment} S={S} ({a}, {b}): rel_err {err:.2e}", flush=True)
            wrong = wrong or not err < bench.TOLERANCE
        save()
        if wrong:
            print(f"{experiment}: a wrong answer above; not timed", flush=True)
            continue
        for S in args.seq_lens:
            q, k, v = inputs(S, D)
            rows = torch.sort(torch.randperm(S, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
                              [:bench.CHECK_ROWS]).values
            for a, b in CASES[experiment]:
                ref = bench.reference_rows(q, k, v, mask_of(experiment, a, b), rows)
                case_rows, checked = [], {}
                for name, make in (("ours", ours), ("one_launch", one_launch)):
                    row = {"experiment": experiment, "seq_len": S, "a": a, "b": b, "impl": name}
                    case_rows.append(row)
                    try:
                        call = make(experiment, q, k, v, a, b)
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
                    print(f"{experiment} S={S:6d} ({a}, {b}) {row['impl']:12s} {row.get('ms') or float('nan'):8.3f} ms"
                          f"  rel_err {row.get('rel_err', float('nan')):.2e} {row.get('error', '')}", flush=True)
                result["rows"] += case_rows
                save()


if __name__ == "__main__":
    main()
