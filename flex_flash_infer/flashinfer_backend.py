"""The FlashInfer backend: plan once per (block mask, shape, dtype), then run only launches.

Whole tiles run on FlashInfer's unmasked fa3 (Hopper) paged-prefill kernel; partial tiles run
on its fa2 kernel with a bit mask covering only those tiles; the two results are merged by
log-sum-exp (flashinfer.merge_state). See planner.py for the request layout.
"""
from __future__ import annotations

import math

import torch

from .mask_eval import mask_dependence
from .planner import partial_tile_mask, plan_tiles

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


def unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int) -> str | None:
    """Why the FlashInfer path cannot run this problem, or None when it can."""
    if device.type != "cuda":
        return f"the FlashInfer backend needs CUDA tensors, got device {device}"
    if not flashinfer_available():
        return "flashinfer is not installed (pip install 'flex-flash-infer[cuda]')"
    if dtype not in SUPPORTED_DTYPES:
        return f"the FlashInfer backend supports dtype float16 or bfloat16, got {dtype}"
    if head_dim not in SUPPORTED_HEAD_DIMS or head_dim_v != head_dim:
        return f"the FlashInfer backend supports head_dim in {SUPPORTED_HEAD_DIMS} (same for values), got {head_dim}/{head_dim_v}"
    return None


def default_workspace(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _workspaces:
        _workspaces[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[key]


def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


class _HeadGroup:
    """The launches of one head group: all heads at once, or one query head of a per-head mask."""

    def __init__(self, tile_plan, mask_mod, head, shape, dtype, scale, workspace, block_size):
        import flashinfer

        batch, q_len, kv_len, hq, hkv, head_dim = shape
        block_q, block_kv = block_size
        common = dict(num_qo_heads=hq, num_kv_heads=hkv, head_dim_qk=head_dim, page_size=block_kv,
                      causal=False, sm_scale=scale, q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype)
        self.full = self.partial = None
        if tile_plan.full is not None:
            backend = "fa3" if _is_hopper(workspace.device) else "fa2"
            self.full = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
            launch = tile_plan.full
            self.full.plan(tile_plan.qo_indptr, launch.kv_indptr, launch.kv_indices, launch.last_page_len, **common)
        if tile_plan.partial is not None:
            bits = partial_tile_mask(tile_plan, mask_mod, 0 if head is None else head, q_len, kv_len, block_q, block_kv)
            self.partial = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
            launch = tile_plan.partial
            self.partial.plan(tile_plan.qo_indptr, launch.kv_indptr, launch.kv_indices, launch.last_page_len,
                              custom_mask=bits, **common)
        self.merge = flashinfer.merge_state

    def run(self, q, kv_pages):
        """Base-2 (out, lse) of this group."""
        if self.full is not None and self.partial is not None:
            o_full, lse_full = self.full.run(q, kv_pages, return_lse=True)
            o_part, lse_part = self.partial.run(q, kv_pages, return_lse=True)
            return self.merge(o_full, lse_full, o_part, lse_part)
        return (self.full or self.partial).run(q, kv_pages, return_lse=True)


class FlashInferPlan:
    """A planned attention problem. run(q, k, v) with q [B*Q_LEN, Hq, D] and k, v
    [B, KV_LEN, Hkv, D] returns out [B*Q_LEN, Hq, D] and natural-log lse [B*Q_LEN, Hq]."""

    def __init__(self, block_mask, batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim,
                 dtype, scale, device, workspace=None):
        device = torch.device(device)
        workspace = default_workspace(device) if workspace is None else workspace
        block_q, block_kv = block_mask.BLOCK_SIZE
        states = block_mask.states.to(device)
        _, uses_h = mask_dependence(block_mask.mask_mod, batch, num_qo_heads, q_len, kv_len, device)
        self.per_head = states.shape[1] > 1 or uses_h
        self.block_kv = block_kv
        self.num_kv_tiles = states.shape[-1]
        self.shape = (batch, q_len, kv_len, num_qo_heads, num_kv_heads, head_dim)
        self.group_size = num_qo_heads // num_kv_heads
        heads = list(range(num_qo_heads)) if self.per_head else [None]
        self.groups = []
        for head in heads:
            head_states = states[:, 0 if head is None or states.shape[1] == 1 else head]
            tile_plan = plan_tiles(head_states, batch, q_len, block_q, block_kv)
            group_shape = self.shape if head is None else (batch, q_len, kv_len, 1, 1, head_dim)
            self.groups.append(_HeadGroup(tile_plan, block_mask.mask_mod, head, group_shape, dtype,
                                          scale, workspace, block_mask.BLOCK_SIZE))

    def _pages(self, x: torch.Tensor) -> torch.Tensor:
        """[B, KV_LEN, H, D] -> pages [B * nKV, block_kv, H, D] (zero-padded tail tile)."""
        batch, kv_len, heads, dim = x.shape
        padded = self.num_kv_tiles * self.block_kv
        if padded != kv_len:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - kv_len))
        return x.reshape(batch * self.num_kv_tiles, self.block_kv, heads, dim)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k_pages, v_pages = self._pages(k), self._pages(v)
        if not self.per_head:
            out, lse = self.groups[0].run(q, (k_pages, v_pages))
        else:
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
            per_kv_head = {}
            for head, group in enumerate(self.groups):
                kv_head = head // self.group_size
                if kv_head not in per_kv_head:
                    per_kv_head[kv_head] = (k_pages[:, :, kv_head:kv_head + 1].contiguous(),
                                            v_pages[:, :, kv_head:kv_head + 1].contiguous())
                o_h, lse_h = group.run(q[:, head:head + 1].contiguous(), per_kv_head[kv_head])
                out[:, head:head + 1] = o_h
                lse[:, head:head + 1] = lse_h
        return out, lse * LN2
