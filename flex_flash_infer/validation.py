"""Input checks shared by the front doors: each error names the argument and what was expected."""
from __future__ import annotations

import numbers
import weakref

import torch



def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_same_device_dtype(**tensors) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; use one dtype")


def check_heads(num_qo_heads: int, num_kv_heads: int, enable_gqa: bool = True, names=("query", "key")) -> None:
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"{names[0]} heads ({num_qo_heads}) must be a multiple of {names[1]} heads ({num_kv_heads})")
    if num_qo_heads != num_kv_heads and not enable_gqa:
        raise ValueError(
            f"{names[0]} has {num_qo_heads} heads but {names[1]} has {num_kv_heads}: pass enable_gqa=True for grouped-query attention")


def check_bhsd(query, key, value, enable_gqa: bool):
    """Shapes of FlexAttention's [B, H, S, D] inputs: returns (B, Hq, L, E, Hkv, S, Ev)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, 4, "[B, H, S, D]")
    check_same_device_dtype(query=query, key=key, value=value)
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    if Bk != B or value.shape[0] != B:
        raise ValueError(f"key and value batch must equal query batch {B}, got {Bk} and {value.shape[0]}")
    if Ek != E:
        raise ValueError(f"key head_dim {Ek} must equal query head_dim {E}")
    if value.shape[1] != Hkv or value.shape[2] != S:
        raise ValueError(f"value must have key's heads and length ({Hkv}, {S}), got {tuple(value.shape[1:3])}")
    if min(L, S) < 1:
        raise ValueError(f"sequence lengths must be >= 1, got query {L} and key {S}")
    check_heads(Hq, Hkv, enable_gqa)
    return B, Hq, L, E, Hkv, S, value.shape[-1]


_converted: dict = {}


def _from_torch_cached(torch_mask):
    """One conversion per torch BlockMask object, so its FlashInfer plan is built once too."""
    entry = _converted.get(id(torch_mask))
    if entry is not None and entry[0]() is torch_mask:
        return entry[1]
    if len(_converted) > 256:
        _converted.clear()
    from .block_mask import BlockMask  # block_mask imports this module

    mask = BlockMask.from_torch(torch_mask)
    _converted[id(torch_mask)] = (weakref.ref(torch_mask), mask)
    return mask


def check_block_mask(block_mask, batch: int, heads: int, q_len: int, kv_len: int, device):
    from .block_mask import BlockMask  # block_mask imports this module

    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "kv_num_blocks"):
            block_mask = _from_torch_cached(block_mask)
        else:
            raise TypeError(f"block_mask must be a BlockMask from create_block_mask, got {type(block_mask).__name__}")
    if block_mask.seq_lengths != (q_len, kv_len):
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN) = {block_mask.seq_lengths} but query/key have "
            f"({q_len}, {kv_len}); rebuild it with create_block_mask(..., Q_LEN={q_len}, KV_LEN={kv_len})")
    mb, mh = block_mask.shape[:2]
    if mb not in (1, batch) or mh not in (1, heads):
        raise ValueError(f"block_mask has (B, H) = ({mb}, {mh}); expected B in (1, {batch}) and H in (1, {heads})")
    if block_mask.device != torch.device(device) and not (
            block_mask.device.type == torch.device(device).type == "cuda"):
        raise ValueError(f"block_mask is on {block_mask.device} but query is on {device}; use block_mask.to(device)")
    return block_mask


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_scale(scale):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)
