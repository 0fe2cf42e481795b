"""flex_attention ([B, H, S, D], reference backend on CPU) against the independent float64 oracle
in dense_reference.py, and against torch's own eager FlexAttention."""
import math
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import (and_masks, create_block_mask, create_mask, flex_attention, get_mask_fn,
                              or_masks, reference_attention)
from flex_flash_infer.mods import document_ids_from_offsets

from library_masks import LIBRARY  # noqa: E402  (one list of library masks for all tests)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# lse is float32 for every input dtype (documented), so it is only float32-accurate.
LSE_TOL = 1e-6


def randn(shape, rng, dtype):
    return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)


def qkv(rng, B, Hq, Hkv, L, S, D, dtype, Dv=None):
    return (randn((B, Hq, L, D), rng, dtype), randn((B, Hkv, S, D), rng, dtype),
            randn((B, Hkv, S, Dv or D), rng, dtype))


def assert_close(out, ref, dtype):
    assert out.dtype == dtype
    assert out.shape == ref.shape
    assert not torch.isnan(out).any()
    err = rel_err(out, ref)
    assert err < TOL[dtype], err


def assert_lse_close(lse, ref_lse):
    """Same -inf rows; finite rows close (relative to max(1, |lse|))."""
    assert lse.shape == ref_lse.shape
    assert not torch.isnan(lse).any()
    lse, ref_lse = lse.double(), ref_lse.double()
    ref_empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ref_empty)
    assert not torch.isposinf(lse).any()
    finite = ~ref_empty
    diff = (lse[finite] - ref_lse[finite]).abs() / ref_lse[finite].abs().clamp_min(1.0)
    assert diff.numel() == 0 or diff.max().item() < LSE_TOL, diff.max().item()


def check(rng, mask_mod, dense_mask, *, B=2, Hq=4, Hkv=2, L=173, S=211, D=16, dtype=torch.float64,
          block=(16, 32), mask_B=None, mask_H=None, score_mod=None, score_fn=None, scale=None, Dv=None):
    q, k, v = qkv(rng, B, Hq, Hkv, L, S, D, dtype, Dv)
    bm = None if mask_mod is None else create_block_mask(mask_mod, mask_B, mask_H, L, S, device="cpu",
                                                         BLOCK_SIZE=block)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale,
                              enable_gqa=Hq != Hkv, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, dense_mask, scale=scale, score_fn=score_fn)
    assert_close(out, ref, dtype)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, L)
    assert_lse_close(lse, ref_lse)
    return out, lse


# ----- masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,params", LIBRARY)
@pytest.mark.parametrize("L,S,block", [(173, 211, (16, 32)), (130, 97, 16)])
def test_library_masks_match_dense_oracle(rng, name, params, L, S, block, dtype):
    mod = get_mask_fn(name, **params)
    check(rng, mod, dense_predicate(name, L, S, **params), L=L, S=S, block=block, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_document_mask_with_random_offsets(rng, dtype):
    lengths = torch.randint(1, 45, (9,), generator=rng)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])
    # the ids worked out here, not by the library's document_ids_from_offsets (which is under test)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    assert torch.equal(document_ids_from_offsets(offsets), ids)
    dense = dense_predicate("document", total, total, document_ids=ids.numpy())
    for mod in (get_mask_fn("document", offsets=offsets), get_mask_fn("document", document_ids=ids)):
        check(rng, mod, dense, L=total, S=total, block=16, dtype=dtype)


def test_combinators(rng):
    L, S = 150, 190
    sw = get_mask_fn("sliding_window", window_size=40)
    prefix = get_mask_fn("prefix_lm", prefix_len=20)

    def no_self(b, h, q, kv):
        return q != kv

    def even_keys(b, h, q, kv):
        return kv % 2 == 0

    cases = [
        (and_masks(sw, no_self), dense_predicate("sliding_window", L, S, window_size=40)
         & ~torch.eye(L, S, dtype=torch.bool)),
        (or_masks(sw, even_keys), dense_predicate("sliding_window", L, S, window_size=40)
         | (torch.arange(S) % 2 == 0).expand(L, S)),
        (and_masks(or_masks(sw, prefix), no_self),
         (dense_predicate("sliding_window", L, S, window_size=40) | dense_predicate("prefix_lm", L, S, prefix_len=20))
         & ~torch.eye(L, S, dtype=torch.bool)),
    ]
    for mod, dense in cases:
        check(rng, mod, dense, L=L, S=S, block=(16, 32))


