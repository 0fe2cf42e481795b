"""Our BlockMask has the members of torch's (torch.nn.attention.flex_attention.BlockMask) that
torch code and torch's own flex_attention use, with torch's answers: as_tuple (so torch's
flex_attention accepts our mask), _adjust (what torch's length-mismatch error asks for), the
generated q tables and from_kv_blocks(compute_q_blocks=); malformed tables are refused where
they are given, naming the argument."""
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from dense_reference import dense_attention, rel_err
from flex_flash_infer import BlockMask, create_block_mask, flex_attention, get_mask_fn
from random_masks import random_mask_mod

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
Q_TABLES = ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
# lengths that are multiples of the block and lengths that are not, blocks other than 128
CASES = [(256, 256, 128), (200, 230, 32), (173, 301, (16, 48)), (96, 64, 64), (50, 300, (64, 16))]


def torch_twin(ours, **kwargs):
    """torch's BlockMask of the same tables."""
    return torch_flex.BlockMask.from_kv_blocks(*(getattr(ours, t) for t in TABLES), BLOCK_SIZE=ours.BLOCK_SIZE,
                                               mask_mod=ours.mask_mod, seq_lengths=ours.seq_lengths, **kwargs)


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a is b or a == b


def torch_eager(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # torch warns that its eager path is unfused
        return torch_flex.flex_attention(*args, **kwargs)


@pytest.mark.parametrize("L,S,block", CASES)
@pytest.mark.parametrize("flatten", [True, False])
def test_as_tuple_is_torchs(rng, L, S, block, flatten):
    mod, _ = random_mask_mod(2, 3, L, S, rng)
    ours = create_block_mask(mod, 2, 3, L, S, device="cpu", BLOCK_SIZE=block)
    got, want = ours.as_tuple(flatten), torch_twin(ours).as_tuple(flatten)
    assert len(got) == len(want)
    assert all(same(a, b) for a, b in zip(got, want)), [i for i, (a, b) in enumerate(zip(got, want)) if not same(a, b)]


@pytest.mark.parametrize("L,S,block", CASES)
def test_torchs_flex_attention_takes_our_mask(rng, L, S, block):
    """torch's eager flex_attention gives with our mask what it gives with torch's mask of the
    same tables, and both what the mask_mod says (torch has no backward on the CPU)."""
    mod, dense = random_mask_mod(1, 2, L, S, rng, density=0.6)
    ours = create_block_mask(mod, 1, 2, L, S, device="cpu", BLOCK_SIZE=block)
    q, k, v = (torch.randn(1, 2, n, 16, generator=rng, dtype=torch.float64) for n in (L, S, S))
    out = torch_eager(q, k, v, block_mask=ours)
    assert torch.equal(out, torch_eager(q, k, v, block_mask=torch_twin(ours)))
    rows = dense.any(-1, keepdim=True)        # rows that see no key: 0, as in the oracle
    assert rel_err(out * rows, dense_attention(q, k, v, dense)[0]) < 1e-10


@pytest.mark.parametrize("L,S,block", CASES)
def test_q_tables_are_torchs(rng, L, S, block):
    mod, _ = random_mask_mod(2, 1, L, S, rng)
    ours = create_block_mask(mod, 2, 1, L, S, device="cpu", BLOCK_SIZE=block)
    theirs = torch_twin(ours)
    for name in Q_TABLES:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    # the same tile map, read by key tile: row j of the q tables lists the query tiles of column j
    for num, idx, kv_num, kv_idx in (("q_num_blocks", "q_indices", "kv_num_blocks", "kv_indices"),
                                     ("full_q_num_blocks", "full_q_indices", "full_kv_num_blocks", "full_kv_indices")):
        by_kv = torch.zeros(ours.states.shape, dtype=torch.bool)
        n, i = getattr(ours, num), getattr(ours, idx)
        for b in range(2):
            for col in range(n.shape[-1]):
                by_kv[b, 0, i[b, 0, col, :int(n[b, 0, col])].long(), col] = True
        assert torch.equal(by_kv, ours.states == (1 if num == "q_num_blocks" else 2))


def test_q_tables_of_a_whole_tile_mask_match_torchs_own_build():
    """Where torch's create_block_mask and ours classify the same tiles (whole tiles), the q
    tables equal those torch builds itself."""
    window = get_mask_fn("sliding_window", window_size=100)
    ours = create_block_mask(window, 2, 2, 512, 384, device="cpu", BLOCK_SIZE=64)
    theirs = torch_flex.create_block_mask(window, 2, 2, 512, 384, device="cpu", BLOCK_SIZE=64)
    for name in ("q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n = getattr(ours, num)
        for b in range(2):
            for h in range(2):
                for col in range(n.shape[-1]):
                    k = int(n[b, h, col])
                    assert torch.equal(getattr(ours, idx)[b, h, col, :k], getattr(theirs, idx)[b, h, col, :k])


def test_compute_q_blocks_as_torchs(rng):
    mod, _ = random_mask_mod(1, 2, 200, 230, rng)
    built = create_block_mask(mod, 1, 2, 200, 230, device="cpu", BLOCK_SIZE=32)
    tables = [getattr(built, t) for t in TABLES]
    for compute in (True, False):
        ours = BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=32, mask_mod=mod, seq_lengths=(200, 230),
                                        compute_q_blocks=compute)
        theirs = torch_flex.BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=32, mask_mod=mod, seq_lengths=(200, 230),
                                                     compute_q_blocks=compute)
        for name in Q_TABLES:
            a, b = getattr(ours, name), getattr(theirs, name)
            assert (a is None) == (b is None) == (not compute) and (a is None or torch.equal(a, b)), name
        assert all(same(a, b) for a, b in zip(ours.as_tuple(), theirs.as_tuple()))
        # slices, adjusted masks and moved masks keep it, as torch's slices and adjusted masks do
        for derived, torch_derived in ((ours[:, 1], theirs[:, 1]), (ours._adjust(100, 230), theirs._adjust(100, 230)),
                                       (ours.to("cpu"), theirs.to("cpu"))):
            assert (derived.q_indices is None) == (torch_derived.q_indices is None) == (not compute)
    with pytest.raises(TypeError, match="compute_q_blocks"):
        BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=32, compute_q_blocks="yes")


