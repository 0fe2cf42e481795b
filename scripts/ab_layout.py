"""A code move timed against the code before it, in one process: the bench's mask and score_mod
cases at one length, our call from this checkout ("after") and from an older copy of the package
("before", loaded under another name), interleaved in the same rounds, each output checked
against the float32 reference first: how a change (a code move, an experiment's kernel or schedule)
moves each case.

    git archive <old commit> flex_flash_infer | tar -x -C /tmp/before
    python scripts/ab_layout.py /tmp/before results.json [--seq-len 8192] [--head-dim 128] [--rounds 30]
        [--cases sliding_window streaming ...]   (default: every case)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import statistics
import sys

import torch

import flex_flash_infer_bench.masks as bench
from flex_flash_infer_bench.provenance import source_commit


def load_before(root: pathlib.Path):
    """The package at root/flex_flash_infer, imported as ffi_before (its imports are relative)."""
    init = root / "flex_flash_infer" / "__init__.py"
    spec = importlib.util.spec_from_file_location("ffi_before", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ffi_before"] = module
    spec.loader.exec_module(module)
    return module


def cases(seq_len, package):
    """name -> (mask_mod, score_mod) built by `package`'s own library (its hints are its classes)."""
    saved = bench.get_mask_fn
    bench.get_mask_fn = package.get_mask_fn
    try:
        masks = bench.case_masks(seq_len)
    finally:
        bench.get_mask_fn = saved
    out = {name: (mod, None) for name, (mod, _, _) in masks.items()}
    mods = importlib.import_module(package.__name__ + ".mods")
    table = torch.randn(32, 257, generator=torch.Generator().manual_seed(bench.SEED)) * 0.5
    out["softcap+causal"] = (masks["causal"][0], mods.generate_softcap_score_mod(20.0))
    out["alibi+causal"] = (masks["causal"][0], mods.generate_alibi_score_mod(num_heads=32))
    out["rel_bias+causal"] = (masks["causal"][0], mods.generate_relative_position_bias_score_mod(table))
    out["softcap+random_tiles"] = (masks["random_tiles"][0], mods.generate_softcap_score_mod(20.0))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("out")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cases", nargs="+", default=None, help="only these cases (a change's own, and a control)")
    args = ap.parse_args()
    before = load_before(pathlib.Path(args.before))
    import flex_flash_infer as after
    S, D, Hq, Hkv, dtype = args.seq_len, args.head_dim, 32, 8, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(bench.SEED)
    q = torch.randn(S, Hq, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(S, Hkv, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(S, Hkv, D, device="cuda", dtype=dtype, generator=gen)
    rows_idx = torch.sort(torch.randperm(S, device="cuda", generator=gen)[:bench.CHECK_ROWS]).values
    built = {"before": cases(S, before), "after": cases(S, after)}
    rows = []
    print(f"{'case':22s} {'before ms':>10s} {'after ms':>10s} {'after/before':>12s}  errors (before, after)")
    for name in built["after"]:
        if args.cases and name not in args.cases:
            continue
        fns, errors = {}, {}
        for side, package in (("before", before), ("after", after)):
            mask_mod, score_mod = built[side][name]
            flex = package.FlexFlashInfer(device="cuda", backend="flashinfer")
            flex.prepare(mask_fn=mask_mod, seq_len_q=S, seq_len_kv=S, num_qo_heads=Hq, num_kv_heads=Hkv,
                         head_dim=D, dtype=dtype, score_mod=score_mod)
            out = flex(q, k, v)
            ref = bench.reference_rows(q, k, v, built["after"][name][0], rows_idx, built["after"][name][1])
            errors[side] = bench.rel_error(out[rows_idx], ref)
            assert errors[side] < bench.TOLERANCE and out.isfinite().all(), f"{name} {side}: error {errors[side]}"
            fns[side] = (lambda f: lambda: f(q, k, v))(flex)
        ms, failed = bench.time_interleaved(fns, rounds=args.rounds)
        assert not failed, failed
        ratio = ms["after"] / ms["before"]
        rows.append({"case": name, "seq_len": S, "head_dim": D, "before_ms": ms["before"], "after_ms": ms["after"],
                     "after_over_before": ratio, "rel_err_before": errors["before"], "rel_err_after": errors["after"]})
        print(f"{name:22s} {ms['before']:10.3f} {ms['after']:10.3f} {ratio:12.3f}  "
              f"({errors['before']:.1e}, {errors['after']:.1e})", flush=True)
    import flashinfer
    worst = max(rows, key=lambda r: r["after_over_before"])
    result = {"what": "our call from this checkout (after) and from an older copy (before), interleaved in one process",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
              "date": datetime.date.today().isoformat(), "commit_after": source_commit(),
              "before": str(args.before), "rounds": args.rounds, "rows": rows,
              "geomean_after_over_before": statistics.geometric_mean(r["after_over_before"] for r in rows),
              "worst": {"case": worst["case"], "after_over_before": worst["after_over_before"]}}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"geomean after/before {result['geomean_after_over_before']:.3f}; worst {worst['case']} "
          f"{worst['after_over_before']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
