"""A block mask changed after its first use (mask_mod or seq_lengths set anew, a table replaced or
written in place, as code refilling static buffers per step does) is read as it is now, by
flex_attention and by BlockMask.states: torch's kernels read a torch BlockMask's fields on every
call, so a conversion, tile states or a plan cached from the old fields must not be reused."""
import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from dense_reference import dense_attention, rel_err
from flex_flash_infer import BlockMask, create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.block_mask import LazyBlockMask, check_block_mask
from random_masks import random_mask_mod

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
B, H, L, S, D = 1, 2, 200, 230, 16       # neither length a multiple of its block
BLOCK = (64, 32)                          # 4 query tiles, 8 key tiles
BACKENDS = ["reference", "flashinfer"]
TOL = {"reference": 1e-10, "flashinfer": 1e-6}   # the CPU model of FlashInfer rounds as float32 does


@pytest.fixture
def backend(request):
    if request.param == "flashinfer":
        request.getfixturevalue("flashinfer_on_cpu")
    return request.param


def tables_to_dense(tables, mask):
    """The attention mask [B, H, L, S] the tables describe, decoded row by row: listed partial
    tiles show `mask`, listed full tiles every in-range pair."""
    kv_num, kv_idx, full_num, full_idx = (t.clone() for t in tables)
    bq, bkv = BLOCK
    out = torch.zeros(B, H, L, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for r in range(kv_num.shape[-1]):
                rows = slice(r * bq, (r + 1) * bq)
                for num, idx, full in ((kv_num, kv_idx, False), (full_num, full_idx, True)):
                    for c in idx[b, h, r, :int(num[b, h, r])].tolist():
                        cols = slice(c * bkv, (c + 1) * bkv)
                        out[b, h, rows, cols] = True if full else mask[b, h, rows, cols]
    return out


def disjoint_tables(gen):
    """Random tables whose partial tiles are odd key tiles and full tiles even ones, so that any
    change below keeps the two lists disjoint (a tile listed twice has no single meaning); the
    padded last key tile (7) is never full, as create_block_mask never makes it."""
    nq, nkv = -(-L // BLOCK[0]), -(-S // BLOCK[1])
    even, odd = torch.arange(0, nkv, 2), torch.arange(1, nkv, 2)

    def rows(first, rest):
        perm = torch.stack([first[torch.randperm(first.numel(), generator=gen)] for _ in range(B * H * nq)])
        return torch.cat([perm, rest.expand(B * H * nq, -1)], -1).view(B, H, nq, nkv).to(torch.int32)

    # counts 1 to 3 of 4: a change of the listed tiles always changes the set
    kv_num = torch.randint(1, 4, (B, H, nq), generator=gen, dtype=torch.int32)
    full_num = torch.randint(1, 4, (B, H, nq), generator=gen, dtype=torch.int32)
    return [kv_num, rows(odd, even), full_num, rows(even, odd)]


def change_in_place(table, name):
    """Change what the table says, in place, keeping partial tiles odd and full tiles even."""
    if name.endswith("num_blocks"):
        table.copy_(table % 3 + 1)           # 1 -> 2 -> 3 -> 1
    else:
        table[..., :4] = (table[..., :4] + 2) % 8


def qkv(rng):
    return tuple(torch.randn(B, H, n, D, generator=rng, dtype=torch.float64) for n in (L, S, S))


def run(q, k, v, bm, backend):
    return flex_attention(q, k, v, block_mask=bm, backend=backend)


def make(kind, tables, mod):
    if kind == "torch":
        return torch_flex.BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK, mask_mod=mod, seq_lengths=(L, S))
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK, mask_mod=mod, seq_lengths=(L, S))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["torch", "ours"])
@pytest.mark.parametrize("name", TABLES)
def test_a_table_written_in_place_is_read_anew(rng, backend, kind, name):
    mod, mask = random_mask_mod(B, H, L, S, rng)
    bm = make(kind, disjoint_tables(rng), mod)
    q, k, v = qkv(rng)
    tables = [getattr(bm, t) for t in TABLES]
    before = run(q, k, v, bm, backend)
    assert rel_err(before, dense_attention(q, k, v, tables_to_dense(tables, mask))[0]) < TOL[backend]
    change_in_place(getattr(bm, name), name)
    now = tables_to_dense(tables, mask)
    assert rel_err(run(q, k, v, bm, backend), dense_attention(q, k, v, now)[0]) < TOL[backend]
    assert rel_err(before, dense_attention(q, k, v, now)[0]) > 1e-3   # the change matters


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["torch", "ours"])
def test_a_table_replaced_is_read_anew(rng, backend, kind):
    mod, mask = random_mask_mod(B, H, L, S, rng)
    bm = make(kind, disjoint_tables(rng), mod)
    q, k, v = qkv(rng)
    run(q, k, v, bm, backend)
    bm.kv_num_blocks = bm.kv_num_blocks % 3 + 1
    want = dense_attention(q, k, v, tables_to_dense([getattr(bm, t) for t in TABLES], mask))[0]
    assert rel_err(run(q, k, v, bm, backend), want) < TOL[backend]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_torch_masks_new_mask_mod_is_followed(rng, backend):
    """The decoding idiom sets .mask_mod on a torch BlockMask it keeps: torch's flex_attention
    follows the new one, and so must the conversion of that same object."""
    L2 = 256
    q, k, v = (torch.randn(B, H, L2, D, generator=rng, dtype=torch.float64) for _ in range(3))
    causal, window = get_mask_fn("causal"), get_mask_fn("sliding_window", window_size=64)
    # one tile: it is partial, so the mask_mod alone decides
    tbm = torch_flex.create_block_mask(causal, None, None, L2, L2, device="cpu", BLOCK_SIZE=256)
    run(q, k, v, tbm, backend)
    tbm.mask_mod = window
    pos = torch.arange(L2)
    want = dense_attention(q, k, v, window(0, 0, pos.view(-1, 1), pos.view(1, -1)))[0]
    assert rel_err(run(q, k, v, tbm, backend), want) < TOL[backend]
    assert rel_err(torch_flex.flex_attention(q, k, v, block_mask=tbm), want) < 1e-10   # what torch gives


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_torch_masks_new_seq_lengths_are_followed(rng, backend):
    """torch's decoding idiom also sets .seq_lengths: the conversion must not keep the old ones
    (here fewer keys, which the same tables still cover)."""
    causal = get_mask_fn("causal")
    tbm = torch_flex.create_block_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, 256, D, generator=rng, dtype=torch.float64) for _ in range(3))
    run(q, k, v, tbm, backend)
    tbm.seq_lengths = (256, 200)
    pos = torch.arange(256)
    want = dense_attention(q, k[:, :, :200], v[:, :, :200], causal(0, 0, pos.view(-1, 1), pos[:200].view(1, -1)))[0]
    assert rel_err(run(q, k[:, :, :200], v[:, :, :200], tbm, backend), want) < TOL[backend]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_built_mask_written_in_place_stops_standing_for_its_mask_mod(rng, backend):
    """create_block_mask's tables come from the mask_mod, so the planner may plan from the
    mask_mod's band instead of the tables; once the tables are written in place they rule."""
    causal = get_mask_fn("causal")
    bm = create_block_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, 256, D, generator=rng, dtype=torch.float64) for _ in range(3))
    run(q, k, v, bm, backend)
    assert bm.tables_match_mask_mod
    bm.kv_num_blocks.zero_()     # the diagonal tiles are gone: only the full tiles below remain
    assert not bm.tables_match_mask_mod
    tile = torch.arange(256) // 64
    want = dense_attention(q, k, v, tile.view(-1, 1) > tile.view(1, -1))[0]
    assert rel_err(run(q, k, v, bm, backend), want) < TOL[backend]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_mask_whose_block_size_is_set_anew_stops_standing_for_its_mask_mod(rng, backend):
    """The tables read at another BLOCK_SIZE (as torch's kernels would) no longer state the
    mask_mod's tiles: the FlashInfer path kept planning from the mask_mod's prefix hint while the
    reference read the tables (0.98 apart, found by a hunt); both now read the tables."""
    bm = create_block_mask(get_mask_fn("prefix_lm", prefix_len=64), None, None, 256, 256, device="cpu",
                           BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, 256, D, generator=rng, dtype=torch.float64) for _ in range(3))
    run(q, k, v, bm, backend)
    bm.BLOCK_SIZE = (128, 128)
    assert not bm.tables_match_mask_mod
    # torch's reading of the tables at 128: query tile r sees the key tiles row r lists (full
    # ones whole, partial ones where the mask_mod holds); rows 0 and 1 of the 64-row tables
    pos = torch.arange(256)
    qt, kt = (pos // 128).view(-1, 1), (pos // 128).view(1, -1)
    listed = lambda num, idx: torch.stack([torch.isin(kt[0], idx[0, 0, r, :num[0, 0, r]]) for r in range(2)])
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices)[qt[:, 0]]
    partial = listed(bm.kv_num_blocks, bm.kv_indices)[qt[:, 0]]
    mask = full | (partial & ((pos.view(-1, 1) >= pos.view(1, -1)) | (pos.view(1, -1) < 64)))
    want = dense_attention(q, k, v, mask)[0]
    assert rel_err(run(q, k, v, bm, backend), want) < TOL[backend]


