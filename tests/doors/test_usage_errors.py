"""Unclear errors and silent acceptance (issue 20, class 8): each mistake a new user makes raises an
error that names the argument and what was expected, on the reference backend and on the
FlashInfer path (the CPU model of its kernels), and a failed call leaves the objects usable."""
import pytest
import torch

from flex_flash_infer import (FlexFlashInfer, PagedFlexAttention, create_block_mask, create_mask, flex_attention,
                              get_mask_fn)
from flex_flash_infer.block_mask import BlockMask
from paged_cases import random_cache

BACKENDS = ["flashinfer", "reference"]


def _qkv(rng, B=1, Hq=4, Hkv=2, L=64, S=64, D=16):
    return (torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64))


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_heads_or_head_dim(flashinfer_on_cpu, backend):
    """Was ZeroDivisionError."""
    def call(Hq, Hkv, D):
        return flex_attention(torch.randn(1, Hq, 8, D), torch.randn(1, Hkv, 8, D), torch.randn(1, Hkv, 8, D),
                              enable_gqa=True, backend=backend)

    with pytest.raises(ValueError, match="query has 0 heads"):
        call(0, 0, 16)
    with pytest.raises(ValueError, match="key has 0 heads"):
        call(2, 0, 16)
    with pytest.raises(ValueError, match="head_dim 0.*>= 1"):
        call(2, 2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_inputs_are_refused_by_name(flashinfer_on_cpu, backend):
    """Was "Cannot copy out of meta tensor" from inside the plan."""
    q = torch.randn(1, 2, 64, 16, device="meta")
    with pytest.raises(ValueError, match="query, key and value are on the meta device"):
        flex_attention(q, q, q, backend=backend)
    bm = create_block_mask(_causal, None, None, 64, 64, device="cpu")
    with pytest.raises(ValueError, match="meta device"):
        flex_attention(q, q, q, block_mask=bm, backend=backend)


@pytest.mark.parametrize("block_size", [(16, 2.7), 16.0, (True, 16), (16,), "16"])
def test_block_size_must_be_ints(block_size):
    """(16, 2.7) was truncated to (16, 2) silently."""
    with pytest.raises(TypeError, match=r"BLOCK_SIZE must be an int or a \(q_block, kv_block\) pair of ints"):
        create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=block_size)


def test_mask_mod_returning_none_or_a_non_bool():
    def forgot_return(b, h, q_idx, kv_idx):
        q_idx >= kv_idx

    with pytest.raises(TypeError, match=r"mask_mod 'forgot_return' returned None.*`return`"):
        create_block_mask(forgot_return, None, None, 64, 64, device="cpu")
    with pytest.raises(TypeError, match="mask_fn|mask_mod.*returned None"):
        FlexFlashInfer(device="cpu").prepare(mask_fn=lambda q_idx, kv_idx: None, seq_len_q=8, seq_len_kv=8,
                                             num_qo_heads=1, num_kv_heads=1, head_dim=16, dtype=torch.float32)
    with pytest.raises(TypeError, match="mask_mod.*must return a bool tensor, got str"):
        create_block_mask(lambda b, h, q, kv: "yes", None, None, 64, 64, device="cpu")


def test_score_mod_returning_none(rng):
    q, k, v = _qkv(rng)

    def forgot_return(score, b, h, q_idx, kv_idx):
        score + 1

    with pytest.raises(TypeError, match=r"score_mod 'forgot_return' returned None.*`return`"):
        flex_attention(q, k, v, score_mod=forgot_return, enable_gqa=True, backend="reference")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    """Was an AssertionError from torch's CUDA initialization."""
    for make in (lambda: create_block_mask(_causal, None, None, 64, 64, device="cuda"),
                 lambda: create_mask(_causal, None, None, 64, 64, device="cuda")):
        with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
            make()
    with pytest.raises(ValueError, match="device must be a torch.device or a name"):
        create_block_mask(_causal, None, None, 64, 64, device="gpu")


