"""The library's score_mods made from a learned tensor read it as it is at each call, whatever its
dtype: after an optimizer step the forward and the gradient follow the new values, on both
backends, and training runs step after step (no graph kept from when the mod was made)."""
import math

import pytest
import torch

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.mods import (generate_alibi_score_mod, generate_t5_relative_bias_score_mod,
                                   generate_temperature_score_mod, t5_buckets)

H, L, D = 2, 64, 16


def _dense(q, k, v, bias):
    """float64 causal attention with bias(s, h, q, kv) added by the caller's formula."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    h, qi, ki = torch.arange(H).view(-1, 1, 1), torch.arange(L).view(1, -1, 1), torch.arange(L).view(1, 1, -1)
    s = bias(s, h, qi, ki).masked_fill(~(qi >= ki), -math.inf)
    return torch.softmax(s, -1) @ v.double()


def _learned(kind, dtype, rng):
    if kind == "t5":
        weight = torch.nn.Parameter(torch.randn(8, H, generator=rng).to(dtype))   # nn.Embedding(buckets, H).weight
        mod = generate_t5_relative_bias_score_mod(weight.T, max_distance=20)
        return weight, mod, lambda s, h, q, kv: s + weight.detach().T.double()[h, t5_buckets(kv - q, 8, 20, True)]
    p = torch.nn.Parameter((torch.rand(H, generator=rng) + 0.5).to(dtype))
    if kind == "temperature":
        return p, generate_temperature_score_mod(p), lambda s, h, q, kv: s * p.detach().double()[h]
    return p, generate_alibi_score_mod(slopes=p), lambda s, h, q, kv: s + p.detach().double()[h] * (kv - q)


@pytest.mark.parametrize("backend", ["reference", "flashinfer"])
@pytest.mark.parametrize("kind,dtype", [("t5", torch.float32), ("t5", torch.float64), ("temperature", torch.bfloat16),
                                        ("temperature", torch.float64), ("alibi", torch.bfloat16),
                                        ("alibi", torch.float64)])
def test_a_learned_table_is_read_as_it_is_after_each_optimizer_step(flashinfer_on_cpu, rng, kind, dtype, backend):
    param, mod, bias = _learned(kind, dtype, rng)
    q, k, v = (torch.randn(1, H, L, D, generator=rng, requires_grad=True) for _ in range(3))
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu", BLOCK_SIZE=32)
    for step in range(3):
        out = flex_attention(q, k, v, score_mod=mod, block_mask=bm, backend=backend)
        assert (out.double() - _dense(q, k, v, bias)).abs().max() < 1e-4, f"step {step}"
        param.grad = None
        out.backward(torch.ones_like(out))
        # the gradient at the current values: float64 autograd through the caller's formula
        check = param.detach().double().requires_grad_()
        twin = _learned_twin(kind, check)
        _dense(q.detach(), k.detach(), v.detach(), twin).sum().backward()
        # a bf16 parameter's gradient is summed in bf16 (as torch sums it): judged against its scale
        assert (param.grad.double() - check.grad).abs().max() <= 2e-2 * check.grad.abs().max() + 1e-6, f"step {step}"
        with torch.no_grad():   # an optimizer step
            param.add_(torch.randn(param.shape, generator=rng).to(dtype) * 0.5)


def _learned_twin(kind, p):
    if kind == "t5":
        return lambda s, h, q, kv: s + p.T[h, t5_buckets(kv - q, 8, 20, True)]
    if kind == "temperature":
        return lambda s, h, q, kv: s * p[h]
    return lambda s, h, q, kv: s + p[h] * (kv - q)
