"""Silent wrong answers found on the FlashInfer routes (issue 20), each through a public door on the
CPU model of FlashInfer (fake_flashinfer.py), against an independent float64 oracle of the mask
and score_mod evaluated densely."""
import math
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention
from flex_flash_infer import FlexFlashInfer, create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.backends import backend_choice, flashinfer_backend, score_mod_kernels, tile_kernels
from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod


def _grid(B, H, L, S, q_offset=0):
    return (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
            torch.arange(L).view(1, 1, -1, 1) + q_offset, torch.arange(S).view(1, 1, 1, -1))


def _inputs(rng, B, Hq, Hkv, L, S, D=16):
    return (torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64))


def _assert_matches(out, lse, ref_out, ref_lse):
    """Output within float64 rounding (the compiled score_mods compute in float32), LSE the
    same natural-log values with -inf exactly where a row sees nothing."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.double() - ref_out).abs().max().item() < 1e-5
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert bool((lse[~seen] == -math.inf).all())
    assert torch.allclose(lse.double()[seen], ref_lse[seen], atol=1e-5)


def _check(q, k, v, mask_mod, block_mask, score_mod=None, q_offset=0):
    """flex_attention on the FlashInfer path against the dense float64 oracle of mask_mod (with
    queries at q_offset + i, as the decoding idiom shifts them)."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True,
                              backend="flashinfer")
    b, h, qi, kv = _grid(B, Hq, L, S, q_offset)
    dense = mask_mod(b, h, qi, kv).expand(B, Hq, L, S)
    score_fn = None if score_mod is None else (lambda s, b, h, qq, kk: score_mod(s, b, h, qq + q_offset, kk))
    ref_out, ref_lse = dense_attention(q, k, v, dense, score_fn=score_fn)
    _assert_matches(out, lse, ref_out, ref_lse)
    return block_mask


# ---------------------------------------------------------------------------------------------
# 1. A band whose keys start past 0: every band runner hands a launch only the band's own keys.

def test_keys_from_3_in_one_batch_entry(flashinfer_on_cpu, rng):
    def from_3(b, h, q, kv):
        return kv >= 3

    bm = create_block_mask(from_3, None, None, 200, 200, device="cpu")
    _check(*_inputs(rng, 1, 2, 2, 200, 200), from_3, bm)


@pytest.mark.parametrize("trial", range(6))
def test_random_key_offsets_batch_shapes_and_gqa(flashinfer_on_cpu, rng, trial):
    """One band (full, causal, or a causal window) starting at a random key, batch 1 or 2,
    Q != KV, GQA: the band and ragged runners, and the per-head bands, see only its keys."""
    g = torch.Generator().manual_seed(trial)
    B, kind = 1 + trial // 3 % 2, trial % 3
    S = int(torch.randint(2, 300, (1,), generator=g))
    L = int(torch.randint(1, S + 1, (1,), generator=g)) if trial % 3 else int(torch.randint(1, 300, (1,), generator=g))
    # causal: a key offset below S - L leaves every row a key, so the band spans every query
    offset = int(torch.randint(1, S if kind == 0 else max(2, S - L + 1), (1,), generator=g))
    window = int(torch.randint(1, 80, (1,), generator=g))

    def offset_mask(b, h, q, kv):
        keep = kv >= offset
        if kind >= 1:   # causal, bottom-right aligned as the decoding of a longer cache
            keep = keep & (kv <= q + (S - L))
        if kind == 2:
            keep = keep & (kv >= q + (S - L) - window)
        return keep

    bm = create_block_mask(offset_mask, None, None, L, S, device="cpu", BLOCK_SIZE=64)
    _check(*_inputs(rng, B, 4, 2, L, S), offset_mask, bm)


