"""Bad input raises ValueError or TypeError whose message names the offending argument."""
import pytest
import torch

from flex_flash_infer import FlexFlashInfer, PagedFlexAttention, create_block_mask, flex_attention, get_mask_fn

B, HQ, HKV, L, S, D = 2, 4, 2, 40, 56, 16


def tensors(B=B, Hq=HQ, Hkv=HKV, L=L, S=S, D=D, Dv=None, dtype=torch.float32):
    return (torch.randn(B, Hq, L, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype),
            torch.randn(B, Hkv, S, Dv or D, dtype=dtype))


def causal_mask(L=L, S=S, B=None, H=None):
    return create_block_mask(get_mask_fn("causal"), B, H, L, S, device="cpu", BLOCK_SIZE=16)


# ----- flex_attention ---------------------------------------------------------------------------

def test_wrong_ranks_name_the_tensor():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="query.*4-D"):
        flex_attention(q[0], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="key.*4-D"):
        flex_attention(q, k[None], v, enable_gqa=True)
    with pytest.raises(ValueError, match="value.*4-D"):
        flex_attention(q, k, v[0, 0], enable_gqa=True)


def test_mismatched_head_dim():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="head_dim"):
        flex_attention(q, k[..., :8], v, enable_gqa=True)


def test_mismatched_batch():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="batch"):
        flex_attention(q, k[:1], v[:1], enable_gqa=True)
    with pytest.raises(ValueError, match="batch"):
        flex_attention(q, k, v[:1], enable_gqa=True)


def test_value_must_match_key_heads_and_length():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="value"):
        flex_attention(q, k, v[:, :, :-1], enable_gqa=True)
    with pytest.raises(ValueError, match="value"):
        flex_attention(q, k, v[:, :1], enable_gqa=True)


def test_query_heads_must_be_multiple_of_key_heads():
    q, k, v = tensors(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\).*multiple.*key heads \(2\)"):
        flex_attention(q, k, v, enable_gqa=True)


def test_gqa_needs_enable_gqa():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention(q, k, v)
    flex_attention(q, k, v, enable_gqa=True)   # and it works with it


def test_mixed_dtypes_name_the_tensor():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="key.*dtype"):
        flex_attention(q, k.double(), v, enable_gqa=True)
    with pytest.raises(TypeError, match="value.*dtype"):
        flex_attention(q, k, v.double(), enable_gqa=True)


def test_integer_tensors_rejected():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="query.*floating"):
        flex_attention(q.to(torch.int64), k, v, enable_gqa=True)


def test_non_tensor_inputs():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="query.*torch.Tensor"):
        flex_attention(q.tolist(), k, v, enable_gqa=True)
    with pytest.raises(TypeError, match="key.*torch.Tensor"):
        flex_attention(q, None, v, enable_gqa=True)
    with pytest.raises(TypeError, match="value.*torch.Tensor"):
        flex_attention(q, k, v.numpy(), enable_gqa=True)


def test_empty_sequence_rejected():
    q, k, v = tensors()
    with pytest.raises(ValueError, match=r"sequence lengths must be >= 1, got query 0 and key"):
        flex_attention(q[:, :, :0], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"sequence lengths must be >= 1, got query \d+ and key 0"):
        flex_attention(q, k[:, :, :0], v[:, :, :0], enable_gqa=True)


def test_block_mask_for_other_lengths():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="block_mask.*Q_LEN"):
        flex_attention(q, k, v, block_mask=causal_mask(L=L + 1), enable_gqa=True)
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q, k, v, block_mask=causal_mask(S=S - 1), enable_gqa=True)
    # Swapped lengths are wrong too.
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q, k, v, block_mask=causal_mask(L=S, S=L), enable_gqa=True)


def test_block_mask_for_other_batch_or_heads():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q, k, v, block_mask=causal_mask(B=3), enable_gqa=True)
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q, k, v, block_mask=causal_mask(H=HKV + 1), enable_gqa=True)


def test_block_mask_of_wrong_type():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="block_mask"):
        flex_attention(q, k, v, block_mask=torch.ones(L, S, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="block_mask"):
        flex_attention(q, k, v, block_mask=get_mask_fn("causal"), enable_gqa=True)


def test_mask_fn_with_three_arguments():
    def three(b, q_idx, kv_idx):
        return q_idx >= kv_idx

    with pytest.raises(TypeError, match="mask_mod.*4 arguments"):
        create_block_mask(three, 1, 1, L, S, device="cpu")
    with pytest.raises(TypeError, match="mask_fn"):
        FlexFlashInfer(device="cpu").prepare(mask_fn=three, seq_len_q=L, seq_len_kv=S, num_qo_heads=2,
                                             num_kv_heads=2, head_dim=D, dtype=torch.float32)


@pytest.mark.parametrize("score_mod", [
    lambda score, b, h, q_idx: score,
    lambda score, b, h, q_idx, kv_idx, extra: score,
    lambda: 0.0,
])
def test_score_mod_with_wrong_arg_count(score_mod):
    q, k, v = tensors()
    with pytest.raises(TypeError, match="score_mod.*5 arguments"):
        flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True)
    with pytest.raises(TypeError, match="score_mod"):
        FlexFlashInfer(device="cpu").prepare(mask_fn=None, seq_len_q=L, seq_len_kv=S, num_qo_heads=2,
                                             num_kv_heads=2, head_dim=D, dtype=torch.float32, score_mod=score_mod)


