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
score_mod that only scales. A step that needs a masked launch (sinks, a mask evaluated per page)
or a compiled score_mod raises, naming what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def differences(self, other: "GraphShape") -> list[str]:
        names = {"requests": "requests", "total_q": "query rows", "heads": "(query heads, KV heads, head_dim)",
                 "dtype": "dtype", "page_size": "page_size", "scale": "scale", "soft_cap": "soft cap",
                 "window_left": "window (window_left)", "tensor_cores": "decode kernel (use_tensor_cores)"}
        return [f"{label} {getattr(self, field)!r} -> {getattr(other, field)!r}" for field, label in names.items()
                if getattr(self, field) != getattr(other, field)]


def graph_shape(plan, heads, dtype, page_size, scale, soft_cap, tensor_cores, variants) -> GraphShape:
    """The plan's GraphShape, or ValueError saying why it cannot run as a replayable step."""
    why = None
    if variants is not None:
        why = "a compiled score_mod or per-head mask (its launch reads tables built per plan)"
    elif plan.partial is not None:
        why = "a masked launch beside the decode launch (a mask that is not causal, a window or full over " \
              "these pages, such as a streaming mask's sinks)"
    elif plan.full is None:
        why = "no visible key at all"
    elif not plan.decode:
        why = "more than one query in some request, or a request without keys (a prefill or chunked step)"
    if why is not None:
        raise ValueError(f"PagedFlexAttention(use_cuda_graph=True) replays decode steps planned as one decode "
                         f"launch (causal, sliding-window or full masks, FlashInfer's soft cap, a score_mod that only "
                         f"scales); this step needs {why}. Plan it with use_cuda_graph=False")
    return GraphShape(requests=plan.full.last_page_len.numel(), total_q=plan.total_q, heads=tuple(heads),
                      dtype=dtype, page_size=page_size, scale=float(scale), soft_cap=soft_cap,
                      window_left=int(plan.full.window_left), tensor_cores=bool(tensor_cores))


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
