"""Bands with a score_mod compiled into FlashInfer's fa3 kernel (variant.py), run by its ragged
prefill. Opt-in (FLEX_FLASH_INFER_SCORE_MOD_KERNELS=1) until it has run on a GPU; without it a
score_mod on CUDA runs on the reference backend.

Each launch is a ragged prefill whose requests are (batch entry, band) pairs; three int32 tables
indexed by the request give its first query and key position and its batch entry, so the
variant can hand the score_mod absolute positions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .codegen import kernel_tensor
from .trace import trace
from .variant import fa3_score_mod_variant

ENABLED = os.environ.get("FLEX_FLASH_INFER_SCORE_MOD_KERNELS") == "1"


class UnsupportedOnFlashInfer(ValueError):
    """This call cannot run on the FlashInfer backend (the caller falls back to the reference)."""


@dataclass
class BandLaunch:
    causal: bool
    window_left: int
    q_rows: slice        # rows of the flattened [B * Q_LEN] queries this launch reads and writes
    kv_rows: slice       # rows of the flattened [B * KV_LEN] keys
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    req_q0: torch.Tensor
    req_kv0: torch.Tensor
    req_b: torch.Tensor


def band_launches(bands, batch: int, q_len: int, kv_len: int) -> list[BandLaunch]:
    """One launch for all (b, band) requests when the bands tile both sequences with one set of
    flags; otherwise one single-request launch per (b, band)."""
    def i32(values):
        return torch.tensor(values, dtype=torch.int32)

    flags = {(b.causal, b.window_left) for b in bands}
    tiles = all(a.q_end == b.q_start and a.kv_end == b.kv_start for a, b in zip(bands, bands[1:]))
    if (len(flags) == 1 and tiles and bands[0].q_start == 0 and bands[-1].q_end == q_len
            and bands[0].kv_start == 0 and bands[-1].kv_end == kv_len):
        requests = [(b, band) for b in range(batch) for band in bands]
        qo = [0] + [b * q_len + band.q_end for b, band in requests]
        kv = [0] + [b * kv_len + band.kv_end for b, band in requests]
        causal, window = flags.pop()
        return [BandLaunch(causal, window, slice(0, batch * q_len), slice(0, batch * kv_len), i32(qo), i32(kv),
                           i32([band.q_start for _, band in requests]), i32([band.kv_start for _, band in requests]),
                           i32([b for b, _ in requests]))]
    launches = []
    for b in range(batch):
        for band in bands:
            launches.append(BandLaunch(
                band.causal, band.window_left,
                slice(b * q_len + band.q_start, b * q_len + band.q_end),
                slice(b * kv_len + band.kv_start, b * kv_len + band.kv_end),
                i32([0, band.q_end - band.q_start]), i32([0, band.kv_end - band.kv_start]),
                i32([band.q_start]), i32([band.kv_start]), i32([b])))
    return launches


class ScoreModBands:
    """Planned launches of bands with a compiled score_mod. run() gives base-2 (out, lse)."""

    def __init__(self, bands, score_mod, shape, dtype, scale, workspace):
        import flashinfer

        batch, q_len, kv_len, hq, hkv, head_dim = shape
        device = workspace.device
        graph = trace(score_mod, "score_mod")
        spec = fa3_score_mod_variant(graph)
        use_swa = any(b.window_left >= 0 for b in bands)
        uri = f"ffi_{graph.key()}_{str(dtype).split('.')[-1]}_d{head_dim}_{'swa' if use_swa else 'noswa'}"
        jit_args = spec.jit_args(uri, dtype, head_dim, torch.int32, use_swa)
        tensors = [kernel_tensor(t).to(device) for _, t in graph.tensors]
        self.extra_scalars = [float(scale)] + [v for _, _, v in graph.scalars] + [
            int(s) for t in tensors for s in t.stride()]
        self.extra_tensors = tensors
        self.shape = shape
        self.launches = []
        for launch in band_launches(bands, batch, q_len, kv_len):
            wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa3", jit_args=jit_args)
            wrapper.plan(launch.qo_indptr, launch.kv_indptr, hq, hkv, head_dim, causal=launch.causal,
                         window_left=launch.window_left, q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype)
            tables = [t.to(device) for t in (launch.req_q0, launch.req_kv0, launch.req_b)]
            self.launches.append((wrapper, launch, tables))

    def run(self, q, k, v, return_lse: bool = True):
        kf, vf = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        batch, q_len = self.shape[:2]
        if len(self.launches) == 1 and self.launches[0][1].q_rows == slice(0, batch * q_len):
            wrapper, _, tables = self.launches[0]
            return wrapper.run(q, kf, vf, *tables, *self.extra_tensors, *self.extra_scalars, return_lse=return_lse)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for wrapper, launch, tables in self.launches:
            o, s = wrapper.run(q[launch.q_rows], kf[launch.kv_rows], vf[launch.kv_rows], *tables,
                               *self.extra_tensors, *self.extra_scalars, return_lse=True)
            out[launch.q_rows], lse[launch.q_rows] = o, s
        return (out, lse) if return_lse else out
