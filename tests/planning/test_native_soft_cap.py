"""native_soft_cap: the library softcap runs FlashInfer's own soft cap, only when its attribute holds."""
import pytest
import torch

from flex_flash_infer.planning import native_soft_cap
from flex_flash_infer.mods import generate_alibi_score_mod, generate_softcap_score_mod
from flex_flash_infer.planning.native_soft_cap import soft_cap_holds


@pytest.mark.parametrize("cap", [0.5, 20.0, 50.0])
def test_the_library_softcap_names_its_cap_and_it_holds(cap):
    mod = generate_softcap_score_mod(cap)
    assert mod.logits_soft_cap == cap
    assert native_soft_cap.native_soft_cap(mod, 8) == cap


def test_a_users_own_softcap_without_the_attribute_runs_the_compiled_variant():
    def my_softcap(score, b, h, q_idx, kv_idx):
        return 20.0 * (score / 20.0).tanh()

    assert soft_cap_holds(my_softcap, 20.0, 8)   # the same function...
    assert native_soft_cap.native_soft_cap(my_softcap, 8) is None   # ...but it does not say so


def test_an_attribute_that_does_not_hold_is_refused():
    wrong_cap = generate_softcap_score_mod(20.0)
    wrong_cap.logits_soft_cap = 30.0
    assert native_soft_cap.native_soft_cap(wrong_cap, 8) is None
    alibi = generate_alibi_score_mod(num_heads=8)
    alibi.logits_soft_cap = 20.0
    assert native_soft_cap.native_soft_cap(alibi, 8) is None

    def head_dependent(score, b, h, q_idx, kv_idx):   # the cap differs on one head: no single cap
        return torch.where(h == 3, 10.0 * (score / 10.0).tanh(), 20.0 * (score / 20.0).tanh())

    head_dependent.logits_soft_cap = 20.0
    assert native_soft_cap.native_soft_cap(head_dependent, 8) is None


@pytest.mark.parametrize("cap", [0, -1.0, True, "20", None])
def test_a_malformed_cap_is_ignored(cap):
    mod = generate_softcap_score_mod(20.0)
    mod.logits_soft_cap = cap
    assert native_soft_cap.native_soft_cap(mod, 8) is None


def test_the_sequence_wrapper_keeps_the_cap():
    from flex_flash_infer.wrapper import _for_sequence

    per_sequence = _for_sequence(generate_softcap_score_mod(20.0), 1, 5)
    assert per_sequence.logits_soft_cap == 20.0
    assert native_soft_cap.native_soft_cap(per_sequence, 8) == 20.0


def test_hints_copied_by_functools_wraps_are_not_trusted(flashinfer_on_cpu, rng):
    """functools.wraps copies a library mod's hints onto a wrapper that computes something else (a
    causal mask that also hides key 0; a soft cap plus a diagonal bonus): the planner reads the
    wrapper's own expression (it ran the library's band and soft cap: 2.4 and 2.2 off)."""
    import functools

    from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn

    causal = get_mask_fn("causal")
    softcap = generate_softcap_score_mod(20.0)

    @functools.wraps(causal)
    def causal_without_key_0(b, h, q_idx, kv_idx):
        return causal(b, h, q_idx, kv_idx) & (kv_idx > 0)

    @functools.wraps(softcap)
    def softcap_and_diagonal(score, b, h, q_idx, kv_idx):
        return softcap(score, b, h, q_idx, kv_idx) + torch.where(q_idx == kv_idx, 3.0, 0.0)

    assert causal_without_key_0.band_hint is causal.band_hint   # copied...
    assert native_soft_cap.native_soft_cap(softcap_and_diagonal, 4) is None   # ...but not stated
    q, k, v = (torch.randn(1, 4, 200, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    for mask_mod, score_mod in ((causal_without_key_0, None), (causal, softcap_and_diagonal)):
        bm = create_block_mask(mask_mod, None, None, 200, 200, device="cpu")
        want = flex_attention(q, k, v, block_mask=bm, score_mod=score_mod, backend="reference")
        got = flex_attention(q, k, v, block_mask=bm, score_mod=score_mod, backend="flashinfer")
        assert (got - want).abs().max() < 1e-5


def test_a_one_entry_relative_table_is_accepted(rng):
    from flex_flash_infer.mods import generate_relative_position_bias_score_mod

    for shape in ((1,), (4, 1)):
        table = torch.randn(shape, generator=rng)
        mod = generate_relative_position_bias_score_mod(table)
        h = torch.tensor(3 if len(shape) == 2 else 0)
        got = mod(torch.tensor(0.25), torch.tensor(0), h, torch.tensor(5), torch.tensor(2))
        # one entry: every distance reads it (the head's own entry for a table per head)
        assert got.shape == () and torch.equal(got, torch.tensor(0.25) + table.reshape(-1)[h if len(shape) == 2 else 0])
