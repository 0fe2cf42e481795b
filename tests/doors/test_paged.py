"""Masks over a paged KV cache (decode, chunked prefill): the plan through the CPU model of
FlashInfer, and the reference path, against a float64 dense oracle built from the positions."""
import math

import pytest
import torch

from dense_reference import rel_err
from flex_flash_infer import PagedFlexAttention, get_mask_fn
from flex_flash_infer.masks.block_build import EMPTY, FULL, PARTIAL
from flex_flash_infer.planning import paged_plan
from flex_flash_infer.planning.paged_plan import plan_paged
from paged_cases import MASKS, dense_oracle, random_cache
from paged_simulator import merge_state, paged_prefill

def simulate(plan, q, k_cache, v_cache, scale):
    results = []
    for spec in (plan.full, plan.partial):
        if spec is not None:
            results.append(paged_prefill(q, k_cache, v_cache, plan.qo_indptr, spec.kv_indptr, spec.kv_indices,
                                         spec.last_page_len, scale, spec.mask, causal=spec.causal,
                                         window_left=spec.window_left))
    out, lse = results[0] if len(results) == 1 else merge_state(*results[0], *results[1])
    return out, lse * math.log(2)


CASES = [([1, 17, 100, 64], [1, 1, 1, 1], 16), ([33, 120, 7, 90], [5, 40, 7, 1], 16), ([130, 64], [64, 3], 8)]


@pytest.mark.parametrize("kv_lens,qo_lens,page_size", CASES)
@pytest.mark.parametrize("name,params", MASKS)
def test_planned_launches_equal_the_dense_oracle(rng, kv_lens, qo_lens, page_size, name, params):
    mod = get_mask_fn(name, **params)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, kv_lens, qo_lens, page_size)
    plan = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, page_size)
    out, lse = simulate(plan, q, kc, vc, q.shape[-1] ** -0.5)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, page_size)
    assert rel_err(out, ref_out) < 1e-12
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and torch.allclose(lse[seen], ref_lse[seen])


@pytest.mark.parametrize("page_size", [1, 4])
def test_skipped_pages_after_full_ones_keep_the_causal_launch_aligned(rng, page_size):
    """A request whose last pages are all hidden (keys < 6) beside one whose pages are causal:
    the one causal launch lists only the visible pages and aligns causal to the bottom right of
    them, which hid every key from most queries of the first request (fuzz case 779:14)."""
    def first_keys(b, h, q_idx, kv_idx):
        return (kv_idx < 6) & (q_idx >= kv_idx)

    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [31, 3, 11], [22, 3, 3], page_size)
    plan = plan_paged(first_keys, qo_indptr, kv_page_indptr, indices, last, page_size)
    out, lse = simulate(plan, q, kc, vc, q.shape[-1] ** -0.5)
    ref_out, ref_lse = dense_oracle(first_keys, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, page_size)
    assert rel_err(out, ref_out) < 1e-12 and torch.allclose(lse, ref_lse)


@pytest.mark.parametrize("name,params", MASKS[:3])
def test_reference_path_equals_the_dense_oracle(rng, name, params):
    mod = get_mask_fn(name, **params)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [33, 120, 7, 90], [5, 40, 7, 1], 16)
    paged = PagedFlexAttention(device="cpu").plan(mod, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4,
                                                  num_kv_heads=2, head_dim=16, page_size=16, dtype=torch.float64)
    assert paged.active_backend == "reference"
    out, lse = paged.run(q, (kc, vc), return_lse=True)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    assert rel_err(out, ref_out) < 1e-6
    seen = torch.isfinite(ref_lse)
    assert torch.allclose(lse[seen].double(), ref_lse[seen], atol=1e-5)


