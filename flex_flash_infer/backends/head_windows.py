"""Causal windows whose width depends on the query head, in one launch on Hopper.

A per-head mask whose every head is one causal window over the whole sequence (its own width, or
none) otherwise runs as one FlashInfer launch per set of heads sharing a width: four launches for
the bench's per-head windows, each filling the GPU poorly, and at head_dim 64 bound by their host
work. FlashInfer's Hopper kernel reads its window from one launch-wide number; this runs its own
kernel (its DefaultAttention variant, its fa3 parameters) built against a copy of its headers in
which each query head's window comes from a table the launch passes (compile/patched_headers.py,
"head_windows"), so all heads go in one launch, each skipping the key tiles outside its window.

The same kernel runs a plain causal window over the whole sequence (every head the same width):
its window starts at the first key tile it sees, where FlashInfer's starts one all-masked tile
early; at head_dim 64 its query tiles hold 128 rows, where FlashInfer's hold 192 (a row's tile
computes 128 + w keys, not 192 + w); and a launch whose widest window is under half the keys is
scheduled as balanced (planning/ragged.py, schedules_by_window). Streaming's sinks go in the same
launch (ffi_sink_len), where they were attended and merged by a second kernel. docs/benchmarks.md
has what each measured.
"""
from __future__ import annotations

import hashlib

import torch

from ..compile import lean_modules, patched_headers
from ..compile.native_copy import FLASHINFER_SCALARS, FLASHINFER_TENSORS
from . import own_modules
from ..planning.bands import Band, plain_band_launch
from ..planning.columns import column_prefix_counts
from ..planning.ragged import planned_ragged

TABLE = "ffi_head_window_left"
SINKS = "ffi_sink_len"   # the scalar: how many keys at the start every later query sees (streaming's sinks)
_VARIANT = "DefaultAttention<false>"

# the windows' module, and the same with streaming's sinks (patched_headers: a module of its own)
def _patch_set(sinks: bool) -> str:
    return "window_sinks" if sinks else "head_windows"


def _decl(sinks: bool) -> str:
    return "#include<flashinfer/attention/hopper/variants.cuh>\n" + patched_headers.MARKERS[_patch_set(sinks)] + "\n"


def head_window_table(head_bands, num_qo_heads: int, q_len: int, kv_len: int) -> list[int] | None:
    """Each query head's window_left (kv_len for a head without a window) when every group of the
    per-head plan is one causal band over the whole sequence, else None."""
    table = [None] * num_qo_heads
    for heads, _, bands in head_bands:
        if len(bands) != 1:
            return None
        band = bands[0]
        if not (band.causal and band.q_start == 0 and band.q_end == q_len and band.kv_start == 0
                and band.kv_end == kv_len):
            return None
        for h in heads:
            table[h] = band.window_left if band.window_left >= 0 else kv_len
    return table if all(w is not None for w in table) else None


def uniform_window_table(bands, num_qo_heads: int, q_len: int, kv_len: int) -> list[int] | None:
    """The table of a plain causal window over the whole sequence (one band, every head the same
    width), or None. A window reaching every key (window_left >= kv_len - 1) is causal, which
    FlashInfer's causal kernel runs without the window's bounds. A band whose keys start later
    only by those no query's window reaches (fewer queries than keys) is the same launch."""
    if len(bands) != 1:
        return None
    band = bands[0]
    if not (band.causal and band.q_start == 0 and band.q_end == q_len and band.kv_end == kv_len
            and 0 <= band.window_left < kv_len - 1 and band.kv_start <= max(0, band.delta - band.window_left)):
        return None
    return [band.window_left] * num_qo_heads


def sink_length(bands, columns, q_len: int, kv_len: int) -> int | None:
    """s when a window plan's key columns are streaming's sinks: the first s keys, each seen by
    every query at or after it beyond the window (the columns' per-row counts say exactly that),
    so one launch of the window kernel with ffi_sink_len s computes the mask; else None."""
    if columns is None or uniform_window_table(bands, 1, q_len, kv_len) is None:
        return None
    s = columns.positions.numel()
    if s == 0 or not torch.equal(columns.positions.cpu().long(), torch.arange(s)):
        return None
    counts = columns.counts   # made for the merge kernel; else counted here (None: not a prefix per row),
    if counts is None:        # where the mask's captured tensors are
        counts = column_prefix_counts(columns.mask_mod, q_len, s, columns.positions.device)
    # the columns' mask leaves out what the band covers: row q sees sink c when c < q - window_left
    expected = (torch.arange(q_len) - bands[0].window_left).clamp(0, s)
    return s if counts is not None and torch.equal(counts.cpu().long(), expected) else None


def available(device, dtype, head_dim: int, sinks: bool = False) -> bool:
    """Hopper (the caller checks), 16-bit, a head_dim the fa3 kernels take, and FlashInfer's headers
    here take the patches (the sinks' too, with sinks)."""
    return (dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128, 256)
            and patched_headers.include_root(_patch_set(sinks)) is not None)


