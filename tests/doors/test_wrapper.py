"""The seed's API: FlexFlashInfer(device).prepare(...) once, then flex(q, k, v) with [seq, heads, dim]
tensors, checked against the float64 oracle in dense_reference.py (CPU: reference backend)."""
import functools

import pytest
import torch

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import FlexFlashInfer, get_mask_fn

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def seq_qkv(rng, L, S, Hq, Hkv, D, dtype):
    def r(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)

    return r(L, Hq, D), r(S, Hkv, D), r(S, Hkv, D)


def oracle(q, k, v, mask=None, scale=None, score_fn=None):
    """The oracle on the seed layout: [seq, H, D] -> ([seq, Hq, D], lse [seq, Hq])."""
    out, lse = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               mask, scale=scale, score_fn=score_fn)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def assert_matches(flex, q, k, v, mask, dtype, scale=None, score_fn=None):
    out, lse = flex(q, k, v, return_lse=True)
    ref, ref_lse = oracle(q, k, v, mask, scale, score_fn)
    assert out.shape == q.shape[:2] + (v.shape[-1],) and out.dtype == dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], rtol=1e-6, atol=1e-6)
    plain = flex(q, k, v)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)
    return out, lse


def prepare(flex, mask_fn, L, S, Hq, Hkv, D, dtype=torch.float32, block=(64, 64), **kw):
    return flex.prepare(mask_fn=mask_fn, seq_len_q=L, seq_len_kv=S, num_qo_heads=Hq, num_kv_heads=Hkv,
                        head_dim=D, block_size_row=block[0], block_size_col=block[1], dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_quick_start_causal(rng, dtype):
    flex = FlexFlashInfer(device="cpu")
    L, H, D = 300, 4, 32
    assert prepare(flex, get_mask_fn("causal"), L, L, H, H, D, dtype, block=(128, 128)) is flex
    assert flex.active_backend == "reference"
    q, k, v = seq_qkv(rng, L, L, H, H, D, dtype)
    assert_matches(flex, q, k, v, dense_predicate("causal", L, L), dtype)


def test_seed_readme_custom_two_argument_mask_fn(rng):
    def custom_mask_fn(q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 256)

    L, H, D = 600, 2, 16
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, custom_mask_fn, L, L, H, H, D)
    q, k, v = seq_qkv(rng, L, L, H, H, D, torch.float32)
    # q - kv <= 256 is a causal window of 257 keys.
    assert_matches(flex, q, k, v, dense_predicate("sliding_window", L, L, window_size=257), torch.float32)


def test_mask_fn_variants_callable_object_and_partial(rng):
    class Band:
        def __call__(self, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < 30)

    def window(q_idx, kv_idx, width):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < width)

    L, H, D = 150, 2, 8
    q, k, v = seq_qkv(rng, L, L, H, H, D, torch.float64)
    for fn in (Band(), functools.partial(window, width=30), lambda q_idx, kv_idx, w=30: window(q_idx, kv_idx, w)):
        flex = FlexFlashInfer(device="cpu")
        prepare(flex, fn, L, L, H, H, D, torch.float64, block=(16, 32))
        assert_matches(flex, q, k, v, dense_predicate("sliding_window", L, L, window_size=30), torch.float64)


def test_four_argument_mask_mod_per_head(rng):
    Hq, Hkv, L, S, D = 4, 2, 130, 170, 16

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 10 + 20 * h)

    flex = FlexFlashInfer(device="cpu")
    prepare(flex, per_head, L, S, Hq, Hkv, D, torch.float64, block=(16, 16))
    assert flex.block_mask.shape == (1, Hq, L, S)
    q, k, v = seq_qkv(rng, L, S, Hq, Hkv, D, torch.float64)
    dense = torch.stack([dense_predicate("sliding_window", L, S, window_size=10 + 20 * h) for h in range(Hq)])[None]
    assert_matches(flex, q, k, v, dense, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,params", [("sliding_window", {"window_size": 100}),
                                         ("attamba", {"window_size": 64, "chunk_size": 32}),
                                         ("attamba", {"window_size": 17, "chunk_size": 50})])
def test_seed_library_masks_with_gqa(rng, name, params, dtype):
    L, S, Hq, Hkv, D = 333, 333, 6, 2, 16
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, get_mask_fn(name, **params), L, S, Hq, Hkv, D, dtype, block=(64, 32))
    assert flex.block_mask.shape == (1, 1, L, S)
    q, k, v = seq_qkv(rng, L, S, Hq, Hkv, D, dtype)
    assert_matches(flex, q, k, v, dense_predicate(name, L, S, **params), dtype)


@pytest.mark.parametrize("L,S", [(100, 257), (257, 100), (1, 50)])
def test_q_len_differs_from_kv_len(rng, L, S):
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, get_mask_fn("causal"), L, S, 2, 1, 16, torch.float64, block=(32, 32))
    q, k, v = seq_qkv(rng, L, S, 2, 1, 16, torch.float64)
    assert_matches(flex, q, k, v, dense_predicate("causal", L, S), torch.float64)


