"""The code around FlashInfer's kernels (query and page layouts, head-major launches, LSE bases,
merges) run on CPU with the kernels replaced by the CPU model (fake_flashinfer.py)."""
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
from flex_flash_infer.backends import flashinfer_backend
from flex_flash_infer.compile import native_copy
from random_masks import random_mask_mod
from paged_cases import MASKS, dense_oracle, random_cache


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    from flex_flash_infer import paged

    for module in (flashinfer_backend, paged):
        monkeypatch.setattr(module, "_is_hopper", lambda device: True)


@pytest.mark.parametrize("B,Hq,Hkv,L,S", [(2, 4, 2, 200, 333), (1, 6, 3, 130, 130)])
def test_per_head_masks_through_the_plan(fake, rng, B, Hq, Hkv, L, S):
    D = 16
    mod, dense = random_mask_mod(B, Hq, L, S, rng)
    bm = create_block_mask(mod, B, Hq, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.route == "tiles-per-head" and plan.head_major
    assert len(plan.groups) == 1
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    ref_out, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-6   # LSE is float32, as in FlashInfer
    got = lse.view(B, L, Hq).transpose(1, 2).double()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(got), seen) and torch.allclose(got[seen], ref_lse[seen], atol=1e-5)


@pytest.mark.parametrize("qo_lens", [[1, 1, 1, 1], [5, 40, 7, 1]])
@pytest.mark.parametrize("name,params", MASKS)
def test_paged_launches_through_the_kernels_glue(fake, rng, qo_lens, name, params):
    from flex_flash_infer.mods import get_mask_fn
    from flex_flash_infer.paged import _build_launches, _run_launches
    from flex_flash_infer.planning.paged_plan import plan_paged

    mod = get_mask_fn(name, **params)
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [33, 120, 7, 90], qo_lens, 16)
    plan = plan_paged(mod, qo_indptr, kv_page_indptr, indices, last, 16)
    launches = _build_launches(plan, 4, 2, 16, 16, torch.float64, 16 ** -0.5, torch.empty(0))
    out, lse = _run_launches(launches, q, (kc, vc))
    out_only, _ = _run_launches(launches, q, (kc, vc), return_lse=False)
    assert torch.equal(out_only, out)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    assert rel_err(out, ref_out) < 1e-6
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and torch.allclose(lse[seen].double(), ref_lse[seen], atol=1e-5)
    if all(n == 1 for n in qo_lens) and plan.decode:
        assert isinstance(launches[0], fake_flashinfer.BatchDecodeWithPagedKVCacheWrapper)


@pytest.mark.parametrize("name,params", [("causal", {}), ("sliding_window", {"window_size": 50}), ("full", {}),
                                         ("prefix_lm", {"prefix_len": 40})])
def test_packed_varlen_batch_through_the_wrapper(fake, monkeypatch, rng, name, params):
    """cu_seqlens batches: one ragged launch, equal to the dense mask of each sequence; prefix_lm
    (two bands) never takes the single launch and keeps one plan per sequence."""
    from flex_flash_infer import FlexFlashInfer, get_mask_fn, varlen, wrapper

    monkeypatch.setattr(varlen, "_is_hopper", lambda device: True)
    monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "flashinfer")
    lens_q = lens_kv = [300, 1, 130, 77, 129]  # 129: a one-row last tile
    cu_q, cu_kv = [0] + list(torch.tensor(lens_q).cumsum(0).tolist()), [0] + list(torch.tensor(lens_kv).cumsum(0).tolist())
    H, Hkv, D = 4, 2, 16
    mod = get_mask_fn(name, **params)
    made = []   # FlashInfer ragged wrappers planned by this prepare()
    real_wrapper = fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper
    monkeypatch.setattr(real_wrapper, "plan", lambda self, *a, _plan=real_wrapper.plan, **k: made.append(self)
                        or _plan(self, *a, **k))
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mod, num_qo_heads=H, num_kv_heads=Hkv, head_dim=D,
                                                dtype=torch.float64, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
    one_launch = flex._prepared.ragged is not None
    assert one_launch == (name != "prefix_lm")
    # the one launch serves: no sequence's own runners were made (a wrapper and a plan each)
    assert not one_launch or (all(s.plan is None for s in flex._prepared.segments) and len(made) <= 1)
    q = torch.randn(cu_q[-1], H, D, generator=rng, dtype=torch.float64)
    k = torch.randn(cu_kv[-1], Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(cu_kv[-1], Hkv, D, generator=rng, dtype=torch.float64)
    out, lse = flex(q, k, v, return_lse=True)
    for i in range(len(lens_q)):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_kv[i], cu_kv[i + 1])
        dense = mod(0, 0, torch.arange(lens_q[i]).view(-1, 1), torch.arange(lens_kv[i]).view(1, -1))
        ref_out, ref_lse = dense_attention(q[rows].transpose(0, 1)[None], k[keys].transpose(0, 1)[None],
                                           v[keys].transpose(0, 1)[None], dense)
        assert rel_err(out[rows].transpose(0, 1)[None], ref_out) < 1e-6, i
        seen = torch.isfinite(ref_lse[0].transpose(0, 1))
        assert torch.allclose(lse[rows].double()[seen], ref_lse[0].transpose(0, 1)[seen], atol=1e-5)