def test_per_head_bands_with_key_offsets(flashinfer_on_cpu, rng):
    def per_head_offset(b, h, q, kv):
        return kv >= 3 + 40 * h

    bm = create_block_mask(per_head_offset, None, 4, 200, 200, device="cpu")
    _check(*_inputs(rng, 1, 4, 2, 200, 200), per_head_offset, bm)
    assert bm._plans and next(iter(bm._plans.values())).route == "bands-per-head"


@pytest.mark.parametrize("pos", [150, 37, 299])
def test_decoding_idiom_sliding_window(flashinfer_on_cpu, rng, pos):
    """torch's decoding idiom: the query tile of a block mask, its mask_mod shifted to the
    position and seq_lengths (1, S)."""
    S = 300
    window = get_mask_fn("sliding_window", window_size=101)
    full = create_block_mask(window, None, None, S, S, device="cpu")
    step = full[:, :, pos // full.BLOCK_SIZE[0]]
    step.mask_mod = lambda b, h, q_idx, kv_idx: window(b, h, q_idx + pos, kv_idx)
    step.seq_lengths = (1, S)
    _check(*_inputs(rng, 1, 4, 2, 1, S), window, step, q_offset=pos)


def _alibi_like(heads):
    slopes = torch.linspace(0.05, 0.4, heads, dtype=torch.float64)

    def alibi_like(score, b, h, q, kv):
        return score - slopes[h] * (q - kv).abs()

    return alibi_like


@pytest.mark.parametrize("mod_name", ["compiled", "softcap"])
@pytest.mark.parametrize("B", [1, 2])
def test_last_keys_with_a_score_mod(flashinfer_on_cpu, rng, mod_name, B):
    """A window over the last 64 of 300 keys with a score_mod: the compiled score_mod bands and
    FlashInfer's own soft cap."""
    L = S = 300

    def last_keys(b, h, q, kv):
        return kv >= S - 64

    score_mod = generate_softcap_score_mod(2.0) if mod_name == "softcap" else _alibi_like(4)
    bm = create_block_mask(last_keys, None, None, L, S, device="cpu")
    _check(*_inputs(rng, B, 4, 2, L, S), last_keys, bm, score_mod)


@pytest.mark.parametrize("B", [1, 2])
def test_far_bias_split_of_a_band_past_key_0(flashinfer_on_cpu, rng, B):
    """A causal band from key 5, ten keys ahead of the queries, with a relative-position bias:
    its near keys (a window band over every query) run the compiled score_mod, its far keys the
    plain kernel."""
    from flex_flash_infer.planning import far_bias

    L, S = 300, 310

    def from_5(b, h, q, kv):
        return (kv >= 5) & (kv <= q + S - L)

    score_mod = generate_relative_position_bias_score_mod(torch.randn(4, 65, dtype=torch.float64, generator=rng))
    bm = create_block_mask(from_5, None, None, L, S, device="cpu")
    _check(*_inputs(rng, B, 4, 2, L, S), from_5, bm, score_mod)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, 4, 2, 16, torch.float64, 0.25, "cpu", score_mod=score_mod)
    assert isinstance(plan.band_runner, far_bias.FarSplitBands)


# ---------------------------------------------------------------------------------------------
# 2. Packed varlen: one ragged launch only when every sequence's plan is exactly bands.

def _check_varlen(flex, rng, mask_mod, cu_q, cu_kv, Hq=4, Hkv=2, D=16):
    q = torch.randn(cu_q[-1], Hq, D, generator=rng, dtype=torch.float64)
    k = torch.randn(cu_kv[-1], Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(cu_kv[-1], Hkv, D, generator=rng, dtype=torch.float64)
    out, lse = flex(q, k, v, return_lse=True)
    for i in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_kv[i], cu_kv[i + 1])
        L, S = cu_q[i + 1] - cu_q[i], cu_kv[i + 1] - cu_kv[i]
        b, h, qi, kv = _grid(1, Hq, L, S)
        dense = mask_mod(b * 0 + i, h, qi, kv).expand(1, Hq, L, S)
        ref_out, ref_lse = dense_attention(q[rows].transpose(0, 1)[None], k[keys].transpose(0, 1)[None],
                                           v[keys].transpose(0, 1)[None], dense)
        _assert_matches(out[rows].transpose(0, 1)[None], lse[rows].transpose(0, 1)[None], ref_out, ref_lse)


