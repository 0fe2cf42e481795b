"""Block masks whose tables were not made by this library's builder: a padded last key tile
listed as full (from_kv_blocks, torch's tables), and tables longer than the mask's seq_lengths (a
torch mask whose lengths were set shorter). The FlashInfer path (CPU model) must give what the
reference backend gives; it attended the padded keys of the full tile (0.04 off) and raised an
IndexError on the longer tables."""
import pytest
import torch

from flex_flash_infer import create_block_mask, flex_attention
from flex_flash_infer.block_mask import BlockMask


def _tables(selected):
    num = selected.sum(-1).to(torch.int32)
    idx = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


@pytest.mark.parametrize("per_head", [False, True], ids=["tiles", "tiles-per-head"])
@pytest.mark.parametrize("L,S,block", [(100, 230, 32), (70, 129, 64), (128, 200, (32, 16))])
def test_a_padded_last_key_tile_listed_as_full(flashinfer_on_cpu, rng, per_head, L, S, block):
    H = 2

    def mask_mod(b, h, q, kv):
        return (kv <= q + 40 + (h * 9 if per_head else 0)) | (kv >= S - 6)

    bm = create_block_mask(mask_mod, 1, H if per_head else None, L, S, device="cpu", BLOCK_SIZE=block)
    states = bm.states.clone()
    assert bool((states[..., -1] == 1).all())   # the builder keeps a padded tile partial
    states[..., -1] = 2                          # made elsewhere: full, the mask holding on its keys
    full_num, full_idx = _tables(states == 2)
    num, idx = _tables(states == 1)
    made = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(L, S))
    q = torch.randn(1, H, L, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(1, H, S, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    want = flex_attention(q, k, v, block_mask=made, backend="reference")
    route = "tiles-per-head" if per_head else "tiles"
    got = flex_attention(q, k, v, block_mask=made, backend="flashinfer", kernel_options={"ROUTE": route})
    assert (got - want).abs().max() < 1e-6   # the CPU model computes as the kernels do, in float32


def test_tables_longer_than_the_sequences(flashinfer_on_cpu, rng):
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

    tm = torch_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256, device="cpu")
    tm.seq_lengths = (128, 256)
    q = torch.randn(1, 2, 128, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 256, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    want = flex_attention(q, k, v, block_mask=tm, backend="reference")
    assert (flex_attention(q, k, v, block_mask=tm, backend="flashinfer") - want).abs().max() < 1e-6


def test_a_tensor_the_mask_reads_written_in_place_plans_again(flashinfer_on_cpu, rng):
    """A per-head window read from a tensor (and a 0-d one), changed in place after a call: the
    plan cached on the block mask (bands, partial tiles' bits) was built from the old values and
    was reused (1.2 off); it is planned again, and agrees with the reference backend, which reads
    the mask live on partial tiles as torch's kernels do."""
    windows, w0 = torch.tensor([5, 10]), torch.tensor(7)

    def per_head(b, h, q, kv):
        return (q >= kv) & (q - kv < windows[h])

    def scalar(b, h, q, kv):
        return (q >= kv) & (q - kv < w0)

    q = torch.randn(1, 2, 300, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 300, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    for mask_mod, heads, table in ((per_head, 2, windows), (scalar, None, w0)):
        bm = create_block_mask(mask_mod, None, heads, 300, 300, device="cpu", BLOCK_SIZE=64)
        flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
        table.fill_(20)
        want = flex_attention(q, k, v, block_mask=bm, backend="reference")
        assert (flex_attention(q, k, v, block_mask=bm, backend="flashinfer") - want).abs().max() < 1e-6


def _attend_both(bm, rng, L=256, S=256):
    q, k, v = (torch.randn(1, 1, n, 16, dtype=torch.float64, generator=rng) for n in (L, S, S))
    ref, ref_lse = flex_attention(q, k, v, block_mask=bm, backend="reference", return_lse=True)
    got, got_lse = flex_attention(q, k, v, block_mask=bm, backend="flashinfer", return_lse=True)
    return (got - ref).abs().max().item(), (got_lse - ref_lse).abs().max().item()


def test_a_full_tile_the_mask_partly_hides_is_attended_whole(flashinfer_on_cpu, rng):
    """torch attends a FULL tile without its mask_mod; the key-column finder reads the mask_mod
    alone (2.3 off before it was kept to tables that agree with the mask)."""
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

    bm = TorchBlockMask.from_kv_blocks(
        torch.tensor([[[0, 1]]], dtype=torch.int32), torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32),
        torch.tensor([[[1, 1]]], dtype=torch.int32), torch.tensor([[[[0, 0], [0, 0]]]], dtype=torch.int32),
        BLOCK_SIZE=128, mask_mod=lambda b, h, q, kv: q >= kv)
    assert max(_attend_both(bm, rng)) < 1e-6


def test_an_empty_tile_over_sink_keys_is_skipped(flashinfer_on_cpu, rng):
    from flex_flash_infer import get_mask_fn

    mm = get_mask_fn("streaming", sink_size=4, window_size=16)
    states = create_block_mask(mm, None, None, 256, 256, device="cpu", BLOCK_SIZE=16).states.clone()
    states[0, 0, 15, 0] = 0                     # the last query tile no longer visits the sinks
    bm = BlockMask.from_kv_blocks(*_tables(states == 1), *_tables(states == 2), BLOCK_SIZE=16, mask_mod=mm,
                                  seq_lengths=(256, 256))
    assert max(_attend_both(bm, rng)) < 1e-6


def test_a_mask_mod_assigned_after_the_tables_were_built(flashinfer_on_cpu, rng):
    """The tables rule after `block_mask.mask_mod = other`, as in torch (1.39 off before)."""
    from flex_flash_infer import get_mask_fn

    bm = create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu", BLOCK_SIZE=32)
    bm.mask_mod = get_mask_fn("streaming", sink_size=4, window_size=16)
    assert max(_attend_both(bm, rng)) < 1e-6


def test_a_torch_block_mask_of_attamba_keeps_the_column_route(flashinfer_on_cpu):
    """Tables made by torch from the same mask agree with it: the key columns still apply."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
    from flex_flash_infer import get_mask_fn

    mm = get_mask_fn("attamba", window_size=256, chunk_size=128)
    bm = BlockMask.from_torch(torch_create_block_mask(mm, None, None, 2048, 2048, device="cpu"))
    assert bm.plan(8, 8, head_dim=64).route == "bands+columns"