def test_varlen_with_unequal_lengths_keeps_one_plan_per_sequence(fake, monkeypatch):
    """mask_mod positions are top-left aligned per sequence, so a causal band with fewer queries
    than keys does not cover the sequence: no single ragged launch."""
    from flex_flash_infer import FlexFlashInfer, get_mask_fn, varlen, wrapper

    monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "flashinfer")
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=get_mask_fn("causal"), num_qo_heads=2, num_kv_heads=2,
                                                head_dim=16, dtype=torch.float64, cu_seqlens_q=[0, 10, 30],
                                                cu_seqlens_kv=[0, 10, 50])
    assert flex._prepared.ragged is None


class CountScalarReads:
    """Scalar reads from tensors (each a GPU sync on CUDA) made by our code, not by the CPU model
    of FlashInfer's kernels."""

    def __enter__(self):
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not any(
                        "fake_flashinfer" in frame.filename for frame in traceback.extract_stack()):
                    counter.reads += 1
                return func(*args, **(kwargs or {}))

        self.reads, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


ROUTE_MASKS = [("causal", {}), ("sliding_window", {"window_size": 300}),
               ("attamba", {"window_size": 256, "chunk_size": 128}), ("prefix_lm", {"prefix_len": 700}),
               ("streaming", {"sink_size": 4, "window_size": 200}), ("dilated_sliding_window", {"window_size": 200, "dilation": 2})]


@pytest.mark.parametrize("name,params", ROUTE_MASKS)
def test_planning_host_syncs_do_not_grow_with_the_tiles(fake, name, params):
    """A plan's scalar reads must not scale with the number of query tiles (it was one .item()
    per tile in the band finder)."""
    reads = []
    for S in (2048, 8192):
        bm = create_block_mask(get_mask_fn(name, **params), None, None, S, S, device="cpu")
        with CountScalarReads() as counter:
            flashinfer_backend.FlashInferPlan(bm, 1, S, S, 4, 2, 64, torch.bfloat16, 0.125, torch.device("cpu"), None)
        reads.append(counter.reads)
    assert reads[0] == reads[1] <= 16, reads


@pytest.mark.parametrize("name,params", ROUTE_MASKS)
def test_run_never_waits_on_the_gpu(fake, name, params):
    """run() only launches kernels: no scalar read (host sync) on any route."""
    S, D = 1000, 16
    bm = create_block_mask(get_mask_fn(name, **params), None, None, S, S, device="cpu")
    plan = flashinfer_backend.FlashInferPlan(bm, 1, S, S, 4, 2, D, torch.float32, 0.25, torch.device("cpu"), None)
    q, k, v = torch.randn(S, 4, D), torch.randn(1, S, 2, D), torch.randn(1, S, 2, D)
    with CountScalarReads() as counter:
        plan.run(q, k, v)
    assert counter.reads == 0, plan.route


def _per_head_band_masks(Hq):
    """Each head a native band of its own: windows of four widths, causal, and full."""
    widths = torch.tensor([16, 40, 100, 1000, 0, -1])  # 0: causal (no window), -1: full

    def per_head(b, h, q_idx, kv_idx):
        w = widths[h % len(widths)]
        window = (kv_idx <= q_idx) & (q_idx - kv_idx < w)
        causal = kv_idx <= q_idx
        return torch.where(w > 0, window, torch.where(w == 0, causal, torch.ones_like(causal)))

    return per_head


@pytest.mark.parametrize("hopper", [True, False])
@pytest.mark.parametrize("B,Hq,Hkv,L", [(1, 12, 4, 300), (2, 8, 2, 257), (1, 6, 6, 130)])
def test_per_head_bands_through_the_plan(fake, monkeypatch, rng, B, Hq, Hkv, L, hopper):
    """bands-per-head (the default): heads with equal bands share a band launch over those heads; the
    result equals the dense per-head mask. On Hopper each group's launch writes its heads of the
    output in place (a strided view, which fa3 honours; the CPU model refuses it on fa2)."""
    D = 16
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: hopper)
    mod = _per_head_band_masks(Hq)
    dense = create_mask(mod, 1, Hq, L, L, device="cpu")
    bm = create_block_mask(mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.route == "bands-per-head"
    assert len(plan.head_band_runs) < Hq or Hq == Hkv  # heads were grouped into shared launches
    in_place = [flag for _, _, flag, _ in plan.head_band_runs]
    # a group of unevenly spaced heads (an index, not a view) and one of several launches copy
    writable = [runner.ragged is not None and isinstance(heads, slice) for heads, _, _, runner in plan.head_band_runs]
    assert in_place == (writable if hopper else [False] * len(in_place))
    assert any(in_place) == hopper
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    ref_out, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-6
    got = lse.view(B, L, Hq).transpose(1, 2).double()
    assert torch.allclose(got, ref_lse, atol=1e-5)
    # without the LSE (a plain call): the same output, no LSE written or scaled
    alone, no_lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2),
                             return_lse=False)
    assert no_lse is None and torch.equal(alone, out)


