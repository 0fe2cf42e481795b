"""Packed variable-length batches (cu_seqlens) in the seed wrapper, against the float64 oracle
run sequence by sequence: mask_mod and score_mod see positions within each sequence and b = the
sequence's index."""
import pytest
import torch

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import FlexFlashInfer, get_mask_fn


def packed(rng, lens_q, lens_kv, H=4, Hkv=2, D=16):
    cu_q = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    cu_kv = [0] + torch.tensor(lens_kv).cumsum(0).tolist()
    q = torch.randn(cu_q[-1], H, D, generator=rng, dtype=torch.float64)
    k = torch.randn(cu_kv[-1], Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(cu_kv[-1], Hkv, D, generator=rng, dtype=torch.float64)
    return cu_q, cu_kv, q, k, v


def oracle(q, k, v, dense, **kw):
    out, lse = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dense, **kw)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def test_causal_documents_of_random_lengths(rng):
    lens = torch.randint(1, 200, (6,), generator=rng).tolist()
    cu_q, cu_kv, q, k, v = packed(rng, lens, lens)
    flex = FlexFlashInfer(device="cpu")
    flex.prepare(mask_fn=get_mask_fn("causal"), num_qo_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float64,
                 block_size_row=32, block_size_col=32, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
    out, lse = flex(q, k, v, return_lse=True)
    assert len(flex.block_masks) == 6
    for i, n in enumerate(lens):
        rows = slice(cu_q[i], cu_q[i + 1])
        ref_out, ref_lse = oracle(q[rows], k[rows], v[rows], dense_predicate("causal", n, n))
        assert rel_err(out[rows], ref_out) < 1e-10
        assert torch.allclose(lse[rows].double(), ref_lse, atol=1e-5)


def test_mask_and_score_mod_see_the_sequence_index_and_local_positions(rng):
    lens_q, lens_kv = [50, 0, 90, 30], [70, 10, 90, 0]      # an empty query run and a run with no keys
    cu_q, cu_kv, q, k, v = packed(rng, lens_q, lens_kv)
    windows = torch.tensor([5, 7, 20, 3])
    bias = torch.randn(4, generator=rng, dtype=torch.float64)

    def per_sequence_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + 10) & (q_idx - kv_idx < windows[b])

    def per_sequence_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b] * (q_idx - kv_idx)

    flex = FlexFlashInfer(device="cpu")
    flex.prepare(mask_fn=per_sequence_window, num_qo_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float64,
                 score_mod=per_sequence_bias, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, block_size_row=16,
                 block_size_col=16)
    out, lse = flex(q, k, v, return_lse=True)
    for i in range(4):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_kv[i], cu_kv[i + 1])
        if lens_q[i] == 0:
            continue
        if lens_kv[i] == 0:
            assert (out[rows] == 0).all() and torch.isneginf(lse[rows]).all()
            continue
        qi, ki = torch.arange(lens_q[i]).view(-1, 1), torch.arange(lens_kv[i]).view(1, -1)
        dense = (ki <= qi + 10) & (qi - ki < windows[i])
        ref_out, _ = oracle(q[rows], k[keys], v[keys], dense,
                            score_fn=lambda s, b, h, qq, kk: s + bias[i] * (qq - kk))
        assert rel_err(out[rows], ref_out) < 1e-10


@pytest.mark.parametrize("kwargs,needle", [
    ({"cu_seqlens_q": [0, 5]}, "both"),
    ({"cu_seqlens_q": [0, 5], "cu_seqlens_kv": [0, 5, 9]}, "sequences"),
    ({"cu_seqlens_q": [1, 5], "cu_seqlens_kv": [0, 5]}, "start at 0"),
    ({"cu_seqlens_q": [0, 5, 3], "cu_seqlens_kv": [0, 5, 6]}, "never decrease"),
    ({"cu_seqlens_q": [0, 5], "cu_seqlens_kv": [0, 5], "seq_len_q": 6}, "seq_len_q"),
    # a batch without any query or any key: was "seq_len_q must be a positive int, got 0"
    ({"cu_seqlens_q": [0, 0, 0], "cu_seqlens_kv": [0, 4, 9]}, "cu_seqlens_q holds no token"),
    ({"cu_seqlens_q": [0, 5], "cu_seqlens_kv": [0, 0]}, "cu_seqlens_kv holds no token"),
])
def test_bad_cu_seqlens_name_the_argument(kwargs, needle):
    flex = FlexFlashInfer(device="cpu")
    with pytest.raises(ValueError, match=needle):
        flex.prepare(mask_fn=None, num_qo_heads=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("mask_name,params", [("chunked_causal", {"chunk_size": 64}), ("causal", {}),
                                              ("attamba", {"window_size": 8, "chunk_size": 4})])
def test_a_sequence_with_one_key_and_several_queries_in_one_launch(flashinfer_on_cpu, rng, mask_name, params):
    """Packed beside a 4 x 4 sequence, one of 4 queries over 1 key, which the mask shows to every
    query: joined into one causal ragged launch (FlashInfer aligns causal to the bottom right),
    only the last query saw it, the others gave 0 and LSE -inf."""
    lens_q, lens_kv = [4, 4], [4, 1]
    cu_q, cu_kv, q, k, v = packed(rng, lens_q, lens_kv)
    mask = get_mask_fn(mask_name, **params)
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mask, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                                                dtype=torch.float64, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
    out, lse = flex(q, k, v, return_lse=True)
    for i in range(2):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_kv[i], cu_kv[i + 1])
        qi, ki = torch.arange(lens_q[i]).view(-1, 1), torch.arange(lens_kv[i]).view(1, -1)
        dense = mask(torch.tensor(0), torch.tensor(0), qi, ki)   # the seed API's positions: top-left, per sequence
        ref_out, ref_lse = oracle(q[rows], k[keys], v[keys], dense)
        assert rel_err(out[rows], ref_out) < 1e-6
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[rows]), seen)
