"""Decode benchmark over a paged KV cache: PagedFlexAttention vs FlashInfer's native
BatchDecodeWithPagedKVCacheWrapper on the same cache, and torch flex_attention's decoding path
(compiled, on the same keys laid out contiguously); and, as a candidate for Hopper, FlashInfer's
fa3 paged prefill kernel with one query per request on the same cache.

Batch 64, contexts of 8192 tokens, 32 query / 8 KV heads, head_dim 128, page size 16, bf16;
causal, sliding_window(1024), and causal with Gemma's logit soft cap as a score_mod (FlashInfer's
wrappers with their own logits_soft_cap). GB/s counts the K and V
bytes the mask makes visible. Each implementation is checked against the float32 reference before
it is timed; one process. The flex_flash_infer row also holds plan_ms: one plan() (a decode step's
host work), warm, median of 5.
"""
from __future__ import annotations

import datetime
import json
import statistics
import time

import torch

from flex_flash_infer.masks.block_build import EMPTY
from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer.mods.softcap import generate_softcap_score_mod
from flex_flash_infer.paged import PagedFlexAttention

from .masks import case_or_report, check_and_time, raising, rel_error
from .profile import host_profile
from .provenance import source_commit


def decode_case(name, mask_mod, window_left, batch=64, context=8192, hq=32, hkv=8, d=128, page=16,
                dtype=torch.bfloat16, with_flex=True, score_mod=None, native_kwargs=None, device="cuda"):
    """native_kwargs: what FlashInfer's own wrappers take for the same score_mod (logits_soft_cap).
    device is "cuda" but for the CPU tests of this orchestration (the CPU model of the kernels)."""
    import flashinfer

    native_kwargs = native_kwargs or {}
    dev = device
    gen = torch.Generator(device=dev).manual_seed(0)
    pages_per = context // page
    num_pages = batch * pages_per
    k_cache = torch.randn(num_pages, page, hkv, d, device=dev, dtype=dtype, generator=gen)
    v_cache = torch.randn(num_pages, page, hkv, d, device=dev, dtype=dtype, generator=gen)
    indices = torch.randperm(num_pages, device=dev, generator=gen).to(torch.int32)
    indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * pages_per
    last = torch.full((batch,), page, device=dev, dtype=torch.int32)
    qo_indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    q = torch.randn(batch, hq, d, device=dev, dtype=dtype, generator=gen)

    plan_args = (mask_mod, qo_indptr, indptr, indices, last, hq, hkv, d, page)
    ours = PagedFlexAttention(device=dev, backend="flashinfer")   # never a silent fallback to the reference
    ours.plan(*plan_args, dtype=dtype, score_mod=score_mod)
    plan_times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ours.plan(*plan_args, dtype=dtype, score_mod=score_mod)
        torch.cuda.synchronize()
        plan_times.append((time.perf_counter() - start) * 1e3)

    def one_plan():
        ours.plan(*plan_args, dtype=dtype, score_mod=score_mod)
        torch.cuda.synchronize()

    plan_profile = host_profile(one_plan)   # where a step's plan() goes (32 ms for windows on an H200)
    reference = PagedFlexAttention(device=dev, backend="reference")
    reference.plan(*plan_args, dtype=dtype, score_mod=score_mod)
    ref = reference.run(q, (k_cache, v_cache)).float()

    native = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev), "NHD")
    native.plan(indptr, indices, last, hq, hkv, d, page, window_left=window_left, q_data_type=dtype,
                kv_data_type=dtype, **native_kwargs)
    impls = {"flashinfer_native": lambda: native.run(q, (k_cache, v_cache)),
             "flex_flash_infer": lambda: ours.run(q, (k_cache, v_cache))}
    from flex_flash_infer.paged import use_tensor_core_decode

    # the other decode kernel than the one chosen for this GQA group, timed beside
    other = not use_tensor_core_decode(hq, hkv)
    ours_other = PagedFlexAttention(device=dev, backend="flashinfer", use_tensor_cores=other)
    other_impl = "ours_tensor_cores" if other else "ours_cuda_cores"
    try:  # a failure to plan becomes its row's error
        ours_other.plan(*plan_args, dtype=dtype, score_mod=score_mod)
        impls[other_impl] = lambda: ours_other.run(q, (k_cache, v_cache))
    except Exception as e:
        impls[other_impl] = raising(e)
    try:  # a candidate kernel (not run yet): Hopper's fa3 paged prefill, one query per request
        fa3 = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev),
                                                             "NHD", backend="fa3")
        fa3.plan(qo_indptr, indptr, indices, last, hq, hkv, d, page, causal=False, window_left=window_left,
                 q_data_type=dtype, kv_data_type=dtype, **native_kwargs)
        impls["flashinfer_fa3_prefill_kernel"] = lambda: fa3.run(q, (k_cache, v_cache))
    except Exception as e:
        impls["flashinfer_fa3_prefill_kernel"] = raising(e)
    full, partial, full_args = ours._planned["launches"][:3]
    if partial is None:  # the planned FlashInfer wrapper alone: our run()'s own cost is the difference
        impls["ours_kernel_only"] = lambda: full.run(q, (k_cache, v_cache), *full_args)
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        offset = context - 1  # the one query is the newest token

        def shifted(b, h, q_idx, kv_idx):
            return mask_mod(b, h, q_idx + offset, kv_idx)

        def shifted_score(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx + offset, kv_idx)

        # contiguous [B, Hkv, S, D] copies of the same cache (flex has no paged input)
        order = indices.long().view(batch, pages_per)
        kf = k_cache[order].reshape(batch, context, hkv, d).transpose(1, 2).contiguous()
        vf = v_cache[order].reshape(batch, context, hkv, d).transpose(1, 2).contiguous()
        bm = create_block_mask(shifted, None, None, 1, context, device=dev)
        compiled = torch.compile(flex_attention, dynamic=False)   # static, as in masks.py
        qf = q.unsqueeze(2)
        flex_score = None if score_mod is None else shifted_score
        impls["torch_flex"] = lambda: compiled(qf, kf, vf, score_mod=flex_score, block_mask=bm,
                                               enable_gqa=True).squeeze(2)
    # which kernel FlashInfer's backend="auto" picked for each wrapper (cuDNN or its own)
    picked = {"flashinfer_native": getattr(native, "resolved_backend", None),
              "flex_flash_infer": getattr(full, "resolved_backend", None)}
    picked["ours_kernel_only"] = picked["flex_flash_infer"]
    if ours_other._planned is not None:
        picked[other_impl] = getattr(ours_other._planned["launches"][0], "resolved_backend", None)
    visible = int((ours._planned["plan"].page_states != EMPTY).sum()) * page  # whole visible pages
    rows = [{"case": f"decode_{name}", "batch": batch, "context": context, "heads_q": hq, "heads_kv": hkv,
             "head_dim": d, "page_size": page, "dtype": str(dtype).replace("torch.", ""), "impl": impl}
            for impl in impls]
    check_and_time([(row, impls[row["impl"]]) for row in rows], lambda out: rel_error(out.float(), ref))
    for row in rows:
        impl = row["impl"]
        if picked.get(impl):
            row["flashinfer_backend"] = picked[impl]
        if impl == "flex_flash_infer":
            row["plan_ms"] = statistics.median(plan_times)
            row["plan_profile"] = plan_profile
        if "ms" in row:
            row["kv_gb_per_s"] = visible * hkv * d * 2 * k_cache.element_size() / (row["ms"] * 1e-3) / 1e9
    return rows


