"""Issue 22's per-head windows row, timed against one launch: a causal window whose width depends
on the query head (the bench's per_head_windows: 128 / 256 / 512 / 1024 by h % 4) runs today as
one FlashInfer launch per set of heads sharing a width (four on 32 heads), which at head_dim 64
is bound by their host work and each launch fills the GPU poorly (0.53x Triton flex, 0.80x FA4
flex on the H100). FlashInfer's Hopper kernel reads its window from one launch-wide number
(mainloop_params.window_left, at its five uses in hopper/mainloop.cuh, sparse_mainloop.cuh,
mainloop_mma.cuh and prefill_sm90.cuh); every use has the query head in scope. This builds
FlashInfer's own window kernel (its DefaultAttention variant and fa3 parameters) against a copy
of its headers made at build time from the installed FlashInfer (never carried in this
repository) in which each use reads the window of its query head from a table the launch passes
(one int32 per query head), and the window starts at its first visible key tile (the "- 1" of
get_swa_begin_kv_tile_idx removed, as scripts/ab_window_tile.py measures alone). Then it times,
in one process, interleaved, each checked against float32 first: the library's call as it runs
today, that one launch, and FlashInfer's plain window kernel at the widest width over every head
(one launch doing more work).

    python scripts/ab_head_window_kernel.py OUT.json [--seq-lens 8192] [--head-dims 128 64]
    # build the modules ahead on the CPU machine (sm_90a), into .aot/ (then pack_prebuilt.sh):
    PYTHONPATH=.:scripts PREBUILD_PY=scripts/ab_head_window_kernel.py bash scripts/prebuild_kernels.sh --prebuild .aot
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import shutil

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer import FlexFlashInfer, get_mask_fn
from flex_flash_infer.compile import lean_modules
from flex_flash_infer_bench.provenance import source_commit
from ab_window_tile import build_variant_modules, time_checked   # scripts/ is the script's own directory

WINDOWS = (128, 256, 512, 1024)   # the bench's per_head_window_mask
MARKER = "// ffi ab_head_window_kernel: the window of each query head, from its table"
TABLE = "ffi_head_window_left"
PER_HEAD = "FFI_WINDOW_LEFT(mainloop_params, qo_head_idx)"
MACRO = (f"#define FFI_WINDOW_LEFT(params, head) "
         f"(static_cast<int>(__ldg((params).additional_params.{TABLE} + (head))))\n")
# (file under include/flashinfer/attention/hopper, text, replacement, times it must occur)
PATCHES = [
    ("utils.cuh", "using namespace cute;\n", "using namespace cute;\n" + MACRO, 1),
    ("utils.cuh", "return std::max((q_tile_idx * CTA_Q + kv_len - qo_len - window_left) / CTA_KV - 1, 0);",
     "return std::max((q_tile_idx * CTA_Q + kv_len - qo_len - window_left) / CTA_KV, 0);", 1),
    ("mainloop.cuh", "mainloop_params.window_left", PER_HEAD, 1),
    ("sparse_mainloop.cuh", "mainloop_params.window_left", PER_HEAD, 1),
    ("mainloop_mma.cuh", "mainloop_params.window_left", PER_HEAD, 1),
    ("prefill_sm90.cuh", "mainloop_params.window_left", PER_HEAD, 2),
]


def patched_root(where: pathlib.Path) -> pathlib.Path:
    """A copy of the installed FlashInfer's include/flashinfer tree with PATCHES applied (it goes
    first on the include path, so every relative include resolves inside it). Raises when a text
    is not found as often as expected (another FlashInfer version)."""
    from flashinfer.jit import env

    root = where / "include"
    hopper = root / "flashinfer" / "attention" / "hopper"
    done = where / "patched"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(env.FLASHINFER_INCLUDE_DIR / "flashinfer", root / "flashinfer")
        for name, old, new, times in PATCHES:
            path = hopper / name
            text = path.read_text()
            if text.count(old) != times:
                raise RuntimeError(f"{path}: {old!r} occurs {text.count(old)} times, not {times} (another FlashInfer?)")
            path.write_text(text.replace(old, new))
        done.write_text("\n".join(repr(p) for p in PATCHES))
    return root


def build_marked_with(root: pathlib.Path) -> None:
    """Modules whose variant code carries MARKER build against root's headers."""
    from flashinfer import prefill

    lean_modules.install()
    generate = prefill.gen_customize_batch_prefill_module

    def generate_patched(backend, uri, *args, **kwargs):
        spec = generate(backend, uri, *args, **kwargs)
        if any(isinstance(a, str) and MARKER in a for a in args):
            spec = dataclasses.replace(spec, extra_include_dirs=[root] + list(spec.extra_include_dirs or []))
        return spec

    prefill.gen_customize_batch_prefill_module = generate_patched


