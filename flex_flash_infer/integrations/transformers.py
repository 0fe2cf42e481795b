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
from ..core.trace import current_reads
from ..core.versions import KeptReads, moved, snapshot, unwatched
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
    """A transformers 4-D mask [B or 1, Hq or 1, Q, KV] (bool, or float with large negatives) as a
    mask_mod, its batch and head counts (None where it broadcasts), and for a float mask whose
    visible entries are not all 0 (a soft bias) the bias as a score_mod term (added to the scaled
    score, as SDPA adds the mask), else None. A mask per head is read per head, as SDPA does."""
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    per_sample, per_head = visible.shape[0] > 1, visible.shape[1] > 1

    def model_mask(b, h, q_idx, kv_idx):
        return visible[b if per_sample else 0, h if per_head else 0, q_idx, kv_idx]
    batch, heads = (visible.shape[0] if per_sample else None), (visible.shape[1] if per_head else None)
    if mask.dtype != torch.bool:
        bias = torch.where(visible, mask, 0).to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
        # a mask that requires grad keeps its term even at all zeros (a learned bias at its zero
        # init must get its gradient)
        if mask.requires_grad or bool((bias != 0).any()):
            def bias_term(score, b, h, q_idx, kv_idx):
                return score + bias[b if per_sample else 0, h if per_head else 0, q_idx, kv_idx]
            return model_mask, batch, heads, bias_term
    return model_mask, batch, heads, None


