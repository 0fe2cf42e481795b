"""A random mask_mod over a captured tensor, shared by the block-mask, planner and backend tests."""
import torch


def random_mask_mod(B, H, L, S, rng, density=0.3):
    """A mask_mod over a captured random tensor, with some all-true and all-false regions."""
    dense = torch.rand(B, H, L, S, generator=rng) < density
    dense[..., : L // 3, : S // 4] = True
    dense[..., L // 2:, S // 2:] = False

    def random_mask(b, h, q, kv):
        return dense[b, h, q, kv]

    return random_mask, dense