def test_head_band_groups_keep_gqa_regular():
    from flex_flash_infer.planning.bands import Band
    from flex_flash_infer.planning.plan import head_band_groups

    a, b = [Band(0, 10, 0, 10, True, 3)], [Band(0, 10, 0, 10, True)]
    # 8 query heads on 2 key heads (4 each): a on heads 0, 1, 4, 5 (two per key head), b elsewhere
    groups = head_band_groups([a, a, b, b, a, a, b, b], 4)
    assert groups == [([0, 1, 4, 5], [0, 1], a), ([2, 3, 6, 7], [0, 1], b)]
    # a on heads 0, 1, 4 only: not the same count per key head, so one launch per key head
    groups = head_band_groups([a, a, b, b, a, b, b, b], 4)
    assert ([0, 1], [0], a) in groups and ([4], [1], a) in groups and ([2, 3], [0], b) in groups


def test_tensor_core_decode_is_chosen_for_gqa_groups_of_four_or_more():
    from flex_flash_infer import paged

    assert paged.use_tensor_core_decode(32, 8) and paged.use_tensor_core_decode(8, 1)
    assert not paged.use_tensor_core_decode(32, 16) and not paged.use_tensor_core_decode(8, 8)
    assert not paged.use_tensor_core_decode(32, 8, False)
    assert paged.use_tensor_core_decode(8, 8, True)


@pytest.mark.parametrize("value", [1, 0, "yes", "auto"])
def test_use_tensor_cores_must_be_none_or_a_bool(value):
    from flex_flash_infer.paged import PagedFlexAttention

    with pytest.raises(TypeError, match="use_tensor_cores must be None, True or False"):
        PagedFlexAttention(device="cpu", use_tensor_cores=value)


