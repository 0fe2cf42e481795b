"""flex_attention: torch FlexAttention's function, run on FlashInfer where it can be."""
from __future__ import annotations

import torch

from .backends.autograd import LearnedMemo, learned_tensors, needs_grad, recomputation_reads, with_recomputed_gradients
from .backends.backend_choice import choose_backend, read_kernel_options
from .block_mask import check_block_mask, full_block_mask, reads_memo
from .backends.flashinfer_backend import FlashInferPlan
from .core.mask_eval import check_score_mod
from .backends.reference import reference_attention, reference_gradients
from .core.compiling import outside_compiled_graphs
from .core.notices import warn_once
from .core.trace import TraceError, current_reads
from .core.versions import unwatched
from .core.validation import check_bhsd, check_scale

try:   # torch's own classes (torch >= 2.9), so code written for torch's flex_attention works unchanged
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:  # pragma: no cover - older torch
    from typing import NamedTuple

    class AuxRequest(NamedTuple):
        lse: bool = False
        max_scores: bool = False

    class AuxOutput(NamedTuple):
        lse: "torch.Tensor | None" = None
        max_scores: "torch.Tensor | None" = None

_full_masks: dict = {}


def _default_block_mask(q_len: int, kv_len: int, device):
    key = (q_len, kv_len, str(device))
    if key not in _full_masks:
        _full_masks[key] = full_block_mask(1, q_len, kv_len, device)
    return _full_masks[key]


def flashinfer_plan_for(block_mask, batch, q_len, kv_len, hq, hkv, head_dim, dtype, scale, device, score_mod=None,
                        route=None):
    """The plan cached on the block mask: built on first use, reused by later calls while what the
    mask_mod and the score_mod read is unchanged (their bands, partial tiles' bits, folded scale,
    soft cap, split and compiled constants come from those values). One plan with a score_mod is
    kept per problem shape, for the last score_mod object: a call with another one plans again."""
    key = (batch, hq, hkv, head_dim, dtype, scale, str(device), score_mod is not None, route)
    plan = block_mask._plans.get(key)
    # a number changed, a tensor written in place or re-bound plans again
    memo = reads_memo(block_mask)
    state = current_reads(block_mask.mask_mod, "mask_mod", memo)
    score_state = current_reads(score_mod, "score_mod", memo) if score_mod is not None else None
    if (plan is not None and plan.score_mod_object is score_mod and _holds(state, plan.mask_state)
            and _holds(score_state, plan.score_state)):
        return plan
    plan = FlashInferPlan(block_mask, batch, q_len, kv_len, hq, hkv, head_dim, dtype, scale, device,
                          score_mod=score_mod, route=route)
    plan.mask_state, plan.score_mod_object, plan.score_state = state, score_mod, score_state
    plan.mask_reads = state.watch() if state is not None else ()
    score_reads = score_state.watch() if score_state is not None else ()
    # one that keeps no write counter (an inference tensor) could change unseen: planned per call
    if unwatched(plan.mask_reads + score_reads):
        warn_once("flex_attention: the mask_mod or score_mod reads a tensor made under torch.inference_mode(), "
                  "which keeps no write counter: its plan is made again at every call (make the tensor "
                  "outside inference_mode to keep it)")
    elif (score_mod is None or score_state is not None) and (state is not None or block_mask.mask_mod is None):
        # a mod that does not trace (torch.bucketize) is not kept: what it reads is unknown, and
        # a table it reads rewritten would leave the plan's partial tiles on the old values
        block_mask._plans[key] = plan
    return plan


def _holds(now, then) -> bool:
    return now.same_as(then) if now is not None else then is None


def _broadcast_key_value_batch(query, key, value, block_mask):
    """Key and value of batch 1 against a query and block mask of batch B, as torch's
    flex_attention takes them (one key/value set shared by B masked entries): views of batch B."""
    tensors = (query, key, value)
    if (block_mask is None or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors)
            or key.shape[0] != 1 or value.shape[0] != 1 or query.shape[0] == 1):
        return key, value
    mask_batch = getattr(getattr(block_mask, "kv_num_blocks", None), "shape", (None,))[0]
    if mask_batch != query.shape[0]:
        return key, value
    return key.expand(query.shape[0], -1, -1, -1), value.expand(query.shape[0], -1, -1, -1)


