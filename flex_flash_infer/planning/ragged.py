"""FlashInfer's batch ragged prefill wrapper made and planned in one place: the band runner, the
compiled score_mod bands and the far keys of a relative-position split all launch it."""
from __future__ import annotations

import weakref

import torch

# planned wrappers, by everything their construction and plan() were given, while some plan still
# holds them: a prepare() of the same launch (a model's next layer, the same mask prepared again)
# reuses one instead of paying FlashInfer's plan() again, the largest part of a long prepare()
# (docs/benchmarks.md). A plan only ever runs its wrappers, never plans them again, and a
# wrapper's run() keeps nothing of a call, so plans may share one (prepared on the same stream).
# Weak: when the last plan holding a wrapper goes, so do its buffers (8 MB on the device and 8 MB
# pinned each).
_planned = weakref.WeakValueDictionary()


def planned_ragged(workspace: torch.Tensor, backend: str, qo_indptr, kv_indptr, shape, dtype, causal: bool,
                   window_left: int = -1, sm_scale=None, logits_soft_cap=None, jit_args=None):
    """A BatchPrefillWithRaggedKVCacheWrapper on backend ("fa3" or "fa2"), planned for the requests
    of qo_indptr / kv_indptr (int32, on the host); shape is (batch, q_len, kv_len, Hq, Hkv, D).
    jit_args: a compiled variant's (which applies its own scale)."""
    import flashinfer

    key = None
    # FlashInfer's own kernels only: a compiled variant's wrapper is its plan's alone (the CPU model
    # of FlashInfer binds a variant's host code, values included, to its wrapper); host tables
    # only (reading device ones would wait for the GPU)
    if jit_args is None and qo_indptr.device.type == "cpu" and kv_indptr.device.type == "cpu":
        # FlashInfer's plan() copies its tables to the GPU on the stream current then, unsynchronised:
        # a wrapper is shared only with plans made on the same stream, which its run is ordered after
        stream = None
        if workspace.device.type == "cuda" and torch.cuda.is_available():
            stream = getattr(torch.cuda.current_stream(workspace.device), "cuda_stream", None)
        key = (workspace.data_ptr(), str(workspace.device), stream, backend, tuple(qo_indptr.tolist()),
               tuple(kv_indptr.tolist()), tuple(shape), dtype, bool(causal), int(window_left),
               None if sm_scale is None else float(sm_scale),
               None if logits_soft_cap is None else float(logits_soft_cap), id(flashinfer))
        wrapper = _planned.get(key)
        if wrapper is not None:
            return wrapper
    _, _, _, hq, hkv, head_dim = shape
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend, jit_args=jit_args)
    # no split-KV: its merge would drop a NaN LSE (nan_merge.py)
    wrapper.plan(qo_indptr, kv_indptr, hq, hkv, head_dim, causal=causal, window_left=window_left, sm_scale=sm_scale,
                 logits_soft_cap=logits_soft_cap, q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype,
                 disable_split_kv=True)
    if key is not None:
        _planned[key] = wrapper
    return wrapper
