"""The key columns of the window band + columns route (attamba's chunk ends, StreamingLLM's
sinks) attended and merged into the band's result in one Triton kernel.

Each program takes BLOCK_M query rows of one head: it reads the few column keys straight from k
and v by their positions (no gathered copy), runs an online softmax over the columns each row
sees (a prefix of the sorted positions: column_merge.column_prefix_counts), and folds the result
into the band's output and base-2 log-sum-exp in place. It replaces FlashInfer's paged fa2
launch over pages of one key, that launch's zero-filled output and merge_state: this kernel
reads q and the band's output once and writes the output once. It still takes several times
what its memory traffic needs (docs/benchmarks.md), so its tiling has room.
Imported only on CUDA: triton is not a dependency of the CPU install.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _columns_merge_kernel(Q, K, V, O, LSE, POS, COUNTS, q_len, num_columns, group, scale_log2,
                          stride_q_row, stride_q_head, stride_k_batch, stride_k_key, stride_k_head,
                          stride_v_batch, stride_v_key, stride_v_head, stride_o_row, stride_o_head,
                          stride_lse_row, stride_lse_head,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                          COLUMNS_PADDED: tl.constexpr):
    block, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    in_seq = rows < q_len
    seen = tl.load(COUNTS + rows, mask=in_seq, other=0)   # columns each row sees: a prefix
    most = tl.max(seen, 0)
    if most > 0:
        dims = tl.arange(0, HEAD_DIM)
        global_rows = (b * q_len + rows).to(tl.int64)   # offsets past 2^31 elements at long contexts
        kv_head = h // group
        batch_k = b.to(tl.int64) * stride_k_batch
        batch_v = b.to(tl.int64) * stride_v_batch
        q = tl.load(Q + global_rows[:, None] * stride_q_row + h * stride_q_head + dims[None, :],
                    mask=in_seq[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for c0 in range(0, COLUMNS_PADDED, BLOCK_C):   # a constexpr bound: Triton's CPU interpreter takes no other
            if c0 < most:
                cols = c0 + tl.arange(0, BLOCK_C)
                col_ok = cols < num_columns
                pos = tl.load(POS + cols, mask=col_ok, other=0).to(tl.int64)
                kc = tl.load(K + batch_k + pos[:, None] * stride_k_key + kv_head * stride_k_head + dims[None, :],
                             mask=col_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(kc)) * scale_log2
                s = tl.where(cols[None, :] < seen[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row that sees nothing yet
                p = tl.exp2(s - m_ref[:, None])
                alpha = tl.exp2(m_i - m_ref)
                l_i = l_i * alpha + tl.sum(p, 1)
                vc = tl.load(V + batch_v + pos[:, None] * stride_v_key + kv_head * stride_v_head + dims[None, :],
                             mask=col_ok[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
                m_i = m_new
        o_ptrs = O + global_rows[:, None] * stride_o_row + h * stride_o_head + dims[None, :]
        lse_ptrs = LSE + global_rows * stride_lse_row + h * stride_lse_head
        writes = in_seq & (seen > 0)
        band_out = tl.load(o_ptrs, mask=writes[:, None], other=0.0).to(tl.float32)
        band_lse = tl.load(lse_ptrs, mask=writes, other=float("-inf"))
        col_lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
        top = tl.maximum(band_lse, col_lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_band = tl.exp2(band_lse - top)
        w_cols = tl.exp2(m_i - top)           # acc and l_i are relative to m_i
        total = w_band + l_i * w_cols
        out = (band_out * w_band[:, None] + acc * w_cols[:, None]) / total[:, None]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=writes[:, None])
        tl.store(lse_ptrs, top + tl.log2(total), mask=writes)


def merge_columns_triton(out, lse2, q, k, v, positions, counts, scale: float, q_len: int) -> None:
    """In place: out [B*L, Hq, D] and base-2 lse2 [B*L, Hq] of the band absorb the columns.
    q [B*L, Hq, D]; k, v [B, S, Hkv, D]; positions int [M] (sorted); counts int32 [L]."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    rows, heads, head_dim = q.shape
    batch = rows // q_len
    group = heads // k.shape[2]
    block_m, block_c = 64, 16 if positions.numel() <= 16 else 32
    grid = (triton.cdiv(q_len, block_m), batch, heads)
    _columns_merge_kernel[grid](
        q, k, v, out, lse2, positions, counts, q_len, positions.numel(), group, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), lse2.stride(0), lse2.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_C=block_c,
        COLUMNS_PADDED=max(block_c, triton.next_power_of_2(positions.numel())), num_warps=4)
