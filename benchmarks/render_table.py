"""Print a benchmark results file as the Markdown table used in benchmarks/README.md.

    python benchmarks/render_table.py benchmarks/results/NVIDIA_H100_80GB_HBM3.json
"""
import json
import sys

from flex_flash_infer_bench.masks import markdown_table

if __name__ == "__main__":
    print(markdown_table(json.load(open(sys.argv[1]))))
