"""Compile: FlashInfer attention variants generated from traced mask_mods and score_mods."""