# the module's parameters: the window table first, so that it takes run()'s first extra argument
# whichever of FlashInfer's own optional tensors its wrapper fills itself (a wrapper filling one
# more than 0.7's would shift the Nones after it into the scalars: a type error, never a silent swap)
_TENSORS = ([TABLE, *FLASHINFER_TENSORS[0]], ["int32_t", *FLASHINFER_TENSORS[1]])
_SCALARS = FLASHINFER_SCALARS
_SINK_SCALARS = (_SCALARS[0] + [SINKS], _SCALARS[1] + ["int64_t"])


def jit_args(dtype, head_dim: int, sinks: bool = False) -> list:
    """FlashInfer's gen_customize_batch_prefill_module arguments: its fa3 DefaultAttention with
    the parameters FlashInfer gives it, and the window table (and with sinks, the sink count).
    The module's name hashes its code, parameters and patches: a changed one never loads a stale
    build."""
    lean_modules.install()
    decl, scalars = _decl(sinks), _SINK_SCALARS if sinks else _SCALARS
    code = hashlib.sha256(repr((decl, _TENSORS, scalars, patched_headers.patch_hash(_patch_set(sinks)))).encode()
                          ).hexdigest()[:16]
    uri = f"ffi_{'sinkwin' if sinks else 'headwin'}_{code}_{str(dtype).split('.')[-1]}_d{head_dim}"
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim, *_TENSORS, *scalars, _VARIANT, decl, 0, True]


class HeadWindowRunner:
    """One ragged fa3 launch over every batch entry and head; run() gives base-2 (out, lse).
    Only the module's ragged kernel may run: its paged kernels (built with it, never called) load
    their last step's values from key tile 0 (hopper/sparse_mainloop.cuh), harmless where
    FlashInfer's window starts one all-masked tile early, wrong with the exact start."""

    def __init__(self, table: list[int], shape, dtype, scale: float, workspace, sink_len: int = 0):
        """sink_len: the first keys every query at or after them sees besides its window (streaming's
        sinks, sink_length()), in the same launch (the sinks' module)."""
        batch, q_len, kv_len, hq, hkv, head_dim = shape
        widest = max(table)
        launch = plain_band_launch([Band(0, q_len, 0, kv_len, True, widest)], batch, q_len, kv_len, windowed=True)
        assert launch is not None and launch.writes_all(batch, q_len)
        # scheduled as balanced where FlashInfer's plan would price the tiles as causal (the
        # widest window under half the keys), several widths too: they cost differently by head,
        # but the causal price misleads more (scripts/fa3_schedule_sim.py; measured in
        # docs/benchmarks.md, session 34)
        self.wrapper = planned_ragged(workspace, "fa3", launch.qo_indptr, launch.kv_indptr, shape, dtype, True,
                                      widest, jit_args=jit_args(dtype, head_dim, sink_len > 0),
                                      shared_module=True, head_windows=table, sink_len=sink_len)
        self.table = torch.tensor(table, dtype=torch.int32, device=workspace.device)
        self.scale = float(scale)
        self.sinks = (int(sink_len),) if sink_len > 0 else ()   # the sinks' module's last scalar

    def run(self, q, k, v, return_lse: bool = True):
        """q [B*L, Hq, D], k/v [B, S, Hkv, D]."""
        return self.wrapper.run(q, k.flatten(0, 1), v.flatten(0, 1), self.table, None, None, None, None,
                                0.0, self.scale, 1.0, 0, *self.sinks, return_lse=return_lse)

    @property
    def sink_len(self) -> int:
        return self.sinks[0] if self.sinks else 0


def built_runner(table: list[int], shape, dtype, scale: float, workspace, sink_len: int = 0):
    """A HeadWindowRunner, or None when its module does not build on this machine (said once,
    own_modules.builds): the caller runs FlashInfer's own kernels instead."""
    head_dim, sinks = shape[-1], sink_len > 0
    instead = ("streaming's sinks are merged after the window kernel" if sinks
               else "windows run on FlashInfer's own kernels")
    if not own_modules.builds(jit_args(dtype, head_dim, sinks), f"the window kernel ({dtype}, head_dim {head_dim}"
                              f"{', with sinks' if sinks else ''})", instead):
        return None
    return HeadWindowRunner(table, shape, dtype, scale, workspace, sink_len)


def window_runner(bands, columns, shape, dtype, scale: float, workspace):
    """The runner of a plain causal window over the whole sequence (bands, with columns: the key
    columns planned beside them, or None), with streaming's sinks in its launch where the columns
    are those: a HeadWindowRunner, or None when this kernel does not serve (not such a window,
    FlashInfer's headers here do not take the patches, its module does not build)."""
    batch, q_len, kv_len, hq, _, head_dim = shape
    table = uniform_window_table(bands, hq, q_len, kv_len)
    if table is None or not available(workspace.device, dtype, head_dim):
        return None
    sinks = sink_length(bands, columns, q_len, kv_len)
    if sinks is not None and available(workspace.device, dtype, head_dim, sinks=True):
        runner = built_runner(table, shape, dtype, scale, workspace, sinks)
        if runner is not None:
            return runner
    # no sinks, or their module does not build here: the windows' own (the sinks merged after it)
    return built_runner(table, shape, dtype, scale, workspace)
