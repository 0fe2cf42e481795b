"""Plan-time benchmark: how long planning takes, against torch's compiled block-mask build.

Measures, in one process on a CUDA GPU:
  * create_block_mask at 131072 tokens (causal, attamba, and documents and sliding window whose
    tiles bounds decide): this library (eager from bounds, eager element by element, and with
    _compile=True) vs torch.compile(torch.nn.attention.flex_attention.create_block_mask), warm,
    median of runs, and whether the tile maps agree;
  * FlexFlashInfer.prepare() for a 32768-token causal problem, warm (kernels already compiled),
    median of runs: the library's causal (its band hint: lowering + FlashInfer plan, the tile
    tables left unbuilt) and a user's own causal function (tables from bounds, bands found and
    verified), and the parts of the latter.
Prints a table and writes JSON with the device name.
"""
from __future__ import annotations

import datetime
import json
import statistics
import time

import torch

from flex_flash_infer.block_mask import BlockMask, create_block_mask
from flex_flash_infer.backends.flashinfer_backend import FlashInferPlan
from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer.masks.tile_bounds import classify_tiles
from flex_flash_infer.wrapper import FlexFlashInfer
from .provenance import source_commit


def _median_s(fn, runs: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


BLOCK_MASK_CASES = ("causal", "attamba", "sliding_window", "document")


def _elementwise_block_mask(mod, n: int) -> BlockMask:
    """create_block_mask(mod, None, None, n, n, device="cuda") with every tile evaluated element by
    element (no bounds), asked of classify_tiles for this call: the library's default is left as it is."""
    states = classify_tiles(mod, 1, 1, n, n, 128, 128, torch.device("cuda"), use_bounds=False)
    return BlockMask.from_states(states, (n, n), (128, 128), mod)


def run_plan_benchmark(out_path: str | None = None, block_mask_cases=BLOCK_MASK_CASES, with_prepare: bool = True,
                       with_our_compiled: bool = True) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    compiled = torch.compile(torch_create_block_mask)
    rows = []
    n = 131072
    params_of = {"causal": {}, "attamba": {"window_size": 256, "chunk_size": 128},
                 "sliding_window": {"window_size": 1024}, "document": {"offsets": list(range(0, n, 4096)) + [n]}}
    for name in block_mask_cases:
        mod = get_mask_fn(name, **params_of[name])
        ours = _median_s(lambda: create_block_mask(mod, None, None, n, n, device="cuda"))
        elementwise = _median_s(lambda: _elementwise_block_mask(mod, n))
        ours_elementwise = _elementwise_block_mask(mod, n).states
        ours_compiled = _median_s(lambda: create_block_mask(mod, None, None, n, n, device="cuda", _compile=True)) \
            if with_our_compiled else None
        ours_states = create_block_mask(mod, None, None, n, n, device="cuda").states
        assert torch.equal(ours_states, ours_elementwise), f"{name}: bounds and element-wise builds differ"
        try:
            theirs = _median_s(lambda: compiled(mod, None, None, n, n, device="cuda"))
            torch_states = BlockMask.from_torch(compiled(mod, None, None, n, n, device="cuda")).states
            same = torch.equal(ours_states, torch_states) and (not with_our_compiled or torch.equal(
                create_block_mask(mod, None, None, n, n, device="cuda", _compile=True).states, torch_states))
        except Exception as e:   # torch's build failing on a mask is a row to report, not the end of the run
            print(f"    torch.compile(create_block_mask) on {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            theirs, same = float("nan"), None
        rows.append({"what": f"create_block_mask {name} {n}", "ours_ms": ours * 1e3,
                     "ours_elementwise_ms": elementwise * 1e3,
                     "ours_compiled_ms": None if ours_compiled is None else ours_compiled * 1e3,
                     "torch_compiled_ms": theirs * 1e3, "same_tiles_as_torch": same})
        print(f"    {rows[-1]}", flush=True)   # each row as it lands: a run cut short keeps them
    if with_prepare:
        rows += _prepare_rows()
    print(f"{'what':52s} {'ours ms':>10s} {'element-wise ms':>17s} {'ours _compile ms':>17s} {'torch.compile ms':>17s}")

    def cell(x):
        return f"{x:17.1f}" if x is not None else f"{'-':>17s}"

    for r in rows:
        same = {None: "", True: "same tiles", False: "TILES DIFFER"}[r.get("same_tiles_as_torch")]
        print(f"{r['what']:52s} {r['ours_ms']:10.1f} {cell(r.get('ours_elementwise_ms'))} "
              f"{cell(r['ours_compiled_ms'])} {cell(r['torch_compiled_ms'])} {same}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "commit": source_commit(), "rows": rows}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _prepare_rows() -> list:
    """FlexFlashInfer.prepare() of a 32768-token causal problem and its two parts."""
    rows = []
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")   # times the FlashInfer plan, never the reference
    mod = get_mask_fn("causal")

    def prepare(compile_block_mask=False):
        flex.prepare(mask_fn=mod, seq_len_q=32768, seq_len_kv=32768, num_qo_heads=32, num_kv_heads=8,
                     head_dim=128, dtype=torch.bfloat16, compile_block_mask=compile_block_mask)

    # the library mask's band hint: its tile tables are not built (a LazyBlockMask) unless read;
    # with compile_block_mask the hint still skips them, so both columns time the same work
    rows.append({"what": "prepare causal 32768 (hinted: lowering + plan)", "ours_ms": _median_s(prepare) * 1e3,
                 "ours_compiled_ms": _median_s(lambda: prepare(True)) * 1e3, "torch_compiled_ms": None})

    def users_causal(b, h, q_idx, kv_idx):   # the same predicate with no band hint: bands found and verified
        return q_idx >= kv_idx

    def prepare_users():
        flex.prepare(mask_fn=users_causal, seq_len_q=32768, seq_len_kv=32768, num_qo_heads=32, num_kv_heads=8,
                     head_dim=128, dtype=torch.bfloat16)

    rows.append({"what": "prepare causal 32768, a user's own function", "ours_ms": _median_s(prepare_users) * 1e3,
                 "ours_compiled_ms": None, "torch_compiled_ms": None})
    # the same at a length no earlier prepare() planned: FlashInfer's plan() runs again (a repeated
    # prepare() of one launch reuses the planned wrapper its previous plan holds: planning/ragged.py)
    lengths = iter(range(32768, 0, -128))

    def prepare_users_new_length():
        n = next(lengths)
        flex.prepare(mask_fn=users_causal, seq_len_q=n, seq_len_kv=n, num_qo_heads=32, num_kv_heads=8,
                     head_dim=128, dtype=torch.bfloat16)

    rows.append({"what": "prepare causal ~32768, a user's own function, a length not planned before",
                 "ours_ms": _median_s(prepare_users_new_length) * 1e3, "ours_compiled_ms": None,
                 "torch_compiled_ms": None})
    attamba = get_mask_fn("attamba", window_size=256, chunk_size=128)

    def users_attamba(b, h, q_idx, kv_idx):   # no hint: window and key columns found and verified
        return attamba(b, h, q_idx, kv_idx)

    for what, fn in (("prepare attamba 32768", attamba), ("prepare attamba 32768, a user's own function",
                                                          users_attamba)):
        def prepare_mask(fn=fn):
            flex.prepare(mask_fn=fn, seq_len_q=32768, seq_len_kv=32768, num_qo_heads=32, num_kv_heads=8,
                         head_dim=128, dtype=torch.bfloat16)

        rows.append({"what": what, "ours_ms": _median_s(prepare_mask) * 1e3, "ours_compiled_ms": None,
                     "torch_compiled_ms": None})
    rows.append({"what": "create_block_mask causal 32768 (a user's mask builds it)",
                 "ours_ms": _median_s(lambda: create_block_mask(mod, None, None, 32768, 32768, device="cuda")) * 1e3,
                 "ours_compiled_ms": _median_s(lambda: create_block_mask(mod, None, None, 32768, 32768, device="cuda",
                                                                         _compile=True)) * 1e3,
                 "torch_compiled_ms": None})
    bm = create_block_mask(mod, None, None, 32768, 32768, device="cuda")
    rows.append({"what": "route + FlashInfer plan of a built causal block mask",
                 "ours_ms": _median_s(lambda: FlashInferPlan(bm, 1, 32768, 32768, 32, 8, 128, torch.bfloat16,
                                                             128 ** -0.5, "cuda")) * 1e3,
                 "ours_compiled_ms": None, "torch_compiled_ms": None})
    return rows
