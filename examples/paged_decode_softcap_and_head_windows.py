"""A decode loop over a paged KV cache with Gemma-style attention: a logit soft cap as score_mod,
local layers that see a sliding window, global layers that see everything, and an experimental
layer whose query heads each have their own window.

Every step appends one token's keys and values to each request's pages, plans once per layer
kind (plan() is the step's host work; run() only launches kernels), and checks the output
against dense float32 attention over the same keys with the same mask and soft cap.
Runs on a CPU (reference backend) or, unchanged, on a CUDA GPU with FlashInfer, where the local
and global layers run from CUDA graphs captured at the first step (use_cuda_graph=True: each
later plan() rewrites the tables the graph reads); the per-head layer's compiled kernel runs eagerly.
"""
import torch

from flex_flash_infer import PagedFlexAttention, get_mask_fn
from flex_flash_infer.mods import generate_softcap_score_mod

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
page_size, Hq, Hkv, D, steps = 16, 8, 2, 128, 6
prompt_lens = [45, 300, 17]                       # per request, before decoding
softcap = generate_softcap_score_mod(50.0)        # Gemma 2's attn_logit_softcapping
windows = torch.tensor([16, 64, 256, 1024] * 2, device=device)


def head_windows(b, h, q_idx, kv_idx):            # query head h sees windows[h] keys back
    return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])


layers = {"local": get_mask_fn("sliding_window", window_size=64), "global": get_mask_fn("causal"),
          "head_windows": head_windows}

max_pages = sum(-(-(n + steps) // page_size) for n in prompt_lens)
gen = torch.Generator(device=device).manual_seed(0)
k_cache = torch.randn(max_pages, page_size, Hkv, D, device=device, generator=gen).to(dtype)
v_cache = torch.randn(max_pages, page_size, Hkv, D, device=device, generator=gen).to(dtype)
# each request owns a contiguous run of page ids here; any page table works
first_page = torch.tensor([0] + [-(-(n + steps) // page_size) for n in prompt_lens]).cumsum(0)
graphed = {"local", "global"} if device == "cuda" else set()
attention = {name: PagedFlexAttention(device=device, **(dict(use_cuda_graph=True, max_num_pages=max_pages)
                                                        if name in graphed else {})) for name in layers}
graphs = {}                                       # layer kind -> (graph, its output)
static_q = torch.empty(len(prompt_lens), Hq, D, device=device, dtype=dtype)   # what the graphs read


def tables(lens):
    pages = [-(-n // page_size) for n in lens]
    indices = torch.cat([torch.arange(int(first_page[r]), int(first_page[r]) + p) for r, p in enumerate(pages)])
    last = [n - (p - 1) * page_size for n, p in zip(lens, pages)]
    return (torch.arange(len(lens) + 1), torch.tensor([0] + pages).cumsum(0), indices, torch.tensor(last))


def dense(q, lens, mask_mod):
    """float32 attention of each request's newest token over its cached keys."""
    out = torch.empty(len(lens), Hq, D, device=device)
    for r, n in enumerate(lens):
        pages = torch.arange(int(first_page[r]), int(first_page[r]) + -(-n // page_size))
        k = k_cache[pages].reshape(-1, Hkv, D)[:n].float().repeat_interleave(Hq // Hkv, 1)
        v = v_cache[pages].reshape(-1, Hkv, D)[:n].float().repeat_interleave(Hq // Hkv, 1)
        kv = torch.arange(n, device=device)
        h = torch.arange(Hq, device=device).view(-1, 1)
        score = softcap(torch.einsum("hd,khd->hk", q[r].float(), k) / D ** 0.5, r, h, n - 1, kv)
        score = score.masked_fill(~mask_mod(r, h, torch.tensor(n - 1, device=device), kv), float("-inf"))
        out[r] = torch.einsum("hk,khd->hd", score.softmax(-1), v)
    return out


lens = list(prompt_lens)
for step in range(steps):
    lens = [n + 1 for n in lens]                  # the new token's keys and values go into the cache
    for r, n in enumerate(lens):
        page, slot = int(first_page[r]) + (n - 1) // page_size, (n - 1) % page_size
        k_cache[page, slot] = torch.randn(Hkv, D, device=device, generator=gen).to(dtype)
        v_cache[page, slot] = torch.randn(Hkv, D, device=device, generator=gen).to(dtype)
    q = torch.randn(len(lens), Hq, D, device=device, generator=gen).to(dtype)
    for name, mask_mod in layers.items():
        attn = attention[name].plan(mask_mod, *tables(lens), num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                    page_size=page_size, dtype=dtype, score_mod=softcap)
        if name in graphed:
            static_q.copy_(q)
            if name not in graphs:                # captured once, after a warm-up run outside it
                attn.run(static_q, (k_cache, v_cache))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    graphs[name] = (graph, attn.run(static_q, (k_cache, v_cache)))
            graph, out = graphs[name]
            graph.replay()
        else:
            out = attn.run(q, (k_cache, v_cache))
        ref = dense(q, lens, mask_mod)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert not torch.isnan(out).any() and err < (2e-2 if dtype == torch.bfloat16 else 1e-5), (name, step, err)
    print(f"step {step}: contexts {lens}, every layer kind matches dense attention "
          f"({attention['head_windows'].active_backend})")
