"""The FlashInfer backend: plan once per (block mask, shape, dtype), then run only launches.

Routes, tried in order:
  * bands: the mask is exactly a few native FlashInfer requests (bands.py), run as FlashInfer's
    own single or ragged prefill; attamba and streaming add key columns (columns.py), attended
    and merged into the band's result by one Triton kernel (column_merge.py);
  * tiles: whole tiles on the unmasked fa3 (Hopper) paged-prefill kernel (with key tiles of 128,
    its ragged kernel gathering each request's tiles: tile_gather.py), partial tiles on its fa2
    kernel with a bit mask covering only those tiles, merged by log-sum-exp
    (flashinfer.merge_state); see planner.py for the request layout. Per-head masks run every
    head in one launch set (planner.plan_tiles_head_major).
"""
from __future__ import annotations

import contextlib

import math
import os

import torch

from . import column_merge, head_windows, tile_gather
from ..core import nan_merge
from ..planning.bands import plain_band_launch
from ..planning.score_folding import kernel_scale_ok
from ..masks.block_build import ceil_div
from .column_merge import merge_columns
from ..planning.far_bias import FarSplitBands
from ..planning.plan import plan_attention
from ..planning.planner import partial_tile_mask
from ..planning.ragged import planned_ragged
from .score_mod_kernels import ScoreModBands
from .tile_kernels import TileVariants, request_tables

LN2 = math.log(2.0)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 256 << 20
_workspaces: dict = {}


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int,
                       scale: float | None = None) -> str | None:
    """Why the FlashInfer path cannot run this problem, or None when it can (scale None: the default)."""
    if device.type != "cuda":
        return f"the FlashInfer backend needs CUDA tensors, got device {device}"
    if not flashinfer_available():
        return "flashinfer is not installed (pip install 'flex-flash-infer[cuda]')"
    if dtype not in SUPPORTED_DTYPES:
        return f"the FlashInfer backend supports dtype float16 or bfloat16, got {dtype}"
    if head_dim not in SUPPORTED_HEAD_DIMS or head_dim_v != head_dim:
        return f"the FlashInfer backend supports head_dim in {SUPPORTED_HEAD_DIMS} (same for values), got {head_dim}/{head_dim_v}"
    return scale_reason(scale)


def scale_reason(scale: float | None) -> str | None:
    """Why FlashInfer's kernels cannot take this scale, or None. They return NaN for every row at
    sm_scale 0 (seen on an H200 by the GPU fuzzer), where FlexAttention averages the visible
    values; a negative scale runs with the query negated (FlashInferPlan)."""
    if scale is not None and not kernel_scale_ok(scale):
        return (f"FlashInfer's kernels need a finite, nonzero scale that float32 holds as a normal number "
                f"(1.2e-38 to 3.4e38 in size), got scale={scale}")
    return None


