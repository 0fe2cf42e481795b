"""A planning change timed against the code before it, in one process: PagedFlexAttention.plan()
for the decode bench's step (64 requests x 8192 keys, page size 16, 32/8 heads, d128, bf16;
causal, sliding_window(1024), soft cap + causal, and streaming(4, 1024), whose sinks take a
bit-mask launch) from this checkout ("after") and from an older
copy of the package ("before", loaded under another name), interleaved. Each side's run() is
first checked against the reference backend in float32. Issue 23 asks for plan() at most 0.3 ms.
Beside them, the floor: FlashInfer's own decode wrapper planned on the same tables (host or
device indptr), its output checked too.
Then "after" once more with the per-request tables on the host (FlashInfer's own advice for its
plan(): only the page ids on the GPU), also back to back as a server's steps run (no wait for the
GPU before each); with every table on the host; with the page ids on the GPU left unchecked
(check_page_ids=False), and a cProfile of "after"'s plan() by own time (the GPU host's share of each
function, which the CPU model cannot show).

    git archive <old commit> flex_flash_infer | tar -x -C /tmp/before
    python scripts/ab_plan.py /tmp/before results.json [--rounds 200]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import json
import pathlib
import statistics
import time

import torch

import flex_flash_infer
from flex_flash_infer_bench.provenance import source_commit
from ab_layout import load_before   # scripts/ is the script's own directory


def step_tables(batch=64, context=8192, page=16, hkv=8, d=128, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages_per = context // page
    num_pages = batch * pages_per
    cache = tuple(torch.randn(num_pages, page, hkv, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    tables = (torch.arange(batch + 1, device="cuda", dtype=torch.int32),                       # qo_indptr
              torch.arange(batch + 1, device="cuda", dtype=torch.int32) * pages_per,           # kv_page_indptr
              torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32),          # kv_page_indices
              torch.full((batch,), page, device="cuda", dtype=torch.int32))                    # kv_last_page_len
    q = torch.randn(batch, 32, d, device="cuda", dtype=dtype, generator=gen)
    return tables, cache, q


def flashinfer_own_plan(plan_args, name, score):
    """(plan, run) of FlashInfer's tensor-core decode wrapper planned on the step's tables as
    PagedFlexAttention's decode launch plans it (backend "fa2", the window and soft cap as its
    flags): what a FlashInfer user's own plan() of the same step costs."""
    import flashinfer
    from flex_flash_infer.backends.flashinfer_backend import default_workspace

    _, qo_indptr, kv_indptr, kv_indices, last, hq, hkv, d, page = plan_args
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(default_workspace(kv_indices.device), "NHD",
                                                           use_tensor_cores=True, backend="fa2")
    kwargs = dict(window_left=1023 if name == "sliding_window" else -1, sm_scale=d ** -0.5,
                  logits_soft_cap=30.0 if score is not None else None, q_data_type=torch.bfloat16,
                  kv_data_type=torch.bfloat16, o_data_type=torch.bfloat16)
    return (lambda: wrapper.plan(kv_indptr, kv_indices, last, hq, hkv, d, page, **kwargs)), wrapper.run