def test_use_tensor_cores_forces_the_decode_kernel(fake, monkeypatch, rng):
    """PagedFlexAttention(use_tensor_cores=True / False) forces FlashInfer's tensor-core decode
    kernel on / off; the result is the same computation. The decode wrapper names its backend
    (fa2, what "auto" resolves a one-token decode to) so that plan() skips "auto"'s checks."""
    from flex_flash_infer import paged
    from flex_flash_infer.mods import get_mask_fn
    from flex_flash_infer.paged import PagedFlexAttention

    kv_lens, page, H, Hkv, D = [40, 100], 16, 8, 2, 16
    pages = [-(-n // page) for n in kv_lens]
    args = (torch.tensor([0, 1, 2]), torch.tensor([0] + pages).cumsum(0), torch.arange(sum(pages)),
            torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)]), H, Hkv, D, page)
    k = torch.randn(sum(pages), page, Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(sum(pages), page, Hkv, D, generator=rng, dtype=torch.float64)
    q = torch.randn(2, H, D, generator=rng, dtype=torch.float64)
    outs = []
    for tensor_cores in (False, True):
        attn = PagedFlexAttention(device="cpu", backend="flashinfer", use_tensor_cores=tensor_cores)
        monkeypatch.setattr(paged, "unsupported_reason", lambda *a: None)
        attn.plan(get_mask_fn("causal"), *args, dtype=torch.float64)
        assert attn._planned["launches"][0].use_tensor_cores == tensor_cores
        # an explicit backend: FlashInfer's "auto" re-resolves through cuDNN checks at every plan()
        assert attn._planned["launches"][0].requested_backend == "fa2"
        outs.append(attn.run(q, (k, v)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name,params,B,L,S", [
    ("causal", {}, 2, 200, 200),
    ("sliding_window", {"window_size": 50}, 1, 300, 300),
    ("prefix_lm", {"prefix_len": 128}, 2, 260, 260),
    ("causal", {}, 1, 150, 230),                  # bottom-right aligned: more keys than queries
    ("document", {"offsets": [0, 20, 150, 300]}, 1, 300, 300),   # one causal band per document
])
@pytest.mark.parametrize("mod_name", ["softcap", "softcap_compiled", "alibi", "rel_bias", "rel_bias_unsplit"])
@pytest.mark.parametrize("hopper", [True, False], ids=["fa3", "fa2"])
def test_compiled_score_mod_bands_through_the_plan(fake, monkeypatch, rng, name, params, B, L, S, mod_name, hopper):
    """The score_mod band route (request tables of first query, first key and batch entry per
    band) with the kernel replaced by the CPU model running the score_mod's generated code
    (host-compiled): the positions it hands the score_mod are the absolute ones. fa2 (GPUs
    before Hopper) runs the fa2 variant with the same tables. The library softcap runs FlashInfer's
    own soft cap (native_soft_cap.py); a user's own softcap, without the attribute that names the
    cap, runs the compiled variant (softcap_compiled), and a user's own relative bias without its
    reach runs the variant on every key (rel_bias_unsplit)."""
    from flex_flash_infer.planning import far_bias
    from flex_flash_infer.backends import score_mod_kernels
    from flex_flash_infer.tools.warmup import example_score_mod

    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: hopper)
    native = mod_name == "softcap"
    hints = not mod_name.endswith(("_unsplit", "_compiled"))
    mod_name = mod_name.replace("_unsplit", "").replace("_compiled", "")
    backends = []
    real_wrapper = fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper

    def recording_wrapper(workspace, layout="NHD", backend="auto", jit_args=None):
        # native_copy's one-mode modules are FlashInfer's plain kernels (the CPU model: not built)
        plain = jit_args is None or native_copy.is_native_copy(jit_args)
        backends.append((backend, None if plain else jit_args[11]))
        return real_wrapper(workspace, layout, backend, jit_args)

    monkeypatch.setattr(sys.modules["flashinfer"], "BatchPrefillWithRaggedKVCacheWrapper", recording_wrapper)
    Hq, Hkv, D = 4, 2, 16
    score_mod = example_score_mod(mod_name, Hq, device="cpu")
    if not hints:   # the same score_mod as a user's own function: no hint attributes
        score_mod = (lambda mod: lambda score, b, h, q_idx, kv_idx: mod(score, b, h, q_idx, kv_idx))(score_mod)
    bm = create_block_mask(get_mask_fn(name, **params), B, None, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    # a relative-position bias on causal bands: keys beyond its reach (32) on the plain kernel
    split = hints and mod_name == "rel_bias" and name != "prefix_lm"
    runner = plan.band_runner.near if split else plan.band_runner
    assert isinstance(plan.band_runner, far_bias.FarSplitBands) == split
    if native:   # FlashInfer's soft-capped plain kernels: its ragged one for one band without a window
        assert isinstance(runner, flashinfer_backend._BandRunner) and runner.soft_cap == 5.0
        # one ragged launch for every band, or one per unwindowed band (prefix-LM's two)
        assert all(n is None for _, n in backends)
        assert len(backends) == (runner.ragged is not None) + len(runner.band_wrappers)
        assert len(runner.band_wrappers) == (2 if name == "prefix_lm" else 0)
        assert runner.ragged is not None or name in ("sliding_window", "prefix_lm")
    else:
        assert isinstance(runner, score_mod_kernels.ScoreModBands)
        # a split's near keys run the fa2 variant on Hopper too
        variant_on_fa2 = not hopper or split
        assert backends and all(("Fa2" in n) == variant_on_fa2 and b == ("fa2" if variant_on_fa2 else "fa3")
                                for b, n in backends if n is not None)
    # FlashInfer's own plain kernels (no jit_args): fa3 on Hopper
    assert all(b == ("fa3" if hopper else "fa2") for b, n in backends if n is None)
    # the far keys of one causal band without a window on FlashInfer's plain ragged kernel (no jit_args)
    plain_ragged = split and len(plan.band_runner.far_bands) == 1 and plan.band_runner.far_bands[0].window_left < 0
    assert native or sum(n is None for _, n in backends) == plain_ragged
    assert (name == "causal") == plain_ragged or not split
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    dense = create_mask(get_mask_fn(name, **params), B, 1, L, S, device="cpu")
    ref_out, ref_lse = dense_attention(q, k, v, dense, score_fn=score_mod)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-5   # the score_mod runs in float32
    got = lse.view(B, L, Hq).transpose(1, 2).double()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(got), seen) and torch.allclose(got[seen], ref_lse[seen], atol=1e-4)


@pytest.mark.parametrize("trial", range(12))
def test_band_edges_inside_a_query_tile(fake, rng, trial):
    """Row ranges of different native patterns (full, causal, windowed) meeting at random rows,
    not at multiples of the tile: found as bands (a prefix-LM's prefix of any length, say) and
    exact through the plan."""
    L = int(torch.randint(130, 400, (1,), generator=rng))
    cuts = sorted(set(torch.randint(1, L, (2,), generator=rng).tolist()))
    kinds = torch.randint(0, 3, (len(cuts) + 1,), generator=rng).tolist()
    window = int(torch.randint(5, 60, (1,), generator=rng))
    edges = torch.tensor(cuts)

    def mod(b, h, q, kv):
        part = torch.bucketize(q, edges, right=True)   # which row range q is in
        causal = kv <= q
        patterns = [torch.ones_like(causal), causal, causal & (kv >= q - window)]
        out = torch.zeros_like(causal)
        for i, kind in enumerate(kinds):
            out = out | ((part == i) & patterns[kind])
        return out

    assert _band_plan_matches_dense(mod, L, L, rng) == "bands", (cuts, kinds)


def _band_plan_matches_dense(mod, L, S, rng):
    """Plan one sequence (4 query / 2 key heads) through the CPU model, check it against the
    dense mask, and return its route."""
    bm = create_block_mask(mod, 1, None, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, 1, L, S, 4, 2, 16, torch.float64, 0.25, "cpu")
    q = torch.randn(1, 4, L, 16, generator=rng, dtype=torch.float64)
    k = torch.randn(1, 2, S, 16, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 2, S, 16, generator=rng, dtype=torch.float64)
    out, _ = plan.run(q.transpose(1, 2).reshape(L, 4, 16), k.transpose(1, 2), v.transpose(1, 2))
    ref, _ = dense_attention(q, k, v, create_mask(mod, 1, 1, L, S, device="cpu"), scale=0.25)
    assert rel_err(out.view(1, L, 4, 16).transpose(1, 2), ref) < 1e-6
    return plan.route