def _with_model_softcap(score_mod, softcap):
    """The model's own logit soft cap (Gemma 2's attn_logit_softcapping, passed as softcap), then
    any score_mod given with attention_mods() or the config."""
    if not softcap:
        return score_mod
    return _then(generate_softcap_score_mod(float(softcap)), score_mod)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' attention interface: query [B, Hq, Q, D], key/value [B, Hkv, KV, D] ->
    ([B, Q, Hq, D], None). is_causal: without a mask, the call's own say (as transformers' SDPA
    gives it first), else the module's is_causal, else causal."""
    if dropout and module.training:
        raise ValueError("flex_flash_infer attention is for inference: dropout must be 0 (call model.eval())")
    config = getattr(module, "config", None)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("flex_flash_infer attention does not support learned attention sinks "
                                  "(the model passed s_aux or sinks); use attn_implementation='eager' for this model")
    # T5's bias, sparse attention's indices or block selection (MiniMax-M3 passes block_indices with
    # no mask to implementations other than eager and sdpa): never dropped silently
    for name in ("position_bias", "indices", "block_indices"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flex_flash_infer attention does not take the model's {name}= argument; "
                                      "use attn_implementation='eager' for this model")
    mask_mod, users_score_mod = getattr(_local, "mods", None) or (None, None)
    mask_mod = mask_mod or getattr(config, "flex_flash_infer_mask_mod", None)
    users_score_mod = users_score_mod or getattr(config, "flex_flash_infer_score_mod", None)
    B, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    offset = kv_len - q_len
    if mask_mod is not None or users_score_mod is not None:
        # the user's mods see the cache slot as the position: raise where the model's differ
        _check_positions(kwargs.get("position_ids"), attention_mask, offset, q_len, kv_len,
                         "mask_mod" if mask_mod is not None else "score_mod")
    # the user's score_mod on absolute positions (the model's soft cap reads none); a float mask's
    # bias below is indexed by the mask's own rows, so it is added after the shift
    score_mod = _shifted(check_score_mod(_with_model_softcap(users_score_mod, kwargs.get("softcap"))), offset, 5)
    mask_batch = mask_heads = None
    if mask_mod is not None:
        mod, owner = _shifted(as_mask_mod(mask_mod), offset, 4), mask_mod
        # a mask that reads b (per-sample documents) or h (per-head windows) gets tables per
        # sample or head: tables of b = 0, h = 0 alone would be broadcast to the others
        uses_b, uses_h = mask_dependence(mod, B, query.shape[1], q_len, kv_len, query.device)
        mask_batch, mask_heads = (B if uses_b else None), (query.shape[1] if uses_h else None)
    elif attention_mask is not None:
        (mod, mask_batch, mask_heads, bias_term), owner = _dense_mask_mod(attention_mask), attention_mask
        if bias_term is not None:
            score_mod = _then(score_mod, bias_term)
    elif is_causal if is_causal is not None else getattr(module, "is_causal", True):
        # no mask: SDPA's is_causal, aligned to the top left (an empty static cache's prefill has
        # kv_len > q_len, the slots past the queries empty); one query sees every key
        mod, owner = (_CAUSAL, _CAUSAL) if q_len > 1 else (None, None)
    else:
        mod, owner = None, None
    block_mask = None
    if mod is not None:
        # One block mask per (mask object, shape), shared by all layers of a forward pass. The
        # entry holds a weak reference and is used only while that very object is alive, so a
        # new mask that reuses an old id never gets a stale block mask.
        # Its entry also holds what the mask read when built (the 4-D mask itself; a mask_mod's
        # numbers, expression and tables): a buffer written in place or re-bound, or a number the
        # mask_mod reads changed since, builds it again.
        key_ = (id(owner), offset, q_len, kv_len, mask_batch, mask_heads, str(query.device))
        entry = _block_masks.get(key_)
        if entry is not None and entry[0]() is not owner:   # another object at a reused id
            entry = None
        state = None
        if isinstance(owner, torch.Tensor):
            reads = snapshot([owner])
            holds = entry is not None and not moved(entry[1]) and entry[1][0][0] is owner and not unwatched(reads)
        else:   # on the CPU compared by value too (.data, numpy); a mask that does not trace: kept
            state = current_reads(mod, "mask_mod")
            holds = entry is not None and (entry[1] is None if state is None else
                                           entry[1] is not None and entry[1].holds(state)
                                           and not unwatched(state.watch()))
        if holds:
            block_mask = entry[2]
        else:
            if len(_block_masks) > 64:
                _block_masks.clear()
            block_mask = create_block_mask(mod, mask_batch, mask_heads, q_len, kv_len, device=query.device)
            if not isinstance(owner, torch.Tensor):   # copied only when built
                reads = KeptReads(state) if state is not None else None
            _block_masks[key_] = (weakref.ref(owner), reads, block_mask)
    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _then(first, second):
    """The score_mod applying first, then second (either may be None): the model's soft cap then a
    given score_mod; a score_mod then a float mask's bias, as SDPA adds the mask last."""
    if first is None or second is None:
        return second if first is None else first
    first, second = check_score_mod(first), check_score_mod(second)

    def first_then_second(score, b, h, q_idx, kv_idx):
        return second(first(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)
    return first_then_second


def _check_positions(position_ids, attention_mask, offset: int, q_len: int, kv_len: int, what: str) -> None:
    """A user's mask_mod or score_mod (`what`) sees the cache slot as the position (queries the last
    q_len of kv_len slots).
    Where the model's positions say otherwise, raise rather than mask the wrong tokens: a padded
    batch (the padding would be visible), a static cache (empty slots past the queries) or a
    sliding cache (slots that no longer start at position 0)."""
    if attention_mask is not None and q_len > 1:   # (one query's mask may hide keys for its window alone)
        visible = attention_mask if attention_mask.dtype == torch.bool else \
            attention_mask > torch.finfo(attention_mask.dtype).min / 2
        if not bool(visible[:, 0].any(-2).all()):
            raise NotImplementedError(f"attention_mods({what}=...) with a padded batch (keys no query sees): "
                                      f"the {what} would see the padding's slots as positions; run the rows unpadded")
    if position_ids is not None:
        first = position_ids[..., 0].reshape(-1)
        if bool((first != offset).any()):
            raise NotImplementedError(
                f"attention_mods({what}=...) takes the cache slot as the position, but the model's positions "
                f"start at {int(first.min())}, not {offset} ({kv_len} cached slots, {q_len} queries): a static or "
                "sliding-window cache, or padding; use the dynamic cache (the default) with unpadded rows")
        slots = torch.arange(offset, offset + q_len, device=position_ids.device)
        if position_ids.shape[-1] == q_len and bool((position_ids != slots).any()):
            raise NotImplementedError(
                f"attention_mods({what}=...) takes the cache slot as the position, but the model's positions "
                "do not count up one per token (packed sequences restart them): the model keeps each packed "
                f"sequence apart and the {what} would not; run the sequences as rows of their own")


def register(name: str = NAME) -> str:
    """Register the attention (and its mask builder) with transformers under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)  # None for plain causal, else a bool mask
    return name
