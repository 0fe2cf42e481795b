"""A CPU model of FlashInfer's paged prefill and merge_state semantics, to test the planner
without a GPU: each request attends to the concatenation of its pages, optionally under a
row-major [qo_len, kv_len] bit mask or a causal mask aligned to the bottom right, and returns base-2 LSE (-inf and 0 for rows that see nothing)."""
import math

import torch


def paged_prefill(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices, last_page_len, scale, mask=None,
                  causal=False, variant=None, window_left=-1, split_kv=False):
    """variant(r, s): a compiled variant's scores [H, n, kv_len] of request r, -inf where its own
    mask removes them (applied before the bit mask and the causal mask, as in FlashInfer).
    window_left >= 0: each query sees at most window_left keys before its own position (bottom-right
    aligned, as FlashInfer's sliding window).
    split_kv: FlashInfer's fa2 kernels (prefill and decode) may split a request's keys across
    thread blocks and merge the parts with merge_state, which drops a NaN LSE (see merge_state);
    modelled at its worst, one part per page, unless the launch was planned with
    disable_split_kv."""
    N, H, D = q.shape
    group = H // k_pages.shape[2]
    out = torch.zeros(N, H, D, dtype=torch.float64)
    lse = torch.full((N, H), -math.inf, dtype=torch.float64)
    offset = 0
    for r in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        pages = kv_indices[int(kv_indptr[r]):int(kv_indptr[r + 1])].long()
        if len(pages) == 0:
            continue
        kv_len = (len(pages) - 1) * k_pages.shape[1] + int(last_page_len[r])
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:kv_len].double().repeat_interleave(group, 1)
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:kv_len].double().repeat_interleave(group, 1)
        s = torch.einsum("nhd,khd->hnk", q[q0:q1].double(), k) * scale
        if variant is not None:
            s = variant(r, s)
        if mask is not None:
            m = mask[offset: offset + (q1 - q0) * kv_len].view(q1 - q0, kv_len)
            offset += (q1 - q0) * kv_len
            s = s.masked_fill(~m, -math.inf)
        rows = torch.arange(q1 - q0).view(-1, 1)
        if causal:  # FlashInfer aligns the causal mask to the bottom right of each request
            s = s.masked_fill(torch.arange(kv_len).view(1, -1) > kv_len - (q1 - q0) + rows, -math.inf)
        if window_left >= 0:
            s = s.masked_fill(torch.arange(kv_len).view(1, -1) < kv_len - (q1 - q0) + rows - window_left, -math.inf)
        parts = s.split(k_pages.shape[1], -1) if split_kv else [s]
        o_r = l_r = None
        for i, s_part in enumerate(parts):
            o_p, l_p = attend(s_part, v[i * k_pages.shape[1]: i * k_pages.shape[1] + s_part.shape[-1]])
            o_r, l_r = (o_p, l_p) if o_r is None else merge_state(o_r, l_r, o_p, l_p)
        out[q0:q1], lse[q0:q1] = o_r, l_r
    return out, lse


def attend(s, v):
    """(out [n, H, D], base-2 lse [n, H]) of scores s [H, n, keys] over values v [keys, H, D]."""
    row_lse = torch.logsumexp(s, -1)
    # a row that sees nothing gives zeros; a NaN score gives NaN, never a hidden 0
    p = torch.exp(s - torch.where(row_lse == -math.inf, 0.0, row_lse).unsqueeze(-1))
    return torch.einsum("hnk,khd->nhd", p, v), (row_lse / math.log(2)).transpose(0, 1)


def merge_state(o_a, s_a, o_b, s_b):
    """FlashInfer's merge_state (cascade.cuh): the larger LSE by fmaxf and the differences clamped
    with it, so a NaN LSE gets weight 0: the output keeps the NaN (0 * NaN), the LSE loses it."""
    m = torch.fmax(s_a, s_b)
    m = torch.where(torch.isinf(m), 0.0, m)
    w_a = torch.exp2(torch.fmax(s_a - m, torch.tensor(-math.inf, dtype=s_a.dtype)))
    w_b = torch.exp2(torch.fmax(s_b - m, torch.tensor(-math.inf, dtype=s_b.dtype)))
    total = w_a + w_b
    safe = torch.where(total > 0, total, 1.0)
    out = (o_a * (w_a / safe).unsqueeze(-1) + o_b * (w_b / safe).unsqueeze(-1))
    return out, torch.log2(total) + m
