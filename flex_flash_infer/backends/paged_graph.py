"""PagedFlexAttention(use_cuda_graph=True): a CUDA graph captured around run() once, replayed
after every later plan().

A captured graph replays the kernels it saw, with the pointers and launch numbers they had. So the
plans it replays must run the same launches (the same FlashInfer wrappers, kernels and flags) and
every table a launch reads must lie in the same device memory, rewritten in place by each plan().
FlashInfer's own CUDA-graph mode does the second: a wrapper made with use_cuda_graph=True and
fixed buffers copies each plan's tables into them, and fixes the batch size and the launch grid.
This module decides whether a plan can run so, and what must stay as at the first plan: checked
at plan() before anything is written, so a step that cannot replay raises there and the graph
still replays the plan before it.

What runs so: a decode step (one query per request) planned as one decode launch, the serving
loop's common step: causal, sliding-window and full masks, FlashInfer's own soft cap and a
score_mod that only scales; and the library's streaming mask, whose sinks take a bit-mask launch
beside the window's decode launch (planned at every step then, each request listing at least a
hidden key, and at most MAX_COLUMN_PAGES sink pages a request). A step that needs a compiled
score_mod, or a mask evaluated page by page, raises, naming what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..planning.paged_plan import MAX_COLUMN_PAGES


@dataclass(frozen=True)
class GraphShape:
    """What a captured graph fixes: the step's batch and query rows, and its launch."""
    requests: int
    total_q: int
    heads: tuple
    dtype: torch.dtype
    page_size: int
    scale: float
    soft_cap: float | None
    window_left: int
    tensor_cores: bool
    masked: bool   # the sinks' bit-mask launch beside the decode launch

    def differences(self, other: "GraphShape") -> list[str]:
        names = {"requests": "requests", "total_q": "query rows", "heads": "(query heads, KV heads, head_dim)",
                 "dtype": "dtype", "page_size": "page_size", "scale": "scale", "soft_cap": "soft cap",
                 "window_left": "window (window_left)", "tensor_cores": "decode kernel (use_tensor_cores)",
                 "masked": "masked launch (a streaming mask's sinks)"}
        return [f"{label} {getattr(self, field)!r} -> {getattr(other, field)!r}" for field, label in names.items()
                if getattr(self, field) != getattr(other, field)]


def graph_shape(plan, heads, dtype, page_size, scale, soft_cap, tensor_cores, variants) -> GraphShape:
    """The plan's GraphShape, or ValueError saying why it cannot run as a replayable step."""
    why = None
    requests = plan.qo_indptr.numel() - 1
    if variants is not None:
        why = "a compiled score_mod or per-head mask (its launch reads tables built per plan)"
    elif plan.total_q != requests:
        why = "more than one query in some request (a prefill, chunked or verification step)"
    elif plan.full is None or not plan.decode or plan.partial is not None and plan.full.window_left < 0:
        why = ("a mask evaluated page by page, or a request without keys (no decode launch over whole pages "
               "for every request, or a masked launch with no bound that fixed buffers could hold)")
    if why is not None:
        raise ValueError(f"PagedFlexAttention(use_cuda_graph=True) replays decode steps planned as one decode "
                         f"launch (causal, sliding-window or full masks, FlashInfer's soft cap, a score_mod that only "
                         f"scales), with the sinks' masked launch for a streaming mask; this step needs {why}. "
                         f"Plan it with use_cuda_graph=False")
    return GraphShape(requests=plan.full.last_page_len.numel(), total_q=plan.total_q, heads=tuple(heads),
                      dtype=dtype, page_size=page_size, scale=float(scale), soft_cap=soft_cap,
                      window_left=int(plan.full.window_left), tensor_cores=bool(tensor_cores),
                      masked=plan.partial is not None)


def masked_buffers(requests: int, page_size: int, device) -> dict:
    """The fixed tables of the sinks' masked launch (FlashInfer's prefill wrapper in CUDA-graph
    mode): at most MAX_COLUMN_PAGES pages of one query's bits a request, the most a plan lists
    there (beyond it paged_plan._with_column_pages evaluates the pages instead, and graph_shape
    refuses that plan)."""
    return dict(qo_indptr_buf=torch.empty(requests + 1, dtype=torch.int32, device=device),
                paged_kv_indptr_buf=torch.empty(requests + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buf=torch.empty(requests * MAX_COLUMN_PAGES, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buf=torch.empty(requests, dtype=torch.int32, device=device),
                custom_mask_buf=torch.empty(requests * -(-MAX_COLUMN_PAGES * page_size // 8), dtype=torch.uint8,
                                            device=device),
                mask_indptr_buf=torch.empty(requests + 1, dtype=torch.int32, device=device))


def check_same_shape(first: GraphShape | None, now: GraphShape, max_num_pages: int, pages: int):
    """ValueError when this step cannot replay the graph of the first plan's shape."""
    if pages > max_num_pages:
        raise ValueError(f"PagedFlexAttention(use_cuda_graph=True): this step lists {pages} pages, more than "
                         f"max_num_pages ({max_num_pages}), the size of the page-id buffer a graph reads")
    if first is not None and first != now:
        raise ValueError("PagedFlexAttention(use_cuda_graph=True): a captured graph replays the first plan's "
                         f"launch, and this step differs in {'; '.join(first.differences(now))}. Use one "
                         "PagedFlexAttention per captured graph (a server keeps one per batch size)")


def decode_buffers(requests: int, max_num_pages: int, device) -> dict:
    """The fixed tables FlashInfer's decode wrapper copies each plan into under use_cuda_graph."""
    return dict(paged_kv_indptr_buffer=torch.empty(requests + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.empty(max_num_pages, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.empty(requests, dtype=torch.int32, device=device))