def test_per_batch_and_per_head_mask(rng):
    B, Hq, Hkv, L, S = 2, 4, 2, 140, 170

    def per_bh_window(b, h, q, kv):
        return (q >= kv) & (q - kv < 8 * (h + 1) + 20 * b)

    dense = torch.zeros(B, Hq, L, S, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            dense[b, h] = dense_predicate("sliding_window", L, S, window_size=8 * (h + 1) + 20 * b)
    check(rng, per_bh_window, dense, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, mask_B=B, mask_H=Hq, block=16)


def test_per_batch_mask_broadcast_over_heads(rng):
    B, L, S = 3, 100, 100
    prefix = torch.tensor([5, 50, 99])

    def per_batch_prefix(b, h, q, kv):
        return (kv < prefix[b]) | (q >= kv)

    dense = torch.stack([dense_predicate("prefix_lm", L, S, prefix_len=int(p)) for p in prefix])[:, None]
    check(rng, per_batch_prefix, dense, B=B, Hq=2, Hkv=2, L=L, S=S, mask_B=B, mask_H=None, block=16)


@pytest.mark.parametrize("backend", ["reference", "flashinfer"])
def test_key_and_value_of_batch_one_serve_every_entry_of_a_batched_mask(flashinfer_on_cpu, rng, backend):
    """torch's flex_attention takes key and value of batch 1 against a query and block mask of
    batch B (one shared key/value set, a mask per entry): each entry as if its own copy were
    passed, and their gradients summed into the one key and value; torch's eager answer alike.
    Without a batched mask, or with a mask of another batch, still refused as torch refuses it."""
    B, Hq, Hkv, L, S = 3, 4, 2, 70, 90
    mask = lambda b, h, q, kv: (kv <= q + 10) & ((kv % (b + 2)) != 1)   # noqa: E731
    bm = create_block_mask(mask, B, None, L, S, device="cpu", BLOCK_SIZE=16)
    q = randn((B, Hq, L, 16), rng, torch.float64).requires_grad_()
    k, v = (randn((1, Hkv, S, 16), rng, torch.float64).requires_grad_() for _ in range(2))
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend=backend)
    copies = [t.detach().expand(B, -1, -1, -1).clone().requires_grad_() for t in (k, v)]
    want = flex_attention(q.detach(), *copies, block_mask=bm, enable_gqa=True, backend="reference")
    assert rel_err(out, want) < 1e-12
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    out.backward(grad)
    want.backward(grad)
    for one, copy in zip((k, v), copies):
        torch.testing.assert_close(one.grad, copy.grad.sum(0, keepdim=True), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = torch_flex.flex_attention(q.detach(), k.detach(), v.detach(),
                                          block_mask=torch_flex.create_block_mask(mask, B, None, L, S, device="cpu"),
                                          enable_gqa=True)
    assert rel_err(out, eager) < 1e-12
    for other in (None, create_block_mask(mask, 1, None, L, S, device="cpu")):
        with pytest.raises(ValueError, match="key and value batch must equal query batch"):
            flex_attention(q, k, v, block_mask=other, enable_gqa=True, backend=backend)


def test_mask_mod_capturing_random_bool_tensor(rng):
    B, Hq, L, S = 2, 3, 123, 157
    dense = torch.rand(B, Hq, L, S, generator=rng) < 0.3
    dense[..., : L // 3, : S // 4] = True    # some full tiles
    dense[..., L // 2:, S // 2:] = False     # some empty tiles

    def random_mask(b, h, q, kv):
        return dense[b, h, q, kv]

    check(rng, random_mask, dense, B=B, Hq=Hq, Hkv=Hq, L=L, S=S, mask_B=B, mask_H=Hq, block=(16, 32))


# ----- score_mods -----------------------------------------------------------------------------

def test_score_mod_per_head_bias_table(rng):
    Hq = 4
    bias = randn((Hq,), rng, torch.float64) * 3

    def head_bias(score, b, h, q, kv):
        return score + bias[h]

    # Per-head bias alone cancels in softmax; it shows in the lse.
    check(rng, get_mask_fn("causal"), dense_predicate("causal", 150, 170), Hq=Hq, L=150, S=170,
          score_mod=head_bias, score_fn=head_bias)


def test_score_mod_relative_position_table(rng):
    M = 24
    table = randn((2 * M + 1,), rng, torch.float64)

    def rel_pos(score, b, h, q, kv):
        return score + table[(q - kv).clamp(-M, M) + M]

    L, S = 160, 180
    check(rng, get_mask_fn("sliding_window", window_size=64), dense_predicate("sliding_window", L, S, window_size=64),
          L=L, S=S, score_mod=rel_pos, score_fn=rel_pos)
    check(rng, None, None, L=L, S=S, score_mod=rel_pos, score_fn=rel_pos)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_mod_softcap_with_scale(rng, dtype):
    cap = 2.0

    def softcap(score, b, h, q, kv):
        return cap * torch.tanh(score / cap)

    L, S = 120, 90
    check(rng, get_mask_fn("causal"), dense_predicate("causal", L, S), L=L, S=S, score_mod=softcap,
          score_fn=softcap, scale=0.7, dtype=dtype)


def test_score_mod_sees_scaled_scores_and_all_indices(rng):
    """score_mod gets q.k * scale (not the raw dot product) and real b/h/q/kv indices."""
    B, Hq, L, S = 2, 2, 70, 90

    def mixed(score, b, h, q, kv):
        return score * (1.0 + 0.5 * h) + 0.1 * b - 0.01 * (q - kv).abs()

    check(rng, get_mask_fn("prefix_lm", prefix_len=10), dense_predicate("prefix_lm", L, S, prefix_len=10),
          B=B, Hq=Hq, Hkv=1, L=L, S=S, score_mod=mixed, score_fn=mixed, scale=0.3, block=16)


def test_score_mod_is_applied_before_the_mask(rng):
    """NaN / +inf written by the score_mod at masked positions must not leak (mask comes after)."""
    def poison_masked(score, b, h, q, kv):
        return torch.where(q >= kv, score, float("nan"))

    def inf_masked(score, b, h, q, kv):
        return torch.where(q >= kv, score, float("inf"))

    L, S = 90, 90
    for mod in (poison_masked, inf_masked):
        check(rng, get_mask_fn("causal"), dense_predicate("causal", L, S), L=L, S=S,
              score_mod=mod, score_fn=lambda s, b, h, q, kv: s, block=16)


def test_score_mod_minus_inf_empties_rows(rng):
    """A score_mod that gives -inf to every key of a row: out 0 and lse -inf for that row."""
    def drop_rows(score, b, h, q, kv):
        return torch.where(q % 7 == 3, float("-inf"), score)

    out, lse = check(rng, None, None, L=50, S=60, score_mod=drop_rows, score_fn=drop_rows)
    rows = torch.arange(50) % 7 == 3
    assert torch.isneginf(lse[:, :, rows]).all()
    assert (out[:, :, rows] == 0).all()


# ----- shapes, scale, GQA, lse ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 1), (3, 3)])
def test_gqa_query_head_reads_key_head_h_div_group(rng, Hq, Hkv, dtype):
    L, S = 131, 77
    check(rng, get_mask_fn("causal"), dense_predicate("causal", L, S), Hq=Hq, Hkv=Hkv, L=L, S=S, dtype=dtype)


def test_gqa_with_per_head_mask_uses_query_head_index(rng):
    Hq, Hkv, L, S = 4, 2, 100, 100

    def window_by_head(b, h, q, kv):
        return (q >= kv) & (q - kv < 5 + 10 * h)

    dense = torch.stack([dense_predicate("sliding_window", L, S, window_size=5 + 10 * h) for h in range(Hq)])[None]
    check(rng, window_by_head, dense, B=1, Hq=Hq, Hkv=Hkv, L=L, S=S, mask_H=Hq, block=16)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 300), (300, 1), (257, 129), (129, 257)])
