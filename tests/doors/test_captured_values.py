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