def default_workspace(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _workspaces:
        _workspaces[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[key]


def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


class _HeadGroup:
    """The launches of one head group: all heads at once, or one query head of a per-head mask.
    With variants (tile_kernels.TileVariants) the launches run compiled mods: key_positions
    gives the first key position of each page of a batch entry. gather: the whole tiles' launch
    made already (a soft-capped tile_gather launch), else made here where it serves."""

    def __init__(self, tile_plan, mask_mod, head, shape, dtype, scale, workspace, block_size,
                 variants=None, key_positions=None, gather=None):
        import flashinfer

        batch, q_len, kv_len, hq, hkv, head_dim = shape
        block_q, block_kv = block_size
        if gather is not None and gather.soft_cap and tile_plan.partial is not None:   # the partial launch would go without it
            raise RuntimeError("flex_flash_infer: a soft cap on the tile-gather launch with partial tiles beside it")
        common = dict(num_qo_heads=hq, num_kv_heads=hkv, head_dim_qk=head_dim, page_size=block_kv,
                      causal=False, sm_scale=scale, q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype,
                      disable_split_kv=True)   # its merge would drop a NaN LSE (nan_merge.py)
        self.full = self.partial = None
        self.full_args = self.partial_args = ()
        self.variants = variants
        self.causal = tile_plan.causal
        if variants is not None and key_positions is None:
            key_positions = torch.arange(tile_plan.num_kv_tiles) * block_kv

        def tables(launch, extra):
            return (*request_tables(tile_plan, launch, key_positions, head, q_len, block_q), *extra)

        if tile_plan.full is not None:
            backend = "fa3" if _is_hopper(workspace.device) else "fa2"
            launch = tile_plan.full
            # whole tiles of 128 keys on the TMA kernel, each request gathering its tiles (tile_gather.py)
            if gather is None and backend == "fa3" and variants is None:
                gather = tile_gather.built_launch(tile_plan, launch, block_kv, shape, dtype, scale, workspace)
            if gather is not None:
                self.full = gather
            elif variants is not None and variants.full_jit_args is not None:
                self.full = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    workspace, "NHD", backend=variants.full_backend, jit_args=variants.full_jit_args)
                self.full_args = tables(launch, variants.full_args)
            else:
                self.full = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
            if gather is None:
                self.full.plan(tile_plan.qo_indptr, launch.kv_indptr, launch.kv_indices, launch.last_page_len,
                               **{**common, "causal": tile_plan.causal})
        if tile_plan.partial is not None:
            launch = tile_plan.partial
            owns_mask = variants is not None and variants.owns_mask
            if variants is None:
                self.partial = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
            else:
                self.partial = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    workspace, "NHD", backend="fa2", jit_args=variants.partial_jit_args, variant_owns_mask=owns_mask)
                self.partial_args = tables(launch, variants.partial_args)
            # with variant_owns_mask the kernel evaluates mask_mod itself: no bit mask to build
            bits = None if owns_mask else partial_tile_mask(tile_plan, mask_mod, 0 if head is None else head, q_len,
                                                            kv_len, block_q, block_kv)
            self.partial.plan(tile_plan.qo_indptr, launch.kv_indptr, launch.kv_indices, launch.last_page_len,
                              custom_mask=bits, **common)
        self.merge = flashinfer.merge_state

    def run(self, q, kv_pages):
        """Base-2 (out, lse) of this group; zeros and -inf when it has no tile to launch (a mask,
        or one head's, under which no query sees a key)."""
        if self.full is None and self.partial is None:
            return torch.zeros(q.shape, dtype=q.dtype, device=q.device), torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        if self.variants is not None:
            self.variants.refresh()   # tables the score_mod reads, as they are now
        if self.full is not None and self.partial is not None:
            o_full, lse_full = self.full.run(q, kv_pages, *self.full_args, return_lse=True)
            o_part, lse_part = self.partial.run(q, kv_pages, *self.partial_args, return_lse=True)
            return merge_rows(self.merge, o_full, lse_full, o_part, lse_part)
        if self.full is not None:
            return self.full.run(q, kv_pages, *self.full_args, return_lse=True)
        return self.partial.run(q, kv_pages, *self.partial_args, return_lse=True)


MERGE_HEADS = 8


def merge_rows(merge, out_a, lse_a, out_b, lse_b):
    """merge_state of two [N, H, D] results, with rows of one head regrouped MERGE_HEADS to a row:
    the merge is per (token, head) pair, and the head-major tiles route's [Hq * L, 1, D] ran about
    three times slower in FlashInfer's merge than [L, 32, D] of the same bytes (the regrouped call
    not timed yet). A NaN LSE stays NaN (nan_merge)."""
    n, h, d = out_a.shape
    if h >= MERGE_HEADS or (n * h) % MERGE_HEADS:
        return nan_merge.merge_state(merge, out_a, lse_a, out_b, lse_b)
    out, lse = nan_merge.merge_state(merge, out_a.reshape(-1, MERGE_HEADS, d), lse_a.reshape(-1, MERGE_HEADS),
                                     out_b.reshape(-1, MERGE_HEADS, d), lse_b.reshape(-1, MERGE_HEADS))
    return out.view(n, h, d), lse.view(n, h)


_announced = False


def announce_first_use() -> None:
    """One line, once per process: why the first FlashInfer call can take minutes."""
    global _announced
    if not _announced:
        _announced = True
        import sys

        cache = os.path.join(os.environ.get("FLASHINFER_WORKSPACE_BASE", os.path.expanduser("~")), ".cache", "flashinfer")
        print(f"flex_flash_infer: FlashInfer compiles each kernel it has not built on this machine "
              f"(1-2 minutes each, once; cached in {cache}); 'python -m flex_flash_infer warmup' does it ahead.",
              file=sys.stderr)