def test_odd_lengths_full_attention_without_block_mask(rng, L, S):
    check(rng, None, None, B=1, Hq=2, Hkv=2, L=L, S=S)


def test_value_head_dim_may_differ(rng):
    out, _ = check(rng, get_mask_fn("causal"), dense_predicate("causal", 60, 80), L=60, S=80, D=16, Dv=24)
    assert out.shape[-1] == 24


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_custom_scale(rng, scale):
    check(rng, get_mask_fn("sliding_window", window_size=37), dense_predicate("sliding_window", 173, 211, window_size=37),
          scale=scale)


def test_default_scale_is_inverse_sqrt_head_dim(rng):
    q, k, v = qkv(rng, 1, 2, 2, 50, 50, 64, torch.float64)
    default = flex_attention(q, k, v)
    explicit = flex_attention(q, k, v, scale=1 / 8)
    other = flex_attention(q, k, v, scale=1.0)
    assert torch.allclose(default, explicit, rtol=0, atol=1e-12)
    assert not torch.allclose(default, other)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_rows_give_zero_output_and_minus_inf_lse(rng, dtype):
    """Rows that see no key (single rows and a whole empty query tile) -> out 0, lse -inf."""
    L, S = 100, 120

    def holes(b, h, q, kv):
        empty_row = (q % 9 == 4) | ((q >= 32) & (q < 48))
        return (q >= kv) & ~empty_row

    q_idx = torch.arange(L).view(-1, 1)
    dense = dense_predicate("causal", L, S) & ~((q_idx % 9 == 4) | ((q_idx >= 32) & (q_idx < 48)))
    out, lse = check(rng, holes, dense, L=L, S=S, block=16, dtype=dtype)
    empty = ~dense.any(-1)
    assert empty.sum() > 10
    assert (out[:, :, empty] == 0).all()
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()


