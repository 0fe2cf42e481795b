"""Varlen prefill benchmark: 16 documents of random lengths totalling 32768 tokens, causal within
each, packed with cu_seqlens. FlexFlashInfer (one plan per sequence, and the one-ragged-launch
path) against FlashInfer's native BatchPrefillWithRaggedKVCacheWrapper on the same tensors.
bf16, 32 query / 8 KV heads, head_dim 128; each checked against the float32 reference first.
"""
from __future__ import annotations

import datetime
import json

import torch

from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer.wrapper import FlexFlashInfer

from .masks import COMMIT, check_and_time, rel_error


def document_lengths(total=32768, count=16, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(total - 1, generator=gen)[:count - 1] + 1).values.tolist()
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def run_varlen_benchmark(out_path: str | None = None, hq=32, hkv=8, d=128, dtype=torch.bfloat16, total=32768,
                         count=16, device="cuda") -> dict:
    """device is "cuda" but for the CPU tests of this orchestration (the CPU model of the kernels)."""
    import flashinfer

    dev = device
    lengths = document_lengths(total, count)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(cu[-1], hq, d, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(cu[-1], hkv, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(cu[-1], hkv, d, device=dev, dtype=dtype, generator=gen)
    causal = get_mask_fn("causal")

    def prepared(backend="flashinfer"):   # ours never falls back to the reference silently
        return FlexFlashInfer(device=dev, backend=backend).prepare(
            mask_fn=causal, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
            cu_seqlens_q=cu, cu_seqlens_kv=cu)

    # checked on every document's last 256 rows, against the reference backend (float32 inside)
    rows = torch.cat([torch.arange(max(a, b - 256), b) for a, b in zip(cu[:-1], cu[1:])]).to(dev)
    ref = prepared("reference")(q, k, v)[rows].float()
    ours = prepared()
    native = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev),
                                                             "NHD", backend="fa3")
    indptr = torch.tensor(cu, dtype=torch.int32, device=dev)
    native.plan(indptr, indptr, hq, hkv, d, causal=True, q_data_type=dtype, kv_data_type=dtype)
    impls = {"flex_flash_infer": lambda: ours(q, k, v),
             "flashinfer_native": lambda: native.run(q, k, v)}
    result_rows = [{"case": f"varlen_{len(lengths)}_documents_causal", "total_tokens": cu[-1], "documents": len(lengths),
                    "heads_q": hq, "heads_kv": hkv, "head_dim": d, "dtype": str(dtype).replace("torch.", ""),
                    "impl": impl, "commit": COMMIT} for impl in impls]
    check_and_time([(row, impls[row["impl"]]) for row in result_rows], lambda out: rel_error(out[rows].float(), ref))
    native_ms = result_rows[-1].get("ms")
    for r in result_rows:
        ratio = f"{native_ms / r['ms']:.2f}x native" if native_ms and r.get("ms") else ""
        print(f"{r['impl']:28s} {r.get('ms', float('nan')):8.3f} ms  {ratio} {r.get('error', '')}")
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else str(dev), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
              "date": datetime.date.today().isoformat(), "commit": COMMIT, "lengths": lengths, "rows": result_rows}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_path}")
    return result
