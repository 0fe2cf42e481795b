"""Gradients on the FlashInfer doors (the kernels forward, a recomputation backward) when state
changes around them: outputs written in place, tables written between forward and backward,
tables re-bound after prepare(), parameters the score_mod never reads, max_scores."""
import math

import pytest
import torch

from dense_reference import dense_attention
from flex_flash_infer import AuxRequest, FlexFlashInfer, create_block_mask, flex_attention, get_mask_fn

H, L, D = 2, 96, 16


def _leaves(rng, shape=(1, H, L, D)):
    return [torch.randn(*shape, generator=rng, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _causal_mask():
    return torch.ones(L, L, dtype=torch.bool).tril()


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
def test_out_and_lse_written_in_place_then_backward(flashinfer_on_cpu, rng, backend):
    q, k, v = _leaves(rng)
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu", BLOCK_SIZE=32)
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, backend=backend)
    out.mul_(2.0)
    lse.add_(1.0)
    got = torch.autograd.grad(out.sum() + lse.sum(), [q, k, v])
    want_out, want_lse = dense_attention(q, k, v, _causal_mask())
    want = torch.autograd.grad((want_out * 2).sum() + (want_lse + 1).sum(), [q, k, v])
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("door", ["flex_attention", "FlexFlashInfer"])
@pytest.mark.parametrize("what", ["mask", "score_table"])
def test_a_table_written_between_forward_and_backward_raises(flashinfer_on_cpu, rng, door, what):
    """The backward recomputes attention: reading the next micro-batch's values would give the
    gradient of a forward that never ran (torch raises for its saved tensors too)."""
    doc = torch.tensor([0] * 40 + [1] * 56)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    q, k, v = _leaves(rng)
    if door == "flex_attention":
        bm = create_block_mask(mask, None, None, L, L, device="cpu", BLOCK_SIZE=32)
        out = flex_attention(q, k, v, score_mod=mod, block_mask=bm, backend="flashinfer")
    else:
        flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mask, seq_len_q=L, seq_len_kv=L, num_qo_heads=H,
                                                    num_kv_heads=H, head_dim=D, dtype=torch.float64, score_mod=mod)
        assert flex.active_backend == "flashinfer"
        out = flex(*(t[0].transpose(0, 1) for t in (q, k, v)))
    with torch.no_grad():
        (doc.copy_(torch.tensor([0] * 10 + [1] * 86)) if what == "mask" else slopes.mul_(4.0))
    with pytest.raises(RuntimeError, match="inplace operation between the forward and the backward"):
        out.square().sum().backward()


def test_a_score_table_re_bound_after_prepare_raises(flashinfer_on_cpu, rng):
    """The kernel holds the tensor prepare() found; a new Parameter in its place (or .data =,
    load_state_dict(assign=True)) is another tensor: the call must not run the old one silently."""
    module = torch.nn.Module()
    module.table = torch.nn.Parameter(torch.randn(H, L, generator=rng))

    def mod(score, b, h, q_idx, kv_idx):
        return score + module.table[h, kv_idx]

    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=get_mask_fn("causal"), seq_len_q=L, seq_len_kv=L,
                                                num_qo_heads=H, num_kv_heads=H, head_dim=D, dtype=torch.float32,
                                                score_mod=mod)
    q, k, v = (torch.randn(L, H, D, generator=rng) for _ in range(3))
    flex(q, k, v)
    with torch.no_grad():
        module.table.add_(1.0)                     # an optimizer step: read as it is
    want, _ = dense_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), _causal_mask(),
                              score_fn=lambda s, b, h, qi, ki: s + module.table.detach().double()[h, ki])
    assert (flex(q, k, v).double() - want[0].transpose(0, 1)).abs().max() < 1e-4
    for rebind in (lambda: setattr(module, "table", torch.nn.Parameter(torch.randn(H, L, generator=rng))),
                   lambda: setattr(module.table, "data", torch.randn(H, L, generator=rng))):
        rebind()
        with pytest.raises(ValueError, match=r"reads a different tensor .* call prepare\(\) again"):
            flex(q, k, v)
        flex.prepare(mask_fn=get_mask_fn("causal"), seq_len_q=L, seq_len_kv=L, num_qo_heads=H, num_kv_heads=H,
                     head_dim=D, dtype=torch.float32, score_mod=mod)
        flex(q, k, v)


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
def test_a_parameter_the_score_mod_never_reads_keeps_no_gradient(flashinfer_on_cpu, rng, backend):
    """A bound method of a module as the score_mod: the module's other parameters are found as
    candidates, but one the mod never reads must keep .grad None (a zero would move it under
    weight decay)."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(H, dtype=torch.float64))
            self.unused = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.bias[h]

    layer = Layer()
    q, k, v = _leaves(rng)
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu", BLOCK_SIZE=32)
    flex_attention(q, k, v, score_mod=layer.score_mod, block_mask=bm, backend=backend).sum().backward()
    assert layer.bias.grad is not None and layer.unused.grad is None


def test_max_scores_are_not_differentiable(rng):
    q, k, v = _leaves(rng)
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(max_scores=True), backend="reference")
    assert not aux.max_scores.requires_grad and out.requires_grad
