"""get_mask_fn(name, **params): the seed's entry point to the mask library."""
from __future__ import annotations

import inspect

from .attamba import generate_attamba_mask_mod
from .causal import generate_causal_mask_mod
from .chunked_causal import generate_chunked_causal_mask_mod
from .dilated_sliding_window import generate_dilated_sliding_window_mask_mod
from .document import generate_document_mask_mod
from .full import generate_full_mask_mod
from .prefix_lm import generate_prefix_lm_mask_mod
from ._seed_form import seed_form
from .sliding_window import generate_sliding_window_mask_mod
from .streaming import generate_streaming_mask_mod

MASK_FACTORIES = {
    "full": generate_full_mask_mod,
    "causal": generate_causal_mask_mod,
    "sliding_window": generate_sliding_window_mask_mod,
    "attamba": generate_attamba_mask_mod,
    "streaming": generate_streaming_mask_mod,
    "prefix_lm": generate_prefix_lm_mask_mod,
    "document": generate_document_mask_mod,
    "chunked_causal": generate_chunked_causal_mask_mod,
    "dilated_sliding_window": generate_dilated_sliding_window_mask_mod,
}


def mask_signature(name: str) -> str:
    params = inspect.signature(MASK_FACTORIES[name]).parameters
    return f"{name}({', '.join(params)})"


def get_mask_fn(name: str, **params):
    """Return a library mask by name, callable both as the seed's ``mask_fn(q_idx, kv_idx)`` and
    as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` (_seed_form.py).

    Example: ``get_mask_fn("attamba", window_size=256, chunk_size=128)``.
    """
    if name not in MASK_FACTORIES:
        accepted = ", ".join(mask_signature(n) for n in MASK_FACTORIES)
        raise ValueError(f"unknown mask name {name!r}; accepted: {accepted}")
    factory = MASK_FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"mask {name!r} takes no parameter {', '.join(unknown)}; expected {mask_signature(name)}")
    missing = [p for p, spec in accepted.items() if spec.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise TypeError(f"mask {name!r} needs {', '.join(missing)}; expected {mask_signature(name)}")
    return seed_form(factory(**params))