def test_mask_with_nothing_visible(rng):
    def nothing(b, h, q, kv):
        return q < 0

    out, lse = check(rng, nothing, torch.zeros(50, 70, dtype=torch.bool), L=50, S=70)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_lse_is_natural_log(rng):
    q, k, v = qkv(rng, 1, 1, 1, 20, 30, 8, torch.float64)
    _, lse = flex_attention(q, k, v, return_lse=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    assert torch.allclose(lse.double(), torch.log(torch.exp(scores).sum(-1)), rtol=1e-6, atol=1e-6)


def test_return_lse_false_returns_only_out(rng):
    q, k, v = qkv(rng, 1, 2, 2, 40, 40, 8, torch.float32)
    out = flex_attention(q, k, v, block_mask=create_block_mask(get_mask_fn("causal"), None, None, 40, 40,
                                                               device="cpu", BLOCK_SIZE=16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 40, 8)


def test_block_mask_is_reusable_and_block_size_does_not_change_result(rng):
    L, S = 173, 211
    mod = get_mask_fn("attamba", window_size=40, chunk_size=16)
    q, k, v = qkv(rng, 2, 4, 2, L, S, 16, torch.float64)
    outs = []
    for block in (16, (16, 32), (32, 16), 128, 512):
        bm = create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=block)
        for _ in range(2):
            outs.append(flex_attention(q, k, v, block_mask=bm, enable_gqa=True))
    ref, _ = dense_attention(q, k, v, dense_predicate("attamba", L, S, window_size=40, chunk_size=16))
    for out in outs:
        assert rel_err(out, ref) < 1e-10


def test_non_contiguous_inputs(rng):
    L, S, D = 90, 70, 16
    q = randn((1, L, 3, D), rng, torch.float64).transpose(1, 2)   # [B, H, L, D] view of [B, L, H, D]
    k = randn((1, S, 3, D), rng, torch.float64).transpose(1, 2)
    v = randn((1, S, 3, D), rng, torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, S, device="cpu", BLOCK_SIZE=16)
    out = flex_attention(q, k, v, block_mask=bm)
    ref, _ = dense_attention(q, k, v, dense_predicate("causal", L, S))
    assert rel_err(out, ref) < 1e-10


def test_reference_chunking_over_query_rows(rng):
    """The reference splits query rows into chunks; index-dependent mods must see true q_idx."""
    L, S = 97, 64
    q, k, v = qkv(rng, 2, 2, 1, L, S, 8, torch.float64)
    table = randn((L,), rng, torch.float64)

    def row_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx] * (kv_idx % 3)

    mod = get_mask_fn("sliding_window", window_size=20)
    bm = create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=16)
    ref, ref_lse = dense_attention(q, k, v, dense_predicate("sliding_window", L, S, window_size=20),
                                   score_fn=row_bias)
    for chunk in (1, 2 * 2 * S * 5, 1 << 24):
        out, lse = reference_attention(q, k, v, bm, row_bias, None, chunk_elements=chunk)
        assert rel_err(out, ref) < 1e-10
        assert_lse_close(lse, ref_lse)


def test_create_mask_agrees_with_attention_visibility(rng):
    """create_mask's dense mask as SDPA-style input to the oracle gives the same result."""
    def quirky(b, h, q, kv):
        return ((q * 7 + kv * 3) % 5 != 0) & (kv <= q + 10)

    L, S = 80, 100
    dense = create_mask(quirky, 1, 1, L, S, device="cpu")
    q_idx, kv_idx = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    assert torch.equal(dense[0, 0], ((q_idx * 7 + kv_idx * 3) % 5 != 0) & (kv_idx <= q_idx + 10))
    check(rng, quirky, dense, L=L, S=S)


# ----- torch FlexAttention (eager, CPU) ------------------------------------------------------

