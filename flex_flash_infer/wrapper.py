"""FlexFlashInfer: the seed's plan-once / run-many wrapper for one sequence in [S, H, D] layout."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend_choice import check_backend_name, choose_backend
from .block_mask import BlockMask, create_block_mask
from .flashinfer_backend import FlashInferPlan
from .mask_eval import as_mask_mod, check_score_mod, mask_dependence
from .mods.combinators import noop_mask
from .reference import reference_attention
from .validation import check_heads, check_positive_int, check_same_device_dtype, check_scale, check_tensor


@dataclass
class _Prepared:
    block_mask: BlockMask
    score_mod: object
    seq_len_q: int
    seq_len_kv: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float | None
    backend: str
    plan: FlashInferPlan | None


class FlexFlashInfer:
    """Attention with a FlexAttention-style mask on FlashInfer kernels.

    >>> flex = FlexFlashInfer(device="cuda")
    >>> flex.prepare(mask_fn=get_mask_fn("causal"), seq_len_q=1024, seq_len_kv=1024,
    ...              num_qo_heads=8, num_kv_heads=8, head_dim=64, dtype=torch.float16)
    >>> out = flex(q, k, v)   # q [seq_q, Hq, D], k/v [seq_kv, Hkv, D] -> out [seq_q, Hq, D]

    prepare() does all planning once; each call only launches kernels. On CPU (or where
    FlashInfer cannot run the problem) it computes with the reference backend.
    """

    def __init__(self, device="cuda", workspace_buffer: torch.Tensor | None = None, backend: str = "auto"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'")
        if workspace_buffer is not None and (not isinstance(workspace_buffer, torch.Tensor)
                                             or workspace_buffer.dtype != torch.uint8):
            raise TypeError("workspace_buffer must be a uint8 torch.Tensor (FlashInfer's float workspace)")
        self.workspace_buffer = workspace_buffer
        self.backend = check_backend_name(backend)
        self._prepared: _Prepared | None = None

    @property
    def block_mask(self) -> BlockMask:
        return self._require_prepared().block_mask

    @property
    def active_backend(self) -> str:
        """'flashinfer' or 'reference': what the last prepare() chose."""
        return self._require_prepared().backend

    def prepare(self, mask_fn=None, seq_len_q=None, seq_len_kv=None, num_qo_heads=None, num_kv_heads=None,
                head_dim=None, block_size_row: int = 128, block_size_col: int = 128, dtype=torch.float16,
                score_mod=None, scale=None) -> "FlexFlashInfer":
        """Plan attention for one shape and mask; replaces any earlier plan only on success.

        mask_fn takes (q_idx, kv_idx) or (b, h, q_idx, kv_idx); None means full attention.
        """
        mask_mod = noop_mask if mask_fn is None else as_mask_mod(mask_fn, "mask_fn")
        score_mod = check_score_mod(score_mod)
        seq_len_q = check_positive_int("seq_len_q", seq_len_q)
        seq_len_kv = check_positive_int("seq_len_kv", seq_len_kv)
        num_qo_heads = check_positive_int("num_qo_heads", num_qo_heads)
        num_kv_heads = check_positive_int("num_kv_heads", num_kv_heads)
        head_dim = check_positive_int("head_dim", head_dim)
        block = (check_positive_int("block_size_row", block_size_row), check_positive_int("block_size_col", block_size_col))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
        scale = check_scale(scale)
        check_heads(num_qo_heads, num_kv_heads, names=("num_qo_heads", "num_kv_heads"))
        backend = choose_backend(self.backend, self.device, dtype, head_dim, head_dim, score_mod is not None)
        _, uses_h = mask_dependence(mask_mod, 1, num_qo_heads, seq_len_q, seq_len_kv, self.device)
        block_mask = create_block_mask(mask_mod, 1, num_qo_heads if uses_h else 1, seq_len_q, seq_len_kv,
                                       device=self.device, BLOCK_SIZE=block)
        plan = None
        if backend == "flashinfer":
            plan = FlashInferPlan(block_mask, 1, seq_len_q, seq_len_kv, num_qo_heads, num_kv_heads, head_dim,
                                  dtype, scale if scale is not None else head_dim ** -0.5, self.device,
                                  self.workspace_buffer)
        self._prepared = _Prepared(block_mask, score_mod, seq_len_q, seq_len_kv, num_qo_heads, num_kv_heads,
                                   head_dim, dtype, scale, backend, plan)
        return self

    def _require_prepared(self) -> _Prepared:
        if self._prepared is None:
            raise RuntimeError("FlexFlashInfer: call prepare(mask_fn=..., seq_len_q=..., ...) before running attention")
        return self._prepared

    def _check_inputs(self, p: _Prepared, q, k, v) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, 3, "[seq, heads, head_dim]")
        check_same_device_dtype(q=q, k=k, v=v)
        expected = {"q": (p.seq_len_q, p.num_qo_heads, p.head_dim),
                    "k": (p.seq_len_kv, p.num_kv_heads, p.head_dim),
                    "v": (p.seq_len_kv, p.num_kv_heads, p.head_dim)}
        for name, t in (("q", q), ("k", k), ("v", v)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]} as prepared, got {tuple(t.shape)}")
        if q.dtype != p.dtype:
            raise TypeError(f"q has dtype {q.dtype} but prepare() was given dtype={p.dtype}")
        if q.device.type != self.device.type:
            raise ValueError(f"q is on {q.device} but this FlexFlashInfer was made for device {self.device}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False):
        """out [seq_q, Hq, D] (and natural-log lse [seq_q, Hq] float32 when return_lse)."""
        p = self._require_prepared()
        self._check_inputs(p, q, k, v)
        if p.backend == "flashinfer":
            out, lse = p.plan.run(q.contiguous(), k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous(),
                                  return_lse=return_lse)
        else:
            out, lse = reference_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], p.block_mask, p.score_mod, p.scale)
            out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1)
        return (out, lse) if return_lse else out

    run = __call__
