"""Why the bench's Triton-flex causal time (1.639 ms, H200, 8192 tokens) differs from the 1.388 ms
measured with triton's do_bench for the same shape: the same compiled flex call timed both ways
(the bench's interleaved CUDA-event rounds, do_bench's median), with the library's causal mask_mod
and with a bare lambda, in one process. GPU only; prints a table, writes JSON to argv[1] if given.
"""
import functools
import json
import sys

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer_bench.masks import fa4_missing, time_interleaved
from flex_flash_infer_bench.provenance import source_commit

S, HQ, HKV, D = 8192, 32, 8, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, HQ, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
k = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
v = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
masks = {"library causal": get_mask_fn("causal"), "lambda q >= kv": lambda b, h, qi, kv: qi >= kv}
backends = {"triton": {}}
if not fa4_missing():
    backends["fa4"] = {"BACKEND": "FLASH"}
fns = {}
for mname, mod in masks.items():
    bm = create_block_mask(mod, None, None, S, S, device="cuda")
    for bname, opts in backends.items():
        compiled = torch.compile(functools.partial(flex_attention, kernel_options=opts or None), dynamic=False)
        fns[f"{bname}, {mname}"] = functools.partial(compiled, q, k, v, block_mask=bm, enable_gqa=True)
for fn in fns.values():   # compile first
    fn()
torch.cuda.synchronize()
rows = []
for attempt in range(2):
    interleaved, errors = time_interleaved(fns)
    for name, fn in fns.items():
        rows.append({"impl": name, "attempt": attempt, "interleaved_ms": interleaved.get(name),
                     "do_bench_ms": do_bench(fn, warmup=25, rep=100, return_mode="median"),
                     "error": errors.get(name)})
print(f"{'impl':32s} {'interleaved':>12s} {'do_bench':>10s}")
for r in rows:
    print(f"{r['impl']:32s} {r['interleaved_ms'] or float('nan'):12.3f} {r['do_bench_ms']:10.3f}")
if len(sys.argv) > 1:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_commit(),
               "shape": [1, HQ, HKV, S, D], "rows": rows}, open(sys.argv[1], "w"), indent=1)