@pytest.mark.parametrize("reduction", [lambda s: s.sum(-1, keepdim=True), lambda s: s.amax(-2, keepdim=True),
                                       lambda s: s.mean(), lambda s: (s > 0).any(-1, keepdim=True).float()],
                         ids=["sum-keys", "max-queries", "mean", "any"])
def test_score_mod_reducing_the_scores(rng, reduction):
    """A result that broadcasts to the scores but is computed across them was silently broadcast."""
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=r"score_mod .* returned shape .* from the scores.*vmap"):
        flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: reduction(s), enable_gqa=True,
                       backend="reference")


@pytest.mark.parametrize("mixing", [lambda s: s / s.abs().amax(-1, keepdim=True), lambda s: s.cumsum(-1),
                                    lambda s: s.softmax(-2), lambda s: s - s.mean()],
                         ids=["row-norm", "cumsum", "softmax-queries", "centred"])
def test_score_mod_mixing_the_scores_at_full_shape(rng, mixing):
    """A scan or reduction kept at the scores' shape gave a different answer from torch's (which hands
    the mod one score at a time) without a word."""
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=r"score_mod .* for that score alone: .* vmap"):
        flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: mixing(s), enable_gqa=True,
                       backend="reference")


def test_a_score_mod_writing_its_score_in_place_runs_as_torchs(rng):
    """The per-score check recomputes three scores alone: a mod writing its score in place (as
    torch's eager path allows) was applied twice to them, or refused."""
    q, k, v = _qkv(rng)
    bias = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64)

    def in_place(s, b, h, q_idx, kv_idx):
        s.mul_(0.5)
        s += bias[h]
        return s

    def pure(s, b, h, q_idx, kv_idx):
        return s * 0.5 + bias[h]

    got = flex_attention(q, k, v, score_mod=in_place, enable_gqa=True, backend="reference")
    want = flex_attention(q, k, v, score_mod=pure, enable_gqa=True, backend="reference")
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_score_mod_not_using_the_score_may_have_a_smaller_shape(rng):
    """A result that does not read the score (a bias per head) keeps its shape and is fine, as in torch."""
    q, k, v = _qkv(rng)
    bias = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    out = flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: bias[h], enable_gqa=True,
                         backend="reference")
    want = v.repeat_interleave(2, 1).mean(2, keepdim=True).expand_as(out)   # equal scores: the mean of values
    assert torch.allclose(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mask_tables_shorter_than_seq_lengths(flashinfer_on_cpu, rng, backend):
    """The FlashInfer path returned zero rows for the query tiles the tables lack."""
    q, k, v = _qkv(rng, L=64, S=64)
    full = create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    cut = full[:, :, :2]                 # two of the four query tiles
    cut.mask_mod = _causal
    with pytest.raises(ValueError, match=r"tables cover 2 query tiles .* seq_lengths \(64, 64\) .* need 4"):
        flex_attention(q, k, v, block_mask=cut, enable_gqa=True, backend=backend)
    narrow = BlockMask.from_kv_blocks(full.kv_num_blocks.clamp(max=2), full.kv_indices[..., :2].contiguous(),
                                      BLOCK_SIZE=16, mask_mod=_causal, seq_lengths=(64, 64))
    with pytest.raises(ValueError, match="2 key tiles .* need 4 and 4"):
        flex_attention(q, k, v, block_mask=narrow, enable_gqa=True, backend=backend)
    cut.seq_lengths = (32, 64)           # what the tables describe: now it runs
    out = flex_attention(q[:, :, :32], k, v, block_mask=cut, enable_gqa=True, backend=backend)
    want = flex_attention(q, k, v, block_mask=full, enable_gqa=True, backend="reference")[:, :, :32]
    assert torch.allclose(out, want, atol=1e-6)


def _if_mask(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return True
    return False


def _and_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx and q_idx - kv_idx < 8


def _if_score(score, b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return score
    return score * 2


@pytest.mark.parametrize("mod", [_if_mask, _and_mask])
def test_python_control_flow_in_a_mask_mod(mod):
    with pytest.raises(TypeError, match=rf"mask_mod '{mod.__name__}' uses a tensor as a Python bool "
                                        r"\(at test_usage_errors.py:\d+.*`&`, `\|`.*torch.where"):
        create_block_mask(mod, None, None, 64, 64, device="cpu")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_python_control_flow_in_a_score_mod(rng, backend):
    q, k, v = _qkv(rng)
    with pytest.raises(TypeError, match=r"score_mod '_if_score' uses a tensor as a Python bool.*torch.where"):
        flex_attention(q, k, v, score_mod=_if_score, enable_gqa=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bshd_inputs_are_recognized(flashinfer_on_cpu, rng, backend):
    """[B, S, H, D] tensors with a block mask: the message asked to rebuild the mask."""
    bm = create_block_mask(_causal, None, None, 64, 80, device="cpu", BLOCK_SIZE=16)
    q, k, v = (t.transpose(1, 2) for t in _qkv(rng, S=80))
    with pytest.raises(ValueError, match=r"look like \[B, S, H, D\].*takes \[B, H, S, D\].*transpose\(1, 2\)"):
        flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend=backend)
    with pytest.raises(ValueError, match=r"if query and key are \[B, S, H, D\].*transpose"):
        flex_attention(q, k, v, enable_gqa=True, backend=backend)   # no block mask: 64 heads vs 80
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=_causal, seq_len_q=64, seq_len_kv=64, num_qo_heads=4,
                                                num_kv_heads=2, head_dim=16, dtype=torch.float64)
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=r"looks like \[heads, seq, head_dim\].*q.transpose\(0, 1\)"):
        flex(q[0], k[0].transpose(0, 1), v[0].transpose(0, 1))


def test_failed_calls_leave_objects_usable(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    flex = FlexFlashInfer(device="cpu")
    with pytest.raises(RuntimeError, match="call prepare"):
        flex(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    with pytest.raises(TypeError, match="returned None"):
        flex.prepare(mask_fn=lambda q_idx, kv_idx: None, seq_len_q=64, seq_len_kv=64, num_qo_heads=4,
                     num_kv_heads=2, head_dim=16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="call prepare"):   # still says it is not prepared
        flex.block_mask
    flex.prepare(mask_fn=_causal, seq_len_q=64, seq_len_kv=64, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                 dtype=torch.float64)
    args = (q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    before = flex(*args)
    for bad in (dict(mask_fn=_if_mask), dict(mask_fn=_causal, block_size_row=2.5), dict(mask_fn=_causal, num_qo_heads=0)):
        with pytest.raises((TypeError, ValueError)):
            flex.prepare(**{**dict(seq_len_q=64, seq_len_kv=64, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                                   dtype=torch.float64), **bad})
        assert torch.equal(flex(*args), before)   # the previous preparation still runs

    bm = create_block_mask(_causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(TypeError):
        bm.mask_mod = lambda q_idx: q_idx   # one argument: refused, the old mask_mod kept
    with pytest.raises(ValueError):
        bm.seq_lengths = (64, 0)
    assert bm.mask_mod is _causal and bm.seq_lengths == (64, 64)
    with pytest.raises(ValueError):
        flex_attention(q, k[:, :, :32], v[:, :, :32], block_mask=bm, enable_gqa=True, backend="flashinfer")
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="flashinfer")
    assert torch.allclose(out, flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="reference"))

    cache = random_cache(rng, [40, 70], [1, 5], 16)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    paged.plan(get_mask_fn("causal"), *cache[3:], 4, 2, 16, 16, dtype=torch.float64)
    first = paged.run(cache[0], cache[1:3])
    with pytest.raises(TypeError, match="returned None"):
        paged.plan(lambda b, h, q_idx, kv_idx: None, *cache[3:], 4, 2, 16, 16, dtype=torch.float64)
    assert torch.equal(paged.run(cache[0], cache[1:3]), first)
