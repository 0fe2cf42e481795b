"""Copies of the installed FlashInfer's CUDA headers with a few lines changed, for this library's
own kernel modules.

FlashInfer's JIT builds a module from generated sources and its include tree; a module given an
extra include directory first on the path compiles against the headers found there. This makes,
once per FlashInfer version and patch set, a copy of the installed include/flashinfer tree in
FlashInfer's own cache folder with each patch applied (a patch names a file, the exact text it
replaces and how many times that text must occur), and hands back its root. Nothing of FlashInfer
is carried in this repository: the copy is made on the user's machine from the FlashInfer
installed there. A FlashInfer whose headers do not hold a patch's text exactly as often as stated
(another version) gets no copy: None, and the caller keeps FlashInfer's own kernels.

A module built against a copy carries MARKERS[name] in its variant code; lean_modules' generator
adds the copy to that module's include path (only to modules named by this library).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile

HOPPER = "attention/hopper"

# per query head, read from the launch's table ffi_head_window_left (one int32 per query head): the
# five uses of the launch-wide mainloop_params.window_left in FlashInfer 0.7's Hopper kernels, each
# with the query head in scope; and the window's first key tile exact (FlashInfer starts one tile
# early, a tile whose keys are all masked: docs/benchmarks.md). The
# exact start holds for the ragged (TMA) mainloop only: the paged one (sparse_mainloop.cuh) loads
# its last step's values from key tile 0, which the all-masked first tile made harmless; a module
# built against these headers runs its ragged kernel alone (backends/head_windows.py)
_PER_HEAD = "FFI_WINDOW_LEFT(mainloop_params, qo_head_idx)"
_MACRO = ("#define FFI_WINDOW_LEFT(params, head) "
          "(static_cast<int>(__ldg((params).additional_params.ffi_head_window_left + (head))))\n")
# streaming's sinks in the same launch (the launch's ffi_sink_len keys at the start, seen by every
# later query): after the window's first key tile, the producer's loads (mainloop.cuh) and the
# consumer's steps (mainloop_mma.cuh) both go on to the sink tiles, 0 .. ceil(ffi_sink_len /
# CTA_KV) - 1, from the same window start, so their pipelines stay in step; the window's left mask
# spares keys below ffi_sink_len. The paged producer is not patched (its kernel never runs: above)
_NEXT = "((kv_tile_idx) == ffi_sink_from ? ffi_sink_tiles - 1 : (kv_tile_idx) - 1)"
_SINK_SETUP = """{i}const int ffi_sink_len = static_cast<int>(mainloop_params.additional_params.ffi_sink_len);
{i}const int ffi_sink_tiles = (ffi_sink_len + CTA_KV - 1) / CTA_KV;
{i}int ffi_sink_from = -1;   // the window's first key tile, after which the sink tiles come
{i}if constexpr (LEFT_SLIDING_WINDOW) {{
{i}  if (ffi_sink_tiles > 0) {{
{i}    if (swa_begin_kv_tile_idx > ffi_sink_tiles) ffi_sink_from = swa_begin_kv_tile_idx;
{i}    swa_begin_kv_tile_idx = 0;   // the loops run to tile 0, jumping the gap
{i}  }}
{i}}}
"""
_WINDOW_LOOP = "for (; kv_tile_idx > swa_begin_kv_tile_idx; --kv_tile_idx) {"
_SINK_LOOP = f"for (; kv_tile_idx > swa_begin_kv_tile_idx; kv_tile_idx = {_NEXT}) {{"
# 128-row query tiles at head_dim 64 in the kernel and, in step with it, in the host's schedule
# (FlashInfer takes 192): a schedule of 192-row tiles for a kernel of 128 would leave rows of
# requests longer than 128 unwritten
_QUERY_TILES_128_AT_D64 = (
    (f"{HOPPER}/prefill_sm90.cuh", "return std::make_tuple(192, 128);", "return std::make_tuple(128, 128);", 1),
    ("attention/scheduler.cuh", "  if (head_dim_vo == 64) {\n    cta_tile_q = 192;\n  }\n", "", 1),
)
_HEAD_WINDOW_PATCHES = (
    (f"{HOPPER}/utils.cuh", "using namespace cute;\n", "using namespace cute;\n" + _MACRO, 1),
    (f"{HOPPER}/utils.cuh",
     "return std::max((q_tile_idx * CTA_Q + kv_len - qo_len - window_left) / CTA_KV - 1, 0);",
     "return std::max((q_tile_idx * CTA_Q + kv_len - qo_len - window_left) / CTA_KV, 0);", 1),
    (f"{HOPPER}/mainloop.cuh", "mainloop_params.window_left", _PER_HEAD, 1),
    (f"{HOPPER}/sparse_mainloop.cuh", "mainloop_params.window_left", _PER_HEAD, 1),
    (f"{HOPPER}/mainloop_mma.cuh", "mainloop_params.window_left", _PER_HEAD, 1),
    (f"{HOPPER}/prefill_sm90.cuh", "mainloop_params.window_left", _PER_HEAD, 2),
    # a window's tile computes 128 + w keys a row, not 192 + w (docs/benchmarks.md, session 34)
    *_QUERY_TILES_128_AT_D64,
)
# a module of their own: in the windows' module they slowed every plain and per-head window
# (docs/benchmarks.md, session 31)
_SINK_PATCHES = (
    # the sinks: the producer's set-up after its window start, its loop and its next K load
    (f"{HOPPER}/mainloop.cuh", "    }\n\n    int lane_predicate = cute::elect_one_sync();\n    if (lane_predicate) {\n",
     "    }\n" + _SINK_SETUP.format(i="    ")
     + "\n    int lane_predicate = cute::elect_one_sync();\n    if (lane_predicate) {\n", 1),
    (f"{HOPPER}/mainloop.cuh", _WINDOW_LOOP, _SINK_LOOP, 1),
    (f"{HOPPER}/mainloop.cuh", "tKgK(_, kv_tile_idx - 1)", f"tKgK(_, {_NEXT})", 1),
    # the consumer's set-up, its next tile in every loop, and the left mask sparing the sinks
    (f"{HOPPER}/mainloop_mma.cuh", "  tiled_mma_pv.accumulate_ = GMMA::ScaleOut::Zero;\n",
     _SINK_SETUP.format(i="  ") + "  tiled_mma_pv.accumulate_ = GMMA::ScaleOut::Zero;\n", 1),
    (f"{HOPPER}/mainloop_mma.cuh", "    int result = kv_tile_idx - 1;\n", f"    int result = {_NEXT};\n", 1),
    (f"{HOPPER}/mainloop_mma.cuh", _WINDOW_LOOP, _SINK_LOOP, 1),
    (f"{HOPPER}/mainloop_mma.cuh", "(kv_tile_idx - 1) * CTA_KV", f"{_NEXT} * CTA_KV", 1),
    (f"{HOPPER}/mainloop_mma.cuh", "if (kv_idx < col_limit_left(qo_idx)) {",
     "if (kv_idx < col_limit_left(qo_idx) && kv_idx >= ffi_sink_len) {", 3),
)
# block-sparse key tiles on the ragged (TMA) kernel: each request lists the key tiles it sees (a
# launch's ffi_tile_start per request into ffi_tiles, tile ids of the whole key tensor), and the
# producer's loads read those tiles where they read the request's consecutive ones. The request's
# kv_len is the keys it lists (its tiles side by side), so the consumer's masks (causal aligned to
# the bottom right, the last tile's length) apply to the listed keys as they do to a paged
# request's pages. The tiles are 128 x 128 at head_dim 64 and 128 in every mask mode, in the kernel
# and in the host's schedule (FlashInfer takes 192 keys unmasked at 128, 192 queries at 64), the key
# tile being the tile size of this library's block masks.
# The paged producer is not patched (backends/tile_gather.py runs the ragged kernel alone)
_GATHER_MACROS = (
    "#define FFI_TILE(params, request, i) (static_cast<int>(__ldg((params).additional_params.ffi_tiles + "
    "__ldg((params).additional_params.ffi_tile_start + (request)) + (i))))\n"
    "#define FFI_KV_ROWS(params) (static_cast<int>(get<0>((params).layout_K.shape())))\n")
_LOCAL_KEYS = "kv_head_idx, kv_indptr,\n                                      kv_len);  // (K, D, _)"
_TILE_GATHER_PATCHES = (
    (f"{HOPPER}/utils.cuh", "using namespace cute;\n", "using namespace cute;\n" + _GATHER_MACROS, 1),
    *_QUERY_TILES_128_AT_D64,
    (f"{HOPPER}/prefill_sm90.cuh", "return std::make_tuple(128, 192);", "return std::make_tuple(128, 128);", 1),
    # the key and value views span the whole tensor: a request's tiles lie anywhere in it
    (f"{HOPPER}/mainloop.cuh", _LOCAL_KEYS,
     "kv_head_idx, 0,\n                                      FFI_KV_ROWS(mainloop_params));  // (K, D, _)", 2),
    (f"{HOPPER}/mainloop.cuh", "tKgK(_, kv_tile_idx),", "tKgK(_, FFI_TILE(mainloop_params, batch_idx, kv_tile_idx)),", 1),
    (f"{HOPPER}/mainloop.cuh", "tKgK(_, kv_tile_idx - 1),",
     "tKgK(_, FFI_TILE(mainloop_params, batch_idx, kv_tile_idx - 1)),", 1),
    (f"{HOPPER}/mainloop.cuh", "tVgV(_, kv_tile_idx),", "tVgV(_, FFI_TILE(mainloop_params, batch_idx, kv_tile_idx)),", 2),
)
PATCH_SETS = {"head_windows": _HEAD_WINDOW_PATCHES, "window_sinks": _HEAD_WINDOW_PATCHES + _SINK_PATCHES,
              "tile_gather": _TILE_GATHER_PATCHES}
MARKERS = {name: f"// flex_flash_infer: built against FlashInfer's headers patched for {name}" for name in PATCH_SETS}


def patch_hash(name: str) -> str:
    return hashlib.sha256(repr(PATCH_SETS[name]).encode()).hexdigest()[:12]


def apply_patches(tree: pathlib.Path, patches) -> str | None:
    """Apply patches to the include tree in place; the reason they do not fit, or None."""
    for rel, old, new, times in patches:
        path = tree / "flashinfer" / rel
        text = path.read_text() if path.exists() else ""
        if text.count(old) != times:
            return f"{rel} holds {old!r} {text.count(old)} times, not {times}"
        path.write_text(text.replace(old, new))
    return None


def patched_tree(name: str, source: pathlib.Path, cache: pathlib.Path) -> pathlib.Path | None:
    """The include root (holding flashinfer/) of source's copy patched with PATCH_SETS[name], made
    under cache once; None when the patches do not fit source. Several processes may ask at once
    (pytest-xdist, the warm-up's kernel sets): each builds in a folder of its own and the first
    rename wins, so no compile ever reads a half-written tree."""
    root = cache / f"{name}-{patch_hash(name)}"
    if (root / "flashinfer").is_dir():
        return root
    refused = cache / f"{name}-{patch_hash(name)}.refused"
    if refused.exists():
        return None
    cache.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        shutil.copytree(source / "flashinfer", work / "flashinfer")
        reason = apply_patches(work, PATCH_SETS[name])
        if reason is not None:
            refused.write_text(reason + "\n")
            return None
        try:
            os.rename(work, root)
        except OSError:   # another process made it first
            if not (root / "flashinfer").is_dir():
                raise
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)


def include_root(name: str) -> pathlib.Path | None:
    """The patched copy of the installed FlashInfer's headers, in FlashInfer's cache folder; None
    without FlashInfer or when its headers do not take the patches."""
    try:
        import flashinfer
        from flashinfer.jit import env
    except Exception:
        return None
    source = getattr(env, "FLASHINFER_INCLUDE_DIR", None)
    if source is None or not (pathlib.Path(source) / "flashinfer").is_dir():
        return None
    base = os.environ.get("FLASHINFER_WORKSPACE_BASE", os.path.expanduser("~"))
    cache = pathlib.Path(base) / ".cache" / "flashinfer" / "flex_flash_infer_headers" / str(flashinfer.__version__)
    return patched_tree(name, pathlib.Path(source), cache)