@pytest.mark.parametrize("merge_kernel", [True, False], ids=["merge-kernel", "paged-columns"])
@pytest.mark.parametrize("name,params", [("streaming", {"sink_size": 4, "window_size": 16}),
                                         ("attamba", {"chunk_size": 8, "window_size": 16})])
def test_varlen_streaming_and_attamba_keep_their_key_columns(flashinfer_on_cpu, monkeypatch, rng, merge_kernel,
                                                             name, params):
    """Each sequence's plan is a window band plus key columns (summed by the merge kernel, or a
    paged launch over the columns): the packed batch runs one plan per sequence."""
    from flex_flash_infer.backends import column_merge
    from flex_flash_infer import varlen

    monkeypatch.setattr(column_merge, "kernel_available", lambda device, head_dim: merge_kernel)
    cu = [0, 100, 200]
    mod = get_mask_fn(name, **params)
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mod, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                                                dtype=torch.float64, cu_seqlens_q=cu, cu_seqlens_kv=cu)
    assert flex._prepared.ragged is None
    assert all(s.plan.route == "bands+columns" for s in flex._prepared.segments)
    _check_varlen(flex, rng, mod, cu, cu)


# ---------------------------------------------------------------------------------------------
# 3. Nothing visible: every route that ends with no launch gives zeros and lse -inf.

def _nothing(b, h, q, kv):
    return q < 0


@pytest.mark.parametrize("with_score_mod", [False, True])
@pytest.mark.parametrize("B,L,S", [(1, 200, 200), (2, 77, 300)])
def test_a_block_mask_with_no_visible_pair(flashinfer_on_cpu, rng, with_score_mod, B, L, S):
    bm = create_block_mask(_nothing, None, None, L, S, device="cpu")
    q, k, v = _inputs(rng, B, 4, 2, L, S)
    _check(q, k, v, _nothing, bm, _alibi_like(4) if with_score_mod else None)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="flashinfer")   # without lse
    assert torch.equal(out, torch.zeros_like(out))
    plan = next(iter(bm._plans.values()))
    assert plan.route == "tiles"
    assert all(g.full is None and g.partial is None for g in plan.groups)   # no launch without a tile


def test_a_decoding_step_that_sees_nothing(flashinfer_on_cpu, rng):
    """torch's decoding idiom at a position whose query tile sees no key."""
    S, pos = 300, 150

    def early_rows(b, h, q, kv):
        return (q < 100) & (kv <= q)

    full = create_block_mask(early_rows, None, None, S, S, device="cpu")
    step = full[:, :, pos // full.BLOCK_SIZE[0]]
    step.mask_mod = lambda b, h, q_idx, kv_idx: early_rows(b, h, q_idx + pos, kv_idx)
    step.seq_lengths = (1, S)
    _check(*_inputs(rng, 1, 4, 2, 1, S), early_rows, step, q_offset=pos)


@pytest.mark.parametrize("empty_heads", [(1,), (0, 1, 2, 3)])
def test_heads_that_see_nothing(flashinfer_on_cpu, rng, empty_heads):
    """A per-head mask with heads that see nothing: every head in one launch set (none at all
    when every head is empty)."""
    empty = torch.zeros(4, dtype=torch.bool)
    empty[list(empty_heads)] = True

    def some_heads_empty(b, h, q, kv):
        return ~empty[h] & (kv <= q) & ((q - kv) % 3 == 0)

    bm = create_block_mask(some_heads_empty, None, 4, 200, 200, device="cpu", BLOCK_SIZE=64)
    _check(*_inputs(rng, 1, 4, 2, 200, 200), some_heads_empty, bm)
    assert next(iter(bm._plans.values())).route.startswith("tiles-per-head")


def test_a_varlen_sequence_that_sees_nothing(flashinfer_on_cpu, rng):
    def second_sequence_empty(b, h, q, kv):
        return (b != 1) & (kv <= q)

    cu = [0, 100, 200, 260]
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=second_sequence_empty, num_qo_heads=4, num_kv_heads=2,
                                                head_dim=16, dtype=torch.float64, cu_seqlens_q=cu, cu_seqlens_kv=cu)
    assert flex._prepared.ragged is None
    _check_varlen(flex, rng, second_sequence_empty, cu, cu)
    single = FlexFlashInfer(device="cpu").prepare(mask_fn=_nothing, seq_len_q=90, seq_len_kv=130, num_qo_heads=4,
                                                  num_kv_heads=2, head_dim=16, dtype=torch.float64)
    _check_varlen(single, rng, _nothing, [0, 90], [0, 130])