def test_decode_routes():
    """Causal decode: every page full, the decode kernel; the library's window (its hint) and a
    user's (its expression): the decode kernel with FlashInfer's window over the pages it reaches,
    the edge page partial; a window with sinks: the edge page in a masked launch; causal chunked
    prefill: one causal launch."""
    page = 16
    kv_page_indptr, indices, last = torch.tensor([0, 8, 16]), torch.arange(16), torch.tensor([16, 5])
    decode = plan_paged(get_mask_fn("causal"), torch.tensor([0, 1, 2]), kv_page_indptr, indices, last, page)
    assert decode.decode and decode.partial is None and bool((decode.page_states == FULL).all())
    window = plan_paged(get_mask_fn("sliding_window", window_size=40), torch.tensor([0, 1, 2]), kv_page_indptr,
                        indices, last, page)
    assert window.decode and window.partial is None and window.full.window_left == 39
    assert window.full.kv_indptr.tolist() == [0, 3, 7]             # keys 88..127 and 77..116: 3 and 4 pages
    assert int((window.page_states == EMPTY).sum()) == 9 and int((window.page_states == PARTIAL).sum()) == 2
    # a user's window (no hint) plans the same from its expression (linear_masks.paged_flags); a
    # user's window with sinks is evaluated: the edge page in a masked launch
    users_window = plan_paged(lambda b, h, q, kv: (q >= kv) & (q - kv < 40), torch.tensor([0, 1, 2]),
                              kv_page_indptr, indices, last, page)
    assert users_window.partial is None and users_window.full.window_left == 39
    assert torch.equal(users_window.full.kv_indptr, window.full.kv_indptr)
    assert torch.equal(users_window.page_states, window.page_states)
    evaluated = plan_paged(lambda b, h, q, kv: (q >= kv) & ((q - kv < 40) | (kv < 2)), torch.tensor([0, 1, 2]),
                           kv_page_indptr, indices, last, page)
    assert evaluated.partial is not None and not evaluated.full.causal and evaluated.full.window_left == -1
    chunked = plan_paged(get_mask_fn("causal"), torch.tensor([0, 20, 40]), kv_page_indptr, indices, last, page)
    assert chunked.full.causal and chunked.partial is None


@pytest.mark.parametrize("heads,tensor_cores,filling,skips", [((8, 2), None, 4, True), ((8, 2), None, 5, False),
                                                             ((4, 4), None, 4, False), ((4, 4), True, 4, True)])
def test_a_window_decode_step_lists_every_page_where_the_kernel_skips_the_window(flashinfer_on_cpu, monkeypatch, rng,
                                                                                 heads, tensor_cores, filling, skips):
    """FlashInfer's tensor-core decode (its prefill kernel, GQA groups of 4 or more by default)
    starts each request's key loop at its window: a window's decode step with requests enough to
    fill the GPU unsplit hands it every page, as causal's does (no gather of the window's page
    ids); fewer requests (their keys split in chunks sized by the pages listed) and the CUDA-core
    decode kernel (which masks the window without skipping) get the window's pages only. All give
    the oracle's result."""
    from flex_flash_infer import paged as paged_module

    monkeypatch.setattr(paged_module, "requests_filling_the_gpu", lambda device, num_kv_heads: filling)
    hq, hkv = heads
    mod = get_mask_fn("sliding_window", window_size=40)
    kv_lens = [33, 120, 7, 90]
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, kv_lens, [1, 1, 1, 1], 16, Hq=hq, Hkv=hkv)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer", use_tensor_cores=tensor_cores).plan(
        mod, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=hq, num_kv_heads=hkv, head_dim=16,
        page_size=16, dtype=torch.float64)
    spec = paged._planned["plan"].full
    assert paged._planned["plan"].decode and spec.window_left == 39
    if skips:
        assert torch.equal(spec.kv_indptr.long(), kv_page_indptr.long())
    else:   # each request's pages from the one holding its window's first key (key n - 40) on
        assert spec.kv_indptr.diff().tolist() == [-(-n // 16) - max(n - 40, 0) // 16 for n in kv_lens] == [3, 3, 1, 3]
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    out, lse = paged.run(q, (kc, vc), return_lse=True)
    assert rel_err(out, ref_out) < 1e-6
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_the_requests_that_fill_the_gpu_follow_its_sms():
    """Two (request, KV head) work items per SM: 64 requests x 8 KV heads fill an H100 (132 SMs) unsplit."""
    from flex_flash_infer.paged import MODEL_SM_COUNT, requests_filling_the_gpu

    assert MODEL_SM_COUNT == 132 and requests_filling_the_gpu("cpu", 8) == 33 <= 64
    assert requests_filling_the_gpu("cpu", 1) == 264 and requests_filling_the_gpu("cpu", 5) == 53


def test_bad_tables_name_the_argument():
    paged = PagedFlexAttention(device="cpu")
    with pytest.raises(ValueError, match="kv_last_page_len.*request 0 has 0"):
        paged.plan(None, [0, 1], [0, 2], [0, 1], [0], num_qo_heads=2, num_kv_heads=1, head_dim=8, page_size=4)
    with pytest.raises(ValueError, match=r"1..page_size \(4\).*request 1 has 5"):
        paged.plan(None, [0, 1, 2], [0, 1, 2], [0, 1], [4, 5], num_qo_heads=2, num_kv_heads=1, head_dim=8, page_size=4)
    with pytest.raises(ValueError, match="request 0 has 9 queries"):
        paged.plan(None, [0, 9], [0, 2], [0, 1], [4], num_qo_heads=2, num_kv_heads=1, head_dim=8, page_size=4)
    with pytest.raises(ValueError, match="num_qo_heads"):
        paged.plan(None, [0, 1], [0, 2], [0, 1], [4], num_qo_heads=3, num_kv_heads=2, head_dim=8, page_size=4)
    with pytest.raises(RuntimeError, match="before plan"):
        paged.run(torch.zeros(1, 2, 8), (torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)))
    paged.plan(None, [0, 1], [0, 2], [0, 1], [4], num_qo_heads=2, num_kv_heads=1, head_dim=8, page_size=4,
               dtype=torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        paged.run(torch.zeros(2, 2, 8), (torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)))
    with pytest.raises(ValueError, match="kv_cache has 1 pages"):
        paged.run(torch.zeros(1, 2, 8), (torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)))
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        paged.run(torch.zeros(1, 2, 8, dtype=torch.float64), (torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)))
    with pytest.raises(ValueError, match="non-negative"):
        paged.plan(None, [0, 1], [0, 2], [0, -1], [4], num_qo_heads=2, num_kv_heads=1, head_dim=8, page_size=4)
    out = paged.run(torch.zeros(1, 2, 8), (torch.zeros(2, 4, 1, 8), torch.ones(2, 4, 1, 8)))   # still usable
    assert torch.allclose(out, torch.ones(1, 2, 8))


