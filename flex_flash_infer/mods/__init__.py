"""The mask library: one pattern per file, each docstring states its exact predicate."""
from .alibi import alibi_slopes, generate_alibi_score_mod
from .attamba import generate_attamba_mask_mod
from .causal_decay import generate_causal_decay_score_mod
from .causal import generate_causal_mask_mod
from .chunked_causal import generate_chunked_causal_mask_mod
from .combinators import and_masks, noop_mask, or_masks
from .dilated_sliding_window import generate_dilated_sliding_window_mask_mod
from .document import document_ids_from_offsets, generate_document_mask_mod
from .full import generate_full_mask_mod
from .prefix_lm import generate_prefix_lm_mask_mod
from .registry import MASK_FACTORIES, get_mask_fn
from .relative_position_bias import generate_relative_position_bias_score_mod
from .softcap import generate_softcap_score_mod
from .sliding_window import generate_sliding_window_mask_mod
from .streaming import generate_streaming_mask_mod
from .t5_relative_bias import generate_t5_relative_bias_score_mod, t5_buckets
from .temperature import generate_temperature_score_mod

__all__ = [
    "alibi_slopes", "generate_alibi_score_mod", "generate_causal_decay_score_mod",
    "generate_relative_position_bias_score_mod", "generate_softcap_score_mod", "generate_temperature_score_mod",
    "generate_t5_relative_bias_score_mod", "t5_buckets",
    "MASK_FACTORIES", "and_masks", "document_ids_from_offsets", "generate_attamba_mask_mod",
    "generate_causal_mask_mod", "generate_chunked_causal_mask_mod",
    "generate_dilated_sliding_window_mask_mod", "generate_document_mask_mod",
    "generate_full_mask_mod", "generate_prefix_lm_mask_mod", "generate_sliding_window_mask_mod",
    "generate_streaming_mask_mod", "get_mask_fn", "noop_mask", "or_masks",
]
