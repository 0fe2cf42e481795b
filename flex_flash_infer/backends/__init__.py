"""Backends: FlashInfer's runners built from a plan, the kernels of our own they launch (column
merge, NaN-aware merges), the float32 reference, and gradients."""