@pytest.mark.parametrize("name", ["causal", "full"])
@pytest.mark.parametrize("qo_lens", [[1, 1, 1], [1, 7, 30], [0, 3, 1]])
def test_a_hinted_causal_or_full_mask_plans_without_evaluation_as_the_evaluated_one(rng, name, qo_lens):
    """The library's causal and full masks skip the page classification (their band hint): the
    launches and the result equal those of the same mask without its hint."""
    from flex_flash_infer.planning.paged_plan import plan_paged

    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 70, 33], qo_lens, 16)
    hinted = get_mask_fn(name)
    plain = (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx) if name == "causal" else (lambda b, h, q_idx, kv_idx: kv_idx >= 0)
    fast = plan_paged(hinted, qo_indptr, kv_indptr, indices, last, 16, "cpu")
    slow = plan_paged(plain, qo_indptr, kv_indptr, indices, last, 16, "cpu")
    assert fast.decode == slow.decode and (fast.partial is None) == (slow.partial is None) is True
    for field in ("kv_indptr", "kv_indices", "last_page_len", "kv_positions"):
        assert torch.equal(getattr(fast.full, field), getattr(slow.full, field)), field
    assert fast.full.causal == slow.full.causal and torch.equal(fast.page_states, slow.page_states)
    assert torch.equal(fast.q_start, slow.q_start) and fast.max_page_id == slow.max_page_id


@pytest.mark.parametrize("mask_fn", [lambda b, h, q, kv: q >= kv,
                                     lambda b, h, q, kv: (q >= kv) & (q - kv < 40),
                                     lambda q, kv: (kv <= q) & (q - kv <= 17)])          # the seed's form
@pytest.mark.parametrize("qo_lens", [[1, 1, 1, 1], [5, 40, 7, 1]])
def test_a_users_own_causal_or_window_mask_plans_from_flags_like_the_librarys(flashinfer_on_cpu, rng, mask_fn,
                                                                               qo_lens):
    """A user's causal or window mask_mod gets the library's band hint from its expression
    (linear_masks.py): the step plans from FlashInfer's flags without evaluating pages, and the
    result is the oracle's."""
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [33, 120, 7, 90], qo_lens, 16)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer").plan(
        mask_fn, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4, num_kv_heads=2, head_dim=16,
        page_size=16, dtype=torch.float64)
    plan = paged._planned["plan"]
    assert callable(plan.states), "planned by evaluating the pages, not from flags"
    out = paged.run(q, (kc, vc))
    mod = mask_fn if mask_fn.__code__.co_argcount == 4 else (lambda b, h, q_idx, kv_idx: mask_fn(q_idx, kv_idx))
    ref_out, _ = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    assert rel_err(out, ref_out) < 1e-6


