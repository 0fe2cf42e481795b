"""A stand-in for the few FlashInfer calls the library makes, computed by the CPU model in
paged_simulator.py, so the glue around the kernels (layouts, LSE bases, merges) runs in CPU tests."""
import types

import torch

from paged_simulator import merge_state as _merge_state
from paged_simulator import paged_prefill


class BatchPrefillWithPagedKVCacheWrapper:
    def __init__(self, workspace, layout="NHD", backend="auto"):
        assert layout == "NHD"
        self.backend = backend

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim_qk=None,
             page_size=None, causal=False, sm_scale=None, custom_mask=None, q_data_type=None, kv_data_type=None,
             o_data_type=None, **_):
        if custom_mask is not None:
            assert self.backend == "fa2" and custom_mask.dtype == torch.bool
        self.args = (qo_indptr.cpu(), kv_indptr.cpu(), kv_indices.cpu(), last_page_len.cpu())
        self.causal, self.mask = causal, None if custom_mask is None else custom_mask.cpu()
        self.heads = (num_qo_heads, num_kv_heads)
        self.scale = head_dim_qk ** -0.5 if sm_scale is None else sm_scale

    def run(self, q, kv_cache, return_lse=False):
        k, v = kv_cache
        assert q.shape[1] == self.heads[0] and k.shape[2] == self.heads[1]
        out, lse = paged_prefill(q.cpu(), k.cpu(), v.cpu(), *self.args, self.scale, self.mask, causal=self.causal)
        out, lse = out.to(q.dtype).to(q.device), lse.float().to(q.device)
        return (out, lse) if return_lse else out


class BatchDecodeWithPagedKVCacheWrapper(BatchPrefillWithPagedKVCacheWrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):
        qo_indptr = torch.arange(indptr.numel(), dtype=torch.int32)
        super().plan(qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                     sm_scale=kw.get("sm_scale"))


def merge_state(o_a, s_a, o_b, s_b):
    out, lse = _merge_state(o_a.double(), s_a.double(), o_b.double(), s_b.double())
    return out.to(o_a.dtype), lse.float()


def module():
    return types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=BatchPrefillWithPagedKVCacheWrapper,
                                 BatchDecodeWithPagedKVCacheWrapper=BatchDecodeWithPagedKVCacheWrapper,
                                 merge_state=merge_state, __version__="fake")
