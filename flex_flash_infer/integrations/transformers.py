"""Run a transformers model's attention through flex-flash-infer.

    from flex_flash_infer.integrations.transformers import register, attention_mods
    register()                                             # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flex_infer")
    with attention_mods(mask_mod=get_mask_fn("sliding_window", window_size=256)):
        logits = model(input_ids).logits

Without a mask_mod the model's own mask is used: none at all for plain causal attention (the
causal pattern is then lowered to FlashInfer's causal kernel), else the boolean mask
transformers builds (padding, sliding-window layers) as a captured tensor. A mask_mod or
score_mod set with attention_mods() (or as config.flex_flash_infer_mask_mod /
config.flex_flash_infer_score_mod) replaces the model's pattern; it sees absolute positions,
so it holds while generating with a KV cache. A model's own logit soft cap (Gemma 2's softcap)
runs as a score_mod, before any score_mod given here; learned attention sinks (s_aux) raise.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from ..api import flex_attention
from ..block_mask import create_block_mask
from ..core.mask_eval import as_mask_mod, check_score_mod, mask_dependence
from ..mods.causal import generate_causal_mask_mod
from ..mods.softcap import generate_softcap_score_mod

# transformers treats every implementation name containing "flash" as a FlashAttention kernel
# (transformers.utils.generic.is_flash_attention_requested), so the name avoids that word.
NAME = "flex_infer"
_local = threading.local()
_CAUSAL = generate_causal_mask_mod()
_block_masks: dict = {}


@contextlib.contextmanager
def attention_mods(mask_mod=None, score_mod=None):
    """Use this mask_mod / score_mod for every attention call inside the block."""
    previous = getattr(_local, "mods", None)
    _local.mods = (None if mask_mod is None else as_mask_mod(mask_mod), check_score_mod(score_mod))
    try:
        yield
    finally:
        _local.mods = previous


def _shifted(mod, offset: int, n_args: int):
    """The mod on absolute query positions: queries are the last q_len of kv_len positions."""
    if mod is None or offset == 0:
        return mod
    if n_args == 4:
        def shifted_mask(b, h, q_idx, kv_idx):
            return mod(b, h, q_idx + offset, kv_idx)
        return shifted_mask

    def shifted_score(score, b, h, q_idx, kv_idx):
        return mod(score, b, h, q_idx + offset, kv_idx)
    return shifted_score


def _dense_mask_mod(mask: torch.Tensor):
    """A transformers 4-D mask [B or 1, 1, Q, KV] (bool, or float with large negatives) as a mask_mod."""
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    visible = visible[:, 0]

    def model_mask(b, h, q_idx, kv_idx):
        return visible[b if visible.shape[0] > 1 else 0, q_idx, kv_idx]
    return model_mask, visible.shape[0]


def _with_model_softcap(score_mod, softcap):
    """The model's own logit soft cap (Gemma 2's attn_logit_softcapping, passed as softcap), then
    any score_mod given with attention_mods() or the config."""
    if not softcap:
        return score_mod
    capped = generate_softcap_score_mod(float(softcap))
    if score_mod is None:
        return capped
    score_mod = check_score_mod(score_mod)

    def softcap_then_score_mod(score, b, h, q_idx, kv_idx):
        return score_mod(capped(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)
    return softcap_then_score_mod


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: query [B, Hq, Q, D], key/value [B, Hkv, KV, D] ->
    ([B, Q, Hq, D], None)."""
    if dropout and module.training:
        raise ValueError("flex_flash_infer attention is for inference: dropout must be 0 (call model.eval())")
    config = getattr(module, "config", None)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("flex_flash_infer attention does not support learned attention sinks "
                                  "(the model passed s_aux); use attn_implementation='eager' for this model")
    mask_mod, score_mod = getattr(_local, "mods", None) or (None, None)
    mask_mod = mask_mod or getattr(config, "flex_flash_infer_mask_mod", None)
    score_mod = _with_model_softcap(score_mod or getattr(config, "flex_flash_infer_score_mod", None),
                                    kwargs.get("softcap"))
    B, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    offset = kv_len - q_len
    mask_batch = mask_heads = None
    if mask_mod is not None:
        mod, owner = _shifted(as_mask_mod(mask_mod), offset, 4), mask_mod
        # a mask that reads b (per-sample documents) or h (per-head windows) gets tables per
        # sample or head: tables of b = 0, h = 0 alone would be broadcast to the others
        uses_b, uses_h = mask_dependence(mod, B, query.shape[1], q_len, kv_len, query.device)
        mask_batch, mask_heads = (B if uses_b else None), (query.shape[1] if uses_h else None)
    elif attention_mask is not None:
        (mod, mask_batch), owner = _dense_mask_mod(attention_mask), attention_mask
    elif getattr(module, "is_causal", True):
        mod, owner = _shifted(_CAUSAL, offset, 4), _CAUSAL
    else:
        mod, owner = None, None
    block_mask = None
    if mod is not None:
        # One block mask per (mask object, shape), shared by all layers of a forward pass. The
        # entry holds a weak reference and is used only while that very object is alive, so a
        # new mask that reuses an old id never gets a stale block mask.
        key_ = (id(owner), offset, q_len, kv_len, mask_batch, mask_heads, str(query.device))
        entry = _block_masks.get(key_)
        if entry is not None and entry[0]() is owner:
            block_mask = entry[1]
        else:
            if len(_block_masks) > 64:
                _block_masks.clear()
            block_mask = create_block_mask(mod, mask_batch, mask_heads, q_len, kv_len, device=query.device)
            _block_masks[key_] = (weakref.ref(owner), block_mask)
    out = flex_attention(query, key, value, score_mod=_shifted(check_score_mod(score_mod), offset, 5),
                         block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention (and its mask builder) with transformers under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)  # None for plain causal, else a bool mask
    return name
