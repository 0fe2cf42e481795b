"""Speculative decoding with a draft tree: verify all draft tokens in one attention call.

Each request has a cached prefix; the draft model proposes a tree of tokens (parent[i] is the
draft token that token i continues, -1 for children of the prefix). The target model scores
every draft token at once: a draft token sees the whole prefix and its own ancestors in the
tree, nothing else. The tree is a captured tensor, so the same mask_mod serves every step.

Runs on a CPU (reference backend) or, unchanged, on a CUDA GPU with FlashInfer.
"""
import torch

from flex_flash_infer import PagedFlexAttention

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

# a draft tree of 7 tokens:   prefix -> 0 -> 1 -> 3
#                                        |    `-> 4
#                                        `-> 2 -> 5 -> 6
parent = [-1, 0, 0, 1, 1, 2, 5]
T = len(parent)
ancestor = torch.eye(T, dtype=torch.bool)            # ancestor[i, j]: j is i or an ancestor of i
for i, p in enumerate(parent):
    if p >= 0:
        ancestor[i] |= ancestor[p]
ancestor = ancestor.to(device)

prefix_lens = torch.tensor([100, 37, 260], device=device)   # per request, before the draft tokens


def tree_mask(b, h, q_idx, kv_idx):
    """Draft tokens sit at positions prefix_len .. prefix_len + T - 1 of their request."""
    start = prefix_lens[b]
    in_prefix = kv_idx < start
    q_node = (q_idx - start).clamp(0, T - 1)
    kv_node = (kv_idx - start).clamp(0, T - 1)
    return in_prefix | ((kv_idx >= start) & ancestor[q_node, kv_node])


page_size, Hq, Hkv, D = 16, 8, 2, 128
kv_lens = (prefix_lens + T).tolist()                 # the draft tokens' keys are appended first
pages = [-(-n // page_size) for n in kv_lens]
kv_page_indptr = torch.tensor([0] + pages).cumsum(0).to(device)
kv_page_indices = torch.randperm(sum(pages)).to(device)      # any page order
kv_last_page_len = torch.tensor([n - (p - 1) * page_size for n, p in zip(kv_lens, pages)], device=device)
qo_indptr = torch.arange(len(kv_lens) + 1, device=device) * T

k_cache = torch.randn(sum(pages), page_size, Hkv, D, device=device, dtype=dtype)
v_cache = torch.randn(sum(pages), page_size, Hkv, D, device=device, dtype=dtype)
q = torch.randn(int(qo_indptr[-1]), Hq, D, device=device, dtype=dtype)

attention = PagedFlexAttention(device=device)
attention.plan(tree_mask, qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len,
               num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, page_size=page_size, dtype=dtype)
out = attention.run(q, (k_cache, v_cache))
print(f"backend: {attention.active_backend}, out {tuple(out.shape)}")

# check one request densely: draft token i sees the prefix and its ancestors only
r = 2
n, P = kv_lens[r], int(prefix_lens[r])
keys = k_cache[kv_page_indices[kv_page_indptr[r]:kv_page_indptr[r + 1]]].reshape(-1, Hkv, D)[:n].float()
vals = v_cache[kv_page_indices[kv_page_indptr[r]:kv_page_indptr[r + 1]]].reshape(-1, Hkv, D)[:n].float()
worst = 0.0
for i in range(T):
    seen = torch.cat([torch.ones(P, dtype=torch.bool, device=device), ancestor[i]])
    qi = q[r * T + i].float().view(Hkv, Hq // Hkv, D)
    s = torch.einsum("gjd,kgd->gjk", qi, keys[seen]) / D ** 0.5
    expected = torch.einsum("gjk,kgd->gjd", s.softmax(-1), vals[seen]).reshape(Hq, D)
    worst = max(worst, ((out[r * T + i].float() - expected).norm() / expected.norm()).item())
print(f"largest relative error against the dense tree mask: {worst:.2e}")
assert worst < (2e-2 if dtype == torch.bfloat16 else 1e-5)
