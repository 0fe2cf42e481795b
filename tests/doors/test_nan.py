"""A NaN is never hidden (issue 20, class 6): a NaN query row gives a NaN output row and LSE, a
NaN key or value gives NaN in every row that sees it, as torch's flex_attention does, on the
reference backend and on every FlashInfer route through the CPU model of its kernels (whose
softmax no longer turns NaN into 0); the rows that see no NaN keep their exact values."""
import math

import pytest
import torch

from dense_reference import dense_attention
from flexfuzz.cpu_model import recording_plans
from flexfuzz.routes import plan_route
from flex_flash_infer import FlexFlashInfer, PagedFlexAttention, create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod
from paged_cases import dense_oracle, random_cache
from random_masks import per_head_starts, striped_causal

B, Hq, Hkv, L, S, D = 1, 4, 2, 200, 200, 16
ROW, KEY = 150, 150           # the NaN query row / key position
NAN_HEAD, NAN_KV_HEAD = 1, 0  # the query head of the NaN row; the key head of the NaN key (query heads 0, 1)


# (name, mask_mod, score_mod): between them the planner's routes (bands, bands+columns, tiles,
# bands-per-head, tiles-per-head; compiled score_mod bands, FlashInfer's soft cap, the far split)
CASES = [
    ("full", None, None),
    ("bands", get_mask_fn("causal"), None),
    ("bands+columns", get_mask_fn("streaming", sink_size=4, window_size=16), None),
    ("tiles", striped_causal, None),
    ("bands-per-head", per_head_starts, None),
    ("soft-cap", get_mask_fn("sliding_window", window_size=40), generate_softcap_score_mod(2.0)),
    ("compiled-score_mod", get_mask_fn("sliding_window", window_size=40),
     lambda s, b, h, q, kv: s - 0.1 * (h + 1) * (q - kv).abs()),
    ("far-split", get_mask_fn("causal"), generate_relative_position_bias_score_mod(
        torch.linspace(-1, 1, 4 * 65, dtype=torch.float64).view(4, 65))),
    # a score_mod the scale cannot take (s * c would fold into it and leave bands-per-head)
    ("tiles-per-head+score_mod", per_head_starts, lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs()),
]
# the route each case is named for, as the fuzzer names them (a case that drifts off it fails)
ROUTES = {"bands": "bands", "bands+columns": "bands+columns", "tiles": "tiles", "bands-per-head": "bands-per-head",
          "soft-cap": "bands/soft-cap", "compiled-score_mod": "bands/score-mod", "far-split": "bands/far-split",
          "tiles-per-head+score_mod": "tiles-per-head"}


def _visible(mask_mod):
    grid = (torch.arange(B).view(-1, 1, 1, 1), torch.arange(Hq).view(1, -1, 1, 1),
            torch.arange(L).view(1, 1, -1, 1), torch.arange(S).view(1, 1, 1, -1))
    return torch.ones(B, Hq, L, S, dtype=torch.bool) if mask_mod is None else mask_mod(*grid).expand(B, Hq, L, S)


def _assert_nan_exactly_where(out, lse, nan_rows, ref_out, ref_lse, values_only=False):
    """Rows in nan_rows [B, Hq, L] are NaN (their LSE too unless values_only: a NaN value does not
    reach the LSE); every other row equals the oracle computed without the NaN."""
    assert torch.isnan(out[nan_rows]).any(-1).all(), "a row that sees the NaN lost it"
    if not values_only:
        assert torch.isnan(lse[nan_rows]).all()
    clean = ~nan_rows
    assert not torch.isnan(out[clean]).any() and not torch.isnan(lse[clean]).any(), "NaN leaked to other rows"
    assert (out[clean].double() - ref_out[clean]).abs().max() < 1e-5
    seen = torch.isfinite(ref_lse) & clean
    assert torch.equal(torch.isfinite(lse) & clean, seen)
    assert torch.allclose(lse[seen].double(), ref_lse[seen], atol=1e-5)


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
@pytest.mark.parametrize("name,mask_mod,score_mod", CASES, ids=[c[0] for c in CASES])
def test_nan_reaches_every_row_that_sees_it(flashinfer_on_cpu, rng, backend, name, mask_mod, score_mod, where):
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    heads = Hq if mask_mod is per_head_starts else None
    bm = None if mask_mod is None else create_block_mask(mask_mod, None, heads, L, S, device="cpu")
    visible = _visible(mask_mod)
    ref_out, ref_lse = dense_attention(q, k, v, visible, score_fn=score_mod)
    if where == "query":
        q[0, NAN_HEAD, ROW] = math.nan
        nan_rows = torch.zeros(B, Hq, L, dtype=torch.bool)
        nan_rows[0, NAN_HEAD, ROW] = True
    else:
        (k if where == "key" else v)[0, NAN_KV_HEAD, KEY] = math.nan
        nan_rows = visible[..., KEY] & (torch.arange(Hq) // (Hq // Hkv) == NAN_KV_HEAD).view(1, -1, 1)
    with recording_plans() as plans:
        out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=True,
                                  backend=backend)
    if backend == "flashinfer" and name in ROUTES:
        assert plans and plan_route(plans[-1]).startswith(ROUTES[name]), [plan_route(p) for p in plans]
    if where == "value":
        # a row that does not see the key may still meet the NaN value in a tile it computes
        # (0 * NaN in p @ v, in torch and in the kernels alike): only the rows that see it are checked
        assert torch.isnan(out[nan_rows]).any(-1).all()
        assert not torch.isnan(lse).any()
        return
    _assert_nan_exactly_where(out, lse, nan_rows, ref_out, ref_lse)