def test_a_users_mask_with_a_bound_past_the_probed_lengths_is_evaluated(flashinfer_on_cpu, rng):
    """Key, row or window bounds that bind only past a few thousand positions are not FlashInfer's
    flags (found by review: they once took the flags path and lost the bound)."""
    W = 5000
    for mask_fn in (lambda b, h, q, kv: (q >= kv) & (kv < 5000), lambda b, h, q, kv: q - kv < W,
                    lambda b, h, q, kv: (q >= kv) & (q >= 5000)):
        q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [6000, 70], [1, 3], 16, 2, 1, 8)
        paged = PagedFlexAttention(device="cpu", backend="flashinfer").plan(
            mask_fn, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=2, num_kv_heads=1, head_dim=8,
            page_size=16, dtype=torch.float64)
        assert not callable(paged._planned["plan"].states)
        ref_out, _ = dense_oracle(mask_fn, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
        assert rel_err(paged.run(q, (kc, vc)), ref_out) < 1e-6


def test_a_paged_bit_mask_past_flashinfers_int32_offsets_is_refused(flashinfer_on_cpu, rng, monkeypatch):
    """Chunked prefill of long requests under a document mask (every page partial) once built a
    mask FlashInfer's int32 offsets wrap over (found by a hunt at 9 x 16384 new tokens; the limit
    scaled down here)."""
    from flex_flash_infer.planning import planner

    monkeypatch.setattr(planner, "MAX_MASK_BITS", 5_000)
    mask_fn = lambda b, h, q, kv: (q // 50 == kv // 50) & (q >= kv)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [300, 200], [120, 90], 16, 2, 1, 8)
    args = (mask_fn, qo_indptr, kv_page_indptr, indices, last)
    with pytest.raises(ValueError, match=r"partial pages' launch would need a bit mask of [\d,]+ bits, more than "
                                         r"the 5,000"):
        PagedFlexAttention(device="cpu", backend="flashinfer").plan(*args, num_qo_heads=2, num_kv_heads=1, head_dim=8,
                                                                    page_size=16, dtype=torch.float64)


WINDOW = 100


def test_a_window_read_from_a_global_is_read_at_every_plan(flashinfer_on_cpu, rng):
    """The flags of a user's mask are worked out at each plan(): a server changing the global
    its mask reads between steps gets the new window (found by review)."""
    global WINDOW

    def mask_fn(b, h, q, kv):
        return (q >= kv) & (q - kv < WINDOW)

    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [300, 50], [1, 1], 16)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    try:
        for WINDOW in (100, 10):
            paged.plan(mask_fn, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4, num_kv_heads=2,
                       head_dim=16, page_size=16, dtype=torch.float64)
            ref_out, _ = dense_oracle(mask_fn, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
            assert rel_err(paged.run(q, (kc, vc)), ref_out) < 1e-6, WINDOW
    finally:
        WINDOW = 100


@pytest.mark.parametrize("factor", [1 / 0.7, -1.5])
@pytest.mark.parametrize("mask_name", ["causal", "sliding_window", "attamba"])
@pytest.mark.parametrize("qo_lens", [[1, 1, 1, 1], [5, 40, 7, 1]])
def test_a_score_mod_that_scales_the_score_runs_as_the_kernels_scale(flashinfer_on_cpu, monkeypatch, rng, factor,
                                                                     mask_name, qo_lens):
    """score * c on the paged cache: no compiled variant, the launches' own scale (a negative one
    through the negated query), and the oracle's result with the score_mod; a plan that fails
    after it rebuilds its launches at the same scale."""
    params = dict(MASKS)[mask_name]
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [33, 120, 7, 90], qo_lens, 16)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * factor

    paged = PagedFlexAttention(device="cpu", backend="flashinfer").plan(
        get_mask_fn(mask_name, **params), qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4, num_kv_heads=2,
        head_dim=16, page_size=16, dtype=torch.float64, score_mod=score_mod)
    assert paged._planned["variants"] is None and paged._planned["negate_query"] == (factor < 0)
    ref_out, ref_lse = dense_oracle(get_mask_fn(mask_name, **params), q, kc, vc, qo_indptr, kv_page_indptr, indices,
                                    last, 16, score_mod=score_mod)
    out, lse = paged.run(q, (kc, vc), return_lse=True)
    assert rel_err(out, ref_out) < 1e-6
    seen = ref_lse > -math.inf
    assert torch.allclose(lse.double()[seen], ref_lse[seen], atol=1e-5)
    # a plan() whose launches fail gives the previous plan fresh wrappers at its own (folded) scale
    from flex_flash_infer import paged as paged_module

    real, failed = paged_module._build_launches, []

    def fails_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("launches failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(paged_module, "_build_launches", fails_once)
    with pytest.raises(RuntimeError, match="launches failed"):
        paged.plan(get_mask_fn(mask_name, **params), qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4,
                   num_kv_heads=2, head_dim=16, page_size=16, dtype=torch.float64, score_mod=score_mod)
    assert failed and rel_err(paged.run(q, (kc, vc)), ref_out) < 1e-6


def test_a_strided_head_dim_is_copied_for_the_query_and_refused_for_the_cache(flashinfer_on_cpu, rng):
    """FlashInfer reads the last dimension as unit-stride: a query laid out otherwise is copied
    (the CPU model refuses the view), a cache so laid out is refused by name, and the call stays usable."""
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [33, 120, 7, 90], [1, 1, 1, 1], 16)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer").plan(
        None, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=16,
        dtype=torch.float64)
    strided_q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert strided_q.stride(-1) != 1
    want = paged.run(q, (kc, vc))
    assert rel_err(paged.run(strided_q, (kc, vc)), want) < 1e-12
    strided_k = kc.transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="k_cache must have a unit-stride last"):
        paged.run(q, (strided_k, vc))
    assert rel_err(paged.run(q, (kc, vc)), want) < 1e-12


