import pytest
import torch

from dense_reference import dense_predicate
from flex_flash_infer import and_masks, create_mask, get_mask_fn, noop_mask, or_masks
from flex_flash_infer.mods import document_ids_from_offsets
from library_masks import LIBRARY


@pytest.mark.parametrize("name,params", LIBRARY)
@pytest.mark.parametrize("L,S", [(173, 173), (96, 211), (211, 96)])
def test_library_mask_matches_its_predicate(name, params, L, S):
    got = create_mask(get_mask_fn(name, **params), 1, 1, L, S, device="cpu")[0, 0]
    assert torch.equal(got, dense_predicate(name, L, S, **params))


def test_document_mask_from_offsets_and_ids(rng):
    lengths = torch.randint(1, 40, (7,), generator=rng)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)   # worked out here, not by the library
    assert torch.equal(document_ids_from_offsets(offsets), ids)
    expected = dense_predicate("document", total, total, document_ids=ids.numpy())
    for mod in (get_mask_fn("document", offsets=offsets), get_mask_fn("document", document_ids=ids)):
        assert torch.equal(create_mask(mod, 1, 1, total, total, device="cpu")[0, 0], expected)


def test_seed_mask_names_keep_working():
    q = torch.arange(300).view(-1, 1)
    kv = torch.arange(300).view(1, -1)
    b = h = torch.zeros(1, dtype=torch.int32)
    sw = get_mask_fn("sliding_window", window_size=256)
    assert torch.equal(sw(b, h, q, kv), (q >= kv) & (q - kv < 256))
    att = get_mask_fn("attamba", window_size=256, chunk_size=128)
    assert bool(att(b, h, torch.tensor(299), torch.tensor(127)))      # a chunk end, far away
    assert not bool(att(b, h, torch.tensor(299), torch.tensor(20)))    # outside window, not a chunk end


def test_unknown_mask_name_lists_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        get_mask_fn("sliding")
    for name, _ in LIBRARY:
        assert name in str(err.value)
    assert "document" in str(err.value)


@pytest.mark.parametrize("call,needle", [
    (lambda: get_mask_fn("sliding_window"), "window_size"),
    (lambda: get_mask_fn("attamba", window_size=4), "chunk_size"),
    (lambda: get_mask_fn("causal", window_size=4), "window_size"),
    (lambda: get_mask_fn("sliding_window", window_size=0), "window_size"),
    (lambda: get_mask_fn("sliding_window", window_size=2.5), "window_size"),
    (lambda: get_mask_fn("document"), "offsets"),
    # int32 positions wrap a larger one in the mask while the planner's hint kept it whole: the
    # FlashInfer path and the reference computed two different masks (found by a hunt, 2.4 off)
    (lambda: get_mask_fn("sliding_window", window_size=2**32 + 3), "window_size must be at most 2**31 - 1"),
    (lambda: get_mask_fn("streaming", sink_size=2, window_size=2**31), "window_size must be at most"),
    (lambda: get_mask_fn("prefix_lm", prefix_len=2**40), "prefix_len must be at most"),
])
def test_bad_mask_parameters_name_the_parameter(call, needle):
    with pytest.raises((TypeError, ValueError)) as err:
        call()
    assert needle in str(err.value)


def test_combinators_match_boolean_algebra(rng):
    L, S = 70, 90
    a = torch.rand(L, S, generator=rng) < 0.5
    c = torch.rand(L, S, generator=rng) < 0.5

    def mod_a(b, h, q, kv):
        return a[q, kv]

    def mod_c(b, h, q, kv):
        return c[q, kv]

    assert torch.equal(create_mask(and_masks(mod_a, mod_c), 1, 1, L, S, "cpu")[0, 0], a & c)
    assert torch.equal(create_mask(or_masks(mod_a, mod_c), 1, 1, L, S, "cpu")[0, 0], a | c)
    assert bool(create_mask(noop_mask, 1, 1, L, S, "cpu").all())
    assert bool(create_mask(and_masks(), 1, 1, L, S, "cpu").all())
    assert not bool(create_mask(or_masks(), 1, 1, L, S, "cpu").any())
    with pytest.raises(TypeError):
        and_masks(mod_a, 3)


def test_create_mask_of_a_score_mod():
    def minus_inf_above_diagonal(score, b, h, q, kv):
        return torch.where(q >= kv, score, float("-inf"))

    got = create_mask(minus_inf_above_diagonal, 1, 1, 20, 20, "cpu")[0, 0]
    assert torch.equal(got, dense_predicate("causal", 20, 20))