@pytest.mark.parametrize("name,params,L,S", [("causal", {}, 333, 200), ("causal", {}, 200, 333), ("full", {}, 333, 200),
                                             ("sliding_window", {"window_size": 70}, 200, 333),
                                             ("prefix_lm", {"prefix_len": 77}, 300, 300)])
def test_hinted_library_bands_through_the_plan(fake, rng, name, params, L, S):
    """The bands a library mask states (band_hint), run through the plan: exact against the
    dense mask, more queries than keys included (causal: a causal band and a full one)."""
    assert _band_plan_matches_dense(get_mask_fn(name, **params), L, S, rng) == "bands"


@pytest.mark.parametrize("name,params,ragged", [("causal", {}, True), ("full", {}, True),
                                                 ("sliding_window", {"window_size": 50}, False)])
def test_one_unwindowed_band_runs_the_ragged_kernel(fake, monkeypatch, rng, name, params, ragged):
    """A single band without a window over the sequence (causal or full attention) runs
    FlashInfer's ragged kernel, faster than its single-sequence call; a
    windowed band keeps the single call. Both give the reference result, also with fewer queries
    than keys."""
    from flex_flash_infer import FlexFlashInfer, wrapper

    monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "flashinfer")
    L, S, Hq, Hkv, D = 130, 257, 4, 2, 16
    q = torch.randn(L, Hq, D, dtype=torch.float64, generator=rng)
    k = torch.randn(S, Hkv, D, dtype=torch.float64, generator=rng)
    v = torch.randn(S, Hkv, D, dtype=torch.float64, generator=rng)
    mask = get_mask_fn(name, **params)
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mask, seq_len_q=L, seq_len_kv=S, num_qo_heads=Hq,
                                                num_kv_heads=Hkv, head_dim=D, dtype=torch.float64)
    plan = flex._prepared.segments[0].plan
    assert plan.route == "bands" and (plan.band_runner.ragged is not None) == ragged
    dense = create_mask(mask, None, None, L, S, device="cpu")[0, 0]
    ref, _ = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dense)
    assert rel_err(flex(q, k, v), ref[0].transpose(0, 1)) < 1e-6


def test_evenly_spaced_heads_are_taken_as_views():
    """bands-per-head takes each group's heads as a strided view when they are evenly spaced."""
    x = torch.randn(5, 12, 3)
    for heads in ([3], [0, 4, 8], [1, 2, 3, 4], [2, 7]):
        sel = flashinfer_backend.head_selector(heads, "cpu")
        assert isinstance(sel, slice)
        taken = flashinfer_backend.take_heads(x, 1, sel)
        assert taken.data_ptr() == x[:, heads[0]].data_ptr() and torch.equal(taken, x[:, heads])
    for heads in ([0, 1, 5], [4, 2]):
        sel = flashinfer_backend.head_selector(heads, "cpu")
        assert torch.is_tensor(sel) and torch.equal(flashinfer_backend.take_heads(x, 1, sel), x[:, heads])


@pytest.mark.parametrize("n,h", [(64, 1), (30, 2), (7, 1), (16, 32)])
def test_merge_rows_regroups_single_head_rows_and_equals_a_plain_merge(n, h):
    """Regrouping rows before merge_state changes nothing: the merge is per (token, head) pair."""
    from paged_simulator import merge_state

    g = torch.Generator().manual_seed(n * h)
    a, b = torch.randn(n, h, 8, generator=g, dtype=torch.float64), torch.randn(n, h, 8, generator=g, dtype=torch.float64)
    sa, sb = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(n, h, generator=g, dtype=torch.float64)
    sb[0, 0] = float("-inf")
    shapes = []

    def recording(*args):
        shapes.append(tuple(args[0].shape))
        return merge_state(*args)

    out, lse = flashinfer_backend.merge_rows(recording, a, sa, b, sb)
    ref_out, ref_lse = merge_state(a, sa, b, sb)
    assert torch.allclose(out, ref_out) and torch.allclose(lse, ref_lse)
    regrouped = h < flashinfer_backend.MERGE_HEADS and (n * h) % flashinfer_backend.MERGE_HEADS == 0
    assert shapes == [(n * h // 8, 8, 8) if regrouped else (n, h, 8)]


@pytest.mark.parametrize("hopper", [True, False])
@pytest.mark.parametrize("mask", ["prefix_lm", "per_head_windows"])
def test_band_outputs_are_written_contiguous_whatever_the_query_strides(flashinfer_on_cpu, monkeypatch, rng, hopper,
                                                                        mask):
    """flex_attention hands the band runner a transposed view of the query (batch 1); the band
    wrappers write rows (prefix-LM) or heads (per-head windows) of one output in place, which
    FlashInfer's fa2 kernel writes as if contiguous: the output must be allocated contiguous, not
    like the query (the CPU model refuses a strided output on fa2)."""
    from flex_flash_infer.api import flex_attention
    from flex_flash_infer.backends.reference import reference_attention
    from flex_flash_infer.block_mask import create_block_mask as ffi_block_mask
    from flex_flash_infer.mods.registry import get_mask_fn

    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: hopper)
    B, H, L, D = 1, 4, 300, 16
    if mask == "prefix_lm":
        mod = get_mask_fn("prefix_lm", prefix_len=100)
    else:
        widths = torch.tensor([16, 40])

        def mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < widths[h % 2])
    bm = ffi_block_mask(mod, None, H if mask == "per_head_windows" else None, L, L, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, L, D, generator=rng) for _ in range(3))
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="flashinfer")
    ref_out, ref_lse = reference_attention(q.double(), k.double(), v.double(), bm)
    assert rel_err(out.double(), ref_out) < 1e-5
    assert torch.allclose(lse.double(), ref_lse.double(), atol=1e-4)


