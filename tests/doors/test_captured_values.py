"""A plan made from the values a mask_mod captured (a Python number it reads, a table it reads,
re-bound or rewritten) must not outlive them: flex_attention plans again, FlexFlashInfer raises,
and a library mask's hint stops standing for tables built from the old values."""
import pytest
import torch

from flex_flash_infer import FlexFlashInfer, create_block_mask, flex_attention, get_mask_fn

L = 256
WINDOW = 37


def _window(b, h, q_idx, kv_idx):          # a user's window read from a module global
    return (q_idx - kv_idx < WINDOW) & (q_idx >= kv_idx)


def _odd_window(b, h, q_idx, kv_idx):      # not linear: the tiles route, bits planned from the number
    return (q_idx - kv_idx < WINDOW) & (q_idx >= kv_idx) & ((q_idx + kv_idx) % 3 != 0)


def _qkv(rng):
    return [torch.randn(1, 2, L, 16, generator=rng) for _ in range(3)]


@pytest.mark.parametrize("mask", [_window, _odd_window])
def test_a_changed_global_number_plans_again(flashinfer_on_cpu, rng, mask):
    global WINDOW
    q, k, v = _qkv(rng)
    try:
        WINDOW = 37
        bm = create_block_mask(mask, None, None, L, L, device="cpu")
        flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
        WINDOW = 20                        # torch: the old tables, the new mask on their partial tiles
        got = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
        want = flex_attention(q, k, v, block_mask=bm, backend="reference")
    finally:
        WINDOW = 37
    assert (got - want).abs().max() < 1e-5


def test_a_changed_closure_offset_plans_again(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    state = {"offset": 0}

    def shifted(b, h, q_idx, kv_idx):
        return q_idx + state["offset"] >= kv_idx

    bm = create_block_mask(shifted, None, None, L, L, device="cpu")
    flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    state["offset"] = -40
    got = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    assert (got - flex_attention(q, k, v, block_mask=bm, backend="reference")).abs().max() < 1e-5


def test_a_re_bound_mask_table_after_prepare_raises(flashinfer_on_cpu, rng):
    tables = {"doc": torch.zeros(L, dtype=torch.long)}
    tables["doc"][100:] = 1

    def documents(q_idx, kv_idx):
        return (tables["doc"][q_idx] == tables["doc"][kv_idx]) & (q_idx >= kv_idx)

    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=documents, seq_len_q=L, seq_len_kv=L, num_qo_heads=2,
                                                num_kv_heads=2, head_dim=16, dtype=torch.float32)
    q, k, v = (torch.randn(L, 2, 16, generator=rng) for _ in range(3))
    flex(q, k, v)
    tables["doc"] = torch.zeros(L, dtype=torch.long)   # another tensor now
    with pytest.raises(ValueError, match=r"re-bound .* prepare\(\) again"):
        flex(q, k, v)


def test_a_library_document_mask_whose_ids_were_rewritten_reads_its_tables(flashinfer_on_cpu, rng):
    """The document_ids hint stands for tables built from these ids only: rewritten since, the
    block mask's tables hold the old documents, and torch reads them."""
    ids = torch.zeros(L, dtype=torch.long)
    ids[128:] = 1
    mask = get_mask_fn("document", document_ids=ids)
    bm = create_block_mask(mask, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    q, k, v = _qkv(rng)
    flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    ids.zero_()
    ids[40:] = 1
    got = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    assert (got - flex_attention(q, k, v, block_mask=bm, backend="reference")).abs().max() < 1e-5


def _planned(monkeypatch):
    """Counts the FlashInfer plans flex_attention builds."""
    from flex_flash_infer import api
    built = []
    real = api.FlashInferPlan

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "FlashInferPlan", counting)
    return built


def test_a_score_mod_plan_is_kept_while_what_it_reads_holds(flashinfer_on_cpu, rng, monkeypatch):
    """A score_mod call plans once and reuses the plan (a server or a training step calls with the
    same function every time); a captured number changed, a table written in place or re-bound,
    or another score_mod object plans again, and every call gives the reference's answer."""
    built = _planned(monkeypatch)
    q, k, v = _qkv(rng)
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu")
    state = {"t": 2.0, "bias": torch.randn(2, generator=rng)}

    def score_mod(score, b, h, q_idx, kv_idx):
        return state["t"] * score + state["bias"][h]

    def check():
        got = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="flashinfer")
        want = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="reference")
        assert (got - want).abs().max() < 1e-5

    check()
    check()
    assert len(built) == 1
    state["t"] = 0.5                       # a number the kernel holds as a constant
    check()
    assert len(built) == 2
    state["bias"].mul_(3)                  # a table written in place
    check()
    state["bias"] = torch.randn(2, generator=rng)   # re-bound
    check()
    assert len(built) == 4
    folded = lambda s, b, h, q_idx, kv_idx: s * 0.25   # another score_mod: its own plan (folded here)
    got = flex_attention(q, k, v, score_mod=folded, block_mask=bm, backend="flashinfer")
    assert (got - flex_attention(q, k, v, score_mod=folded, block_mask=bm, backend="reference")).abs().max() < 1e-5
    check()
    assert len(built) == 6


