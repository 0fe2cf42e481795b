"""Exact row intervals read off a linear mask's expression, checked against evaluating the mask, and
the bands found with them against the bands found by element-by-element verification."""
import random

import pytest
import torch

from flex_flash_infer import create_block_mask
from flex_flash_infer.planning import bands as bands_module
from flex_flash_infer.planning.bands import find_bands
from flex_flash_infer.core.mask_eval import INDEX_DTYPE, evaluate_mask_mod
from flex_flash_infer.planning.linear_masks import exact_row_intervals


def dense_predicate(mod, L, S):
    """The mask evaluated on every (q, kv), as the library evaluates it (int32 indices)."""
    zero = torch.zeros(1, 1, dtype=INDEX_DTYPE)
    q, kv = torch.arange(L, dtype=INDEX_DTYPE).view(-1, 1), torch.arange(S, dtype=INDEX_DTYPE).view(1, -1)
    return evaluate_mask_mod(mod, zero, zero, q, kv).expand(L, S)


def intervals_of(mod, L, S):
    """(lo, hi) of each row by evaluating the mask; lo > hi for a row that sees nothing."""
    dense = dense_predicate(mod, L, S)
    keys = torch.arange(S).expand(L, S)
    lo = torch.where(dense, keys, S).amin(1)
    hi = torch.where(dense, keys, -1).amax(1)
    return lo, hi, dense


def assert_same_rows(mod, L, S):
    got = exact_row_intervals(mod, L, S)
    assert got is not None, "expected a linear mask"
    lo, hi, dense = intervals_of(mod, L, S)
    empty = lo > hi
    assert torch.equal(got[0] > got[1], empty), "rows seeing nothing differ"
    assert torch.equal(got[0][~empty], lo[~empty]) and torch.equal(got[1][~empty], hi[~empty])
    # and every row is one interval (a linear mask's rows have no holes)
    assert int(dense.sum()) == int((hi - lo + 1).clamp(min=0).sum())


def random_linear_mask(r: random.Random):
    """A conjunction of 1-4 unit-slope comparisons, written the ways users write them."""
    terms = []
    for _ in range(r.randint(1, 4)):
        c = r.randint(-300, 300)
        form = r.choice(["q-kv", "kv-q", "kv", "q", "kv+q-q", "-kv"])
        op = r.choice([">=", ">", "<=", "<", "=="] if form != "q" else [">=", ">", "<=", "<"])
        negate = op != "==" and r.random() < 0.2
        terms.append((form, op, c, negate))

    def side(form, q, kv):
        return {"q-kv": q - kv, "kv-q": kv - q, "kv": kv, "q": q, "kv+q-q": kv + q - q, "-kv": -kv}[form]

    def mask_mod(b, h, q_idx, kv_idx):
        out = None
        for form, op, c, negate in terms:
            x = side(form, q_idx, kv_idx)
            t = {">=": x >= c, ">": x > c, "<=": x <= c, "<": x < c, "==": x == c}[op]
            t = ~t if negate else t
            out = t if out is None else out & t
        return out

    mask_mod.terms = terms
    return mask_mod


@pytest.mark.parametrize("seed", range(40))
def test_random_linear_masks_give_their_exact_rows(seed):
    r = random.Random(seed)
    mod = random_linear_mask(r)
    L, S = r.randint(1, 400), r.randint(1, 400)
    assert_same_rows(mod, L, S)


@pytest.mark.parametrize("mod", [
    lambda b, h, q, kv: q >= kv,
    lambda b, h, q, kv: (q - kv < 64) & (kv <= q),
    lambda b, h, q, kv: (kv >= 3) & (q >= 10) & (q < 250),
    lambda b, h, q, kv: ~(kv > q + 5),
    lambda b, h, q, kv: (q - kv == 0),
    lambda b, h, q, kv: (kv < -1) & (q >= kv),    # nothing visible
    lambda b, h, q, kv: (kv + 7 - 2 <= q + 1),
])
def test_users_masks_give_their_exact_rows(mod):
    assert_same_rows(mod, 300, 257)


