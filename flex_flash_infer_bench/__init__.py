"""The benchmarks (python -m flex_flash_infer bench): above the library, which imports them only to run that command."""