def torch_flex_attention(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_flex.flex_attention(*args, **kwargs)


TORCH_CASES = [
    ("causal", {}),
    ("sliding_window", {"window_size": 37}),
    ("attamba", {"window_size": 40, "chunk_size": 16}),
    ("document", None),
]
_DOC = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 1, 69, 50]))   # offsets 0, 30, 31, 100, 150
# torch's side of each case written out here (the library's mods are what is under test)
TORCH_PREDICATES = {
    "causal": lambda b, h, q, kv: q >= kv,
    "sliding_window": lambda b, h, q, kv: (q >= kv) & (q - kv < 37),
    "attamba": lambda b, h, q, kv: (q >= kv) & (((kv + 1) % 16 == 0) | (q - kv < 40)),
    "document": lambda b, h, q, kv: (_DOC[q] == _DOC[kv]) & (q >= kv),
}


@pytest.mark.parametrize("name,params", TORCH_CASES)
def test_matches_torch_flex_attention(rng, name, params):
    B, Hq, Hkv, L, S, D = 2, 4, 2, 150, 150, 16
    if params is None:
        params = {"offsets": torch.tensor([0, 30, 31, 100, 150])}
    mod = get_mask_fn(name, **params)
    q, k, v = qkv(rng, B, Hq, Hkv, L, S, D, torch.float64)
    ours_bm = create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=32)
    torch_bm = torch_flex.create_block_mask(TORCH_PREDICATES[name], None, None, L, S, device="cpu", BLOCK_SIZE=32)
    expected, expected_lse = torch_flex_attention(q, k, v, block_mask=torch_bm, enable_gqa=True, return_lse=True)
    for bm in (ours_bm, torch_bm):       # a torch BlockMask is accepted as is
        out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
        assert rel_err(out, expected) < 1e-10
        assert_lse_close(lse, expected_lse)


def test_matches_torch_flex_attention_with_score_mod(rng):
    B, H, L, S, D = 1, 3, 100, 130, 16
    bias = randn((H,), rng, torch.float64)
    M = 10
    table = randn((2 * M + 1,), rng, torch.float64)

    def score_mod(score, b, h, q, kv):
        return 3.0 * torch.tanh(score / 3.0) + bias[h] + table[(q - kv).clamp(-M, M) + M]

    mod = get_mask_fn("prefix_lm", prefix_len=17)
    q, k, v = qkv(rng, B, H, H, L, S, D, torch.float64)
    torch_bm = torch_flex.create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=(16, 32))
    expected, expected_lse = torch_flex_attention(q, k, v, score_mod=score_mod, block_mask=torch_bm,
                                                  scale=0.4, return_lse=True)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=torch_bm, scale=0.4, return_lse=True)
    assert rel_err(out, expected) < 1e-10
    assert_lse_close(lse, expected_lse)
    out32 = flex_attention(q.float(), k.float(), v.float(), score_mod=score_mod,
                           block_mask=create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=16),
                           scale=0.4)
    assert out32.dtype == torch.float32
    assert rel_err(out32, expected) < 1e-5


def test_matches_torch_with_per_batch_head_torch_block_mask(rng):
    B, H, L, S, D = 2, 2, 70, 90, 8

    def per_bh(b, h, q, kv):
        return (q >= kv) & (q - kv < 10 + 15 * h + 30 * b)

    q, k, v = qkv(rng, B, H, H, L, S, D, torch.float32)
    torch_bm = torch_flex.create_block_mask(per_bh, B, H, L, S, device="cpu", BLOCK_SIZE=16)
    expected = torch_flex_attention(q, k, v, block_mask=torch_bm)
    out = flex_attention(q, k, v, block_mask=torch_bm)
    assert rel_err(out, expected) < 1e-5


def test_matches_torch_on_empty_rows(rng):
    def holes(b, h, q, kv):
        return (q >= kv) & ~((q % 9 == 4) | ((q >= 32) & (q < 48)))

    q, k, v = qkv(rng, 1, 2, 2, 100, 120, 8, torch.float64)
    torch_bm = torch_flex.create_block_mask(holes, None, None, 100, 120, device="cpu", BLOCK_SIZE=16)
    expected, expected_lse = torch_flex_attention(q, k, v, block_mask=torch_bm, return_lse=True)
    out, lse = flex_attention(q, k, v, block_mask=torch_bm, return_lse=True)
    assert torch.isneginf(expected_lse).any()
    assert rel_err(out, expected) < 1e-10
    assert_lse_close(lse, expected_lse)