@pytest.mark.parametrize("B", [1, 2])
def test_a_query_whose_last_dimension_is_strided_is_read_correctly(flashinfer_on_cpu, rng, B):
    """FlashInfer reads every tensor's last dimension as unit-stride: a query made by transposing
    [.., D, L] (last-dimension stride L) must reach it copied, not as a view (the CPU model refuses
    the view); keys and values too."""
    from flex_flash_infer.api import flex_attention
    from flex_flash_infer.backends.reference import reference_attention
    from flex_flash_infer.block_mask import create_block_mask as ffi_block_mask
    from flex_flash_infer.mods.registry import get_mask_fn

    H, L, D = 4, 200, 16
    q, k, v = (torch.randn(B, H, D, L, generator=rng).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) == L
    for mask in (get_mask_fn("causal"), get_mask_fn("prefix_lm", prefix_len=50)):
        bm = ffi_block_mask(mask, None, None, L, L, device="cpu")
        out = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
        ref, _ = reference_attention(q.double(), k.double(), v.double(), bm)
        assert rel_err(out.double(), ref) < 1e-5


class _FakeStream:
    def __init__(self, name):
        self.name, self.waited_on = name, []

    def wait_stream(self, other):
        self.waited_on.append(other)


def test_per_head_groups_run_on_side_streams_only_under_graph_capture(fake, monkeypatch, rng):
    """bands-per-head: while a CUDA graph is captured, group 0 runs on the caller's stream and each
    other group on a side stream that waits on the caller's and is joined back; called, in turn.
    The streams are stand-ins here (CPU): what is checked is the choice, the fork and join, and
    that the output is the one the groups give in turn."""
    B, L, D = 1, 300, 16

    def planned(Hq, Hkv, widths):
        def mod(b, h, q_idx, kv_idx):   # a causal window per head, widths[h % len(widths)] wide
            return (kv_idx <= q_idx) & (q_idx - kv_idx < torch.tensor(widths)[h % len(widths)])

        bm = create_block_mask(mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
        plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
        assert plan.route == "bands-per-head" and len(plan.head_band_runs) > 1
        return plan

    # heads h, h + 4 share a window: four evenly spaced groups, each written in place
    plan = planned(8, 2, [16, 40, 100, 1000])
    assert all(flag for _, _, flag, _ in plan.head_band_runs)
    # heads 2, 3, 6, 7 share one (a window as long as the keys is causal): unevenly spaced, copied
    copying = planned(8, 2, [16, 40, L, L])
    assert not all(flag for _, _, flag, _ in copying.head_band_runs)
    q = torch.randn(B * L, 8, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, L, 2, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, L, 2, D, generator=rng, dtype=torch.float64)
    in_turn = plan.run(q, k, v)

    # the choice: never on a CPU tensor, never when not capturing, never with a group that copies
    class CudaLike:
        is_cuda, device = True, torch.device("cuda", 0)

    capturing = [False]
    made = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(_FakeStream(len(made))) or made[-1])
    assert plan._streams_if_capturing(q) is None
    assert plan._streams_if_capturing(CudaLike()) is None
    capturing[0] = True
    assert copying._streams_if_capturing(CudaLike()) is None
    streams = plan._streams_if_capturing(CudaLike())
    assert streams[0] is None and len(streams) == len(plan.head_band_runs) and len(made) == len(streams) - 1
    assert plan._streams_if_capturing(CudaLike()) is streams   # made once, kept

    # the run on those streams (stand-ins: the CPU runs every launch at once, in order)
    main = _FakeStream("caller")
    entered = []

    class StreamContext:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            entered.append(self.s)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(plan, "_streams_if_capturing", lambda q: streams)
    out, lse = plan.run(q, k, v)
    assert torch.equal(out, in_turn[0]) and torch.equal(lse, in_turn[1])
    assert entered == streams
    assert all(s.waited_on == [main] for s in streams[1:])
    assert main.waited_on == streams[1:]


