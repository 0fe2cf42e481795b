"""Input checks shared by the front doors: each error names the argument and what was expected."""
from __future__ import annotations

import numbers

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


def check_heads(num_qo_heads: int, num_kv_heads: int, enable_gqa: bool = True, names=("query", "key"),
                hint: str = "") -> None:
    for name, n in zip(names, (num_qo_heads, num_kv_heads)):
        if n < 1:
            raise ValueError(f"{name} has {n} heads; at least 1 is needed")
    unit = "" if names[0].startswith("num_") else " heads"   # an argument's name says heads already
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"{names[0]}{unit} ({num_qo_heads}) must be a multiple of {names[1]}{unit} ({num_kv_heads})"
                         f"{hint}")
    if num_qo_heads != num_kv_heads and not enable_gqa:
        raise ValueError(
            f"{names[0]} has {num_qo_heads} heads but {names[1]} has {num_kv_heads}: pass enable_gqa=True for "
            f"grouped-query attention{hint}")


def _swapped_layout_hint(query, key) -> str:
    """A note for shape errors when the inputs could be [B, S, H, D] rather than [B, H, S, D]."""
    hq, hkv = query.shape[2], key.shape[2]   # the heads, were the layout swapped
    if query.shape[1] == key.shape[1] and hq == hkv or min(query.shape[1], key.shape[1], hkv) < 1 or hq % hkv:
        return ""
    return (f" (if query and key are [B, S, H, D] with {hq} and {hkv} heads, transpose them: flex_attention "
            f"takes [B, H, S, D], e.g. query.transpose(1, 2))")


def check_bhsd(query, key, value, enable_gqa: bool, seq_lengths=None):
    """Shapes of FlexAttention's [B, H, S, D] inputs: returns (B, Hq, L, E, Hkv, S, Ev).
    seq_lengths: the block mask's (Q_LEN, KV_LEN), to recognize [B, S, H, D] inputs by."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, 4, "[B, H, S, D]")
    check_same_device_dtype(query=query, key=key, value=value)
    if query.device.type == "meta":   # (was "Cannot copy out of meta tensor", from deep inside a plan)
        raise ValueError("query, key and value are on the meta device, which holds no values: flex_attention "
                         "computes on CPU or CUDA tensors (torch's flex_attention refuses meta inputs too)")
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    if seq_lengths is not None and tuple(seq_lengths) != (L, S) and tuple(seq_lengths) == (Hq, Hkv):
        raise ValueError(
            f"query and key look like [B, S, H, D]: their dim 1 ({Hq}, {Hkv}) is the block mask's (Q_LEN, KV_LEN) "
            f"= {tuple(seq_lengths)}, their dim 2 ({L}, {S}) is not. flex_attention takes [B, H, S, D]: pass "
            "query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2) (and transpose the output back)")
    hint = _swapped_layout_hint(query, key)
    if Bk != B or value.shape[0] != B:
        raise ValueError(f"key and value batch must equal query batch {B}, got {Bk} and {value.shape[0]}")
    if Ek != E:
        raise ValueError(f"key head_dim {Ek} must equal query head_dim {E}")
    if E < 1:
        raise ValueError(f"query and key have head_dim 0 (shape {tuple(query.shape)}); head_dim must be >= 1")
    if value.shape[1] != Hkv or value.shape[2] != S:
        raise ValueError(f"value must have key's heads and length ({Hkv}, {S}), got {tuple(value.shape[1:3])}")
    if min(L, S) < 1:
        raise ValueError(f"sequence lengths must be >= 1, got query {L} and key {S}{hint}")
    check_heads(Hq, Hkv, enable_gqa, hint=hint)
    return B, Hq, L, E, Hkv, S, value.shape[-1]


def check_device(name: str, device) -> torch.device:
    """A torch.device for device, and one this machine has."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must be a torch.device or a name such as 'cuda' or 'cpu', got {device!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r} but CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use 'cpu', or leave it None (CUDA when "
                             "available, else CPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def check_object_device(device) -> torch.device:
    """The device an object that plans for one device (FlexFlashInfer, PagedFlexAttention) is made
    for: torch.device(device), refused when it is CUDA on a machine without it."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'")
    return device


def check_workspace(workspace_buffer):
    if workspace_buffer is not None and (not isinstance(workspace_buffer, torch.Tensor)
                                         or workspace_buffer.dtype != torch.uint8):
        raise TypeError("workspace_buffer must be a uint8 torch.Tensor (FlashInfer's float workspace)")
    return workspace_buffer


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_scale(scale):
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.dtype.is_floating_point:
        # torch takes a 0-d tensor too; one that requires grad would lose its gradient as a float
        if scale.requires_grad:
            raise TypeError("scale is a tensor that requires grad: its gradient would be dropped (the kernels "
                            "take the scale as a number); multiply the score in a score_mod instead "
                            "(score_mod=lambda s, b, h, q, kv: s * t)")
        return float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, a 0-d float tensor or None, got {type(scale).__name__}")
    return float(scale)
