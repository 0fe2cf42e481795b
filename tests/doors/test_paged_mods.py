"""A score_mod and per-head masks on a paged KV cache (paged.py, paged_kernels.py): the reference
path and the FlashInfer launches (kernels replaced by the CPU model, which runs the host-compiled
code of each generated variant with the positions its tables give) against test_paged's float64
oracle, request by request and head by head."""
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import rel_err
from flex_flash_infer import PagedFlexAttention, get_mask_fn, paged
from flex_flash_infer.backends import tile_kernels
from flex_flash_infer.masks.block_build import FULL, PARTIAL
from flex_flash_infer.planning.paged_plan import plan_paged
from flex_flash_infer.core.trace import TraceError
from flex_flash_infer.tools.warmup import example_score_mod
from paged_cases import dense_oracle, random_cache

HQ, HKV, D = 4, 2, 16


@pytest.fixture
def fake(monkeypatch):
    """flashinfer is the CPU model; every variant the plan generates is registered with the
    host-compiled code of its graphs; returns the names of the variants built."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(paged, "unsupported_reason", lambda *a: None)
    monkeypatch.setattr(paged, "_is_hopper", lambda device: True)
    return fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)


def per_head_windows(b, h, q_idx, kv_idx):
    widths = torch.tensor([5, 17, 40, 1000])   # a captured tensor indexed by h
    return (q_idx >= kv_idx) & (q_idx - kv_idx < widths[h])


def per_request_and_head(b, h, q_idx, kv_idx):
    sinks = torch.tensor([0, 2, 4])            # per request
    window = torch.tensor([9, 30, 16, 50])     # per head
    return (q_idx >= kv_idx) & ((q_idx - kv_idx < window[h]) | (kv_idx < sinks[b]))


def random_per_head(rng, n=160):
    table = torch.rand(HQ, n, n, generator=rng) < 0.5
    table[:, :, :3] = True                     # every row sees a key

    def random_heads(b, h, q_idx, kv_idx):
        return table[h, q_idx, kv_idx] & (q_idx >= kv_idx)

    return random_heads


KV_QO = [([40, 100, 7], [1, 1, 1]), ([33, 120, 7], [5, 40, 7])]   # decode, chunked prefill


def _mask(name, rng):
    return {"per_head_windows": per_head_windows, "per_request_and_head": per_request_and_head,
            "random_per_head": random_per_head(rng) if name == "random_per_head" else None,
            "sliding_window": get_mask_fn("sliding_window", window_size=20), "causal": get_mask_fn("causal")}[name]


def _run(backend, mask_mod, score_mod, kv_lens, qo_lens, rng, page_size=16):
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, kv_lens, qo_lens, page_size, HQ, HKV, D)
    attn = PagedFlexAttention(device="cpu", backend=backend)
    attn.plan(mask_mod, qo_indptr, kv_page_indptr, indices, last, HQ, HKV, D, page_size, dtype=torch.float64,
              score_mod=score_mod)
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    ref_out, ref_lse = dense_oracle(mask_mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, page_size,
                                    score_mod)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < 1e-5        # the score_mod runs in float32
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and torch.allclose(lse[seen].double(), ref_lse[seen], atol=1e-4)
    return attn


@pytest.mark.parametrize("kv_lens,qo_lens", KV_QO, ids=["decode", "chunked"])
@pytest.mark.parametrize("mask_name", ["causal", "sliding_window", "per_head_windows", "per_request_and_head"])
@pytest.mark.parametrize("mod_name", [None, "softcap", "alibi", "rel_bias", "causal_decay"])
def test_reference_path(rng, kv_lens, qo_lens, mask_name, mod_name):
    score_mod = example_score_mod(mod_name, HQ, device="cpu") if mod_name else None
    attn = _run("reference", _mask(mask_name, rng), score_mod, kv_lens, qo_lens, rng)
    assert attn.active_backend == "reference"


@pytest.mark.parametrize("kv_lens,qo_lens", KV_QO, ids=["decode", "chunked"])
@pytest.mark.parametrize("mask_name", ["causal", "sliding_window", "per_head_windows", "per_request_and_head",
                                       "random_per_head"])
@pytest.mark.parametrize("mod_name", [None, "softcap", "alibi", "rel_bias"])
@pytest.mark.parametrize("hopper", [True, False], ids=["fa3", "fa2"])
def test_compiled_mods_through_the_launches(fake, monkeypatch, rng, kv_lens, qo_lens, mask_name, mod_name, hopper):
    monkeypatch.setattr(paged, "_is_hopper", lambda device: hopper)
    score_mod = example_score_mod(mod_name, HQ, device="cpu") if mod_name else None
    attn = _run("flashinfer", _mask(mask_name, rng), score_mod, kv_lens, qo_lens, rng)
    assert attn.active_backend == "flashinfer"
    full, partial = attn._planned["launches"][:2]
    per_head = mask_name not in ("causal", "sliding_window")
    # the library's soft cap is FlashInfer's own logits_soft_cap, unless a per-head mask compiles
    # a variant anyway (which then takes the score_mod too)
    native_cap = mod_name == "softcap" and not per_head
    compiled = score_mod is not None and not native_cap
    assert (attn._planned["soft_cap"] is not None) == native_cap
    if compiled:   # a score_mod never runs on the decode kernel, which takes no variant
        on_fa3 = hopper and not attn._planned["plan"].decode    # decode: fa2, which folds GQA groups
        assert full is None or (full.variant is not None and full.backend == ("fa3" if on_fa3 else "fa2"))
    if native_cap:
        assert full is None or full.variant is None
    assert partial is None or (partial.variant is not None) == (compiled or per_head)
    assert partial is None or partial.owns_mask == per_head
    assert bool(fake) == (compiled or per_head)


def test_per_head_pages_are_full_only_when_full_for_every_head():
    """Head 0 sees 5 keys back, head 3 everything: a page inside head 3's window but outside head
    0's is partial, a page inside both is full, and the partial launch carries no bit mask."""
    kv_page_indptr, indices, last = torch.tensor([0, 4]), torch.arange(4), torch.tensor([16])
    plan = plan_paged(per_head_windows, torch.tensor([0, 1]), kv_page_indptr, indices, last, 16, heads=HQ)
    assert plan.page_states.tolist() == [PARTIAL, PARTIAL, PARTIAL, PARTIAL]
    assert plan.partial.mask is None and plan.full is None
    head_3_only = plan_paged(lambda b, h, q, kv: (h == 3) | (kv >= 48), torch.tensor([0, 1]), kv_page_indptr,
                             indices, last, 16, heads=HQ)
    assert head_3_only.page_states.tolist() == [PARTIAL, PARTIAL, PARTIAL, FULL]
    assert head_3_only.partial.kv_positions.tolist() == [0, 16, 32]
    assert head_3_only.full.kv_positions.tolist() == [48]


