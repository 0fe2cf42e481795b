"""Issue 22's lead, timed: FlashInfer 0.7.2's Hopper (fa3) kernel starts each query tile's sliding
window one key tile early (hopper/utils.cuh, get_swa_begin_kv_tile_idx subtracts 1; the mainloops
visit that tile, whose keys are all masked): scripts/fa3_window_tiles.py counts 10% of a 1024-token
window's key tiles and 33% of a 128-token one's. This builds the library's compiled score_mod
variant twice, against FlashInfer's headers as installed and against a copy of them made here with
that "- 1" removed (nothing else changed; the copy is FlashInfer's own headers, patched at build
time, never carried in this repository), and times both beside FlashInfer's plain window kernel,
in one process, interleaved, each output checked against float32 first. The score_mod is
score + 0 * (q - kv): the same compiled code on both sides, and not folded into the scale.
Then FlashInfer's own window kernel called directly three ways: its native module, the same kernel
generated and built by this script against the headers as installed ("native_rebuilt"), and
against the patched copy ("native_exact_start"): the last two differ in that one line alone.

    python scripts/ab_window_tile.py OUT.json [--seq-lens 8192 32768] [--windows 128 256 1024]

The patched variant's module compiles on first use (about as long as any compiled score_mod's;
bash scripts/prebuild_kernels.sh does not know it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import pathlib
import shutil

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer import FlexFlashInfer, get_mask_fn
from flex_flash_infer.backends import score_mod_kernels
from flex_flash_infer.compile import lean_modules
from flex_flash_infer_bench.provenance import source_commit

MARKER = "// ffi ab_window_tile: window starts at its first visible key tile"
SWA_BEGIN = "return std::max((q_tile_idx * CTA_Q + kv_len - qo_len - window_left) / CTA_KV - 1, 0);"
SWA_BEGIN_EXACT = "return std::max((q_tile_idx * CTA_Q + kv_len - qo_len - window_left) / CTA_KV, 0);"


def patched_include_root(where: pathlib.Path) -> pathlib.Path:
    """A copy of the installed FlashInfer's include/flashinfer tree with the window's first key tile
    exact (the copy goes first on the include path, so every relative include resolves inside it)."""
    from flashinfer.jit import env

    root = where / "include"
    utils = root / "flashinfer" / "attention" / "hopper" / "utils.cuh"
    if not utils.exists():
        shutil.copytree(env.FLASHINFER_INCLUDE_DIR / "flashinfer", root / "flashinfer", dirs_exist_ok=True)
        text = utils.read_text()
        if text.count(SWA_BEGIN) != 1:
            raise RuntimeError(f"{utils}: FlashInfer's window start is not the line this patches (another version?)")
        utils.write_text(text.replace(SWA_BEGIN, SWA_BEGIN_EXACT))
    return root


GENERATED = {}   # uri -> whether it was built against the patched headers


def build_patched_variants_with(root: pathlib.Path) -> None:
    """Variants whose code carries MARKER build against root's headers."""
    from flashinfer import prefill

    lean_modules.install()
    generate = prefill.gen_customize_batch_prefill_module

    def generate_patched(backend, uri, *args, **kwargs):
        spec = generate(backend, uri, *args, **kwargs)
        marked = any(isinstance(a, str) and MARKER in a for a in args)
        if marked:
            spec = dataclasses.replace(spec, extra_include_dirs=[root] + list(spec.extra_include_dirs or []))
        GENERATED[uri] = marked
        return spec

    prefill.gen_customize_batch_prefill_module = generate_patched


@contextlib.contextmanager
def marked_variants():
    """Variants made inside carry MARKER in their code (a module of their own: its uri hashes the code)."""
    make = score_mod_kernels.fa3_score_mod_variant

    def marked(graph, bound=None):
        spec = make(graph, bound)
        return dataclasses.replace(spec, decl=spec.decl + "\n" + MARKER + "\n")

    score_mod_kernels.fa3_score_mod_variant = marked
    try:
        yield
    finally:
        score_mod_kernels.fa3_score_mod_variant = make


