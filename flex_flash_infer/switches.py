"""The environment switches that change how a plan runs, with the values in effect (shown by
`python -m flex_flash_infer info` and recorded in every benchmark file)."""
from __future__ import annotations


def route_switches() -> list:
    """(environment variable, value in effect) of every switch that changes how a plan runs."""
    from . import (column_merge, far_bias, flashinfer_backend, native_soft_cap, paged, route, score_mod_kernels,
                   tile_kernels, variant, varlen)

    def on(flag):
        return "1" if flag else "0"

    return [("FLEX_FLASH_INFER_COLUMNS", on(route.ENABLE_COLUMN_LOWERING)),
            ("FLEX_FLASH_INFER_COLUMN_MERGE", on(column_merge.ENABLED)),
            ("FLEX_FLASH_INFER_HEAD_BANDS", on(route.ENABLE_HEAD_BANDS)),
            ("FLEX_FLASH_INFER_HEADS_ONE_LAUNCH", on(flashinfer_backend.PER_HEAD_ONE_LAUNCH)),
            ("FLEX_FLASH_INFER_RAGGED_BAND", on(flashinfer_backend.RAGGED_UNWINDOWED_BAND)),
            ("FLEX_FLASH_INFER_TILE_VARIANTS", on(tile_kernels.TILE_VARIANTS)),
            ("FLEX_FLASH_INFER_MASK_IN_KERNEL", on(tile_kernels.MASK_IN_KERNEL)),
            ("FLEX_FLASH_INFER_FA3_MASK", on(tile_kernels.FA3_MASK)),
            ("FLEX_FLASH_INFER_SCORE_MOD_KERNELS", on(score_mod_kernels.ENABLED)),
            ("FLEX_FLASH_INFER_FA2_SCORE_MOD", on(score_mod_kernels.FA2_BANDS)),
            ("FLEX_FLASH_INFER_FAR_BIAS_SPLIT", on(far_bias.ENABLED)),
            ("FLEX_FLASH_INFER_NATIVE_SOFT_CAP", on(native_soft_cap.ENABLED)),
            ("FLEX_FLASH_INFER_TANH_FMA_SHARE", variant.TANH_FMA_SHARE),
            ("FLEX_FLASH_INFER_NEAR_FA2", on(far_bias.NEAR_ON_FA2)),
            ("FLEX_FLASH_INFER_VARLEN_ONE_LAUNCH", on(varlen.ENABLED)),
            ("FLEX_FLASH_INFER_DECODE_FA3", on(paged.DECODE_FA3)),
            ("FLEX_FLASH_INFER_DECODE_TENSOR_CORES", "auto" if paged.DECODE_TENSOR_CORES is None
             else on(paged.DECODE_TENSOR_CORES))]


def source_commit() -> str | None:
    """The git commit of the package's checkout (short hash, '+' when it has uncommitted changes),
    so that benchmark rows name the code that produced them. A copy without .git (the lent GPU
    machine's) reads the file SOURCE_COMMIT at the root instead (git-ignored; write it with
    `git rev-parse --short HEAD > SOURCE_COMMIT` and carry it); None when neither is there."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = root / "SOURCE_COMMIT"
    return stamp.read_text().strip() or None if stamp.is_file() else None
