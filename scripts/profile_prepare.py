"""Where prepare() of a 32768-token causal mask spends its host time (cProfile, warm, CUDA):
   python scripts/profile_prepare.py [OUT_FILE]"""
import cProfile
import io
import pstats
import sys

import torch

from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.wrapper import FlexFlashInfer

flex = FlexFlashInfer(device="cuda")
mod = get_mask_fn("causal")


def prepare():
    flex.prepare(mask_fn=mod, seq_len_q=32768, seq_len_kv=32768, num_qo_heads=32, num_kv_heads=8,
                 head_dim=128, dtype=torch.bfloat16)
    torch.cuda.synchronize()


for _ in range(3):
    prepare()
profile = cProfile.Profile()
profile.enable()
for _ in range(10):
    prepare()
profile.disable()
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(45)
report = text.getvalue()
print(report)
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(report)