def test_states_follow_in_place_writes_of_our_masks_and_their_slices():
    bm = create_block_mask(get_mask_fn("causal"), 2, 1, 256, 256, device="cpu", BLOCK_SIZE=64)
    sliced = bm[1]
    before = bm.states.clone()
    assert torch.equal(sliced.states, before[1:])
    bm.full_kv_num_blocks.zero_()     # a slice is a view: its tables change too
    assert not bool((bm.states == 2).any()) and not bool((sliced.states == 2).any())
    assert torch.equal(bm.states, torch.where(before == 2, 0, before))


def test_a_lazy_mask_follows_in_place_writes_after_its_build():
    causal = get_mask_fn("causal")
    lazy = LazyBlockMask(lambda: create_block_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=64),
                         (1, 1), (256, 256), 64, causal, "cpu")
    assert lazy.tables_match_mask_mod and not lazy.built     # checking it for changes builds nothing
    full_tiles = int((lazy.states == 2).sum())
    assert full_tiles == 6 and lazy.tables_match_mask_mod
    lazy.full_kv_num_blocks.zero_()
    assert int((lazy.states == 2).sum()) == 0 and not lazy.tables_match_mask_mod


def test_an_unchanged_mask_keeps_its_conversion_states_and_plans(flashinfer_on_cpu, rng):
    """The check costs a few attribute reads and keeps everything while nothing changed."""
    tbm = torch_flex.create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu")
    first = check_block_mask(tbm, 1, 2, 256, 256, "cpu")
    assert check_block_mask(tbm, 1, 2, 256, 256, "cpu") is first
    tbm.kv_indices.add_(0)             # any in-place write counts, even one that changes no value
    assert check_block_mask(tbm, 1, 2, 256, 256, "cpu") is not first
    bm = create_block_mask(get_mask_fn("causal"), None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, 256, D, generator=rng, dtype=torch.float64) for _ in range(3))
    states = bm.states
    run(q, k, v, bm, "flashinfer")
    plans = dict(bm._plans)
    run(q, k, v, bm, "flashinfer")
    assert bm.states is states and plans and all(bm._plans[key] is plan for key, plan in plans.items())


@pytest.mark.parametrize("make_mask", [torch_flex.create_block_mask, create_block_mask], ids=["torch", "ours"])
def test_tables_written_in_place_under_inference_mode_are_read_anew(rng, make_mask):
    """Tables made and refilled inside torch.inference_mode() (a decoding loop) keep no write
    counter: the next call still sees the new tables, not the conversion or states of the old."""
    causal = get_mask_fn("causal")
    q, k, v = (torch.randn(1, 1, 256, D, generator=rng, dtype=torch.float64) for _ in range(3))
    with torch.inference_mode():
        bm = make_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=64)
        flex_attention(q, k, v, block_mask=bm)
        bm.full_kv_num_blocks.zero_()          # every full tile dropped: each row sees its diagonal tile
        got = flex_attention(q, k, v, block_mask=bm)
    tile = torch.arange(256) // 64
    pos = torch.arange(256)
    diagonal = (tile.view(-1, 1) == tile.view(1, -1)) & (pos.view(-1, 1) >= pos.view(1, -1))
    assert rel_err(got, dense_attention(q, k, v, diagonal)[0]) < 1e-10
