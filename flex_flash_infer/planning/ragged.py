"""FlashInfer's batch ragged prefill wrapper made and planned in one place: the band runner, the
compiled score_mod bands and the far keys of a relative-position split all launch it."""
from __future__ import annotations

import torch


def planned_ragged(workspace: torch.Tensor, backend: str, qo_indptr, kv_indptr, shape, dtype, causal: bool,
                   window_left: int = -1, sm_scale=None, logits_soft_cap=None, jit_args=None):
    """A BatchPrefillWithRaggedKVCacheWrapper on backend ("fa3" or "fa2"), planned for the requests
    of qo_indptr / kv_indptr (int32, on the host); shape is (batch, q_len, kv_len, Hq, Hkv, D).
    jit_args: a compiled variant's (which applies its own scale)."""
    import flashinfer

    _, _, _, hq, hkv, head_dim = shape
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend, jit_args=jit_args)
    # no split-KV: its merge would drop a NaN LSE (nan_merge.py)
    wrapper.plan(qo_indptr, kv_indptr, hq, hkv, head_dim, causal=causal, window_left=window_left, sm_scale=sm_scale,
                 logits_soft_cap=logits_soft_cap, q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype,
                 disable_split_kv=True)
    return wrapper