def test_full_attention_when_mask_fn_is_none(rng):
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, None, 90, 70, 2, 2, 16, torch.float64, block=(16, 16))
    q, k, v = seq_qkv(rng, 90, 70, 2, 2, 16, torch.float64)
    assert_matches(flex, q, k, v, None, torch.float64)


def test_score_mod_and_scale(rng):
    Hq, Hkv, L, D = 4, 2, 200, 16
    bias = torch.randn(Hq, generator=rng, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return 5.0 * torch.tanh(score / 5.0) + bias[h] - 0.02 * (q_idx - kv_idx)

    flex = FlexFlashInfer(device="cpu")
    prepare(flex, get_mask_fn("attamba", window_size=40, chunk_size=25), L, L, Hq, Hkv, D, torch.float64,
            block=(32, 32), score_mod=score_mod, scale=0.6)
    q, k, v = seq_qkv(rng, L, L, Hq, Hkv, D, torch.float64)
    assert_matches(flex, q, k, v, dense_predicate("attamba", L, L, window_size=40, chunk_size=25), torch.float64,
                   scale=0.6, score_fn=score_mod)


def test_rows_that_see_nothing(rng):
    def holes(q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx % 4 != 1)

    L, H, D = 64, 2, 8
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, holes, L, L, H, H, D, torch.float32, block=(16, 16))
    q, k, v = seq_qkv(rng, L, L, H, H, D, torch.float32)
    rows = torch.arange(L) % 4 == 1
    out, lse = assert_matches(flex, q, k, v, dense_predicate("causal", L, L) & ~rows.view(-1, 1), torch.float32)
    assert (out[rows] == 0).all() and torch.isneginf(lse[rows]).all()
    assert torch.isfinite(lse[~rows]).all()


def test_run_is_an_alias_of_call(rng):
    flex = prepare(FlexFlashInfer(device="cpu"), get_mask_fn("causal"), 50, 50, 2, 2, 8, torch.float64)
    q, k, v = seq_qkv(rng, 50, 50, 2, 2, 8, torch.float64)
    assert torch.equal(flex.run(q, k, v), flex(q, k, v))


# ----- lifecycle ------------------------------------------------------------------------------

def test_calling_before_prepare_raises(rng):
    flex = FlexFlashInfer(device="cpu")
    q, k, v = seq_qkv(rng, 10, 10, 1, 1, 8, torch.float32)
    with pytest.raises(RuntimeError, match="prepare"):
        flex(q, k, v)
    with pytest.raises(RuntimeError, match="prepare"):
        flex.block_mask
    with pytest.raises(RuntimeError, match="prepare"):
        flex.active_backend


def test_second_prepare_replaces_first(rng):
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, get_mask_fn("causal"), 100, 100, 2, 2, 16, torch.float32)
    q, k, v = seq_qkv(rng, 100, 100, 2, 2, 16, torch.float32)
    assert_matches(flex, q, k, v, dense_predicate("causal", 100, 100), torch.float32)

    # New mask, shape, heads and dtype: the old inputs no longer fit, the new ones do.
    prepare(flex, get_mask_fn("sliding_window", window_size=20), 120, 150, 4, 2, 8, torch.float64)
    with pytest.raises(ValueError):
        flex(q, k, v)
    q2, k2, v2 = seq_qkv(rng, 120, 150, 4, 2, 8, torch.float64)
    assert_matches(flex, q2, k2, v2, dense_predicate("sliding_window", 120, 150, window_size=20), torch.float64)

    # Same shape, different mask: the result follows the new mask.
    prepare(flex, get_mask_fn("full"), 120, 150, 4, 2, 8, torch.float64)
    assert_matches(flex, q2, k2, v2, None, torch.float64)


@pytest.mark.parametrize("bad", [
    dict(num_kv_heads=3),                       # 4 query heads not a multiple of 3
    dict(num_qo_heads=0),
    dict(head_dim=-1),
    dict(seq_len_q=None),
    dict(seq_len_kv=2.5),
    dict(block_size_row=0),
    dict(dtype="float16"),
    dict(dtype=torch.int32),
    dict(mask_fn=lambda a, b, c: a),
    dict(mask_fn=lambda q, kv: q - kv),         # not a bool mask: fails when evaluated
    dict(score_mod=lambda s, b: s),
    dict(scale="big"),
    dict(compile_block_mask="yes"),
    dict(compile_block_mask=True, cu_seqlens_q=[0, 30, 64], cu_seqlens_kv=[0, 30, 64]),
])
def test_failed_prepare_keeps_previous_preparation(rng, bad):
    flex = FlexFlashInfer(device="cpu")
    prepare(flex, get_mask_fn("sliding_window", window_size=30), 100, 100, 4, 2, 16, torch.float64, block=(16, 16))
    q, k, v = seq_qkv(rng, 100, 100, 4, 2, 16, torch.float64)
    before = flex(q, k, v)
    mask_before, prepared_before = flex.block_mask, flex._prepared
    args = dict(mask_fn=get_mask_fn("causal"), seq_len_q=64, seq_len_kv=64, num_qo_heads=4, num_kv_heads=2,
                head_dim=8, block_size_row=32, block_size_col=32, dtype=torch.float32)
    args.update(bad)
    with pytest.raises((TypeError, ValueError)):
        flex.prepare(**args)
    assert flex.block_mask is mask_before and flex._prepared is prepared_before
    assert torch.equal(flex(q, k, v), before)
    assert_matches(flex, q, k, v, dense_predicate("sliding_window", 100, 100, window_size=30), torch.float64)


