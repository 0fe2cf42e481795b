"""Tools: the command line, warm-up and drawings. They sit above the library and change none of its
runtime state; the benchmarks are the separate package flex_flash_infer_bench."""