def test_score_mod_not_callable():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="score_mod"):
        flex_attention(q, k, v, score_mod=1.5, enable_gqa=True)


def test_bad_scale():
    q, k, v = tensors()
    with pytest.raises(TypeError, match="scale"):
        flex_attention(q, k, v, scale="0.1", enable_gqa=True)


def test_flashinfer_backend_on_cpu():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="flashinfer"):
        flex_attention(q, k, v, enable_gqa=True, backend="flashinfer")
    with pytest.raises(ValueError, match="flashinfer"):
        FlexFlashInfer(device="cpu", backend="flashinfer").prepare(
            mask_fn=get_mask_fn("causal"), seq_len_q=L, seq_len_kv=L, num_qo_heads=2, num_kv_heads=2,
            head_dim=64, dtype=torch.float16)


def test_unknown_backend_name():
    q, k, v = tensors()
    with pytest.raises(ValueError, match="backend"):
        flex_attention(q, k, v, enable_gqa=True, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        FlexFlashInfer(device="cpu", backend="triton")


def test_reference_backend_by_name_works():
    q, k, v = tensors()
    assert torch.equal(flex_attention(q, k, v, enable_gqa=True, backend="reference"),
                       flex_attention(q, k, v, enable_gqa=True))


# ----- FlexFlashInfer -----------------------------------------------------------------------------

# PagedFlexAttention was accepted, then plan() failed with torch's bare AssertionError from CUDA initialization
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("cls,message", [(FlexFlashInfer, "cuda"),
                                         (PagedFlexAttention, "device='cuda' was requested but CUDA is not available")])
def test_cuda_device_without_cuda(cls, message):
    with pytest.raises(ValueError, match=message):
        cls(device="cuda")
    with pytest.raises(ValueError, match=message):
        cls()                  # the default device is cuda


@pytest.mark.parametrize("cls", [FlexFlashInfer, PagedFlexAttention])
def test_bad_workspace_buffer(cls):
    with pytest.raises(TypeError, match="workspace_buffer"):
        cls(device="cpu", workspace_buffer=torch.empty(16, dtype=torch.float32))


PREPARE = dict(mask_fn=None, seq_len_q=L, seq_len_kv=S, num_qo_heads=4, num_kv_heads=2, head_dim=D,
               dtype=torch.float32)


@pytest.mark.parametrize("name,value", [
    ("num_qo_heads", 0), ("num_qo_heads", 4.0), ("num_qo_heads", "4"), ("num_qo_heads", True),
    ("num_qo_heads", None), ("num_kv_heads", -2), ("seq_len_q", 0), ("seq_len_kv", 1.5), ("head_dim", None),
    ("block_size_row", 0), ("block_size_col", "64"),
])
def test_prepare_rejects_bad_ints(name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        FlexFlashInfer(device="cpu").prepare(**{**PREPARE, name: value})


def test_prepare_heads_not_a_multiple():
    with pytest.raises(ValueError, match="num_qo_heads.*num_kv_heads"):
        FlexFlashInfer(device="cpu").prepare(**{**PREPARE, "num_qo_heads": 3})


@pytest.mark.parametrize("dtype", ["float16", None, torch.int32, torch.bool, float])
def test_prepare_dtype_must_be_a_floating_torch_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        FlexFlashInfer(device="cpu").prepare(**{**PREPARE, "dtype": dtype})


def test_prepare_mask_fn_not_callable():
    with pytest.raises(TypeError, match="mask_fn"):
        FlexFlashInfer(device="cpu").prepare(**{**PREPARE, "mask_fn": "causal"})


def test_prepare_bad_scale():
    with pytest.raises(TypeError, match="scale"):
        FlexFlashInfer(device="cpu").prepare(**{**PREPARE, "scale": [0.1]})


def test_call_errors_name_the_tensor():
    flex = FlexFlashInfer(device="cpu").prepare(**PREPARE)
    q, k, v = torch.randn(L, 4, D), torch.randn(S, 2, D), torch.randn(S, 2, D)
    flex(q, k, v)
    with pytest.raises(ValueError, match="q.*shape"):
        flex(q[:-1], k, v)
    with pytest.raises(ValueError, match="k.*shape"):
        flex(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v.*shape"):
        flex(q, k, v[..., :8])
    with pytest.raises(ValueError, match="q.*3-D"):
        flex(q[None], k, v)
    with pytest.raises(TypeError, match="k.*dtype"):
        flex(q, k.double(), v)
    with pytest.raises(TypeError, match="q.*dtype"):
        flex(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="v.*torch.Tensor"):
        flex(q, k, None)


# ----- mask library and block masks ----------------------------------------------------------

def test_mask_mod_returning_wrong_shape():
    def bad_shape(b, h, q_idx, kv_idx):
        return torch.ones(3, 5, dtype=torch.bool)

    with pytest.raises(ValueError, match="bad_shape"):
        create_block_mask(bad_shape, 1, 1, L, S, device="cpu")


def test_create_block_mask_bad_sizes():
    causal = get_mask_fn("causal")
    with pytest.raises(ValueError, match="KV_LEN"):
        create_block_mask(causal, 1, 1, L, -1, device="cpu")
    with pytest.raises(ValueError, match="B"):
        create_block_mask(causal, 0, 1, L, S, device="cpu")
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        create_block_mask(causal, 1, 1, L, S, device="cpu", BLOCK_SIZE=(16, 0))