@outside_compiled_graphs("flex_attention")
def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, return_aux=None, backend: str = "auto"):
    """Attention with a score_mod and a block mask, as torch.nn.attention.flex_attention.

    Parameters
    ----------
    query : [B, Hq, L, E]; key : [B, Hkv, S, E]; value : [B, Hkv, S, Ev]
    score_mod : score_mod(score, b, h, q_idx, kv_idx) applied to visible scaled scores, or None
    block_mask : BlockMask from create_block_mask (or a torch BlockMask); None means full attention
    scale : float, default 1 / sqrt(E)
    enable_gqa : allow Hq to be a multiple of Hkv (query head h reads key head h // (Hq // Hkv))
    return_lse : also return the natural-log logsumexp [B, Hq, L] float32 (-inf for rows that see no key)
    return_aux : AuxRequest(lse=..., max_scores=...) (torch's newer form of return_lse): returns
        (out, AuxOutput(lse, max_scores)); max_scores, each row's largest visible score after
        score_mod, comes from the reference backend only (FlashInfer's kernels do not return it)
    kernel_options : torch's per-call options: {"BACKEND": "FLASHINFER" or "REFERENCE"} as backend=,
        {"ROUTE": "bands", "bands+columns", "bands-per-head", "tiles" or "tiles-per-head"} forces a
        FlashInfer route (BlockMask.plan() shows them); torch's own keys change nothing here
    backend : "auto" (FlashInfer on CUDA when it supports the call, else reference), "flashinfer" or "reference"

    Returns
    -------
    out [B, Hq, L, Ev] in query's dtype, or (out, lse) when return_lse, or (out, AuxOutput) with return_aux.
    """
    key, value = _broadcast_key_value_batch(query, key, value, block_mask)
    B, Hq, L, E, Hkv, S, Ev = check_bhsd(query, key, value, enable_gqa, getattr(block_mask, "seq_lengths", None))
    backend, route = read_kernel_options(kernel_options, backend)
    score_mod = check_score_mod(score_mod)
    scale = check_scale(scale)
    want_lse, want_max = aux_wanted(return_lse, return_aux)
    if block_mask is None:
        block_mask = _default_block_mask(L, S, query.device)
    else:
        block_mask = check_block_mask(block_mask, B, Hq, L, S, query.device)
    chosen = choose_backend(backend, query.device, query.dtype, E, Ev, scale)
    if route is not None and chosen != "flashinfer":
        raise ValueError(f"kernel_options['ROUTE']={route!r} picks a FlashInfer route, but this call runs on the "
                         f"reference backend ({query.device.type} tensors, dtype {query.dtype}, head_dim {E})")
    if chosen == "flashinfer" and want_max:
        reason = "FlashInfer's kernels do not return each row's largest score (return_aux max_scores)"
        if backend == "flashinfer":
            raise ValueError(f"backend='flashinfer' cannot run this call: {reason}; use backend='reference'")
        warn_once(f"flex_flash_infer: running on the slow reference backend because {reason}")
        chosen = "reference"
    plan = None
    learned = []
    if chosen == "flashinfer" and score_mod is not None and torch.is_grad_enabled():
        # FlashInfer's kernels record nothing for autograd: the backward (autograd.py) recomputes
        # attention, and needs the learned tensors the score_mod reads (a bias table)
        # (searched again only once what the search reaches changed: a memo kept on the mask)
        memo = getattr(block_mask, "_learned_memo", None)
        if memo is None:
            memo = block_mask._learned_memo = LearnedMemo()
        learned = learned_tensors(score_mod, query.device, memo)
    if chosen == "flashinfer":
        sm_scale = scale if scale is not None else E ** -0.5
        try:
            plan = flashinfer_plan_for(block_mask, B, L, S, Hq, Hkv, E, query.dtype, sm_scale, query.device, score_mod,
                                       route)
        except TraceError as e:
            if backend == "flashinfer":
                raise
            warn_once(f"flex_flash_infer: running on the slow reference backend because {e}")
            chosen = "reference"
    max_scores = None
    if chosen == "reference":
        out, lse, *rest = reference_attention(query, key, value, block_mask, score_mod, scale, return_max=want_max)
        # not differentiable, as torch's (its backward marks it so)
        max_scores = rest[0].detach() if want_max else None
    else:
        out, lse = _run_flashinfer(plan, query, key, value, block_mask, score_mod, scale, learned, want_lse)
    if return_aux is not None:
        return out, AuxOutput(lse=lse if want_lse else None, max_scores=max_scores)
    return (out, lse) if return_lse else out


def _run_flashinfer(plan, query, key, value, block_mask, score_mod, scale, learned, want_lse):
    """(out [B, Hq, L, Ev], lse [B, Hq, L] or None) of the plan's kernels; when an input (or a
    tensor the score_mod reads, learned) requires grad, with a grad_fn whose backward recomputes
    attention on the reference backend (autograd.py)."""
    B, Hq, L, E = query.shape
    Ev = value.shape[-1]
    grad = needs_grad(query, key, value, *learned)

    def run():
        """The kernels' [B * L, Hq, Ev] output and [B * L, Hq] LSE, not views of anything: the
        autograd function returns these, and the [B, Hq, L] views are taken outside it (a view
        returned from inside one cannot be written in place)."""
        q = query.transpose(1, 2).reshape(B * L, Hq, E)
        if q.stride(-1) != 1:   # FlashInfer takes every stride but the last dimension's
            q = q.contiguous()
        k = key.transpose(1, 2).contiguous()
        v = value.transpose(1, 2).contiguous()
        out, lse = plan.run(q, k, v, return_lse=want_lse or grad)
        return (out if out._base is None else out.clone()), (lse if lse is None or lse._base is None else lse.clone())

    def as_bhl(out, lse):
        return out.view(B, L, Hq, Ev).transpose(1, 2), (lse.view(B, L, Hq).transpose(1, 2) if lse is not None else None)

    if not grad:
        return as_bhl(*run())

    def backward(saved, grad_out, grad_lse, needs):
        q, k, v, *tables = saved
        grad_out, grad_lse = as_bhl(grad_out, grad_lse)
        return reference_gradients(q, k, v, tables, block_mask, score_mod, scale, grad_out, grad_lse, needs)

    out, lse = as_bhl(*with_recomputed_gradients(run, backward, (query, key, value, *learned),
                                                 recomputation_reads(score_mod, block_mask.mask_mod, block_mask)))
    return out, (lse if want_lse else None)


def aux_wanted(return_lse, return_aux) -> tuple[bool, bool]:
    """(lse wanted, max_scores wanted), with torch's rules: return_aux=AuxRequest(...) replaces
    the older return_lse, and the two cannot be given together."""
    return_lse = bool(return_lse)
    if return_aux is None:
        return return_lse, False
    if not all(isinstance(getattr(return_aux, f, None), bool) for f in ("lse", "max_scores")):
        raise TypeError(f"return_aux must be an AuxRequest(lse=..., max_scores=...), got {return_aux!r}")
    if return_lse:
        raise ValueError("give return_aux=AuxRequest(lse=True) or return_lse=True, not both (as torch's flex_attention)")
    return return_aux.lse, return_aux.max_scores