def test_failed_prepare_with_raising_mask_fn_keeps_previous(rng):
    def broken(q_idx, kv_idx):
        raise RuntimeError("user bug")

    flex = prepare(FlexFlashInfer(device="cpu"), get_mask_fn("causal"), 50, 50, 2, 2, 8, torch.float64)
    q, k, v = seq_qkv(rng, 50, 50, 2, 2, 8, torch.float64)
    before = flex(q, k, v)
    with pytest.raises(RuntimeError, match="user bug"):
        prepare(flex, broken, 60, 60, 2, 2, 8, torch.float64)
    assert torch.equal(flex(q, k, v), before)


def test_failed_call_leaves_object_usable(rng):
    L, Hq, Hkv, D = 80, 4, 2, 16
    flex = prepare(FlexFlashInfer(device="cpu"), get_mask_fn("causal"), L, L, Hq, Hkv, D, torch.float32)
    q, k, v = seq_qkv(rng, L, L, Hq, Hkv, D, torch.float32)
    good = flex(q, k, v)
    bad_calls = [
        ((q[:-1], k, v), ValueError),                   # wrong seq_len_q
        ((q, k[:, :1], v[:, :1]), ValueError),          # wrong kv heads
        ((q[..., :8], k, v), ValueError),               # wrong head_dim
        ((q[None], k, v), ValueError),                  # wrong rank
        ((q.double(), k.double(), v.double()), TypeError),   # not the prepared dtype
        ((q, k.double(), v), TypeError),                # mixed dtypes
        ((q, k, v.tolist()), TypeError),                # not a tensor
        ((q.to(torch.int32), k, v), TypeError),         # not floating point
    ]
    for args, exc in bad_calls:
        with pytest.raises(exc):
            flex(*args)
        assert torch.equal(flex(q, k, v), good)
    assert_matches(flex, q, k, v, dense_predicate("causal", L, L), torch.float32)


def test_compiled_block_mask_build_gives_the_same_plan(rng):
    """compile_block_mask=True (torch.compile of the tile counts) classifies the same tiles as the
    eager build, and the attention matches the oracle."""
    mask = get_mask_fn("sliding_window", window_size=40)
    eager = prepare(FlexFlashInfer(device="cpu"), mask, 300, 300, 4, 2, 16, torch.float64)
    compiled = prepare(FlexFlashInfer(device="cpu"), mask, 300, 300, 4, 2, 16, torch.float64, compile_block_mask=True)
    assert torch.equal(compiled.block_mask.states, eager.block_mask.states)
    q, k, v = seq_qkv(rng, 300, 300, 4, 2, 16, torch.float64)
    assert_matches(compiled, q, k, v, dense_predicate("sliding_window", 300, 300, window_size=40), torch.float64)


def test_a_tensor_the_mask_reads_changed_after_prepare_raises(flashinfer_on_cpu, rng):
    """prepare() plans the mask from the values of the tensors it reads (bands, partial tiles'
    bits): one written in place afterwards makes the next call raise, saying to prepare again,
    where the old plan ran silently."""
    windows = torch.tensor([5, 10])

    def per_head(b, h, q, kv):
        return (q >= kv) & (q - kv < windows[h])

    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=per_head, seq_len_q=100, seq_len_kv=100, num_qo_heads=2,
                                                num_kv_heads=2, head_dim=16, dtype=torch.float32)
    q = torch.randn(100, 2, 16, generator=rng)
    flex(q, q, q)
    windows.fill_(20)
    with pytest.raises(ValueError, match="mask_fn reads was written in place.*prepare\\(\\) again"):
        flex(q, q, q)
    flex.prepare(mask_fn=per_head, seq_len_q=100, seq_len_kv=100, num_qo_heads=2, num_kv_heads=2, head_dim=16,
                 dtype=torch.float32)
    flex(q, q, q)


def test_a_mask_tensor_written_after_prepare_raises_on_the_reference_backend_too():
    """The reference runs prepare()'s tile tables with the mask's values at the call: written in
    between, the answer was neither mask's (1.2 off the new one)."""
    wins = torch.tensor([3, 40])

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < wins[h])

    flex = FlexFlashInfer(device="cpu", backend="reference").prepare(
        mask_fn=per_head, seq_len_q=256, seq_len_kv=256, num_qo_heads=2, num_kv_heads=2, head_dim=16,
        dtype=torch.float32)
    q, k, v = (torch.randn(256, 2, 16) for _ in range(3))
    flex(q, k, v)
    wins.fill_(100)
    with pytest.raises(ValueError, match=r"prepare\(\) again"):
        flex(q, k, v)