def planned_for(block_mask, batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, device, score_mod=None,
                route=None, scale=None):
    """The plan (plan.AttentionPlan) a FlashInferPlan of these arguments runs, without its runners
    (no FlashInfer wrapper made or planned): for a caller that may run something else instead."""
    device = torch.device(device)
    return plan_attention(block_mask, batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, device, score_mod,
                          column_merge.kernel_available(device, head_dim), route, scale)


class FlashInferPlan:
    """A planned attention problem (plan.AttentionPlan, as .plan) with its FlashInfer runners.
    run(q, k, v) with q [B*Q_LEN, Hq, D] and k, v [B, KV_LEN, Hkv, D] returns out [B*Q_LEN, Hq, D]
    and natural-log lse [B*Q_LEN, Hq]."""

    def __init__(self, block_mask, batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim,
                 dtype, scale, device, workspace=None, score_mod=None, route=None, planned=None):
        """planned: the plan_attention() of these arguments, made already (planned_for)."""
        announce_first_use()
        device = torch.device(device)
        workspace = default_workspace(device) if workspace is None else workspace
        plan = self.plan = planned if planned is not None else planned_for(
            block_mask, batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim, device, score_mod, route, scale)
        # a score_mod that is c * score runs as FlashInfer's own scale: no compiled variant
        if plan.score_factor is not None:
            score_mod, scale = None, scale * plan.score_factor
        # FlashInfer's kernels give NaN for a negative sm_scale (seen on an H200 by the GPU fuzzer):
        # scale * q.k = |scale| * (-q).k exactly, so the query is negated at run time instead
        self.negate_query, scale = scale < 0, abs(scale)
        block_q, block_kv = plan.block_size
        self.block_kv = block_kv
        self.scale = scale
        self.num_kv_tiles = ceil_div(kv_len, block_kv)
        self.shape = plan.shape
        self.group_size = num_qo_heads // num_kv_heads
        self.head_major = plan.head_major
        self.bands = list(plan.bands)
        self.groups = []
        self.head_band_runs = None   # bands-per-head: [(query heads, key heads, writes in place, _BandRunner)]
        self.head_windows = None     # bands-per-head, every head one causal window: HeadWindowRunner
        self._lse_slots = None       # bands-per-head, interleaved groups: each group's slot (interleaved_lse_slots)
        self._capture_streams = None   # bands-per-head under CUDA graph capture: the groups' streams
        self._streams_serve = False    # bands-per-head: whether its groups may run on side streams
        self.columns = self.column_counts = self.positions = None
        hopper = _is_hopper(device)

        def variants(page_size):
            """The compiled score_mod of a tile group, or None when plain launches serve (partial
            tiles read a bit mask built at plan time)."""
            if score_mod is None:
                return None
            return TileVariants(score_mod, None, self.shape, dtype, scale, page_size, device, hopper)

        # a causal window over the whole sequence on Hopper: the window kernel that starts at its
        # first visible key tile, balanced, with streaming's sinks in its launch (head_windows.py)
        window_runner = None
        if plan.band_kernel == "plain" and hopper:
            window_runner = head_windows.window_runner(self.bands, plan.columns, self.shape, dtype, scale, workspace)
        self.sinks_in_launch = window_runner is not None and window_runner.sink_len > 0
        if plan.columns is not None and not self.sinks_in_launch:
            self.positions = plan.columns.positions
            self.column_counts = plan.columns.counts   # one Triton kernel (column_merge)
            if plan.columns.tiles is not None:   # FlashInfer's launch over pages of one key, then merge_state
                col_shape = (batch, q_len, self.positions.numel(), num_qo_heads, num_kv_heads, head_dim)
                # the compact mask leaves out what the bands cover: its bits serve, not the mask_mod
                self.columns = _HeadGroup(plan.columns.tiles, plan.columns.mask_mod, None, col_shape, dtype, scale,
                                          workspace, (block_q, 1), variants(1), self.positions)
        if window_runner is not None:
            self.band_runner = window_runner
        elif plan.band_kernel in ("plain", "soft-cap"):
            self.band_runner = _BandRunner(self.bands, self.shape, dtype, scale, workspace, logits_soft_cap=plan.soft_cap)
        elif plan.band_kernel == "score-mod":
            self.band_runner = ScoreModBands(self.bands, score_mod, self.shape, dtype, scale, workspace, hopper)
        elif plan.band_kernel == "far-split":   # keys beyond the score_mod's reach on the plain kernel (far_bias.py)
            near, far, hint = plan.far_split
            # the near keys on the fa2 variant even on Hopper: a band two tiles wide per query
            # tile leaves fa3's one large work tile per SM waiting on its loads, where fa2's
            # smaller tiles keep several per SM (measured faster in all: docs/benchmarks.md)
            near_runner = ScoreModBands(near, score_mod, self.shape, dtype, scale, workspace, False)
            self.band_runner = FarSplitBands(near_runner, far, hint, self.shape, dtype, scale, workspace, hopper)
        elif plan.head_bands and (table := head_windows.head_window_table(plan.head_bands, num_qo_heads, q_len, kv_len)
                                  ) is not None and hopper and head_windows.available(device, dtype, head_dim) and (
                runner := head_windows.built_runner(table, self.shape, dtype, scale, workspace)) is not None:
            # every head one causal window of its own width: one launch of the patched kernel
            self.head_windows = runner
        elif plan.head_bands:
            self.head_band_runs = []
            for heads, kv_heads, bands in plan.head_bands:
                group_shape = (batch, q_len, kv_len, len(heads), len(kv_heads), head_dim)
                selected = head_selector(list(heads), device)
                # evenly spaced heads are a strided view of the output, which fa3 writes in place
                # by its strides (fa2 writes contiguous outputs): one planned ragged launch per
                # group and no copy, where a windowed group's single call returned a new output
                # to copy in (four groups of per-head windows: 4 x 16 MB at 8192 tokens)
                runner = _BandRunner(list(bands), group_shape, dtype, scale, workspace,
                                     ragged_window=hopper and isinstance(selected, slice))
                in_place = hopper and isinstance(selected, slice) and runner.ragged is not None
                self.head_band_runs.append((selected, head_selector(list(kv_heads), device), in_place, runner))
            self._lse_slots = interleaved_lse_slots(self.head_band_runs, num_qo_heads)
            # side streams under capture only where every set is one in-place launch (the case
            # measured; a set writing a new output would allocate on its side stream)
            self._streams_serve = len(self.head_band_runs) > 1 and all(
                in_place for _, _, in_place, _ in self.head_band_runs)
        elif plan.tiles is not None:
            group_shape = (batch, q_len, kv_len, 1, 1, head_dim) if plan.head_major else self.shape
            # a soft cap over whole tiles alone: the tile-gather kernel's own soft cap, where it runs
            # (else the compiled score_mod, as every other score_mod on tiles)
            gather = (tile_gather.built_launch(plan.tiles, plan.tiles.full, block_kv, group_shape, dtype, scale,
                                               workspace, plan.soft_cap)
                      if hopper and plan.soft_cap is not None and plan.tiles.full is not None else None)
            self.groups.append(_HeadGroup(plan.tiles, block_mask.mask_mod, None, group_shape, dtype, scale, workspace,
                                          plan.block_size, None if gather is not None else variants(block_kv),
                                          gather=gather))

    def _pages(self, x: torch.Tensor) -> torch.Tensor:
        """[B, KV_LEN, H, D] -> pages [B * nKV, block_kv, H, D] (zero-padded tail tile)."""
        batch, kv_len, heads, dim = x.shape
        padded = self.num_kv_tiles * self.block_kv
        if padded != kv_len:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - kv_len))
        return x.reshape(batch * self.num_kv_tiles, self.block_kv, heads, dim)

    @property
    def has_columns(self) -> bool:
        """bands+columns: key columns beside the bands (the merge kernel's, or the paged launch's)."""
        return self.columns is not None or self.column_counts is not None

    @property
    def route(self) -> str:
        return self.plan.route

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = True):
        """(out, natural-log lse); lse is None when return_lse is False."""
        if self.negate_query:
            q = -q
        if self.bands and not self.has_columns and not return_lse:
            return self.band_runner.run(q, k, v, return_lse=False), None
        if self.bands:
            out, lse = self.band_runner.run(q, k, v)
            if self.column_counts is not None:   # in place, one kernel
                merge_columns(out, lse, q, k, v, self.positions, self.column_counts, self.scale, self.shape[1])
            elif self.columns is not None:
                # gathered keys as pages of one key: [B * M, 1, Hkv, D]
                kc = k[:, self.positions].reshape(-1, 1, *k.shape[2:])
                vc = v[:, self.positions].reshape(-1, 1, *v.shape[2:])
                o_col, lse_col = self.columns.run(q, (kc, vc))
                out, lse = nan_merge.merge_state(self.columns.merge, out, lse, o_col, lse_col)
            # the merge needed the LSE; natural-log only when asked for (else a launch for nothing)
            return out, lse * LN2 if return_lse else None
        if self.head_windows is not None:
            if not return_lse:
                return self.head_windows.run(q, k, v, return_lse=False), None
            out, lse = self.head_windows.run(q, k, v)
            return out, lse * LN2
        if self.head_band_runs is not None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            # without an LSE asked for, none is written or scaled: per group a copy launch less
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
            # interleaved groups write their LSE in place, into slots of one buffer that a single
            # multiply by LN2 lays out (where per group a copy into lse[:, heads] and a multiply were)
            slots = self._lse_slots if return_lse else None
            if slots is not None:
                lse_parts = torch.empty((len(slots), q.shape[0], q.shape[1] // len(slots)), dtype=torch.float32,
                                        device=q.device)
            # every group's inputs first, on the caller's stream and before any fork: a gather of
            # unevenly spaced key heads (or k flattened from a strided view) is a kernel that a
            # side stream must see finished, and the list keeps them alive until the join. Keys
            # and values are flattened once for every group whose launch reads all rows: per group
            # then only its heads' views of q and of the output (host work per call)
            k_rows = v_rows = None
            calls = []   # (heads, writes in place, run, inputs) per group
            for heads, kv_heads, in_place, runner in self.head_band_runs:
                # evenly spaced heads are strided views (FlashInfer reads q, k, v by their strides):
                # profiled on an H200, gathering them cost three times the group's launches
                if runner.reads_all_rows:
                    if k_rows is None:
                        k_rows, v_rows = k.flatten(0, 1), v.flatten(0, 1)
                    calls.append((heads, in_place, runner.run_rows, (
                        take_heads(q, 1, heads), take_heads(k_rows, 1, kv_heads), take_heads(v_rows, 1, kv_heads))))
                else:
                    calls.append((heads, in_place, runner.run, (
                        take_heads(q, 1, heads), take_heads(k, 2, kv_heads), take_heads(v, 2, kv_heads))))
            streams = self._streams_if_capturing(q)
            if streams:
                main = torch.cuda.current_stream(q.device)
                for s in streams:
                    if s is not None:   # None: that group on the caller's stream
                        s.wait_stream(main)
            for n, (heads, in_place, run, inputs) in enumerate(calls):
                with torch.cuda.stream(streams[n]) if streams else _NO_STREAM:
                    if slots is not None:
                        run(*inputs, out=out[:, heads], lse=lse_parts[slots[n]], return_lse=True)
                    elif in_place:
                        result = run(*inputs, out=out[:, heads], return_lse=return_lse)
                        if return_lse:
                            lse[:, heads] = result[1]
                    elif return_lse:
                        out[:, heads], lse[:, heads] = run(*inputs)
                    else:
                        out[:, heads] = run(*inputs, return_lse=False)
            if streams:
                for s in streams:
                    if s is not None:
                        main.wait_stream(s)
            if slots is not None:   # lse[:, i * G + g] = LN2 * lse_parts[g, :, i]
                torch.mul(lse_parts.permute(1, 2, 0), LN2, out=lse.view(q.shape[0], -1, len(slots)))
                return out, lse
            return out, lse * LN2 if return_lse else None
        if self.head_major:
            return self._run_head_major(q, k, v, return_lse)
        out, lse = self.groups[0].run(q, (self._pages(k), self._pages(v)))
        return out, lse * LN2 if return_lse else None


    def _streams_if_capturing(self, q):
        """bands-per-head: the streams its groups run on while a CUDA graph is captured (group 0 on
        the caller's, None; the others on side streams), or None: then they run in turn. Replayed,
        the groups overlap; called, the forks and joins cost the host what the overlap gains
        (docs/benchmarks.md)."""
        # (the current device's capture: on another device than q's, the groups run in turn)
        if not self._streams_serve or not q.is_cuda or not torch.cuda.is_current_stream_capturing():
            return None
        if self._capture_streams is None:
            # from torch's stream pool, which the capture's own side stream has set up already
            self._capture_streams = [None] + [torch.cuda.Stream(q.device) for _ in self.head_band_runs[1:]]
        return self._capture_streams

    def _run_head_major(self, q, k, v, return_lse: bool = True):
        """All heads in one launch set: queries [Hq * B * L, 1, D], pages [Hkv * B * nKV, block_kv, 1, D]."""
        batch, q_len, kv_len, hq, hkv, d = self.shape
        q_hm = q.transpose(0, 1).reshape(hq * batch * q_len, 1, d)

        def pages(x):   # [B * nKV, block_kv, Hkv, D] -> key-head-major [Hkv * B * nKV, block_kv, 1, D]
            return self._pages(x).permute(2, 0, 1, 3).reshape(-1, self.block_kv, 1, d)

        out, lse = self.groups[0].run(q_hm, (pages(k), pages(v)))
        out = out.view(hq, batch * q_len, d).transpose(0, 1).contiguous()
        return out, lse.view(hq, batch * q_len).t().contiguous() * LN2 if return_lse else None


def interleaved_lse_slots(runs, num_heads: int):
    """For G head groups that interleave (each heads g, g + G, g + 2G, ... of every head, for g in
    0..G-1, on one in-place ragged launch over every row), each group's g; else None."""
    count = len(runs)
    if not runs or num_heads % count:
        return None
    slots = []
    for heads, _, in_place, runner in runs:
        if not (in_place and isinstance(heads, slice) and runner.reads_all_rows):
            return None
        taken = range(num_heads)[heads]
        if not taken or taken[0] >= count or list(taken) != list(range(taken[0], num_heads, count)):
            return None
        slots.append(taken[0])
    return slots if sorted(slots) == list(range(count)) else None


def head_selector(heads: list, device):
    """A slice for evenly spaced ascending heads (a view, no copy), else an index tensor."""
    if len(heads) == 1 or (heads[1] > heads[0] and all(b - a == heads[1] - heads[0] for a, b in zip(heads, heads[1:]))):
        step = heads[1] - heads[0] if len(heads) > 1 else 1
        return slice(heads[0], heads[-1] + 1, step)
    return torch.tensor(heads, device=device)


_LEADING = {1: (slice(None),), 2: (slice(None), slice(None))}
_NO_STREAM = contextlib.nullcontext()   # reusable: enters and exits as often as asked


def take_heads(x: torch.Tensor, dim: int, heads) -> torch.Tensor:
    """x's heads along dim: a strided view for a slice (x itself for all of them), a gathered
    copy for an index tensor."""
    if isinstance(heads, slice):
        if heads.start == 0 and heads.step == 1 and heads.stop >= x.shape[dim]:
            return x
        return x[(_LEADING.get(dim) or (slice(None),) * dim) + (heads,)]
    return x.index_select(dim, heads)


class _BandRunner:
    """Runs lowered bands: one ragged launch when the bands tile both sequences with the same
    flags (packed documents, one band over everything), else one native call per band."""

    def __init__(self, bands, shape, dtype, scale, workspace, logits_soft_cap: float | None = None,
                 ragged_window: bool = False):
        """ragged_window: a windowed band over the whole sequence takes the ragged kernel too, for
        run(out=...) to write in place."""
        import flashinfer

        self.bands = bands
        self.shape = shape
        self.scale = scale
        self.soft_cap = logits_soft_cap   # None: no cap (FlashInfer's own soft cap when set)
        batch, q_len, kv_len = shape[:3]
        self.covers_all = bands[0].q_start == 0 and bands[-1].q_end == q_len
        self.ragged = None
        backend = "fa3" if _is_hopper(workspace.device) else "fa2"
        launch = self.ragged_launch = plain_band_launch(bands, batch, q_len, kv_len, windowed=ragged_window)
        if launch is not None:   # every (batch entry, band) request in one ragged launch
            self.ragged = planned_ragged(workspace, backend, launch.qo_indptr, launch.kv_indptr, shape, dtype,
                                         launch.causal, launch.window_left, sm_scale=scale,
                                         logits_soft_cap=logits_soft_cap)
        self.single = flashinfer.single_prefill_with_kv_cache
        # several bands, one launch each: a band without a window on the ragged kernel, which
        # writes its rows of the output and LSE in place (prefix-LM's full block and causal rows
        # ran faster so than as single calls whose outputs are copied in); a windowed band keeps
        # the single call, faster for windows
        self.band_wrappers = {}
        if self.ragged is None and not (batch == 1 and len(bands) == 1 and self.covers_all):
            for i, band in enumerate(bands):
                if band.window_left < 0:
                    n_q, n_kv = band.q_end - band.q_start, band.kv_end - band.kv_start
                    self.band_wrappers[i] = planned_ragged(
                        workspace, backend, torch.tensor([0, n_q], dtype=torch.int32),
                        torch.tensor([0, n_kv], dtype=torch.int32), shape, dtype, band.causal, -1, sm_scale=scale,
                        logits_soft_cap=logits_soft_cap)
        # its one ragged launch reads every row of q and of the flattened k, v (run_rows)
        self.reads_all_rows = (self.ragged is not None and launch.q_rows == slice(0, batch * q_len)
                               and launch.kv_rows == slice(0, batch * kv_len))
        # every query row written by some band: the output needs no zero fill first
        rows = sorted((band.q_start, band.q_end) for band in bands)
        self.writes_every_row = (rows[0][0] == 0 and rows[-1][1] == q_len
                                 and all(a[1] == b[0] for a, b in zip(rows, rows[1:])))

    def run(self, q, k, v, return_lse: bool = True, out=None):
        """Base-2 (out, lse), or out alone when not return_lse; q [B*L, Hq, D], k/v [B, S, Hkv, D].
        out: written in place (by the ragged launch, whose fa3 kernel honours its strides) and
        returned; only for a runner with one ragged launch."""
        batch, q_len, kv_len = self.shape[:3]
        if self.reads_all_rows:
            return self.ragged.run(q, k.flatten(0, 1), v.flatten(0, 1), out=out, return_lse=return_lse)
        if self.ragged is not None:
            inputs = self.ragged_launch.inputs(q, k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]))
            return self.ragged.run(*inputs, out=out, return_lse=return_lse)
        assert out is None, "only a runner with one ragged launch writes into a given output"
        if batch == 1 and len(self.bands) == 1 and self.covers_all:
            band = self.bands[0]
            return self.single(q, k[0, band.kv_start:band.kv_end], v[0, band.kv_start:band.kv_end],
                               causal=band.causal, window_left=band.window_left, sm_scale=self.scale,
                               logits_soft_cap=self.soft_cap, return_lse=return_lse)
        # a contiguous output whatever q's strides (a transposed view from the doors): the band
        # wrappers write rows of it in place, and fa2 writes by its own contiguous strides
        # rows no band writes see no key: 0 and an LSE of -inf. The bands' rows are disjoint, so no
        # LSE joins them: none is written unless asked
        out = (torch.empty if self.writes_every_row else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
        if lse is not None and not self.writes_every_row:
            lse.fill_(float("-inf"))
        for b in range(batch):
            for i, band in enumerate(self.bands):
                rows = slice(b * q_len + band.q_start, b * q_len + band.q_end)
                keys = k[b, band.kv_start:band.kv_end], v[b, band.kv_start:band.kv_end]
                if i in self.band_wrappers:
                    self.band_wrappers[i].run(q[rows], *keys, out=out[rows], return_lse=lse is not None,
                                              lse=None if lse is None else lse[rows])
                    continue
                result = self.single(q[rows], *keys, causal=band.causal, window_left=band.window_left,
                                     sm_scale=self.scale, logits_soft_cap=self.soft_cap, return_lse=lse is not None)
                if lse is None:
                    out[rows] = result
                else:
                    out[rows], lse[rows] = result
        return (out, lse) if return_lse else out

    def run_rows(self, q, k, v, return_lse: bool = True, out=None, lse=None):
        """run() for a runner that reads_all_rows, with k, v already flattened to [B * S, Hkv, D]:
        the launch alone; lse: a contiguous [B * L, Hq] float32 buffer it writes the LSE into."""
        return self.ragged.run(q, k, v, out=out, lse=lse, return_lse=return_lse)
