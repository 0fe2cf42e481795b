"""Bands with a score_mod compiled into FlashInfer's fa3 kernel (variant.py), run by its ragged
prefill. Masks that take the tiles route run a score_mod in tile_kernels' paged variants. On a
GPU older than Hopper the bands run the fa2 variant (variant.fa2_score_mod_variant).

Each launch is a ragged prefill whose requests are (batch entry, band) pairs (bands.band_launches);
three int32 tables indexed by the request give its first query and key position and its batch
entry, so the variant can hand the score_mod absolute positions.

On fa3 the module is the generic variant with the score_mod linked in by device LTO where it fits
(lto_score_mods.py), else the score_mod's own variant module.
"""
from __future__ import annotations

import hashlib

import torch

from ..planning.bands import band_launches
from ..masks.tile_bounds import check_table_indices
from ..compile.codegen import position_bound_for
from ..planning.ragged import planned_ragged
from ..core.trace import trace
from ..compile import lto_variants
from ..compile.variant import fa2_score_mod_variant, fa3_score_mod_variant, graph_values
from . import lto_score_mods


class ScoreModBands:
    """Planned launches of bands with a compiled score_mod, on fa3 (Hopper) or fa2 (older GPUs:
    the variant also applies the sliding window, as FlashInfer's own fa2 variant does). run()
    gives base-2 (out, lse)."""

    def __init__(self, bands, score_mod, shape, dtype, scale, workspace, hopper: bool = True):
        batch, q_len, kv_len, hq, _, head_dim = shape
        device = workspace.device
        graph = trace(score_mod, "score_mod")
        check_table_indices(graph, batch, hq, q_len, kv_len, "cpu", "score_mod")
        bound = position_bound_for(batch, hq, q_len, kv_len)
        self.hopper = hopper
        backend = "fa3" if hopper else "fa2"
        use_swa = any(b.window_left >= 0 for b in bands)
        self.extra_tensors, values = graph_values(graph, device)
        # fa3: the generic module with this score_mod linked in by device LTO where it fits
        # (lto_score_mods.py, said when not); it takes the generic slots as run arguments
        self.lto = lto_score_mods.lto_module(graph, bound, dtype, head_dim, use_swa) if hopper else None
        if self.lto is not None:
            jit_args, module, self.module_name = self.lto.jit_args, self.lto.loaded, self.lto.name
            # the KernelCopies' tensors themselves: refresh() rewrites them in place
            self.extra_args = lto_variants.run_arguments(graph, list(self.extra_tensors), values, scale)
        else:
            spec = fa3_score_mod_variant(graph, bound) if hopper else fa2_score_mod_variant(graph, bound)
            # the code's own hash: a changed code generator never reuses a stale cached module
            self.module_name = uri = (f"ffi_{'' if hopper else 'fa2_'}{hashlib.sha256(spec.decl.encode()).hexdigest()[:16]}_"
                                      f"{str(dtype).split('.')[-1]}_d{head_dim}_{'swa' if use_swa else 'noswa'}")
            jit_args, module = spec.jit_args(uri, dtype, head_dim, torch.int32, use_swa), None
            self.extra_args = [*self.extra_tensors, float(scale), *values]
        self.shape = shape
        self.launches = []
        for launch in band_launches(bands, batch, q_len, kv_len):
            window_left = launch.window_left
            if hopper and use_swa and window_left < 0:
                # the fa3 module has its window on for every launch (FlashInfer's fa3 kernel takes it
                # from the module, not the launch): one without a window gets one wider than its
                # keys, which hides nothing; -1 there would hide every key (rows 0, LSE -inf). The fa2
                # variant reads -1 as no window, as FlashInfer's own does
                window_left = int(launch.kv_indptr.diff().max()) if launch.kv_indptr.numel() > 1 else 0
            wrapper = planned_ragged(workspace, backend, launch.qo_indptr, launch.kv_indptr, shape, dtype, launch.causal,
                                     window_left, jit_args=jit_args, module=module)
            tables = [t.to(device) for t in (launch.req_q0, launch.req_kv0, launch.req_b)]
            self.launches.append((wrapper, launch, tables))

    def run(self, q, k, v, return_lse: bool = True):
        self.extra_tensors.refresh()   # tables the score_mod reads, as they are now
        kf, vf = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        batch, q_len = self.shape[:2]
        if len(self.launches) == 1 and self.launches[0][1].writes_all(batch, q_len):
            wrapper, launch, tables = self.launches[0]
            return wrapper.run(*launch.inputs(q, kf, vf), *tables, *self.extra_args,
                               return_lse=return_lse)
        # contiguous whatever q's strides (a batch-1 query is a strided view): FlashInfer's
        # merge_state, which a far split runs on rows of it, takes contiguous tensors only
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for wrapper, launch, tables in self.launches:
            o, s = wrapper.run(*launch.inputs(q, kf, vf), *tables, *self.extra_args,
                               return_lse=True)
            out[launch.q_rows], lse[launch.q_rows] = o, s
        return (out, lse) if return_lse else out
