"""Shared inputs of the paged-cache tests: library masks, a shuffled page table over a random
cache, and a float64 dense oracle built from the positions."""
import math

import torch

MASKS = [("causal", {}), ("sliding_window", {"window_size": 40}), ("streaming", {"sink_size": 3, "window_size": 33}),
         ("attamba", {"window_size": 24, "chunk_size": 16}), ("prefix_lm", {"prefix_len": 50}),
         ("dilated_sliding_window", {"window_size": 60, "dilation": 3}), ("full", {})]


def random_cache(rng, kv_lens, qo_lens, page_size, Hq=4, Hkv=2, D=16):
    """Shuffled page table over a shared cache; q are the newest qo_len tokens of each request."""
    pages = [-(-n // page_size) for n in kv_lens]
    total = sum(pages) + 3
    order = torch.randperm(total, generator=rng)[:sum(pages)]
    kv_page_indptr = torch.tensor([0] + pages).cumsum(0)
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)])
    qo_indptr = torch.tensor([0] + list(qo_lens)).cumsum(0)
    k_cache = torch.randn(total, page_size, Hkv, D, generator=rng, dtype=torch.float64)
    v_cache = torch.randn(total, page_size, Hkv, D, generator=rng, dtype=torch.float64)
    q = torch.randn(int(qo_indptr[-1]), Hq, D, generator=rng, dtype=torch.float64)
    return q, k_cache, v_cache, qo_indptr, kv_page_indptr, order, last


def dense_oracle(mod, q, k_cache, v_cache, qo_indptr, kv_page_indptr, indices, last, page_size, score_mod=None):
    """float64 attention of each (request, head, query) over its cached keys, the queries being
    the newest tokens, written independently of the library's reference; score_mod sees the
    scaled score, the mask applies after it."""
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    for r in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        pages = indices[int(kv_page_indptr[r]):int(kv_page_indptr[r + 1])]
        n = (len(pages) - 1) * page_size + int(last[r]) if len(pages) else 0
        k = k_cache[pages].reshape(-1, Hkv, k_cache.shape[-1])[:n]
        v = v_cache[pages].reshape(-1, Hkv, v_cache.shape[-1])[:n]
        kv = torch.arange(n)
        for i in range(q1 - q0):
            pos = torch.tensor(n - (q1 - q0) + i)
            for h in range(Hq):
                b, hh = torch.tensor(r), torch.tensor(h)
                seen = mod(b, hh, pos, kv).expand(n).bool()
                if not seen.any():
                    continue
                s = (k[:, h // (Hq // Hkv)] @ q[q0 + i, h]) / math.sqrt(q.shape[-1])
                if score_mod is not None:
                    s = score_mod(s.float(), b, hh, pos, kv).double()
                s = s[seen]
                out[q0 + i, h] = torch.softmax(s, 0) @ v[seen, h // (Hq // Hkv)]
                lse[q0 + i, h] = torch.logsumexp(s, 0)
    return out, lse
