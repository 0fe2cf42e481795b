"""flex-flash-infer: FlexAttention-style mask_mod / score_mod on FlashInfer's GPU kernels."""
from .api import AuxOutput, AuxRequest, flex_attention
from .block_mask import BlockMask, create_block_mask, create_mask
from .mods import and_masks, get_mask_fn, noop_mask, or_masks
from .paged import PagedFlexAttention
from .backends.reference import reference_attention
from .wrapper import FlexFlashInfer

__version__ = "0.1.0"

__all__ = [
    "AuxOutput", "AuxRequest", "BlockMask", "FlexFlashInfer", "PagedFlexAttention", "and_masks", "create_block_mask", "create_mask", "flex_attention",
    "get_mask_fn", "noop_mask", "or_masks", "reference_attention",
]
