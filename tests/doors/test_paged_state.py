"""What a PagedFlexAttention plan keeps between plan() and run(), and what it must notice: tensors
the mask reads written after plan(), a score_mod's 0-d constant re-bound and then written, a mask
that starts reading h between steps, score tables written where no version counter moves."""
import types
import warnings

import pytest
import torch

from flex_flash_infer import PagedFlexAttention, get_mask_fn
from paged_cases import dense_oracle, random_cache

HQ, HKV, D, P = 4, 2, 16, 16


def _cache(rng, kv_lens=(300, 250), qo_lens=(1, 3)):
    return random_cache(rng, list(kv_lens), list(qo_lens), P, HQ, HKV, D)


def _err(a, b):
    return (a - b).abs().max().item()


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_per_head_mask_table_written_after_plan_raises(flashinfer_on_cpu, rng):
    """The pages were classified from the old windows; the kernel would read the new ones on them."""
    wins = torch.tensor([2, 5, 9, 100])

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < wins[h])

    q, k, v, qi, ki, idx, last = _cache(rng, qo_lens=(1, 1))
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    paged.plan(per_head, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    wins[3] = 1000
    with pytest.raises(ValueError, match=r"mask_mod reads was written in place after plan\(\)"):
        paged.run(q, (k, v))
    paged.plan(per_head, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)   # planned again: the new windows
    want, _ = dense_oracle(per_head, q, k, v, qi, ki, idx, last, P)
    assert _err(paged.run(q, (k, v)), want) < 1e-6


def test_document_ids_written_after_plan_raise_on_flashinfer_and_are_read_live_by_the_reference(
        flashinfer_on_cpu, rng):
    docs = torch.zeros(2, 400, dtype=torch.long)
    docs[:, 200:] = 1

    def per_request_docs(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    q, k, v, qi, ki, idx, last = _cache(rng, qo_lens=(1, 4))
    planned = {b: PagedFlexAttention(device="cpu", backend=b).plan(per_request_docs, qi, ki, idx, last, HQ, HKV, D, P,
                                                                  dtype=torch.float64)
               for b in ("flashinfer", "reference")}
    docs[:, 100:] = 1
    with pytest.raises(ValueError, match="plan"):
        planned["flashinfer"].run(q, (k, v))
    want, _ = dense_oracle(per_request_docs, q, k, v, qi, ki, idx, last, P)
    assert _err(planned["reference"].run(q, (k, v)), want) < 1e-6


def test_a_rebound_0d_constant_written_after_the_next_plan_raises(flashinfer_on_cpu, rng):
    """The constant watched is the one this plan compiled in, not the first one ever traced."""
    state = types.SimpleNamespace(temp=torch.tensor(2.0))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * state.temp + 0.01 * h

    q, k, v, qi, ki, idx, last = _cache(rng)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    paged.plan(None, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64, score_mod=score_mod)
    paged.run(q, (k, v))
    state.temp = torch.tensor(2.5)
    paged.plan(None, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64, score_mod=score_mod)
    want, _ = dense_oracle(_causal, q, k, v, qi, ki, idx, last, P, score_mod)
    assert _err(paged.run(q, (k, v)), want) < 1e-6                       # the new tensor's value
    state.temp.fill_(4.0)
    with pytest.raises(ValueError, match=r"plan\(\) again"):
        paged.run(q, (k, v))


def test_a_mask_that_starts_reading_h_between_steps_is_planned_per_head(flashinfer_on_cpu, rng):
    state = types.SimpleNamespace(windows=None)

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        if state.windows is None:            # a switch on a global, not on an index
            return causal
        return causal & (q_idx - kv_idx < state.windows[h])

    q, k, v, qi, ki, idx, last = _cache(rng)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    paged.plan(mask_mod, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    paged.run(q, (k, v))
    state.windows = torch.tensor([3, 40, 100, 1000])
    paged.plan(mask_mod, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    want, _ = dense_oracle(mask_mod, q, k, v, qi, ki, idx, last, P)
    assert _err(paged.run(q, (k, v)), want) < 1e-6


@pytest.mark.parametrize("how", ["inference_mode", "data", "bf16 under inference_mode"])
def test_a_score_table_written_where_no_version_counter_moves_is_read_as_it_is(flashinfer_on_cpu, rng, how):
    """Serving under inference_mode writes each layer's bias into one table between runs; a write
    through .data moves no counter either (seen when the kernel can read the table itself)."""
    layer_bias = [torch.randn(HQ, 400, generator=rng) for _ in range(3)]
    dtype = torch.bfloat16 if how.startswith("bf16") else torch.float32
    ctx = torch.no_grad() if how == "data" else torch.inference_mode()
    with ctx:
        table = layer_bias[0].to(dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, kv_idx]

        q, k, v, qi, ki, idx, last = _cache(rng)
        paged = PagedFlexAttention(device="cpu", backend="flashinfer")
        paged.plan(None, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64, score_mod=score_mod)
        for layer in range(3):
            (table.data if how == "data" else table).copy_(layer_bias[layer])
            out = paged.run(q, (k, v))
            want, _ = dense_oracle(_causal, q, k, v, qi, ki, idx, last, P, score_mod)
            assert _err(out, want) < 1e-5, f"layer {layer}"


def test_a_mask_reading_an_inference_tensor_warns_that_writes_after_plan_are_not_seen(flashinfer_on_cpu, rng):
    with torch.inference_mode():
        wins = torch.tensor([2, 5, 9, 100])

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < wins[h])

    q, k, v, qi, ki, idx, last = _cache(rng, qo_lens=(1, 1))
    from flex_flash_infer.core import notices
    notices._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PagedFlexAttention(device="cpu", backend="flashinfer").plan(per_head, qi, ki, idx, last, HQ, HKV, D, P,
                                                                    dtype=torch.float64)
    assert any("inference_mode" in str(w.message) and "plan()" in str(w.message) for w in caught)


def test_a_plan_failing_after_its_launches_leaves_the_previous_plan_running_as_planned(flashinfer_on_cpu, rng):
    """plan() re-plans FlashInfer's wrappers, which the current plan shares: a plan() that failed
    after that (here the inference-tensor warning raised under warnings-as-errors) left the
    previous plan reading the failed step's page tables (2.5 off on the CPU model)."""
    q, k, v, qi, ki, idx, last = _cache(rng, qo_lens=(1, 1))
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    paged.plan(_causal, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    want, _ = dense_oracle(_causal, q, k, v, qi, ki, idx, last, P)
    assert _err(paged.run(q, (k, v)), want) < 1e-9
    with torch.inference_mode():
        first_key = torch.tensor([0, 0, 0])

    def reads_an_inference_tensor(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (kv_idx >= first_key[b])

    _, _, _, qi2, ki2, idx2, last2 = random_cache(rng, [40, 7, 90], [1, 1, 1], P, HQ, HKV, D)
    from flex_flash_infer.core import notices
    notices._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="inference_mode"):
            paged.plan(reads_an_inference_tensor, qi2, ki2, idx2, last2, HQ, HKV, D, P, dtype=torch.float64)
    assert _err(paged.run(q, (k, v)), want) < 1e-9


def test_a_plan_whose_rebuild_of_the_previous_one_fails_too_keeps_no_plan(flashinfer_on_cpu, rng):
    """A plan() that fails after re-planning a shared wrapper, where giving the previous plan fresh
    wrappers fails too (the GPU out of memory, or an interrupt): the previous launches held a
    wrapper planned with the failed step's tables, and run() returned wrong numbers silently.
    Now no plan is kept: run() raises until the next plan(), which works."""
    import fake_flashinfer

    q, k, v, qi, ki, idx, last = _cache(rng, qo_lens=(1, 1))
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    paged.plan(_causal, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    want, _ = dense_oracle(_causal, q, k, v, qi, ki, idx, last, P)
    assert _err(paged.run(q, (k, v)), want) < 1e-9
    real_init = fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper.__init__

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (a new wrapper's buffers, simulated)")
    streaming = get_mask_fn("streaming", sink_size=4, window_size=8)   # its sinks need a new prefill wrapper
    _, _, _, qi2, ki2, idx2, last2 = random_cache(rng, [40, 70], [1, 1], P, HQ, HKV, D)
    fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper.__init__ = out_of_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):
            paged.plan(streaming, qi2, ki2, idx2.flip(0), last2, HQ, HKV, D, P, dtype=torch.float64)
    finally:
        fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper.__init__ = real_init
    with pytest.raises(RuntimeError, match="before plan"):
        paged.run(q, (k, v))
    paged.plan(_causal, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    assert _err(paged.run(q, (k, v)), want) < 1e-9


def test_a_copy_on_another_device_is_watched_on_its_source():
    """A mod's captured ids copied to the GPU (mods/_captured.follow_device): the plan read the
    copy, the user rewrites the source (the next batch packed into the same buffer)."""
    from flex_flash_infer.core.versions import copied_from, moved, snapshot

    source = torch.zeros(8, dtype=torch.long)
    copy = source.clone()            # stands in for source.to("cuda")
    copied_from(copy, source)
    pairs = snapshot([copy])
    assert not moved(pairs)
    source[4:] = 1
    assert moved(pairs) == [source]


def test_float64_on_the_reference_is_computed_in_float64(rng):
    q, k, v, qi, ki, idx, last = _cache(rng)
    out = PagedFlexAttention(device="cpu", backend="reference").plan(_causal, qi, ki, idx, last, HQ, HKV, D, P,
                                                                     dtype=torch.float64).run(q, (k, v))
    want, _ = dense_oracle(_causal, q, k, v, qi, ki, idx, last, P)
    assert _err(out, want) < 1e-12


def test_bad_dtype_and_cache_are_refused_by_name(rng):
    q, k, v, qi, ki, idx, last = _cache(rng)
    paged = PagedFlexAttention(device="cpu", backend="reference")
    with pytest.raises(TypeError, match="dtype must be the floating torch.dtype"):
        paged.plan(_causal, qi, ki, idx, last, HQ, HKV, D, P, dtype="bf16")
    paged.plan(_causal, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64)
    with pytest.raises(ValueError, match="kv_cache must be"):
        paged.run(q, [k, None])
    assert paged.run(q, (k, v)).shape == q.shape        # still usable


@pytest.mark.parametrize("changed,error", [
    ({"num_qo_heads": True}, "num_qo_heads"), ({"head_dim": 0}, "head_dim"), ({"page_size": 2.0}, "page_size"),
    ({"num_kv_heads": 3}, "must be a multiple"), ({"dtype": torch.int32}, "dtype must be the floating")])
def test_plan_checks_its_numbers_again_when_they_change(rng, changed, error):
    """plan() checks heads, head_dim, page_size and dtype only when they change (a server plans
    every step with the same ones): a bad one after good steps still raises by name, and the plan
    of the last good step still runs."""
    q, k, v, qi, ki, idx, last = _cache(rng)
    paged = PagedFlexAttention(device="cpu", backend="reference")
    args = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=P, dtype=torch.float64)
    for _ in range(2):
        paged.plan(_causal, qi, ki, idx, last, **args)
    with pytest.raises((TypeError, ValueError), match=error):
        paged.plan(_causal, qi, ki, idx, last, **dict(args, **changed))
    want, _ = dense_oracle(_causal, q, k, v, qi, ki, idx, last, P)
    assert _err(paged.run(q, (k, v)), want) < 1e-12


def test_a_folded_score_mod_beside_a_per_head_mask_is_applied_once(flashinfer_on_cpu, rng):
    """score * c folds into the launches' scale; the per-head mask still compiles a variant, which
    must not apply the score_mod again (found by the fuzzer: 0.67 off)."""
    windows = torch.tensor([5, 40, 100, 300])

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < windows[h]) & (q_idx >= kv_idx)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * 1.391

    q, k, v, qi, ki, idx, last = _cache(rng, qo_lens=(1, 69))
    out = PagedFlexAttention(device="cpu", backend="flashinfer").plan(
        per_head, qi, ki, idx, last, HQ, HKV, D, P, dtype=torch.float64, score_mod=scaled).run(q, (k, v))
    want, _ = dense_oracle(per_head, q, k, v, qi, ki, idx, last, P, scaled)
    assert _err(out, want) < 1e-6
