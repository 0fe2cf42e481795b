"""prepare() of a mask with a lowering hint plans on FlashInfer without building its tile tables
(wrapper._block_mask, block_mask.LazyBlockMask); reading them later builds exactly the tables
create_block_mask gives, and a mask without a hint still builds them while planning."""
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import rel_err
from flex_flash_infer import FlexFlashInfer, create_block_mask, get_mask_fn
from flex_flash_infer.backends import backend_choice, flashinfer_backend
from flex_flash_infer.block_mask import LazyBlockMask


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(backend_choice, "unsupported_reason", lambda *a: None)


def _prepare(mask_fn, L=300, S=300, backend="flashinfer"):
    return FlexFlashInfer(device="cpu", backend=backend).prepare(
        mask_fn=mask_fn, seq_len_q=L, seq_len_kv=S, num_qo_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float64)


@pytest.mark.parametrize("name,params", [("causal", {}), ("sliding_window", {"window_size": 70}),
                                         ("prefix_lm", {"prefix_len": 90}), ("streaming", {"sink_size": 4, "window_size": 50}),
                                         ("attamba", {"window_size": 40, "chunk_size": 32})])
def test_hinted_masks_plan_without_their_tables(fake, rng, name, params):
    mod = get_mask_fn(name, **params)
    flex = _prepare(mod)
    bm = flex.block_mask
    assert isinstance(bm, LazyBlockMask) and not bm.built
    assert bm.shape == (1, 1, 300, 300) and bm.device == torch.device("cpu")
    q = torch.randn(300, 4, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(300, 2, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    out = flex(q, k, v)
    assert not bm.built                       # running it needs no tables either
    eager = create_block_mask(mod, 1, 1, 300, 300, device="cpu")
    assert torch.equal(bm.states, eager.states) and bm.built
    for table in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(bm, table), getattr(eager, table))
    reference = _prepare(mod, backend="reference")
    assert not isinstance(reference.block_mask, LazyBlockMask)
    assert rel_err(out, reference(q, k, v)) < 1e-6


def test_a_users_own_mask_builds_its_tables_while_planning(fake):
    flex = _prepare(lambda b, h, q, kv: (q >= kv) & ((q - kv) % 3 == 0))
    assert not isinstance(flex.block_mask, LazyBlockMask) or flex.block_mask.built


def test_a_lazy_mask_whose_hint_does_not_apply_builds_on_demand(fake, rng):
    """A document mask's hint needs packed sequences of its own length: at another length the
    route reads the tiles, and the lazy mask builds them then."""
    mod = get_mask_fn("document", offsets=[0, 100, 300])
    flex = _prepare(mod, L=200, S=300)
    assert flex.block_mask.built
    assert torch.equal(flex.block_mask.states, create_block_mask(mod, 1, 1, 200, 300, device="cpu").states)


def test_a_lazy_mask_given_another_mask_mod_plans_from_its_tables(fake):
    """The hint stands for the tables only while the mask_mod is the one they come from: after
    `mask_mod = other` the route reads (and so builds) the tables, which rule as in torch."""
    from flex_flash_infer.planning import route

    flex = _prepare(get_mask_fn("causal"))
    bm = flex.block_mask
    assert bm.tables_match_mask_mod and not bm.built
    bm.mask_mod = get_mask_fn("sliding_window", window_size=20)
    assert not bm.tables_match_mask_mod
    chosen = route.choose_route(bm, 1, 4, 300, 300, "cpu")
    # the causal tables' full tiles are not the window's: no band fits both, so the tiles route
    assert bm.built and chosen.kind == "tiles"


@pytest.mark.parametrize("mask_fn,L,S", [
    (lambda b, h, q, kv: q >= kv, 300, 300),
    (lambda b, h, q, kv: (q >= kv) & (q - kv < 70), 300, 300),
    (lambda b, h, q, kv: (kv <= q + 40) & (kv >= 7), 260, 300),      # a decoding-style offset, keys from 7
    (lambda q, kv: (q - kv >= 0) & (q - kv <= 50), 300, 300),         # the seed's two-argument form
])
def test_a_users_own_linear_mask_plans_like_the_librarys(fake, rng, mask_fn, L, S):
    """A user's causal, window or key-range mask gets its bands from its expression
    (linear_masks.py): no tile tables while planning, and the same result as the reference."""
    flex = _prepare(mask_fn, L=L, S=S)
    bm = flex.block_mask
    assert isinstance(bm, LazyBlockMask) and not bm.built
    q = torch.randn(L, 4, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(S, 2, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    out = flex(q, k, v)
    assert not bm.built
    assert rel_err(out, _prepare(mask_fn, L=L, S=S, backend="reference")(q, k, v)) < 1e-6


def test_a_linear_mask_no_band_shape_fits_builds_its_tables(fake, rng):
    """Keys up to 3 past the query, at the end of the sequence, make rows whose last key stops at
    the sequence's end while their first key still moves: no FlashInfer band is that shape, so the
    mask plans from its tables as before."""
    mask_fn = lambda b, h, q, kv: (q - kv >= -3) & (q - kv <= 50)   # noqa: E731
    flex = _prepare(mask_fn)
    assert not isinstance(flex.block_mask, LazyBlockMask) or flex.block_mask.built
    q = torch.randn(300, 4, 16, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(300, 2, 16, generator=rng, dtype=torch.float64) for _ in range(2))
    assert rel_err(flex(q, k, v), _prepare(mask_fn, backend="reference")(q, k, v)) < 1e-6