def test_per_head_side_streams_see_every_input_made_before_the_fork(fake, monkeypatch, rng):
    """Groups whose key heads are unevenly spaced gather them (a kernel on the caller's stream):
    every such gather comes before the side streams fork from the caller's stream, so none reads
    a gather it has not waited for (24 query / 6 key heads, a window by h % 6: group 0 has query
    heads 0, 6, 12, 18, a view written in place, and key heads 0, 1, 3, 4, gathered)."""
    Hq, Hkv, L, D = 24, 6, 300, 16
    widths = torch.tensor([16, 40, 100, 200, 250, 290])

    def mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < widths[h % 6])

    bm = create_block_mask(mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, 1, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.route == "bands-per-head" and all(flag for _, _, flag, _ in plan.head_band_runs)
    assert any(isinstance(kv_heads, torch.Tensor) for _, kv_heads, _, _ in plan.head_band_runs)
    q = torch.randn(L, Hq, D, generator=rng, dtype=torch.float64)
    k = torch.randn(1, L, Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(1, L, Hkv, D, generator=rng, dtype=torch.float64)
    in_turn = plan.run(q, k, v)

    events = []

    class Logged(_FakeStream):
        def wait_stream(self, other):
            events.append(("fork" if other is main else "join", self.name))
            super().wait_stream(other)

    main = Logged("caller")
    streams = [None] + [Logged(n) for n in range(1, len(plan.head_band_runs))]

    class StreamContext:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            events.append(("launch on", None if self.s is None else self.s.name))

        def __exit__(self, *exc):
            return False

    take = flashinfer_backend.take_heads

    def logged_take(x, dim, heads):
        events.append(("gather", None))
        return take(x, dim, heads)

    monkeypatch.setattr(flashinfer_backend, "take_heads", logged_take)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(plan, "_streams_if_capturing", lambda q: streams)
    out, lse = plan.run(q, k, v)
    assert torch.equal(out, in_turn[0]) and torch.equal(lse, in_turn[1])
    kinds = [kind for kind, _ in events]
    first_fork = kinds.index("fork")
    assert "gather" in kinds and max(i for i, kind in enumerate(kinds) if kind == "gather") < first_fork, events
    assert [name for kind, name in events if kind == "launch on"] == [None] + list(range(1, len(streams)))


def test_plans_of_the_same_launch_share_one_planned_wrapper(fake, rng, monkeypatch):
    """FlashInfer's plan() is the largest part of a long prepare(): a second plan
    of the same launch reuses the wrapper a live plan holds, a different launch plans its own, and
    a wrapper no plan holds any more is gone. Each plan's output stays its own mask's."""
    import gc

    from flex_flash_infer.planning import ragged

    planned = []
    real_plan = fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper.plan

    def counting_plan(self, *args, **kwargs):
        planned.append(None)   # a count: holding the wrapper would keep it alive
        return real_plan(self, *args, **kwargs)

    monkeypatch.setattr(fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper, "plan", counting_plan)
    B, Hq, Hkv, L, D = 2, 4, 2, 300, 16

    def make(mod):
        bm = create_block_mask(mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
        return flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")

    causal, window = get_mask_fn("causal"), get_mask_fn("sliding_window", window_size=70)
    first = make(causal)
    assert len(planned) == 1
    second = make(lambda b, h, q, kv: q >= kv)   # a user's own causal: the same launch
    assert len(planned) == 1 and second.band_runner.ragged is first.band_runner.ragged
    other = make(window)
    assert len(planned) == 2 and other.band_runner.ragged is not first.band_runner.ragged
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    for plan, dense in ((first, ki <= qi), (second, ki <= qi), (other, (ki <= qi) & (qi - ki < 70))):
        out, _ = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
        ref, _ = dense_attention(q, k, v, dense.expand(1, Hq, L, L))
        assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref) < 1e-6
    import weakref

    shared = weakref.ref(first.band_runner.ragged)
    del first, second, plan
    gc.collect()
    assert shared() is None   # the causal wrapper went with its last plan
    assert other.band_runner.ragged in ragged._planned.values()
    make(causal)
    assert len(planned) == 3


def test_a_planned_wrapper_is_shared_only_on_the_stream_it_was_planned_on(monkeypatch):
    """FlashInfer's plan() copies its tables to the GPU on the current stream without a sync: a plan
    made on another stream must not run a wrapper whose copies it is not ordered after."""
    import types

    from flexfuzz.simulated import simulated
    from flex_flash_infer.planning import ragged

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    current = types.SimpleNamespace(cuda_stream=1)
    with simulated():
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
        workspace = torch.empty(16, dtype=torch.uint8, device="cuda")
        indptr = torch.tensor([0, 128], dtype=torch.int32)

        def plan():
            return ragged.planned_ragged(workspace, "fa3", indptr, indptr, (1, 128, 128, 4, 2, 16), torch.bfloat16, True)

        first = plan()
        assert plan() is first
        current.cuda_stream = 2
        other = plan()
        assert other is not first and plan() is other
        current.cuda_stream = 1
        assert plan() is first


@pytest.mark.parametrize("hopper", [True, False], ids=["fa3", "fa2"])
@pytest.mark.parametrize("mod_name", ["alibi", "softcap_compiled"])
def test_score_mod_bands_with_and_without_a_window_in_one_module(fake, monkeypatch, rng, hopper, mod_name):
    """A compiled score_mod's bands where some have a window and some do not (documents shorter than
    the window are plain causal bands) share one module, built with its window on; FlashInfer's fa3
    kernel applies a module's window to every launch, so the bands without one must be launched
    with a window that hides nothing (the CPU model refuses window_left -1 on such an fa3 module:
    its rows would come back 0, LSE -inf; fa2 variants read -1 as no window). Against the dense
    reference."""
    from flex_flash_infer import and_masks
    from flex_flash_infer.backends import score_mod_kernels
    from flex_flash_infer.tools.warmup import example_score_mod

    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: hopper)
    B, L, Hq, Hkv, D = 1, 300, 4, 2, 16
    mask = and_masks(get_mask_fn("document", offsets=[0, 30, 160, 300]), get_mask_fn("sliding_window", window_size=50))
    score_mod = example_score_mod(mod_name.replace("_compiled", ""), Hq, device="cpu")
    score_mod = (lambda mod: lambda score, b, h, q_idx, kv_idx: mod(score, b, h, q_idx, kv_idx))(score_mod)
    bm = create_block_mask(mask, B, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu",
                                             score_mod=score_mod)
    runner = plan.band_runner
    assert isinstance(runner, score_mod_kernels.ScoreModBands)
    windows = {launch.window_left for _, launch, _ in runner.launches}
    assert -1 in {b.window_left for b in plan.bands} and any(w < 1000 for w in windows), (plan.bands, windows)
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    dense = create_mask(mask, B, 1, L, L, device="cpu")
    ref_out, ref_lse = dense_attention(q, k, v, dense, score_fn=score_mod)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-5


def test_the_cpu_model_refuses_a_window_the_module_would_not_apply():
    """The CPU model's check of a module's window flag against a launch's window (both ways on fa3;
    fa2 paged variants take none), on the jit_args of the library's own modules."""
    import torch as _torch

    window_args = native_copy.jit_args(_torch.bfloat16, 128, True, True, False)
    plain_args = native_copy.jit_args(_torch.bfloat16, 128, True, False, False)
    fake_flashinfer.check_window_flag("fa3", window_args, 63, "t")
    fake_flashinfer.check_window_flag("fa3", plain_args, -1, "t")
    with pytest.raises(AssertionError, match="built with a window and planned with window_left -1"):
        fake_flashinfer.check_window_flag("fa3", window_args, -1, "t")
    with pytest.raises(AssertionError, match="built without a window and planned with window_left 63"):
        fake_flashinfer.check_window_flag("fa3", plain_args, 63, "t")
    fake_flashinfer.check_window_flag("fa2", plain_args, 63, "t")   # fa2's ragged variants read the launch's
    with pytest.raises(AssertionError, match="ignores a window"):
        fake_flashinfer.check_window_flag("fa2", plain_args, 63, "t", paged=True)


@pytest.mark.parametrize("name", ["prefix_lm", "block_then_window", "rows_without_keys"])
@pytest.mark.parametrize("B", [1, 2])
def test_bands_launched_one_by_one_write_no_lse_unless_asked(fake, rng, name, B):
    """Bands run one launch each (prefix-LM's block and causal rows on the ragged wrapper; a
    window after a block as a single call; bands with rows between them that see no key, which
    come back 0 and -inf) give the dense mask's output with and without the LSE asked for, and the
    LSE when asked."""
    from flex_flash_infer import or_masks

    L, Hq, Hkv, D = 300, 4, 2, 16
    mod = {"prefix_lm": get_mask_fn("prefix_lm", prefix_len=77),
           "block_then_window": or_masks(lambda b, h, q, kv: (q < 64) & (kv < 64),
                                         get_mask_fn("sliding_window", window_size=40)),
           "rows_without_keys": lambda b, h, q, kv: (q < 128) & (kv <= q) | (q >= 256) & (kv < 64)}[name]
    bm = create_block_mask(mod, B, None, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, 0.25, "cpu")
    runner = plan.band_runner
    assert runner.ragged is None and runner.band_wrappers
    assert runner.writes_every_row == (name != "rows_without_keys")
    assert (len(runner.band_wrappers) == len(runner.bands)) == (name != "block_then_window")   # else one single call
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    args = (q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    ref, ref_lse = dense_attention(q, k, v, create_mask(mod, B, 1, L, L, device="cpu"), scale=0.25)
    out, lse = plan.run(*args, return_lse=True)
    out_only, no_lse = plan.run(*args, return_lse=False)
    assert no_lse is None
    for o in (out, out_only):
        assert rel_err(o.view(B, L, Hq, D).transpose(1, 2), ref) < 1e-6
    lse = lse.view(B, L, Hq).transpose(1, 2)
    seen = torch.isfinite(ref_lse)   # a row that sees no key: -inf on both sides
    assert torch.equal(lse[~seen], ref_lse[~seen]) and bool((lse[~seen] == float("-inf")).all())
    assert rel_err(lse[seen], ref_lse[seen]) < 1e-6