@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_rows_as_torch_flex_attention(rng, where):
    """The same NaN rows as torch's own flex_attention (eager, on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    q = torch.randn(1, 4, 64, 16, generator=rng)
    k = torch.randn(1, 2, 64, 16, generator=rng)
    v = torch.randn(1, 2, 64, 16, generator=rng)
    (q if where == "query" else k)[0, 1, 40] = math.nan
    bm = create_block_mask(get_mask_fn("sliding_window", window_size=10), None, None, 64, 64, device="cpu",
                           BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="reference")
    want, want_lse = torch_flex(q, k, v, block_mask=bm.to_torch(), enable_gqa=True, return_lse=True)
    assert torch.isnan(out).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isnan(lse), torch.isnan(want_lse))


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "varlen"])
def test_seed_api_nan_query_row(flashinfer_on_cpu, monkeypatch, rng, backend, packed):
    from flex_flash_infer import varlen, wrapper

    if backend == "reference":
        monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "reference")
    lens = [100, 100] if packed else [200]
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    flex = FlexFlashInfer(device="cpu").prepare(
        mask_fn=get_mask_fn("causal"), seq_len_q=cu[-1], seq_len_kv=cu[-1], num_qo_heads=Hq, num_kv_heads=Hkv,
        head_dim=D, dtype=torch.float64, **({"cu_seqlens_q": cu, "cu_seqlens_kv": cu} if packed else {}))
    q = torch.randn(cu[-1], Hq, D, generator=rng, dtype=torch.float64)
    k = torch.randn(cu[-1], Hkv, D, generator=rng, dtype=torch.float64)
    v = torch.randn(cu[-1], Hkv, D, generator=rng, dtype=torch.float64)
    q[120, 2] = math.nan
    out, lse = flex(q, k, v, return_lse=True)
    assert torch.isnan(out[120, 2]).all() and torch.isnan(lse[120, 2])
    assert torch.isnan(out).any(-1).sum() == 1 and torch.isnan(lse).sum() == 1


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
@pytest.mark.parametrize("where", ["query", "key"])
@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_paged_nan(flashinfer_on_cpu, rng, backend, where, step):
    """The CPU model splits the keys of fa2's launches and of the decode kernel page by page and
    merges the parts as FlashInfer does, dropping a NaN LSE (paged_simulator.paged_prefill):
    prefill launches must be planned without the split, decode's LSE repaired."""
    qo_lens = [1, 1] if step == "decode" else [1, 5]
    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 70], qo_lens, 16)
    mod = get_mask_fn("sliding_window", window_size=40)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_indptr, indices, last, 16)
    nan_rows = torch.zeros(q.shape[:2], dtype=torch.bool)
    if where == "query":
        row = 1 if step == "decode" else 3
        q[row, 1] = math.nan
        nan_rows[row, 1] = True
    else:   # request 1's queries (positions 65..69) all see key 55 in their window; decode's
        # (69) sees key 66 on the last of its three full pages: the decode kernel's launch
        key = 66 if step == "decode" else 55
        page = indices[int(kv_indptr[1]) + key // 16]
        kc[page, key % 16, 0] = math.nan
        nan_rows[1:1 + qo_lens[1], :2] = True   # query heads 0 and 1 read key head 0
    attn = PagedFlexAttention(device="cpu", backend=backend)
    attn.plan(mod, qo_indptr, kv_indptr, indices, last, 4, 2, 16, 16, dtype=torch.float64)
    assert attn._planned["plan"].decode == (step == "decode" and backend == "flashinfer") or backend == "reference"
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    _assert_nan_exactly_where(out, lse, nan_rows, ref_out, ref_lse)


def test_a_nan_query_row_that_sees_no_key_keeps_lse_minus_inf_on_decode(flashinfer_on_cpu, rng):
    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 70], [1, 1], 16)
    q[1, 2] = math.nan
    attn = PagedFlexAttention(device="cpu", backend="flashinfer")
    attn.plan(lambda b, h, q_idx, kv_idx: kv_idx < 0, qo_indptr, kv_indptr, indices, last, 4, 2, 16, 16,
              dtype=torch.float64)
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    assert torch.isneginf(lse).all()   # nothing visible: -inf, NaN query or not