def test_the_reference_plan_keeps_its_own_tables(rng):
    """The reference backend's plan copies the tables: a caller writing its next step into the same
    int64 buffers before run() does not change the planned step (1.38 off before); an empty list
    of page ids is accepted as the tensors are."""
    kv_lens, page = [40, 70], 16
    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, kv_lens, [1, 1], page)
    tables = [t.long().clone() for t in (qo_indptr, kv_indptr, indices, last)]
    paged = PagedFlexAttention(device="cpu", backend="reference")
    mod = get_mask_fn("causal")
    paged.plan(mod, *tables, 4, 2, 16, page, dtype=torch.float64)
    want, _ = dense_oracle(mod, q, kc, vc, qo_indptr, kv_indptr, indices, last, page)
    tables[2].copy_(tables[2].flip(0))   # the next step's page order, written in place
    tables[3].fill_(3)
    assert rel_err(paged.run(q, (kc, vc)), want) < 1e-6   # the paged reference computes in float32
    paged.plan(None, [0, 0], [0, 0], [], [0], 4, 2, 16, page, dtype=torch.float64)   # no pages at all
    assert paged.run(q[:0], (kc, vc)).shape == (0, 4, 16)


def test_a_prefix_longer_than_the_probed_lengths_is_not_taken_for_full(rng):
    """prefix_lm(4200) over a 4400-key cache, a chunk of 200 queries: its band hint is one full band
    at every length up to 4200, so asking only short lengths took it for full attention (0.07 off);
    the longest request's length is asked too."""
    mod = get_mask_fn("prefix_lm", prefix_len=4200)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [4400], [200], 16, Hq=2, Hkv=1)
    plan = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, 16)
    out, lse = simulate(plan, q, kc, vc, q.shape[-1] ** -0.5)
    ref_out, _ = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    assert rel_err(out, ref_out) < 1e-10


@pytest.mark.parametrize("sink_size,window_size,page_size", [(4, 1024, 16), (3, 33, 4), (40, 24, 16), (1, 1, 1),
                                                             (0, 33, 4), (64, 24, 4)])
