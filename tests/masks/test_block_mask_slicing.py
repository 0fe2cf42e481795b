"""BlockMask indexing as torch's (block_mask[b, h, query tiles]), the decoding idiom built on it
(slice the current query tile, set a mask_mod with shifted positions), and plans that follow a
reassigned mask_mod or seq_lengths instead of reusing a stale one."""
import sys

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import fake_flashinfer
from dense_reference import rel_err
from flex_flash_infer.backends import backend_choice, flashinfer_backend
from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


@pytest.mark.parametrize("index", [0, -1, (1, 2), (slice(0, 2), slice(1, 2)), (slice(None), slice(None), 2),
                                   (slice(None), slice(None), torch.tensor([1, 3]))])
def test_slices_match_torchs(index):
    # whole tiles only: the two libraries classify a partly padded tail tile differently
    def causal(b, h, q, kv):
        return q >= kv

    ours = create_block_mask(causal, 2, 3, 512, 640, device="cpu")
    theirs = torch_flex.create_block_mask(causal, 2, 3, 512, 640, device="cpu")
    a, b = ours[index], theirs[index]
    for name in TABLES:
        assert torch.equal(getattr(a, name).long(), getattr(b, name).long()), name
    assert a.seq_lengths == (512, 640) and a.shape == tuple(b.shape) and a.numel() == b.numel()
    with pytest.raises(RuntimeError, match="set its mask_mod first"):
        a.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(0), torch.tensor(0))


def test_bad_slices_name_the_problem():
    bm = create_block_mask(get_mask_fn("causal"), 2, 1, 256, 256, device="cpu")
    with pytest.raises(IndexError, match="out of range"):
        bm[2]
    with pytest.raises(IndexError, match="batch, head, query tile"):
        bm[0, 0, 0, 0]
    for bad in [(1,), ("a", 3), (0, 5), 7]:
        with pytest.raises(ValueError, match="seq_lengths must be a"):
            bm.seq_lengths = bad
    with pytest.raises(TypeError, match="mask_mod must be a callable"):
        bm.mask_mod = 5
    assert bm.seq_lengths == (256, 256) and bm.mask_mod is not None   # a bad assignment changes nothing


def test_decoding_with_a_sliced_block_mask_matches_the_full_row(rng):
    """gpt-fast's decoding step: the query at position pos uses block_mask[:, :, pos // 128] with
    its mask_mod shifted by pos and seq_lengths (1, S)."""
    S, D, pos = 640, 16, 300
    mask = get_mask_fn("sliding_window", window_size=100)
    full = create_block_mask(mask, None, None, S, S, device="cpu")
    q = torch.randn(1, 4, S, D, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 2, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 2, S, D, generator=rng, dtype=torch.float64)
    expected = flex_attention(q, k, v, block_mask=full, enable_gqa=True)[:, :, pos:pos + 1]
    step = full[:, :, pos // full.BLOCK_SIZE[0]]
    step.mask_mod = lambda b, h, q_idx, kv_idx: mask(b, h, q_idx + pos, kv_idx)
    step.seq_lengths = (1, S)
    got = flex_attention(q[:, :, pos:pos + 1], k, v, block_mask=step, enable_gqa=True)
    assert rel_err(got, expected) < 1e-12


def test_a_reassigned_mask_mod_is_planned_again(monkeypatch, rng):
    """The FlashInfer plan cached on a block mask belongs to its mask_mod: setting another one
    (or other seq_lengths) drops it."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(backend_choice, "unsupported_reason", lambda *a: None)
    L, D = 256, 16
    q = torch.randn(1, 2, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 2, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 2, L, D, generator=rng, dtype=torch.float64)
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu")
    causal = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    assert bm._plans
    bm.mask_mod = get_mask_fn("sliding_window", window_size=8)   # narrower than causal: same tiles apply
    assert not bm._plans
    windowed = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    expected = flex_attention(q, k, v, block_mask=bm, backend="reference")
    assert rel_err(windowed, expected) < 1e-6 and rel_err(causal, expected) > 1e-3