def run_decode_benchmark(out_path: str | None = None, with_flex: bool = True) -> dict:
    import flashinfer

    rows, failed = [], []
    for name, mod, window_left, extra in (
            ("causal", get_mask_fn("causal"), -1, {}),
            ("sliding_window", get_mask_fn("sliding_window", window_size=1024), 1023, {}),
            ("softcap+causal", get_mask_fn("causal"), -1,
             {"score_mod": generate_softcap_score_mod(30.0), "native_kwargs": {"logits_soft_cap": 30.0}})):
        rows += case_or_report(failed, f"decode {name}", decode_case, name, mod, window_left, with_flex=with_flex,
                                **extra)
    print(f"{'case':24s} {'impl':18s} {'ms':>8s} {'KV GB/s':>8s} {'vs native':>9s}")
    for what in failed:
        print(f"FAILED case: {what}")
    for r in rows:
        nat = next(x for x in rows if x["case"] == r["case"] and x["impl"] == "flashinfer_native").get("ms")
        ratio = f"{nat / r['ms']:9.2f}" if nat and r.get("ms") else f"{'-':>9s}"
        ms = f"{r['ms']:8.3f}" if "ms" in r else f"{'-':>8s}"
        gbs = f"{r['kv_gb_per_s']:8.0f}" if "kv_gb_per_s" in r else f"{'-':>8s}"
        plan = f" plan {r['plan_ms']:.2f} ms" if "plan_ms" in r else ""
        print(f"{r['case']:24s} {r['impl']:18s} {ms} {gbs} {ratio} {r.get('flashinfer_backend', ''):6s} "
              f"{r.get('error', '')}{plan}")
        for where, cum_ms, own_ms, calls in r.get("plan_profile", [])[1:7]:   # [0] is the plan call itself
            print(f"    plan: {cum_ms:7.2f} ms ({own_ms:.2f} its own) in {calls} call(s) of {where}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
              "date": datetime.date.today().isoformat(), "commit": source_commit(), "rows": rows}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_path}")
    return result