@pytest.mark.parametrize("qo_lens", [[1, 1, 1, 1], [5, 40, 1, 0]])
def test_streaming_runs_as_the_window_flags_and_a_launch_over_the_sink_pages(rng, sink_size, window_size,
                                                                              page_size, qo_lens):
    """The library's streaming mask on the paged cache plans from its hint: FlashInfer's window
    flags over the window's pages and a masked launch over the pages holding sinks no query's
    window reaches (planned per request, not per page of the cache); the same attention as the
    dense oracle, a sink inside the window counted once."""
    mod = get_mask_fn("streaming", sink_size=sink_size, window_size=window_size)
    kv_lens = [2000, 90, 37, 200]
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, kv_lens, qo_lens, page_size)
    plan = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, page_size)
    sink_pages = -(-sink_size // page_size)
    if sink_pages <= paged_plan.MAX_COLUMN_PAGES:   # else the pages are evaluated (many sinks: the plain launch reads them)
        assert plan.full is not None and plan.full.causal == (max(qo_lens) > 1)
        assert plan.full.window_left == window_size - 1
        if sink_size == 0:   # a window alone
            assert plan.partial is None
        if plan.partial is not None:   # sink pages only (or one dummy key for a request without any)
            assert int((plan.partial.kv_indptr[1:] - plan.partial.kv_indptr[:-1]).max()) <= sink_pages
            assert int(plan.partial.kv_positions.max()) < sink_size
    out, lse = simulate(plan, q, kc, vc, q.shape[-1] ** -0.5)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, page_size)
    assert rel_err(out, ref_out) < 1e-12
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and torch.allclose(lse[seen], ref_lse[seen])
    # the pages' states, asked for, are the evaluated ones
    evaluated = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, page_size, _hints=False)
    assert torch.equal(plan.page_states, evaluated.page_states)


def test_streaming_page_states_are_the_planned_steps_after_the_buffers_are_rewritten(rng):
    """A server writes its next step into the same table buffers: a plan's page states, worked
    out when asked, are the planned step's (they read the caller's buffers)."""
    mod = get_mask_fn("streaming", sink_size=4, window_size=32)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [150, 90], [1, 1], 16)
    plan = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, 16)
    want = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, 16, _hints=False).page_states.clone()
    last.fill_(1)
    qo_indptr.copy_(torch.tensor([0, 0, 1]))
    assert torch.equal(plan.page_states, want)


@pytest.mark.parametrize("name", ["causal", "full"])
def test_a_decode_steps_plan_keeps_the_step_it_was_given(rng, name):
    """A decode step of a causal or full mask takes the caller's tables as its launch's (every
    request lists all its pages): the same launch as the general flags plan, copies of the tables
    (a server writes its next step into the same buffers before run()), and the page states the
    evaluated plan gives."""
    mod = get_mask_fn(name)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [40, 70, 16, 1], [1, 1, 1, 1], 16)
    tables = [t.to(torch.int32) for t in (qo_indptr, kv_page_indptr, indices, last)]
    plan = plan_paged(mod, *tables, 16, positions=False)
    general = plan_paged(mod, *tables, 16, positions=True)   # positions asked: the general flags path
    evaluated = plan_paged(mod, *tables, 16, _hints=False)
    want = [t.clone() for t in (plan.full.kv_indptr, plan.full.kv_indices, plan.full.last_page_len, plan.qo_indptr)]
    for field in ("kv_indptr", "kv_indices", "last_page_len"):
        assert torch.equal(getattr(plan.full, field), getattr(general.full, field)), field
    assert (plan.decode, plan.full.causal, plan.full.window_left, plan.partial) == (True, False, -1, None)
    assert torch.equal(plan.q_start, general.q_start) and plan.total_q == 4 and plan.max_kv_len == 70
    tables[1].copy_(torch.tensor([0, 1, 2, 3, 4]))
    tables[2].copy_(tables[2].flip(0))
    tables[3].fill_(3)
    got = (plan.full.kv_indptr, plan.full.kv_indices, plan.full.last_page_len, plan.qo_indptr)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(plan.page_states, evaluated.page_states)
    out, _ = simulate(plan, q, kc, vc, q.shape[-1] ** -0.5)
    ref_out, _ = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    assert rel_err(out, ref_out) < 1e-12


def test_a_library_masks_flags_are_asked_at_the_caches_length_every_step(rng):
    """The library's band hints are asked once at the fixed lengths, then at each step's longest
    request: a prefix-LM whose prefix the cache outgrows between steps stops planning as full."""
    mod = get_mask_fn("prefix_lm", prefix_len=5000)   # full below 5000 keys (the fixed lengths among them)
    assert paged_plan._hinted_flags(mod, 4900) == (False, -1)
    assert paged_plan._hinted_flags(mod, 4900) == (False, -1)   # remembered answers, the same
    assert paged_plan._hinted_flags(mod, 5001) is None
    assert paged_plan._hinted_flags(get_mask_fn("prefix_lm", prefix_len=100), 90) is None   # not full at 300
    assert paged_plan._hinted_flags(get_mask_fn("causal"), 5000) == (True, -1)
    assert paged_plan._hinted_flags(get_mask_fn("sliding_window", window_size=64), 5000) == (True, 63)