def test_a_nan_value_on_decode_gives_a_nan_lse_where_torch_gives_a_number(flashinfer_on_cpu, rng):
    """The documented difference: after FlashInfer's split-KV merge a NaN key cannot be told from
    a NaN value, so decode marks the LSE of every row whose output is NaN (never a hidden NaN)."""
    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 70], [1, 1], 16)
    page = indices[int(kv_indptr[1]) + 55 // 16]
    vc[page, 55 % 16, 0] = math.nan
    mod = get_mask_fn("sliding_window", window_size=20)
    ref_out, ref_lse = dense_oracle(mod, q, kc, vc, qo_indptr, kv_indptr, indices, last, 16)
    attn = PagedFlexAttention(device="cpu", backend="flashinfer")
    attn.plan(mod, qo_indptr, kv_indptr, indices, last, 4, 2, 16, 16, dtype=torch.float64)
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    assert torch.isnan(out[1, :2]).all() and not torch.isnan(ref_lse[1, :2]).any()
    assert torch.isnan(lse[1, :2]).all() and not torch.isnan(lse[0]).any() and not torch.isnan(lse[1, 2:]).any()


def test_a_plus_inf_score_gives_lse_inf_and_nan_only_where_torch_has_it():
    """A score_mod that sends some scores to +inf: torch gives those rows LSE +inf and NaN output,
    and a key no such row sees keeps a finite gradient (fuzz case 5012:93 gave LSE NaN and NaN dv)."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx < 10) & (kv_idx == 5), float("inf"), score)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (q_idx < 10)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    block_mask = create_block_mask(mask_mod, None, None, 40, 40, device="cpu")
    out, lse = flex_attention(*leaves, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    torch.where(torch.isnan(out), 0.0, out).sum().backward()
    with torch.no_grad():   # torch's flex has no backward on CPU
        torch_mask = torch.nn.attention.flex_attention.create_block_mask(mask_mod, None, None, 40, 40, device="cpu")
        want_out, want_lse = torch_flex(q, k, v, score_mod=score_mod, block_mask=torch_mask, return_lse=True)
    assert torch.isposinf(lse[:, :, :10]).all() and torch.isfinite(lse[:, :, 10:]).all()
    for got, want in ((out, want_out), (lse, want_lse)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        both = ~torch.isnan(want)
        torch.testing.assert_close(got[both].detach(), want[both], check_dtype=False)
    # v's gradient: NaN only at key 5 (the +inf scores' key), as the dense float64 oracle has it
    assert torch.equal(torch.isnan(leaves[2].grad).any(-1)[0, 0], torch.arange(40) == 5)


@pytest.mark.parametrize("per_head", [False, True])
def test_a_nan_in_one_requests_page_stays_in_that_request(flashinfer_on_cpu, rng, per_head):
    """A request without partial pages gets a dummy key in the masked launch; it came from the
    batch's first page, so a NaN value of request 0 made request 1's output and LSE NaN. It is
    the request's own first page now: another request's values never reach it."""
    hq, hkv, d, page = 4, 2, 16, 4
    k_cache = torch.randn(30, page, hkv, d, generator=rng)
    v_cache = torch.randn_like(k_cache)
    v_cache[5, 0, 0, 0] = float("nan")   # request 0's first key (its own sink: it sees it)
    windows = torch.tensor([8, 8, 8, 8])
    if per_head:   # the mask evaluated in the kernel (a compiled variant)
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((q_idx - kv_idx < windows[h]) | (kv_idx < 1))
    else:          # bits of the partial pages
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((q_idx - kv_idx < 8) | (kv_idx < 1))
    # request 0: 20 keys in pages 5..9; request 1: 3 keys in page 12, all visible (no partial page)
    tables = (torch.tensor([0, 1, 2]), torch.tensor([0, 5, 6]), torch.tensor([5, 6, 7, 8, 9, 12]), torch.tensor([4, 3]))
    q = torch.randn(2, hq, d, generator=rng)
    attention = PagedFlexAttention("cpu", backend="flashinfer")
    attention.plan(mask_mod, *tables, hq, hkv, d, page, dtype=torch.float32)
    out, lse = attention.run(q, (k_cache, v_cache), return_lse=True)
    keys = k_cache[12, :3].double().repeat_interleave(2, 1)
    values = v_cache[12, :3].double().repeat_interleave(2, 1)
    scores = torch.einsum("hd,khd->hk", q[1].double(), keys) / math.sqrt(d)
    assert not out[1].isnan().any() and not lse[1].isnan().any()
    want = torch.einsum("hk,khd->hd", scores.softmax(-1), values)
    assert (out[1].double() - want).abs().max() < 1e-5
    assert out[0].isnan().any()   # request 0 sees its NaN value