def native_jit_args(dtype, head_dim: int, marked: bool) -> list:
    """FlashInfer's own Hopper window kernel (its DefaultAttention variant and the additional
    parameters FlashInfer's gen_batch_prefill_module gives it for fa3) as a module of this script's:
    built against FlashInfer's headers as installed, or (marked) against the patched copy. The same
    kernel as FlashInfer's native window module, so the pair times the one changed line alone."""
    decl = "#include<flashinfer/attention/hopper/variants.cuh>" + (f"\n{MARKER}\n" if marked else "")
    uri = f"ffi_abwin_native_{'exact' if marked else 'stock'}_{str(dtype).split('.')[-1]}_d{head_dim}"
    lean_modules.install()
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim,
            ["maybe_prefix_len_ptr", "maybe_token_pos_in_items_ptr", "maybe_max_item_len_ptr", "maybe_scale_v"],
            ["uint32_t", "uint16_t", "uint16_t", "float"],
            ["logits_soft_cap", "sm_scale", "scale_v_scalar", "token_pos_in_items_len"],
            ["double", "double", "double", "int64_t"], "DefaultAttention<false>", decl, 0, True]


def native_call(q, k, v, window: int, jit_args=None):
    """One ragged fa3 launch of the causal window over the whole sequence: FlashInfer's native
    module (jit_args None) or the module of jit_args, which takes its scale as an argument."""
    from flex_flash_infer.backends.flashinfer_backend import default_workspace
    from flex_flash_infer.planning.ragged import planned_ragged

    S, hq, D = q.shape
    indptr = torch.tensor([0, S], dtype=torch.int32)
    scale = D ** -0.5
    wrapper = planned_ragged(default_workspace(q.device), "fa3", indptr, indptr, (1, S, S, hq, k.shape[1], D),
                             q.dtype, True, window - 1, sm_scale=None if jit_args else scale, jit_args=jit_args)
    extra = (None, None, None, None, 0.0, scale, 1.0, 0) if jit_args else ()
    return lambda: wrapper.run(q, k, v, *extra)


def zero_bias(score, b, h, q_idx, kv_idx):
    return score + 0.0 * (q_idx - kv_idx)


def prepared(mask_mod, seq_len, head_dim, score_mod=None):
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask_mod, seq_len_q=seq_len, seq_len_kv=seq_len, num_qo_heads=32, num_kv_heads=8,
                 head_dim=head_dim, dtype=torch.bfloat16, score_mod=score_mod)
    return flex


def build_variant_modules(recorded, out: pathlib.Path) -> list:
    """Build the modules of recorded [(backend, jit_args)] here, on the CPU machine, into out (the
    .aot layout of scripts/prebuild_kernels.py; run through its toolchain), each as FlashInfer's
    wrapper would ask for it (its build intercepted, so the spec is the one a GPU machine builds).
    Returns the specs, built or found built."""
    import time

    from flashinfer import prefill
    from flashinfer.jit.core import JitSpec
    from prebuild_kernels import _Stop

    specs = {}
    build_and_load = JitSpec.build_and_load

    def keep(self, *a, **k):
        specs.setdefault(self.name, self)
        raise _Stop

    JitSpec.build_and_load = keep
    try:
        for backend, args in {args[0]: (backend, args) for backend, args in recorded}.values():
            try:
                getattr(prefill.get_customize_batch_prefill_module, "__wrapped__",
                        prefill.get_customize_batch_prefill_module)(backend, *args)
            except _Stop:
                pass
    finally:
        JitSpec.build_and_load = build_and_load
    for spec in specs.values():
        target = out / spec.name / f"{spec.name}.so"
        patched = bool(getattr(spec, "extra_include_dirs", None))
        print(f"{spec.name} ({'patched headers' if patched else 'headers as installed'})", flush=True)
        if target.exists():
            continue
        start = time.time()
        spec.build()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(spec.jit_library_path, target)
        print(f"    built in {time.time() - start:.0f} s, {target.stat().st_size / 1e6:.1f} MB", flush=True)
    return list(specs.values())


def time_checked(case_rows, calls, error_of, rounds: int, label: str) -> None:
    """Check each row's call (error_of(impl, out) against the float32 reference, bench.check), then
    time the ones that pass interleaved, and fill and print the rows."""
    checked = {}
    for row in case_rows:
        call = calls.get(row["impl"])
        if call is not None and bench.check(row, call, lambda out, impl=row["impl"]: error_of(impl, out)):
            checked[row["impl"]] = call
    times, errors = bench.time_interleaved(checked, rounds=rounds)
    for row in case_rows:
        row["ms"] = times.get(row["impl"])
        if row["impl"] in errors:
            row["error"] = errors[row["impl"]]
        print(f"{label} {row['impl']:28s} {row.get('ms') or float('nan'):8.3f} ms  "
              f"rel_err {row.get('rel_err', float('nan')):.2e} {row.get('error', '')}", flush=True)