@pytest.mark.parametrize("L,S,block", CASES)
def test_adjust_crops_as_torchs(rng, L, S, block):
    """_adjust to shorter lengths (often not multiples of the block) keeps the upper-left tiles,
    as torch's; torch's own count can list a key tile past the new end (its to_dense then fails
    or is wrong): where torch's is right, the two agree tile for tile."""
    mod, dense = random_mask_mod(2, 2, L, S, rng)
    ours = create_block_mask(mod, 2, 2, L, S, device="cpu", BLOCK_SIZE=block)
    theirs = torch_twin(ours)
    bq, bkv = ours.BLOCK_SIZE
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=rng)))
    compared = 0
    for _ in range(6):
        new_q, new_kv = (int(torch.randint(1, n + 1, (1,), generator=gen)) for n in (L, S))
        adjusted = ours._adjust(new_q, new_kv)
        nq, nkv = -(-new_q // bq), -(-new_kv // bkv)
        assert adjusted.seq_lengths == (new_q, new_kv) and adjusted.shape == (2, 2, new_q, new_kv)
        assert adjusted.mask_mod is ours.mask_mod and adjusted.BLOCK_SIZE == ours.BLOCK_SIZE
        assert torch.equal(adjusted.states, ours.states[..., :nq, :nkv])
        assert adjusted.kv_indices.shape == (2, 2, nq, nkv)
        torch_adjusted = theirs._adjust(new_q, new_kv)
        assert torch_adjusted.seq_lengths == adjusted.seq_lengths and tuple(torch_adjusted.shape) == adjusted.shape
        try:
            torch_dense = torch_adjusted.to_dense()
        except (IndexError, RuntimeError):
            continue
        if torch.equal(torch_dense, ours.to_dense()[..., :nq, :nkv]):
            compared += 1
            assert torch.equal(adjusted.to_dense(), torch_dense)
            for name in ("kv_num_blocks", "full_kv_num_blocks"):
                assert torch.equal(getattr(adjusted, name), getattr(torch_adjusted, name)), name
            for name in Q_TABLES:
                assert torch.equal(getattr(adjusted, name), getattr(torch_adjusted, name)), name
    assert compared >= 3      # torch's count is wrong only now and then
    # cropping the queries alone never trips torch's count
    torch_adjusted = theirs._adjust(max(1, L // 2 + 1), S)
    adjusted = ours._adjust(max(1, L // 2 + 1), S)
    assert torch.equal(adjusted.to_dense(), torch_adjusted.to_dense())
    assert torch.equal(adjusted.kv_num_blocks, torch_adjusted.kv_num_blocks)
    assert torch.equal(adjusted.full_kv_num_blocks, torch_adjusted.full_kv_num_blocks)


def test_adjust_never_lists_a_key_tile_past_the_new_end():
    """A row listing key tiles 3 and 5 of 6, cropped to 4 key tiles: torch's count keeps two
    entries (3 and 5, past the end); ours keeps tile 3 alone."""
    kv_num = torch.tensor([[[2]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[3, 5, 0, 1, 2, 4]]]], dtype=torch.int32)
    ours = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=16, seq_lengths=(16, 96))
    adjusted = ours._adjust(16, 64)
    assert adjusted.kv_num_blocks.tolist() == [[[1]]] and adjusted.kv_indices[0, 0, 0, 0] == 3
    assert adjusted.to_dense().tolist() == [[[[0, 0, 0, 1]]]]
    assert torch_flex.BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=16, seq_lengths=(16, 96),
                                               compute_q_blocks=False)._adjust(16, 64).kv_num_blocks.tolist() == [[[2]]]


@pytest.mark.parametrize("L,S,block", CASES)
def test_an_adjusted_mask_attends_as_the_cropped_mask(rng, L, S, block):
    """What torch's error suggests: a mask built for longer sequences, _adjust-ed, used on shorter
    ones, by our flex_attention and by torch's."""
    mod, dense = random_mask_mod(1, 2, L, S, rng)
    ours = create_block_mask(mod, 1, 2, L, S, device="cpu", BLOCK_SIZE=block)
    new_q, new_kv = max(1, L - 37), max(1, S - 45)
    q, k, v = (torch.randn(1, 2, n, 16, generator=rng, dtype=torch.float64) for n in (new_q, new_kv, new_kv))
    adjusted = ours._adjust(new_q, new_kv)
    want = dense_attention(q, k, v, dense[..., :new_q, :new_kv])[0]
    assert rel_err(flex_attention(q, k, v, block_mask=adjusted), want) < 1e-10
    rows = dense[..., :new_q, :new_kv].any(-1, keepdim=True)
    assert rel_err(torch_eager(q, k, v, block_mask=adjusted) * rows, want) < 1e-10


@pytest.mark.parametrize("L,S,block", CASES)
def test_adjust_to_longer_lengths_adds_empty_tiles(rng, L, S, block):
    """torch keeps the old tables for longer lengths (its kernels never visit the key tiles they
    lack); ours has the tiles the new lengths need, the added ones empty."""
    mod, _ = random_mask_mod(1, 1, L, S, rng)
    ours = create_block_mask(mod, 1, 1, L, S, device="cpu", BLOCK_SIZE=block)
    bq, bkv = ours.BLOCK_SIZE
    new_q, new_kv = L + 2 * bq + 3, S + bkv + 5
    adjusted = ours._adjust(new_q, new_kv)
    theirs = torch_twin(ours)._adjust(new_q, new_kv)
    nq, nkv = ours.states.shape[-2:]
    assert adjusted.states.shape[-2:] == (-(-new_q // bq), -(-new_kv // bkv))
    assert torch.equal(adjusted.states[..., :nq, :nkv], ours.states)
    assert not bool(adjusted.states[..., nq:, :].any()) and not bool(adjusted.states[..., nkv:].any())
    assert theirs.seq_lengths == adjusted.seq_lengths
    assert torch.equal(adjusted.to_dense()[..., :nq, :nkv], theirs.to_dense())


def test_adjust_refuses_bad_lengths():
    bm = create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu")
    for bad in [(0, 10), (10, -1), (2.5, 10)]:
        with pytest.raises((ValueError, TypeError), match="new_q_len|new_kv_len"):
            bm._adjust(*bad)


def test_full_tables_are_given_together_or_not_at_all():
    built = create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    with pytest.raises(AssertionError, match="full_kv_num_blocks and full_kv_indices"):   # torch's refusal
        torch_flex.BlockMask.from_kv_blocks(built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks, None)
    with pytest.raises(ValueError, match=r"full_kv_num_blocks and full_kv_indices .*full_kv_indices is None"):
        BlockMask.from_kv_blocks(built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks, None)
    with pytest.raises(ValueError, match=r"full_kv_num_blocks and full_kv_indices .*full_kv_num_blocks is None"):
        BlockMask.from_kv_blocks(built.kv_num_blocks, built.kv_indices, None, built.full_kv_indices)
    with pytest.raises(ValueError, match="full_kv_num_blocks and full_kv_indices"):
        BlockMask((256, 256), built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks, None, 64)


def test_tables_of_the_wrong_rank_or_shape_are_refused_by_name():
    built = create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    kv_num, kv_idx, full_num, full_idx = (getattr(built, t) for t in TABLES)
    with pytest.raises(ValueError, match=r"kv_num_blocks must have 3 dimensions, \[B, H, num_q_blocks\].*\(1, 4\)"):
        BlockMask.from_kv_blocks(kv_num[0], kv_idx[0], BLOCK_SIZE=64)
    with pytest.raises(ValueError, match=r"kv_indices must have 4 dimensions, "
                                         r"\[B, H, num_q_blocks, num_kv_blocks\].*\(1, 4, 4\)"):
        BlockMask.from_kv_blocks(kv_num, kv_idx[0], BLOCK_SIZE=64)
    with pytest.raises(ValueError, match=r"full_kv_indices must have 4 dimensions"):
        BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx[0], BLOCK_SIZE=64)
    with pytest.raises(ValueError, match=r"kv_num_blocks \(1, 1, 3\) must be kv_indices's shape"):
        BlockMask.from_kv_blocks(kv_num[..., :3], kv_idx, BLOCK_SIZE=64)
    with pytest.raises(ValueError, match=r"full_kv_num_blocks \(2, 1, 4\) and kv_num_blocks \(1, 1, 4\)"):
        BlockMask.from_kv_blocks(kv_num, kv_idx, full_num.expand(2, 1, 4), full_idx.expand(2, 1, 4, 4), BLOCK_SIZE=64)
    with pytest.raises(TypeError, match="kv_indices must hold integers"):
        BlockMask.from_kv_blocks(kv_num, kv_idx.float(), BLOCK_SIZE=64)
    with pytest.raises(TypeError, match="kv_num_blocks must be an integer tensor"):
        BlockMask.from_kv_blocks([[[1]]], kv_idx, BLOCK_SIZE=64)


@pytest.mark.parametrize("L,S,block", CASES)
def test_sparsity_is_torchs(rng, L, S, block):
    """sparsity() gives torch's number for the same tables: lengths that are not multiples of the
    block, a slice (whose numel is still that of seq_lengths) and shorter seq_lengths included."""
    mod, _ = random_mask_mod(2, 3, L, S, rng)
    ours = create_block_mask(mod, 2, 3, L, S, device="cpu", BLOCK_SIZE=block)
    theirs = torch_twin(ours)
    assert ours.sparsity() == pytest.approx(theirs.sparsity(), abs=1e-9)
    for index in (1, (slice(None), -1), (slice(None), slice(None), slice(0, None, 2))):
        assert ours[index].sparsity() == pytest.approx(theirs[index].sparsity(), abs=1e-9), index
    ours.seq_lengths = theirs.seq_lengths = (L, max(1, S - 7))
    assert ours.sparsity() == pytest.approx(theirs.sparsity(), abs=1e-9)


@pytest.mark.parametrize("name", ["B", "H"])
def test_a_broadcast_map_of_a_mask_that_reads_b_or_h_is_said(name, monkeypatch):
    # torch's kernels run entry 0's tile map for every entry of a B=None / H=None mask; a mask_mod
    # that reads b / h then differs from what it states outside the partial tiles: warned, not silent
    from flex_flash_infer.core import notices
    monkeypatch.setattr(notices, "_warned", set())
    reads = (lambda b, h, q, kv: kv >= 64 * b) if name == "B" else (lambda b, h, q, kv: kv >= 64 * h)
    q = torch.randn(2, 2, 128, 16)
    with pytest.warns(UserWarning, match=f"built with {name}=1 .* reads {name.lower()}: .*{name}=2"):
        flex_attention(q, q, q, block_mask=create_block_mask(reads, None, None, 128, 128, device="cpu", BLOCK_SIZE=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # built per entry, or a mod that reads neither: nothing to say
        flex_attention(q, q, q, block_mask=create_block_mask(reads, 2, 2, 128, 128, device="cpu", BLOCK_SIZE=64))
        flex_attention(q, q, q, block_mask=create_block_mask(lambda b, h, q_, kv: kv <= q_, None, None, 128, 128,
                                                             device="cpu", BLOCK_SIZE=64))
