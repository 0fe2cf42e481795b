"""Masks shared by several test folders: a random mask_mod over a captured tensor, and two
formulas that send a call to the tiles and the per-head routes."""
import torch


def random_mask_mod(B, H, L, S, rng, density=0.3):
    """A mask_mod over a captured random tensor, with some all-true and all-false regions."""
    dense = torch.rand(B, H, L, S, generator=rng) < density
    dense[..., : L // 3, : S // 4] = True
    dense[..., L // 2:, S // 2:] = False

    def random_mask(b, h, q, kv):
        return dense[b, h, q, kv]

    return random_mask, dense


def striped_causal(b, h, q, kv):
    """Causal with a fifth of the pairs removed in a pattern that no band describes: the tiles route."""
    return ((q * 7 + kv * 13) % 5 != 0) & (kv <= q)


def per_head_starts(b, h, q, kv):
    """Head h sees keys from 3 + 40 h on: a mask that differs per head (the per-head routes)."""
    return kv >= 3 + 40 * h