def _prepare_args():
    return dict(seq_len_q=L, seq_len_kv=L, num_qo_heads=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)


def _nhd_inputs(rng):
    return [t[0].transpose(0, 1).contiguous() for t in _qkv(rng)]   # [L, H, D]


def _reference(mask, q, k, v):
    bm = create_block_mask(mask, None, None, L, L, device="cpu")
    return flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=bm,
                          backend="reference")[0].transpose(0, 1)


def test_the_same_function_prepared_again_is_lowered_once_and_still_follows_its_global(flashinfer_on_cpu, rng,
                                                                                      monkeypatch):
    """prepare() of the same function again (a model's next layer) takes the stand-ins made the
    first time, with no new lowering of its bands; a global it reads changed since works them out
    again, and the output follows the new number."""
    global WINDOW
    from flex_flash_infer.planning import linear_masks

    lowered = []
    real = linear_masks.linear_bands
    monkeypatch.setattr(linear_masks, "linear_bands", lambda *a: lowered.append(a[1:]) or real(*a))
    q, k, v = _nhd_inputs(rng)
    flex = FlexFlashInfer(device="cpu", backend="flashinfer")
    try:
        WINDOW = 37
        first = flex.prepare(mask_fn=_window, **_prepare_args())(q, k, v)
        assert lowered == [(L, L)]
        assert torch.equal(flex.prepare(mask_fn=_window, **_prepare_args())(q, k, v), first)
        assert lowered == [(L, L)]   # lowered once
        WINDOW = 20
        got = flex.prepare(mask_fn=_window, **_prepare_args())(q, k, v)
        assert lowered == [(L, L), (L, L)]   # the changed global: lowered again
        want = _reference(_window, q, k, v)
    finally:
        WINDOW = 37
    assert (got - want).abs().max() < 1e-5


def test_a_wrapper_copying_a_prepared_functions_attributes_runs_its_own_mask(flashinfer_on_cpu, rng):
    """functools.wraps copies the wrapped function's __dict__: nothing prepare() keeps may ride
    there (a review found a wrapper hiding key 0 running the causal mask it wraps)."""
    import functools

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q, k, v = _nhd_inputs(rng)
    flex = FlexFlashInfer(device="cpu", backend="flashinfer").prepare(mask_fn=causal, **_prepare_args())
    hides_key0 = functools.wraps(causal)(lambda b, h, q_idx, kv_idx: causal(b, h, q_idx, kv_idx) & (kv_idx > 0))
    got = flex.prepare(mask_fn=hides_key0, **_prepare_args())(q, k, v)
    assert (got - _reference(hides_key0, q, k, v)).abs().max() < 1e-5


def test_a_prepared_function_and_what_it_captures_go_once_another_is_prepared(flashinfer_on_cpu):
    """What prepare() keeps of a function goes when the object prepares another (the object lives
    on), and a prepare() that fails keeps nothing of the function it was given."""
    import gc
    import weakref

    def holding(big):
        return lambda b, h, q, kv: (q >= kv) & (q - kv < 16) & (big.shape[0] > 0)

    flex = FlexFlashInfer(device="cpu", backend="flashinfer")
    big = torch.zeros(1 << 16)
    alive = weakref.ref(big)
    flex.prepare(mask_fn=holding(big), **_prepare_args())
    flex.prepare(mask_fn=_window, **_prepare_args())
    del big
    gc.collect()
    assert alive() is None
    big = torch.zeros(1 << 16)
    alive = weakref.ref(big)
    with pytest.raises(ValueError):
        flex.prepare(mask_fn=holding(big), **{**_prepare_args(), "num_kv_heads": 3})
    del big
    gc.collect()
    assert alive() is None
    q, k, v = (torch.randn(L, 2, 16) for _ in range(3))
    assert (flex(q, k, v) - _reference(_window, q, k, v)).abs().max() < 1e-5   # still the last good plan


def test_a_function_whose_code_is_swapped_is_called_as_it_is_now(flashinfer_on_cpu, rng):
    def seed_form(q_idx, kv_idx):
        return q_idx >= kv_idx

    def four_args(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (kv_idx > 0)

    q, k, v = _nhd_inputs(rng)
    flex = FlexFlashInfer(device="cpu", backend="flashinfer").prepare(mask_fn=seed_form, **_prepare_args())
    seed_form.__code__ = four_args.__code__
    got = flex.prepare(mask_fn=seed_form, **_prepare_args())(q, k, v)
    assert (got - _reference(four_args, q, k, v)).abs().max() < 1e-5


def test_calls_after_prepare_do_not_trace_the_mask_again(flashinfer_on_cpu, rng, monkeypatch):
    from flex_flash_infer.core import trace as trace_module

    traced = []
    real = trace_module._trace
    monkeypatch.setattr(trace_module, "_trace", lambda *a: traced.append(a) or real(*a))
    q, k, v = _nhd_inputs(rng)
    flex = FlexFlashInfer(device="cpu", backend="flashinfer")
    for _ in range(2):   # the second prepare takes the first's stand-ins
        flex.prepare(mask_fn=_window, **_prepare_args())
        flex(q, k, v)
    traced.clear()
    for _ in range(5):
        flex(q, k, v)
    assert not traced