def test_untraceable_mods_name_the_problem_or_fall_back_with_a_warning(fake, monkeypatch, rng):
    from flex_flash_infer.core import notices

    monkeypatch.setattr(notices, "_warned", set())
    def branchy(score, b, h, q_idx, kv_idx):
        return score if q_idx > 3 else -score   # Python control flow on a traced value

    args = random_cache(rng, [40, 20], [1, 1], 16, HQ, HKV, D)[3:]
    with pytest.raises(TraceError, match="control flow"):
        PagedFlexAttention(device="cpu", backend="flashinfer").plan(None, *args, HQ, HKV, D, 16,
                                                                    dtype=torch.float64, score_mod=branchy)
    with pytest.warns(UserWarning, match="reference backend because"):
        attn = PagedFlexAttention(device="cpu", backend="auto").plan(None, *args, HQ, HKV, D, 16,
                                                                     dtype=torch.float64, score_mod=branchy)
    assert attn.active_backend == "reference"


def _decode_step_tables(kv_lens, page_size=16):
    pages = [-(-n // page_size) for n in kv_lens]
    return (torch.arange(len(kv_lens) + 1), torch.tensor([0] + pages).cumsum(0), torch.arange(sum(pages)),
            torch.tensor([n - (p - 1) * page_size for n, p in zip(kv_lens, pages)]))


@pytest.mark.parametrize("mod_name", [None, "softcap"])
def test_decode_steps_plan_the_same_wrappers_again(fake, rng, mod_name):
    """plan() at every decode step re-plans the FlashInfer wrappers of the previous step (a new
    wrapper allocates buffers) and the result of each step is the reference's."""
    score_mod = example_score_mod(mod_name, HQ, device="cpu") if mod_name else None
    mask = get_mask_fn("sliding_window", window_size=20)
    cache = [torch.randn(40, 16, HKV, D, generator=rng, dtype=torch.float64) for _ in range(2)]
    attn = PagedFlexAttention(device="cpu", backend="flashinfer")
    reference = PagedFlexAttention(device="cpu", backend="reference")
    seen = []
    for step, kv_lens in enumerate(([40, 100, 7], [41, 101, 8], [42, 102, 9])):
        tables = _decode_step_tables(kv_lens)
        attn.plan(mask, *tables, HQ, HKV, D, 16, dtype=torch.float64, score_mod=score_mod)
        reference.plan(mask, *tables, HQ, HKV, D, 16, dtype=torch.float64, score_mod=score_mod)
        q = torch.randn(3, HQ, D, generator=rng, dtype=torch.float64)
        assert (attn.run(q, cache) - reference.run(q, cache)).abs().max() < 1e-5
        seen.append([id(w) for w in attn._planned["launches"][:2]])
    assert seen[0] == seen[1] == seen[2]


def test_a_failed_plan_leaves_the_previous_plan_running(fake, monkeypatch, rng):
    # a user's window with sinks (no hint, not linear): a full and a partial launch, two wrappers to re-plan
    mask = lambda b, h, q, kv: (q >= kv) & ((q - kv < 20) | (kv < 4))   # noqa: E731
    cache = [torch.randn(40, 16, HKV, D, generator=rng, dtype=torch.float64) for _ in range(2)]
    attn = PagedFlexAttention(device="cpu", backend="flashinfer")
    attn.plan(mask, *_decode_step_tables([40, 100, 7]), HQ, HKV, D, 16, dtype=torch.float64)
    q = torch.randn(3, HQ, D, generator=rng, dtype=torch.float64)
    before = attn.run(q, cache)
    partial = attn._planned["launches"][1]

    def broken_plan(*args, **kwargs):
        raise RuntimeError("FlashInfer could not plan")

    monkeypatch.setattr(partial, "plan", broken_plan)   # the full wrapper re-plans first, then this fails
    with pytest.raises(RuntimeError, match="could not plan"):
        attn.plan(mask, *_decode_step_tables([41, 101, 8]), HQ, HKV, D, 16, dtype=torch.float64)
    assert torch.equal(attn.run(q, cache), before)


def test_a_bad_score_mod_names_the_argument_and_keeps_the_plan(rng):
    attn = PagedFlexAttention(device="cpu")
    tables = _decode_step_tables([40, 20])
    attn.plan(None, *tables, HQ, HKV, D, 16, dtype=torch.float64)
    cache = [torch.randn(5, 16, HKV, D, generator=rng, dtype=torch.float64) for _ in range(2)]
    q = torch.randn(2, HQ, D, generator=rng, dtype=torch.float64)
    before = attn.run(q, cache)
    with pytest.raises(TypeError, match="score_mod must take 5 arguments"):
        attn.plan(None, *tables, HQ, HKV, D, 16, dtype=torch.float64, score_mod=lambda s, b: s)
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        attn.plan(None, *tables, HQ, HKV, D, 16, dtype=torch.float64, score_mod=3)
    with pytest.raises(TypeError, match="scale must be a float"):
        attn.plan(None, *tables, HQ, HKV, D, 16, dtype=torch.float64, scale="0.1")
    assert torch.equal(attn.run(q, cache), before)


def test_a_score_mod_that_gives_plus_inf_keeps_lse_plus_inf(flashinfer_on_cpu):
    """A score_mod whose value is +inf at a key (-inf times a negative number), on decode steps: the
    output is NaN as torch's, and the LSE +inf as torch's, on the reference backend (inf - inf made
    it NaN) and on FlashInfer's (the decode repair marked every row with a NaN output NaN). The
    fuzzer's case 9150045:135."""
    import sys

    sys.path.insert(0, __file__.rsplit("/doors/", 1)[0])
    from flexfuzz import check

    def build(device="cpu"):
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx // 100 == kv_idx // 100)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where((b > kv_idx) & (q_idx < 25), score, float("-inf")) * -1.095

        return mask_mod, score_mod

    for backend in ("flashinfer", "reference"):
        check(build, seed=9150045, index=135, target="paged", door="paged", backend=backend, Hq=9, Hkv=3, L=4, S=51,
              block=(16, 32), broadcast=False, kv_lens=[1, 1, 11, 51], qo_lens=[1, 1, 1, 1], input_seed=196105641)