def head_window_jit_args(dtype, head_dim: int) -> list:
    """FlashInfer's fa3 DefaultAttention with its native parameters plus the per-head window table."""
    decl = f"#include<flashinfer/attention/hopper/variants.cuh>\n{MARKER}\n"
    uri = f"ffi_abheadwin_{str(dtype).split('.')[-1]}_d{head_dim}"
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim,
            ["maybe_prefix_len_ptr", "maybe_token_pos_in_items_ptr", "maybe_max_item_len_ptr", "maybe_scale_v", TABLE],
            ["uint32_t", "uint16_t", "uint16_t", "float", "int32_t"],
            ["logits_soft_cap", "sm_scale", "scale_v_scalar", "token_pos_in_items_len"],
            ["double", "double", "double", "int64_t"], "DefaultAttention<false>", decl, 0, True]


def one_launch(q, k, v, window_left: torch.Tensor | None, widest: int):
    """One ragged fa3 launch over every head: with window_left (int32 [Hq] on q's device) the
    patched kernel, each head its own window; without, FlashInfer's own kernel at `widest`."""
    from flex_flash_infer.backends.flashinfer_backend import default_workspace
    from flex_flash_infer.planning.ragged import planned_ragged

    S, hq, D = q.shape
    indptr = torch.tensor([0, S], dtype=torch.int32)
    scale = D ** -0.5
    jit = head_window_jit_args(q.dtype, D) if window_left is not None else None
    wrapper = planned_ragged(default_workspace(q.device), "fa3", indptr, indptr, (1, S, S, hq, k.shape[1], D),
                             q.dtype, True, widest - 1, sm_scale=None if jit else scale, jit_args=jit)
    extra = (None, None, None, None, window_left, 0.0, scale, 1.0, 0) if jit else ()
    return lambda: wrapper.run(q, k, v, *extra)


def prebuild(out: pathlib.Path, build_dir: pathlib.Path, head_dims=(128, 64)) -> None:
    """Build the patched modules here, on the CPU machine, into out (the module doc says how)."""
    build_marked_with(patched_root(build_dir))
    for spec in build_variant_modules([("fa3", head_window_jit_args(torch.bfloat16, d)) for d in head_dims], out):
        assert getattr(spec, "extra_include_dirs", None), f"{spec.name} was built against the stock headers"


def main():
    import sys

    build_dir = pathlib.Path.home() / ".cache" / "flex_flash_infer" / "head_window"
    if "--prebuild" in sys.argv:
        prebuild(pathlib.Path(sys.argv[sys.argv.index("--prebuild") + 1]), build_dir)
        return
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    build_marked_with(patched_root(build_dir))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
              "date": datetime.date.today().isoformat(), "windows": WINDOWS, "rows": []}
    mask = bench.per_head_window_mask(WINDOWS)
    for S in args.seq_lens:
        for D in args.head_dims:
            gen = torch.Generator(device="cuda").manual_seed(bench.SEED)
            q = torch.randn(S, 32, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(S, 8, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(S, 8, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            rows = torch.sort(torch.randperm(S, device="cuda", generator=gen)[:bench.CHECK_ROWS]).values
            ref = bench.reference_rows(q, k, v, mask, rows)
            table = torch.tensor([WINDOWS[h % len(WINDOWS)] - 1 for h in range(32)], dtype=torch.int32, device="cuda")
            calls, case_rows = {}, []
            makers = {"ours": lambda: _ours(mask, q, k, v),
                      "one_launch_per_head_window": lambda: one_launch(q, k, v, table, max(WINDOWS)),
                      "widest_window_all_heads": lambda: one_launch(q, k, v, None, max(WINDOWS))}
            for name, make in makers.items():
                row = {"seq_len": S, "head_dim": D, "impl": name}
                case_rows.append(row)
                try:
                    calls[name] = make()
                except Exception as e:
                    row["error"] = f"make: {type(e).__name__}: {e}"[:300]
            # the widest window over every head is another mask: checked against its own reference
            refs = {name: ref for name in makers}
            refs["widest_window_all_heads"] = bench.reference_rows(
                q, k, v, get_mask_fn("sliding_window", window_size=max(WINDOWS)), rows)
            time_checked(case_rows, calls, lambda impl, out: bench.rel_error(out[rows], refs[impl]), args.rounds,
                         f"S={S:6d} d={D:4d}")
            result["rows"] += case_rows
            json.dump(result, open(args.out, "w"), indent=1)   # after each case: a later failure keeps these


def _ours(mask, q, k, v):
    S, hq, D = q.shape
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask, seq_len_q=S, seq_len_kv=S, num_qo_heads=hq, num_kv_heads=k.shape[1], head_dim=D,
                 dtype=q.dtype)
    return lambda: flex(q, k, v)


if __name__ == "__main__":
    main()
