"""Every user mistake ends in ValueError or TypeError that names the argument, before any kernel."""
import pytest
import torch

from flex_flash_infer import FlexFlashInfer, create_block_mask, flex_attention, get_mask_fn


def t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


CASES = [
    ("query rank", lambda: flex_attention(t(2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4)), ValueError, "query must be 4-D"),
    ("key not a tensor", lambda: flex_attention(t(1, 2, 8, 4), [1], t(1, 2, 8, 4)), TypeError, "key must be a torch.Tensor"),
    ("head_dim", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 5), t(1, 2, 8, 5)), ValueError, "head_dim"),
    ("batch", lambda: flex_attention(t(2, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4)), ValueError, "batch"),
    ("gqa multiple", lambda: flex_attention(t(1, 3, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), enable_gqa=True), ValueError, "multiple"),
    ("gqa flag", lambda: flex_attention(t(1, 4, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4)), ValueError, "enable_gqa"),
    ("dtypes", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4, dtype=torch.float64), t(1, 2, 8, 4)), TypeError, "key has dtype"),
    ("integer input", lambda: flex_attention(t(1, 2, 8, 4, dtype=torch.int32), t(1, 2, 8, 4), t(1, 2, 8, 4)), TypeError, "floating"),
    ("value length", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 9, 4)), ValueError, "value"),
    ("mask lengths", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4),
                                            block_mask=create_block_mask(get_mask_fn("causal"), 1, 1, 16, 16, "cpu")), ValueError, "Q_LEN"),
    ("mask heads", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4),
                                          block_mask=create_block_mask(get_mask_fn("causal"), 1, 3, 8, 8, "cpu")), ValueError, "block_mask"),
    ("not a mask", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), block_mask="causal"), TypeError, "block_mask"),
    ("score_mod arity", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), score_mod=lambda s, b: s), TypeError, "score_mod"),
    ("scale type", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), scale="big"), TypeError, "scale"),
    ("backend name", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), backend="triton"), ValueError, "backend"),
    ("flashinfer on cpu", lambda: flex_attention(t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), backend="flashinfer"), ValueError, "CUDA"),
    ("mask_fn arity", lambda: FlexFlashInfer("cpu").prepare(mask_fn=lambda a, b, c: a, seq_len_q=8, seq_len_kv=8,
                                                            num_qo_heads=1, num_kv_heads=1, head_dim=4), TypeError, "mask_fn"),
    ("heads zero", lambda: FlexFlashInfer("cpu").prepare(mask_fn=None, seq_len_q=8, seq_len_kv=8, num_qo_heads=0,
                                                         num_kv_heads=1, head_dim=4), ValueError, "num_qo_heads"),
    ("seq not int", lambda: FlexFlashInfer("cpu").prepare(mask_fn=None, seq_len_q=8.5, seq_len_kv=8, num_qo_heads=1,
                                                          num_kv_heads=1, head_dim=4), ValueError, "seq_len_q"),
    ("dtype not dtype", lambda: FlexFlashInfer("cpu").prepare(mask_fn=None, seq_len_q=8, seq_len_kv=8, num_qo_heads=1,
                                                              num_kv_heads=1, head_dim=4, dtype="half"), TypeError, "dtype"),
    ("wrapper backend", lambda: FlexFlashInfer("cpu", backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize("what,call,error,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(what, call, error, needle):
    with pytest.raises(error, match=needle):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        FlexFlashInfer(device="cuda")