@pytest.mark.parametrize("kind", ["plain", "score_mod", "per_head"])
@pytest.mark.parametrize("qo_lens", [[1, 1, 1], [5, 40, 1]], ids=["decode", "prefill"])
def test_a_paged_plan_that_sees_nothing(flashinfer_on_cpu, rng, kind, qo_lens):
    from flex_flash_infer import PagedFlexAttention
    from paged_cases import dense_oracle, random_cache

    def none_for_heads(b, h, q, kv):
        return (h < 0) & (kv <= q)

    mod = none_for_heads if kind == "per_head" else _nothing
    score_mod = _alibi_like(4) if kind == "score_mod" else None
    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [40, 100, 7], qo_lens, 16)
    attn = PagedFlexAttention(device="cpu", backend="flashinfer")
    attn.plan(mod, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4, num_kv_heads=2, head_dim=16,
              page_size=16, dtype=torch.float64, score_mod=score_mod)
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16, score_mod)
    _assert_matches(out, lse, ref_out, ref_lse)


# ---------------------------------------------------------------------------------------------
# Found by a differential campaign over the same routes.

@pytest.mark.parametrize("L", [1, 5, 7])
def test_attamba_shorter_than_its_first_column(flashinfer_on_cpu, rng, L):
    """Attamba's first key column (chunk_size - 1) past the last key: no column to gather (the
    column lowering raised inside torch.arange), a plain causal band."""
    mod = get_mask_fn("attamba", chunk_size=8, window_size=16)
    bm = create_block_mask(mod, None, None, L, L, device="cpu")
    _check(*_inputs(rng, 1, 4, 2, L, L), mod, bm)
    cu = [0, L, L + 100]
    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=mod, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                                                dtype=torch.float64, cu_seqlens_q=cu, cu_seqlens_kv=cu)
    _check_varlen(flex, rng, mod, cu, cu)


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
def test_paged_mask_indexing_a_table_as_long_as_a_short_cache(flashinfer_on_cpu, rng, backend):
    """A document mask over a cache of 3 tokens (its table holds 3 entries): planning probed the
    mask on positions 0..3 whatever the cache held, and raised IndexError."""
    from flex_flash_infer import PagedFlexAttention
    from paged_cases import dense_oracle, random_cache

    ids = torch.tensor([0, 0, 1])

    def documents(b, h, q, kv):
        return (ids[q] == ids[kv]) & (kv <= q)

    q, kc, vc, qo_indptr, kv_page_indptr, indices, last = random_cache(rng, [3], [2], 16)
    attn = PagedFlexAttention(device="cpu", backend=backend)
    attn.plan(documents, qo_indptr, kv_page_indptr, indices, last, num_qo_heads=4, num_kv_heads=2, head_dim=16,
              page_size=16, dtype=torch.float64)
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    ref_out, ref_lse = dense_oracle(documents, q, kc, vc, qo_indptr, kv_page_indptr, indices, last, 16)
    _assert_matches(out, lse, ref_out, ref_lse)