@pytest.mark.parametrize("mod", [
    lambda b, h, q, kv: (q >= kv) | (kv < 16),              # a union: two intervals a row
    lambda b, h, q, kv: torch.where(q > 5, q >= kv, kv < 3),
    lambda b, h, q, kv: (q >= kv) & (h == 0),                # depends on the head
    lambda b, h, q, kv: 2 * q >= kv,                         # slope 2
    lambda b, h, q, kv: q >= 2 * kv,
    lambda b, h, q, kv: kv >= 300 - q,                       # slope -1
    lambda b, h, q, kv: (q // 64) >= (kv // 64),             # chunked: not linear
    lambda b, h, q, kv: q.to(torch.int8) >= kv.to(torch.int8),   # wraps past 127
    lambda b, h, q, kv: q + (2 ** 31 - 100) >= kv,           # int32 overflow: must not be trusted
    lambda b, h, q, kv: q >= kv + 0.5,                       # compared in floating point
    lambda b, h, q, kv: q != kv,
])
def test_anything_else_is_left_to_evaluation(mod):
    assert exact_row_intervals(mod, 300, 300) is None


def test_offsets_near_int64s_ends_are_left_to_evaluation():
    """int64 sides that each fit but whose difference would not (found by review)."""
    never = lambda b, h, q, kv: q < q + q.new_zeros(1, dtype=torch.int64) + kv + (-(2 ** 63) + 1)   # noqa: E731
    assert exact_row_intervals(never, 4, 4) is None


def test_a_captured_tensor_is_left_to_evaluation():
    starts = torch.tensor([0, 5, 9])
    assert exact_row_intervals(lambda b, h, q, kv: kv >= starts[b], 64, 64) is None


@pytest.mark.parametrize("seed", range(80))
def test_bands_found_with_exact_rows_are_those_found_element_by_element(seed, monkeypatch):
    r = random.Random(1000 + seed)
    mod = random_linear_mask(r)
    L, S = r.randint(1, 700), r.randint(1, 700)
    block = r.choice([16, 64, 128])
    bm = create_block_mask(mod, None, None, L, S, device="cpu", BLOCK_SIZE=block)
    states = bm.states[0, 0]
    fast = find_bands(states, bm.mask_mod, L, S, block, block)
    monkeypatch.setattr(bands_module, "exact_row_intervals", lambda *a: None)
    slow = find_bands(states, bm.mask_mod, L, S, block, block)
    assert fast == slow, (mod.terms, L, S, block)
    if fast is not None:   # and they are the mask, exactly
        q, kv = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
        lowered = torch.zeros(L, S, dtype=torch.bool)
        for band in fast:
            lowered |= band.visible(q, kv)
        assert torch.equal(lowered, dense_predicate(mod, L, S))


def test_wrong_bands_are_caught_by_the_row_check():
    """A band one key too wide on one row: the exact rows name that row's query tile."""
    from flex_flash_infer.planning.bands import Band, _rows_unlike

    lo, hi = exact_row_intervals(lambda b, h, q, kv: q >= kv, 256, 256)
    assert _rows_unlike([Band(0, 256, 0, 256, True)], lo, hi, 256).numel() == 0
    wrong = _rows_unlike([Band(0, 256, 0, 257, True)], lo, hi, 256)
    assert wrong.numel() == 256
    shifted = _rows_unlike([Band(0, 128, 0, 128, True), Band(128, 256, 0, 256, False)], lo, hi, 256)
    assert shifted.min() == 128 and shifted.numel() == 127   # row 255 sees every key either way


@pytest.mark.parametrize("seed", range(120))
def test_bands_read_off_a_linear_mask_are_the_mask(seed):
    """linear_bands, from the expression alone: None, or bands whose union is exactly the mask."""
    from flex_flash_infer.planning.bands import Band
    from flex_flash_infer.planning.linear_masks import linear_bands

    r = random.Random(5000 + seed)
    mod = random_linear_mask(r)
    L, S = r.randint(1, 500), r.randint(1, 500)
    found = linear_bands(mod, L, S)
    if found is None:
        assert exact_row_intervals(mod, L, S) is not None   # linear, with a run no band shape fits
        return
    q, kv = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    lowered = torch.zeros(L, S, dtype=torch.bool)
    for band in map(lambda b: Band(*b), found):
        assert 0 <= band.q_start < band.q_end <= L and 0 <= band.kv_start < band.kv_end <= S, band
        assert not (lowered & band.visible(q, kv)).any(), "bands overlap"
        lowered |= band.visible(q, kv)
    assert torch.equal(lowered, dense_predicate(mod, L, S)), (mod.terms, L, S, found)


def window_of(size):   # the usual factory: the size a captured Python int
    return lambda b, h, q, kv: (q >= kv) & (q - kv < size)


@pytest.mark.parametrize("mod,L,S,expected", [
    (lambda b, h, q, kv: q >= kv, 300, 300, [(0, 300, 0, 300, True, -1)]),
    (window_of(64), 300, 300, [(0, 300, 0, 300, True, 63)]),
    (lambda b, h, q, kv: (q >= kv) & (q - kv < 64), 300, 300, [(0, 300, 0, 300, True, 63)]),
    (lambda b, h, q, kv: kv >= 0, 10, 20, [(0, 10, 0, 20, False, -1)]),
    (lambda b, h, q, kv: q + 100 >= kv, 50, 200, [(0, 50, 0, 150, True, -1)]),   # decoding: queries at the end
])
def test_users_masks_read_as_the_librarys_bands(mod, L, S, expected):
    from flex_flash_infer.planning.linear_masks import linear_bands

    assert linear_bands(mod, L, S) == expected


@pytest.mark.parametrize("mod,flags", [
    (lambda b, h, q, kv: q >= kv, (True, -1)),
    (lambda b, h, q, kv: (q >= kv) & (q - kv < 1024), (True, 1023)),
    (lambda b, h, q, kv: (kv <= q) & (kv >= q - 3) & (kv >= -5), (True, 3)),
    (lambda b, h, q, kv: kv >= 0, (False, -1)),
    (lambda b, h, q, kv: q == kv, (True, 0)),
    (lambda b, h, q, kv: (q >= kv) & (kv < 5000), None),        # a key bound binds at some length
    (lambda b, h, q, kv: q - kv < 5000, None),                  # a window without causality
    (lambda b, h, q, kv: q + 2 >= kv, None),                    # a shifted diagonal
    (lambda b, h, q, kv: (q >= kv) & (q >= 5), None),           # a row bound
    (lambda b, h, q, kv: (q >= kv) & (kv + (2 ** 31 - 5000) > 0), None),   # wraps in int32
    (lambda b, h, q, kv: (q >= kv) | (kv < 4), None),           # not linear
])
def test_paged_flags_hold_at_every_position(mod, flags):
    from flex_flash_infer.planning.linear_masks import paged_flags

    assert paged_flags(mod) == flags


def test_a_wrapper_of_a_users_hinted_mask_is_not_the_librarys():
    """The band hint read off a user's mask reads what the user's mask reads, which may change: a
    wrapper passing that hint on (a sequence of a varlen batch, the seed's two-argument form) is
    around the user's mask too, never a library mask whose flags are fixed when made."""
    from flex_flash_infer.core.hints import made_by_library, pass_hints, stated_hint
    from flex_flash_infer.mods.registry import get_mask_fn
    from flex_flash_infer.planning.linear_masks import with_linear_band_hint

    width = 64

    def users_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < width)

    hinted = with_linear_band_hint(users_window, 300, 300)
    assert stated_hint(hinted, "band_hint") is not None and not made_by_library(hinted)

    def wrapper(b, h, q_idx, kv_idx):
        return hinted(b, h, q_idx, kv_idx)

    pass_hints(wrapper, hinted)
    assert stated_hint(wrapper, "band_hint") is not None and not made_by_library(wrapper)

    library = get_mask_fn("sliding_window", window_size=64)

    def library_wrapper(b, h, q_idx, kv_idx):
        return library(b, h, q_idx, kv_idx)

    pass_hints(library_wrapper, library)
    assert made_by_library(library) and made_by_library(library_wrapper)