def prebuild(out: pathlib.Path, build_dir: pathlib.Path, head_dim: int) -> None:
    """Build both variants' modules and FlashInfer's window kernel both ways into out:
    PREBUILD_PY=scripts/ab_window_tile.py bash scripts/prebuild_kernels.sh --prebuild .aot"""
    from prebuild_kernels import _Stop, _planning_on_cpu_as_hopper, _recording_flashinfer

    build_patched_variants_with(patched_include_root(build_dir))
    recorded = []
    with _planning_on_cpu_as_hopper(_recording_flashinfer(recorded)):
        for marked in (False, True):
            with marked_variants() if marked else contextlib.nullcontext():
                try:
                    FlexFlashInfer(device="cpu", backend="flashinfer").prepare(
                        mask_fn=get_mask_fn("sliding_window", window_size=1024), seq_len_q=4096, seq_len_kv=4096,
                        num_qo_heads=32, num_kv_heads=8, head_dim=head_dim, dtype=torch.bfloat16, score_mod=zero_bias)
                except _Stop:
                    pass
    for marked in (False, True):
        recorded.append(("fa3", native_jit_args(torch.bfloat16, head_dim, marked)))
    build_variant_modules(recorded, out)


def main():
    import sys

    if "--prebuild" in sys.argv:
        at = sys.argv.index("--prebuild")
        prebuild(pathlib.Path(sys.argv[at + 1]), pathlib.Path.home() / ".cache" / "flex_flash_infer" / "exact_window",
                 128)
        return
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--windows", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--build-dir", default=str(pathlib.Path.home() / ".cache" / "flex_flash_infer" / "exact_window"))
    args = p.parse_args()
    build_patched_variants_with(patched_include_root(pathlib.Path(args.build_dir)))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
              "date": datetime.date.today().isoformat(), "head_dim": args.head_dim, "rows": []}
    D = args.head_dim
    for S in args.seq_lens:
        gen = torch.Generator(device="cuda").manual_seed(bench.SEED)
        q = torch.randn(S, 32, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(S, 8, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(S, 8, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        rows = torch.sort(torch.randperm(S, device="cuda", generator=gen)[:bench.CHECK_ROWS]).values
        for W in args.windows:
            mask = get_mask_fn("sliding_window", window_size=W)
            ref = bench.reference_rows(q, k, v, mask, rows)
            made, case_rows = {}, []
            for name, score_mod, marked in (("plain", None, False), ("variant", zero_bias, False),
                                            ("variant_exact_start", zero_bias, True)):
                row = {"seq_len": S, "window": W, "impl": name}
                case_rows.append(row)
                try:   # the variant's module is built (or loaded) here
                    with marked_variants() if marked else contextlib.nullcontext():
                        made[name] = prepared(mask, S, D, score_mod)
                except Exception as e:
                    row["error"] = f"prepare: {type(e).__name__}: {e}"[:300]
            # the A/B compares two modules: one of each kind was generated (when both were made)
            if "variant" in made and "variant_exact_start" in made:
                assert sorted(set(GENERATED.values())) == [False, True], GENERATED
            calls = {name: (lambda f=flex: f(q, k, v)) for name, flex in made.items()}
            # FlashInfer's own window kernel, called directly: its module, the same kernel built
            # here, and that kernel against the patched headers
            for name, jit in (("native", None), ("native_rebuilt", native_jit_args(q.dtype, D, False)),
                              ("native_exact_start", native_jit_args(q.dtype, D, True))):
                row = {"seq_len": S, "window": W, "impl": name}
                case_rows.append(row)
                try:
                    calls[name] = native_call(q, k, v, W, jit)
                except Exception as e:
                    row["error"] = f"plan: {type(e).__name__}: {e}"[:300]
            time_checked(case_rows, calls, lambda impl, out: bench.rel_error(out[rows], ref), args.rounds,
                         f"S={S:6d} window={W:5d}")
            result["rows"] += case_rows
            json.dump(result, open(args.out, "w"), indent=1)   # after each case: a later failure keeps these


if __name__ == "__main__":
    main()
