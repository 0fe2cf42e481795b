"""return_aux=AuxRequest(...), torch flex_attention's newer form of return_lse: the same objects,
the lse the older flag gives, and each row's largest visible score after score_mod, compared with
torch's own flex_attention (eager, on CPU) and a dense float64 computation."""
import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from flex_flash_infer import AuxRequest, create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.mods import generate_softcap_score_mod


def _inputs(rng, B=2, H=4, Hkv=2, L=130, S=150, D=16):
    q = torch.randn(B, H, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    return q, k, v


def test_aux_request_is_torchs_own():
    assert AuxRequest is torch_flex.AuxRequest


@pytest.mark.parametrize("want", [AuxRequest(lse=True), AuxRequest(max_scores=True),
                                  AuxRequest(lse=True, max_scores=True), AuxRequest()])
def test_aux_outputs_match_dense_scores(rng, want):
    q, k, v = _inputs(rng)
    mask = get_mask_fn("sliding_window", window_size=40)
    softcap = generate_softcap_score_mod(3.0)
    bm = create_block_mask(mask, None, None, 130, 150, device="cpu", BLOCK_SIZE=64)
    out, aux = flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True, return_aux=want)
    assert torch.equal(out, flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True))
    qi, ki = torch.arange(130).view(-1, 1) + 20, torch.arange(150).view(1, -1)   # bottom-right: 20 more keys
    scores = softcap(torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / 4.0, None, None, qi, ki)
    scores = scores.masked_fill(~mask(None, None, qi - 20, ki).expand_as(scores), float("-inf"))
    assert (aux.lse is None) == (not want.lse) and (aux.max_scores is None) == (not want.max_scores)
    if want.lse:
        assert torch.allclose(aux.lse.double(), torch.logsumexp(scores, -1), atol=1e-5)
    if want.max_scores:
        assert aux.max_scores.shape == (2, 4, 130)
        assert torch.allclose(aux.max_scores.double(), scores.amax(-1), atol=1e-5)


def test_aux_lse_matches_torchs_flex_attention(rng):
    """torch computes max_scores on GPUs only; its lse on CPU is compared here."""
    q, k, v = (x.float() for x in _inputs(rng, L=128, S=128))
    mask = get_mask_fn("causal")
    ours_out, ours = flex_attention(q, k, v, block_mask=create_block_mask(mask, None, None, 128, 128, device="cpu"),
                                    enable_gqa=True, return_aux=AuxRequest(lse=True))
    bm = torch_flex.create_block_mask(mask, None, None, 128, 128, device="cpu")
    theirs_out, theirs = torch_flex.flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                                   return_aux=torch_flex.AuxRequest(lse=True))
    assert torch.allclose(ours_out, theirs_out, atol=1e-5)
    assert torch.allclose(ours.lse, theirs.lse, atol=1e-5) and ours.max_scores is None


def test_bad_aux_requests_name_the_argument(rng, monkeypatch):
    from flex_flash_infer.backends import backend_choice

    q, k, v = _inputs(rng, B=1, Hkv=4, L=8, S=8)
    with pytest.raises(ValueError, match="not both"):
        flex_attention(q, k, v, return_lse=True, return_aux=AuxRequest(lse=True))
    with pytest.raises(TypeError, match="return_aux must be an AuxRequest"):
        flex_attention(q, k, v, return_aux={"lse": True})
    monkeypatch.setattr(backend_choice, "unsupported_reason", lambda *a: None)   # as on a GPU with FlashInfer
    with pytest.raises(ValueError, match="max_scores"):
        flex_attention(q.float(), k.float(), v.float(), return_aux=AuxRequest(max_scores=True), backend="flashinfer")
