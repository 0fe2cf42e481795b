"""Where prepare() of a 32768-token causal mask spends its host time (cProfile, warm, CUDA): the
library's causal (band hint) and a user's own `q >= kv`, each by cumulative and by own time.
   python scripts/profile_prepare.py [OUT_FILE]"""
import cProfile
import io
import pstats
import sys

import torch

from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.wrapper import FlexFlashInfer

flex = FlexFlashInfer(device="cuda", backend="flashinfer")


def users_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def profile(mask_fn, title: str) -> str:
    def prepare():
        flex.prepare(mask_fn=mask_fn, seq_len_q=32768, seq_len_kv=32768, num_qo_heads=32, num_kv_heads=8,
                     head_dim=128, dtype=torch.bfloat16)
        torch.cuda.synchronize()

    for _ in range(3):
        prepare()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        prepare()
    prof.disable()
    text = io.StringIO()
    text.write(f"==== {title}: 10 calls\n")
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
    return text.getvalue()


report = profile(get_mask_fn("causal"), "the library's causal") + profile(users_causal, "a user's q >= kv")
print(report)
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(report)
