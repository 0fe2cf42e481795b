"""An independent float64 oracle: dense masks from numpy predicates and plain softmax attention.

Nothing here calls the library, so tests compare two separate implementations.
"""
import math

import numpy as np
import torch


def predicate(name, q, kv, **p):
    """numpy truth of each library mask on index grids q [L, 1], kv [1, S]."""
    if name == "full":
        return np.ones(np.broadcast(q, kv).shape, dtype=bool)
    if name == "causal":
        return q >= kv
    if name == "sliding_window":
        return (q >= kv) & (q - kv < p["window_size"])
    if name == "attamba":
        return (q >= kv) & (((kv + 1) % p["chunk_size"] == 0) | (q - kv < p["window_size"]))
    if name == "streaming":
        return (q >= kv) & ((kv < p["sink_size"]) | (q - kv < p["window_size"]))
    if name == "prefix_lm":
        return (kv < p["prefix_len"]) | (q >= kv)
    if name == "chunked_causal":
        return (q >= kv) & (q // p["chunk_size"] == kv // p["chunk_size"])
    if name == "dilated_sliding_window":
        d = np.abs(q - kv)
        return (d <= p["window_size"]) & (d % p["dilation"] == 0)
    if name == "document":
        ids = np.asarray(p["document_ids"])
        return (ids[q] == ids[kv]) & (q >= kv)
    raise KeyError(name)


def dense_predicate(name, L, S, **p):
    q = np.arange(L)[:, None]
    kv = np.arange(S)[None, :]
    return torch.from_numpy(np.ascontiguousarray(predicate(name, q, kv, **p)))


def dense_attention(q, k, v, mask=None, scale=None, score_fn=None):
    """float64 attention. q [B, Hq, L, E], k/v [B, Hkv, S, *], mask bool broadcastable to
    [B, Hq, L, S], score_fn(scores, b, h, q, kv) on dense index grids. Returns (out, lse)."""
    B, Hq, L, E = q.shape
    g = Hq // k.shape[1]
    scale = 1 / math.sqrt(E) if scale is None else scale
    qd, kd, vd = q.double().cpu(), k.double().cpu().repeat_interleave(g, 1), v.double().cpu().repeat_interleave(g, 1)
    s = torch.einsum("bhld,bhsd->bhls", qd, kd) * scale
    if score_fn is not None:
        b = torch.arange(B).view(-1, 1, 1, 1)
        h = torch.arange(Hq).view(1, -1, 1, 1)
        qi = torch.arange(L).view(1, 1, -1, 1)
        ki = torch.arange(s.shape[-1]).view(1, 1, 1, -1)
        s = score_fn(s, b, h, qi, ki).double()
    if mask is not None:
        s = s.masked_fill(~mask.cpu().expand_as(s), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("bhls,bhsd->bhld", p, vd)
    return out, lse


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
