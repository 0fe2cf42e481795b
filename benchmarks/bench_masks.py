"""Benchmark every mask case against torch FlexAttention, FlashInfer's native call and cuDNN SDPA.

    python benchmarks/bench_masks.py [--seq-lens 8192 32768] [--cases causal attamba ...]

Same as `python -m flex_flash_infer bench`; prints a table and writes benchmarks/results/<device>.json.
"""
import sys

from flex_flash_infer.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
