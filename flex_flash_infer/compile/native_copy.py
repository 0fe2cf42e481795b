"""FlashInfer's own fa3 prefill kernels, built as this library's module with the one mask mode a
launch runs, where FlashInfer's module for them is neither prebuilt nor built here.

FlashInfer's native fa3 batch-prefill module for a (dtype, head_dim, window flag, soft-cap flag)
holds 8 kernel files (mask modes none, causal, bit mask and multi-item scoring, each for the ragged
and the paged kernel) and 3 host files; the README's main job waited for all 11 (docs/benchmarks.md)
where its causal check runs one mode. The same kernels -
FlashInfer's hopper DefaultAttention, its parameters, its generated sources - are asked for here
through FlashInfer's own generator for custom variants, under a name of this library's that ends in
the one mode the launch runs (lean_modules keeps that mode's kernel files and switches over it
alone; another mode raises, never a different kernel): 2 kernel files instead of 8.

A module FlashInfer already has (flashinfer-jit-cache's prebuilt ones, or one built here before)
is used as it is: it costs nothing more, and it is the same code. The choice is made once per
configuration and process.
"""
from __future__ import annotations

import hashlib

import torch

from . import lean_modules

_DECL = "#include<flashinfer/attention/hopper/variants.cuh>"
# FlashInfer 0.7's fa3 DefaultAttention arguments, in its order (jit/attention/modules.py,
# _gen_batch_prefill_module): its optional tensors, then its scalars; this library's other modules of
# that variant (head_windows, tile_gather) put their own tables before them
FLASHINFER_TENSORS = (["maybe_prefix_len_ptr", "maybe_token_pos_in_items_ptr", "maybe_max_item_len_ptr", "maybe_scale_v"],
                      ["uint32_t", "uint16_t", "uint16_t", "float"])
FLASHINFER_SCALARS = (["logits_soft_cap", "sm_scale", "scale_v_scalar", "token_pos_in_items_len"],
                      ["double", "double", "double", "int64_t"])
_TENSORS, _SCALARS = FLASHINFER_TENSORS, FLASHINFER_SCALARS
URI_PREFIX = f"{lean_modules.OWN_URI_PREFIX}native_"
_VARIANTS = {cap: f"DefaultAttention<{'true' if cap else 'false'}>" for cap in (False, True)}
# the module's name hashes its code: a changed one never loads a stale build
_CODE = {cap: hashlib.sha256(repr((_DECL, _TENSORS, _SCALARS, v)).encode()).hexdigest()[:12] for cap, v in _VARIANTS.items()}

_own_module_here = {}   # (dtype, head_dim, window, soft cap) -> whether FlashInfer's own module is there


def jit_args(dtype, head_dim: int, causal: bool, window: bool, soft_cap: bool) -> list:
    """FlashInfer's gen_customize_batch_prefill_module arguments of its native fa3 kernels with the
    window and soft-cap flags given, for the mask mode `causal` selects alone."""
    lean_modules.install()
    variant = _VARIANTS[bool(soft_cap)]
    uri = (f"{URI_PREFIX}{_CODE[bool(soft_cap)]}_{str(dtype).split('.')[-1]}_d{head_dim}_{'swa' if window else 'noswa'}"
           f"{lean_modules.only_mode_suffix(1 if causal else 0)}")
    return [uri, dtype, dtype, dtype, torch.int32, head_dim, head_dim, *_TENSORS, *_SCALARS, variant, _DECL, 0,
            window, soft_cap]


def is_native_copy(jit_args) -> bool:
    return jit_args is not None and str(jit_args[0]).startswith(URI_PREFIX)


def run_arguments(soft_cap: float | None, sm_scale: float) -> tuple:
    """What run() passes after q, k, v: FlashInfer's optional tensors unset, then its scalars as its
    own run() fills them (no soft cap: 0; no value scale: 1)."""
    return (None, None, None, None, 0.0 if soft_cap is None else float(soft_cap), float(sm_scale), 1.0, 0)


def flashinfer_has_its_own(dtype, head_dim: int, window: bool, soft_cap: bool) -> bool:
    """Whether FlashInfer's own fa3 module for this configuration is prebuilt or already built here
    (then it is used); asked once per configuration and process. A FlashInfer without the
    generator this reads (another version, or a stand-in) keeps its own module."""
    key = (dtype, head_dim, bool(window), bool(soft_cap))
    if key not in _own_module_here:
        _own_module_here[key] = _ask_flashinfer(dtype, head_dim, window, soft_cap)
    return _own_module_here[key]


def _ask_flashinfer(dtype, head_dim: int, window: bool, soft_cap: bool) -> bool:
    import flashinfer

    # the generator FlashInfer's wrappers call for this module (prefill.get_batch_prefill_module):
    # its spec says whether the module is prebuilt (is_aot) or in the JIT cache (is_compiled)
    generate = getattr(getattr(flashinfer, "prefill", None), "gen_batch_prefill_module", None)
    try:
        spec = generate("fa3", dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, bool(window), bool(soft_cap),
                        False)
        return bool(spec.is_aot or spec.is_compiled)
    except (AttributeError, TypeError):
        return True
