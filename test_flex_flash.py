#!/usr/bin/env python
"""The seed's correctness test: flex_flash_infer against PyTorch SDPA given the same custom mask.

    python test_flex_flash.py --q_len 1024 --kv_len 1024 --num_qo_heads 8 --mask_type causal

On a CUDA GPU it checks the FlashInfer path (float16 by default), elsewhere the reference backend
on CPU (float32). It prints PASS or FAIL with the max and relative error and exits 0 on PASS,
1 on FAIL, 2 on a bad argument. It is `python -m flex_flash_infer check` under the seed's name
(flex_flash_infer/tools/cli.py); both take the seed's underscore flags and the dashed ones.
"""
import argparse
import sys

from flex_flash_infer.tools import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="test_flex_flash.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_check_arguments(parser)
    return cli.check_command(parser.parse_args(argv), name="test_flex_flash.py")


if __name__ == "__main__":
    sys.exit(main())