def _back_to_back(plan, runs: int, length: int = 20) -> list[float]:
    """ms per plan() over runs of `length` calls one after another, the GPU waited for once per run."""
    out = []
    for _ in range(max(runs, 1)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(length):
            plan()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) * 1e3 / length)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("before")
    p.add_argument("out")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    before = load_before(pathlib.Path(args.before))
    tables, cache, q = step_tables()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
              "date": datetime.date.today().isoformat(), "rows": []}
    for name in ("causal", "sliding_window", "softcap+causal", "streaming"):
        sides = {}
        for side, package in (("before", before), ("after", flex_flash_infer)):
            get = package.get_mask_fn   # each side's own library: its hints are its own
            mask = {"sliding_window": lambda: get("sliding_window", window_size=1024),
                    "streaming": lambda: get("streaming", sink_size=4, window_size=1024)}.get(name, lambda: get("causal"))()
            score = package.mods.generate_softcap_score_mod(30.0) if name.startswith("softcap") else None
            plan_args = (mask, *tables, 32, 8, 128, 16)
            ours = package.PagedFlexAttention(device="cuda", backend="flashinfer")
            ours.plan(*plan_args, dtype=torch.bfloat16, score_mod=score)
            reference = package.PagedFlexAttention(device="cuda", backend="reference")
            reference.plan(*plan_args, dtype=torch.float32, score_mod=score)
            out = ours.run(q, cache).float()
            ref = reference.run(q.float(), tuple(c.float() for c in cache))
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 2e-2, (name, side, rel)
            sides[side] = (ours, plan_args, score, rel)
        times = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 else ("after", "before")):
                ours, plan_args, score, _ = sides[side]
                torch.cuda.synchronize()
                start = time.perf_counter()
                ours.plan(*plan_args, dtype=torch.bfloat16, score_mod=score)
                torch.cuda.synchronize()
                times[side].append((time.perf_counter() - start) * 1e3)
        # each side's run() of its own plan, interleaved (ms per call, 20 back to back): a plan
        # that hands the kernel more pages must not cost the step more than the plan saves
        for r in range(args.rounds // 10):
            for side in (("before", "after") if r % 2 else ("after", "before")):
                planned = sides[side][0]
                times.setdefault(f"run() {side}", []).extend(_back_to_back(lambda: planned.run(q, cache), 1))
        for side in ("before", "after"):
            sides[f"run() {side}"] = sides[side]
        ours, plan_args, score, _ = sides["after"]
        host_args = (plan_args[0], plan_args[1].cpu(), plan_args[2].cpu(), plan_args[3], plan_args[4].cpu(),
                     *plan_args[5:])
        ours.plan(*host_args, dtype=torch.bfloat16, score_mod=score)
        assert ((ours.run(q, cache).float() - ref).norm() / ref.norm()).item() < 2e-2, (name, "host tables")
        times["after, host tables"] = []
        for r in range(args.rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            ours.plan(*host_args, dtype=torch.bfloat16, score_mod=score)
            torch.cuda.synchronize()
            times["after, host tables"].append((time.perf_counter() - start) * 1e3)
        sides["after, host tables"] = sides["after"]
        # a server's steps do not wait for the GPU before each plan(): the same plans back to back,
        # one wait at the end (each time: the mean of a run of 20)
        times["after, host tables, back to back"] = _back_to_back(
            lambda: ours.plan(*host_args, dtype=torch.bfloat16, score_mod=score), args.rounds // 20)
        sides["after, host tables, back to back"] = sides["after"]
        # the page ids' range is the one read back left: ids on the host are checked there, and
        # check_page_ids=False leaves ids on the GPU unread (no wait for the GPU at all)
        all_host_args = (*host_args[:3], plan_args[3].cpu(), *host_args[4:])
        for label, make, args_ in (("after, all tables on the host", lambda: ours, all_host_args),
                                   ("after, host tables, ids unchecked", lambda: flex_flash_infer.PagedFlexAttention(
                                       device="cuda", backend="flashinfer", check_page_ids=False), host_args)):
            planner = make()
            planner.plan(*args_, dtype=torch.bfloat16, score_mod=score)
            rel = ((planner.run(q, cache).float() - ref).norm() / ref.norm()).item()
            assert rel < 2e-2, (name, label, rel)
            times[label] = []
            for r in range(args.rounds):
                torch.cuda.synchronize()
                start = time.perf_counter()
                planner.plan(*args_, dtype=torch.bfloat16, score_mod=score)
                torch.cuda.synchronize()
                times[label].append((time.perf_counter() - start) * 1e3)
            times[label + ", back to back"] = _back_to_back(
                lambda: planner.plan(*args_, dtype=torch.bfloat16, score_mod=score), args.rounds // 20)
            sides[label] = sides[label + ", back to back"] = (None, None, None, rel)
        # a server's whole step, plan() then run(), back to back: a plan that waits for the GPU
        # cannot overlap the previous step's kernel
        for label, check in (("step (plan + run), host tables", True), ("step (plan + run), ids unchecked", False)):
            planner = flex_flash_infer.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=check)

            def step():
                planner.plan(*host_args, dtype=torch.bfloat16, score_mod=score)
                return planner.run(q, cache)
            rel = ((step().float() - ref).norm() / ref.norm()).item()
            assert rel < 2e-2, (name, label, rel)
            times[label + ", back to back"] = _back_to_back(step, args.rounds // 20)
            sides[label + ", back to back"] = (None, None, None, rel)
        if name != "streaming":   # the floor: FlashInfer's own decode plan of the same step, as ours calls it
            for form, form_args in (("device", plan_args), ("host", host_args)):
                label = f"flashinfer's own plan, {form} tables"
                own, run_own = flashinfer_own_plan(form_args, name, score)
                own()
                rel = ((run_own(q, cache).float() - ref).norm() / ref.norm()).item()
                assert rel < 2e-2, (name, label, rel)
                times[label] = []
                for r in range(args.rounds):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    own()
                    torch.cuda.synchronize()
                    times[label].append((time.perf_counter() - start) * 1e3)
                sides[label] = (None, None, None, rel)
                if form == "host":
                    times[label + ", back to back"] = _back_to_back(own, args.rounds // 20)
                    sides[label + ", back to back"] = sides[label]
        profile = cProfile.Profile()
        torch.cuda.synchronize()
        profile.enable()
        for _ in range(50):
            ours.plan(*plan_args, dtype=torch.bfloat16, score_mod=score)
        torch.cuda.synchronize()
        profile.disable()
        text = io.StringIO()
        # by own time, then by time inside (which of our steps holds the host's share)
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
        result.setdefault("profiles", {})[name] = text.getvalue()
        for side in sides:
            row = {"case": name, "side": side, "plan_ms": statistics.median(times[side]),
                   "plan_ms_p10": sorted(times[side])[len(times[side]) // 10], "rel_err": sides[side][3]}
            result["rows"].append(row)
            print(f"{name:16s} {side:20s} {'run' if side.startswith('run()') else 'plan'} {row['plan_ms']:.3f} ms (p10 {row['plan_ms_p10']:.3f})  "
                  f"rel_err {row['rel_err']:.2e}", flush=True)
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
