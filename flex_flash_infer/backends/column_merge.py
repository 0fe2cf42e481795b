"""The key columns of the window band + columns route merged into the band's result in one pass.

The columns a row sees outside its window are, for attamba and StreamingLLM (and a user's own
mask of that shape), a prefix of the sorted column positions: the chunk ends or sinks left of the
window. Then one count per row describes the column part of the mask, and a single kernel
(column_merge_triton) attends those columns and folds them into the band's output, instead of
FlashInfer's paged launch over pages of one key with a bit mask, plus merge_state.
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def merge_columns_reference(out, lse2, q, k, v, positions, counts, scale: float, q_len: int) -> None:
    """The kernel's result in torch (CPU tests, and its GPU test's reference), in place."""
    rows, heads, dim = q.shape
    batch = rows // q_len
    group = heads // k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)   # float32, or float64 for the oracle tests
    kc = k[:, positions.long()].repeat_interleave(group, 2).to(work)   # [B, M, Hq, D]
    vc = v[:, positions.long()].repeat_interleave(group, 2).to(work)
    qf = q.view(batch, q_len, heads, dim).to(work)
    s = torch.einsum("blhd,bmhd->blhm", qf, kc) * (scale / LN2)   # base 2, as FlashInfer's lse
    seen = torch.arange(positions.numel(), device=q.device).view(1, -1) < counts.view(-1, 1).long()   # [L, M]
    s = s.masked_fill(~seen.view(1, q_len, 1, -1), float("-inf"))
    band_lse = lse2.view(batch, q_len, heads).to(work)
    all_lse = torch.cat([band_lse.unsqueeze(-1), s], -1)
    new_lse = torch.logsumexp(all_lse * LN2, -1) / LN2
    safe = torch.where(torch.isfinite(new_lse), new_lse, torch.zeros_like(new_lse))
    w_band = torch.exp2(band_lse - safe)
    p = torch.exp2(s - safe.unsqueeze(-1))
    merged = out.view(batch, q_len, heads, dim).to(work) * w_band.unsqueeze(-1) + torch.einsum("blhm,bmhd->blhd", p, vc)
    touched = (counts > 0).view(1, q_len, 1)
    out.view(batch, q_len, heads, dim).copy_(torch.where(touched.unsqueeze(-1), merged.to(out.dtype),
                                                         out.view(batch, q_len, heads, dim)))
    lse2.view(batch, q_len, heads).copy_(torch.where(touched, new_lse.to(lse2.dtype), lse2.view(batch, q_len, heads)))


def merge_columns(out, lse2, q, k, v, positions, counts, scale: float, q_len: int) -> None:
    """In place: the band's out [B*L, Hq, D] and base-2 lse2 [B*L, Hq] absorb the columns;
    the Triton kernel on CUDA, the torch reference elsewhere."""
    if q.is_cuda:
        from .column_merge_triton import merge_columns_triton

        merge_columns_triton(out, lse2, q, k, v, positions, counts, scale, q_len)
    else:
        merge_columns_reference(out, lse2, q, k, v, positions, counts, scale, q_len)


def kernel_available(device: torch.device, head_dim: int) -> bool:
    """On CUDA, the kernel needs triton (shipped with torch's CUDA builds) and a power-of-two head_dim."""
    if head_dim not in (16, 32, 64, 128, 256):
        return False
    if device.type != "cuda":
        return True   # the torch reference serves (the CPU model of the route)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
