"""Masks: the tile states of a mask_mod, worked out from bounds or evaluation, and the block tables
built from them."""
