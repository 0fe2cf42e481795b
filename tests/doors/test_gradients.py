"""Gradients are never dropped silently (issue 20, class 4): on the FlashInfer backend (the CPU
model of its kernels) outputs carry a grad_fn whose backward recomputes attention in plain torch,
on the reference backend every path keeps the graph (rows that see nothing included), and a
learned table a score_mod reads gets its gradient. Checked against torch.autograd through an
independent dense float64 attention (torch's own flex_attention has no backward on CPU)."""
import math
import types

import pytest
import torch

from flex_flash_infer import FlexFlashInfer, PagedFlexAttention, api, create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.backends import autograd, reference
from flex_flash_infer.mods import generate_relative_position_bias_score_mod
from paged_cases import random_cache


def dense_grad_oracle(q, k, v, visible, score_fn=None, scale=None):
    """float64 (out, lse) with autograd, written without the library: a row that sees no key
    gives out 0 and lse -inf through where()s whose gradient is exactly 0."""
    B, Hq, L, E = q.shape
    g = Hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("bhld,bhsd->bhls", q.double(), kk) * (1 / math.sqrt(E) if scale is None else scale)
    if score_fn is not None:
        grid = (torch.arange(B).view(-1, 1, 1, 1), torch.arange(Hq).view(1, -1, 1, 1),
                torch.arange(L).view(1, 1, -1, 1), torch.arange(s.shape[-1]).view(1, 1, 1, -1))
        s = score_fn(s, *grid).double()
    visible = visible.expand_as(s)
    seen = visible.any(-1, keepdim=True)
    s = torch.where(visible, s, -math.inf)
    s = torch.where(seen, s, 0.0)   # an empty row: any finite row, then zeroed
    out = torch.softmax(s, -1) @ vv * seen
    lse = torch.where(seen.squeeze(-1), torch.logsumexp(s, -1), -math.inf)
    return out, lse


def _grid(B, H, L, S):
    return (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
            torch.arange(L).view(1, 1, -1, 1), torch.arange(S).view(1, 1, 1, -1))


def _ours_and_oracle(q, k, v, backend="flashinfer"):
    """Two ways to attend with a score_mod over every key: this library's (GQA) and the oracle's."""
    return (lambda mod: flex_attention(q, k, v, score_mod=mod, enable_gqa=True, backend=backend),
            lambda mod: dense_grad_oracle(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), mod)[0])


def _leaves(rng, B, Hq, Hkv, L, S, D=16, dtype=torch.float64):
    return [torch.randn(shape, generator=rng, dtype=torch.float64).to(dtype).requires_grad_()
            for shape in ((B, Hq, L, D), (B, Hkv, S, D), (B, Hkv, S, D))]


def _seeds(rng, out, lse):
    """Random upstream gradients for out and for the finite entries of lse."""
    g_out = torch.randn(out.shape, generator=rng, dtype=torch.float64).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=rng, dtype=torch.float64).to(lse.dtype)
    return g_out, torch.where(torch.isfinite(lse), g_lse, 0.0)


def _assert_grads(got, want, tol=1e-9):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"input {i} got no gradient"
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), f"input {i}: non-finite gradient"
        err, size = (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()
        assert err <= tol * max(1.0, size), f"input {i}: max error {err:.3g}"


def _causal_from_5(b, h, q, kv):   # rows 0..4 see nothing
    return kv <= q - 5


def _per_head(b, h, q, kv):   # bands per head
    return kv >= 3 + 40 * h


def _random_tiles(b, h, q, kv):
    return ((q * 7 + kv * 13) % 5 != 0) & (kv <= q)


ROUTES = [
    ("bands", get_mask_fn("causal"), None),
    ("empty-rows", _causal_from_5, None),
    ("streaming", get_mask_fn("streaming", sink_size=4, window_size=16), None),   # L != S: tiles, not key columns
    ("tiles", _random_tiles, None),
    ("bands-per-head", _per_head, None),
    ("compiled-score_mod", get_mask_fn("sliding_window", window_size=40), "alibi"),
    ("far-split-learned-table", get_mask_fn("causal"), "relbias"),
    ("tiles-learned-table", _random_tiles, "relbias"),
]


def _score_mod(kind, rng, heads):
    """(score_mod, learned tensors it reads)."""
    if kind is None:
        return None, []
    if kind == "alibi":
        slopes = torch.linspace(0.05, 0.4, heads, dtype=torch.float64)
        return (lambda s, b, h, q, kv: s - slopes[h] * (q - kv).abs()), []
    table = torch.randn(heads, 65, generator=rng, dtype=torch.float64).requires_grad_()
    return generate_relative_position_bias_score_mod(table), [table]


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
@pytest.mark.parametrize("name,mask_mod,score_kind", ROUTES, ids=[r[0] for r in ROUTES])
def test_gradients_match_autograd_on_the_dense_oracle(flashinfer_on_cpu, rng, backend, name, mask_mod, score_kind):
    B, Hq, Hkv, L, S = 2, 4, 2, 150, 170
    q, k, v = _leaves(rng, B, Hq, Hkv, L, S)
    score_mod, learned = _score_mod(score_kind, rng, Hq)
    per_head = mask_mod is _per_head
    bm = create_block_mask(mask_mod, None, Hq if per_head else None, L, S, device="cpu", BLOCK_SIZE=64)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=True,
                              backend=backend)
    assert out.grad_fn is not None and lse.grad_fn is not None
    g_out, g_lse = _seeds(rng, out, lse)
    got = torch.autograd.grad([out, lse], [q, k, v, *learned], [g_out, g_lse])
    want_out, want_lse = dense_grad_oracle(q, k, v, mask_mod(*_grid(B, Hq, L, S)), score_mod)
    want = torch.autograd.grad([want_out, want_lse], [q, k, v, *learned], [g_out, g_lse.double()])
    _assert_grads(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_have_the_inputs_dtypes(flashinfer_on_cpu, rng, dtype):
    """float32 and bfloat16 inputs get float32 and bfloat16 gradients (recomputed in float32), a
    float64 learned table a float64 gradient."""
    q, k, v = _leaves(rng, 1, 4, 2, 70, 90, dtype=dtype)
    score_mod, (table,) = _score_mod("relbias", rng, 4)
    bm = create_block_mask(get_mask_fn("causal"), None, None, 70, 90, device="cpu", BLOCK_SIZE=32)
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, backend="flashinfer")
    got = torch.autograd.grad(out.float().square().sum(), [q, k, v, table])
    assert [g.dtype for g in got] == [dtype] * 3 + [torch.float64]
    want_out, _ = dense_grad_oracle(q, k, v, get_mask_fn("causal")(*_grid(1, 4, 70, 90)), score_mod)
    want = torch.autograd.grad(want_out.square().sum(), [q, k, v, table])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= tol * b.abs().max()


def test_a_learned_table_alone_gets_its_gradient(flashinfer_on_cpu, rng):
    """Frozen q, k, v and a learned table (a closure cell, a module's parameter): the output still
    carries a grad_fn, and the table gets the oracle's gradient."""
    q, k, v = (t.detach() for t in _leaves(rng, 1, 4, 2, 60, 60))

    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(4, 60, generator=rng, dtype=torch.float64))

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.table[h, kv_idx]

    module = Bias()
    for backend in ("flashinfer", "reference"):
        out = flex_attention(q, k, v, score_mod=module.score_mod, enable_gqa=True, backend=backend)
        (got,) = torch.autograd.grad(out.sum(), [module.table])
        want_out, _ = dense_grad_oracle(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), module.score_mod)
        (want,) = torch.autograd.grad(want_out.sum(), [module.table])
        _assert_grads([got], [want])


def test_learned_tensors_the_search_cannot_reach_get_their_gradients(flashinfer_on_cpu, rng):
    """Tensors requiring grad that captured_tensors does not reach (an object's __slots__, a class
    attribute), beside one it finds (a closure cell): the traced expression and the probe at
    position 0 find them, and each gets the oracle's gradient (one was silently None before)."""
    class Holder:
        __slots__ = ("table",)

    class Config:
        slope = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)

    holder = Holder()
    holder.table = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)
    found = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)

    def hidden_bias(score, b, h, q_idx, kv_idx):
        return score + holder.table[h] + found[h] - Config.slope[h] * (q_idx - kv_idx).abs() * 0.05

    q, k, v = (t.detach() for t in _leaves(rng, 1, 4, 2, 50, 50))
    assert [t is found for t in autograd.captured_tensors(hidden_bias)] == [True]
    out = flex_attention(q, k, v, score_mod=hidden_bias, enable_gqa=True, backend="flashinfer")
    got = torch.autograd.grad(out.square().sum(), [holder.table, found, Config.slope])
    want_out, _ = dense_grad_oracle(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), hidden_bias)
    want = torch.autograd.grad(want_out.square().sum(), [holder.table, found, Config.slope])
    _assert_grads(got, want, tol=1e-6)   # the forward's kernels read float32 copies of the tables
    with torch.no_grad():   # inference is unaffected
        assert flex_attention(q, k, v, score_mod=hidden_bias, enable_gqa=True, backend="flashinfer").grad_fn is None


def test_a_table_and_a_tensor_derived_from_it_both_read(flashinfer_on_cpu, rng):
    """A score_mod reading a learned table and a tensor computed from it (table * 2): the table's
    gradient holds its own use and what flows through the derived tensor (its direct use was lost
    before: 3.5 off)."""
    table = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)
    scaled = table * 2

    def both(score, b, h, q_idx, kv_idx):
        return score + table[h] * 0.3 - scaled[h] * (q_idx - kv_idx).abs() * 0.01

    q, k, v = _leaves(rng, 1, 4, 2, 60, 60)
    for backend in ("flashinfer", "reference"):
        out = flex_attention(q, k, v, score_mod=both, enable_gqa=True, backend=backend)
        got = torch.autograd.grad(out.square().sum(), [q, k, v, table], retain_graph=True)
        want_out, _ = dense_grad_oracle(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), both)
        want = torch.autograd.grad(want_out.square().sum(), [q, k, v, table], retain_graph=True)
        _assert_grads(got, want, tol=1e-6)


def test_a_table_computed_from_a_parameter_gets_its_own_gradient(flashinfer_on_cpu, rng):
    """A score_mod reading bias = w * 2 (a non-leaf table): the table's own gradient exists
    (autograd.grad, retain_grad; it was None on the FlashInfer doors, the parameter's only
    input), and the parameter's is the oracle's."""
    w = torch.randn(8, generator=rng, dtype=torch.float64, requires_grad=True)
    q, k, v = _leaves(rng, 1, 4, 2, 60, 60)
    for backend in ("flashinfer", "reference"):
        results = []
        for attend in _ours_and_oracle(q, k, v, backend):
            bias = w * 2
            bias.retain_grad()

            def from_param(score, b, h, q_idx, kv_idx):
                return score + bias[(q_idx - kv_idx).abs().clamp(max=7)] * 0.3

            out = attend(from_param)
            results.append(torch.autograd.grad(out.square().sum(), [bias, w, q], retain_graph=True))
            out.sum().backward()
            results.append([bias.grad])
        got, got_retained, want, want_retained = results
        assert got[0] is not None and got_retained[0] is not None
        _assert_grads([*got, *got_retained], [*want, *want_retained], tol=1e-6)


def test_a_hook_on_a_learned_table_runs_once(flashinfer_on_cpu, rng):
    """A hook on the table (a gradient scale, a clip, a logger) runs once per backward and the
    table's gradient is the oracle's with it (the recomputation ran it too: 2 calls, gradient 2x)."""
    q, k, v = _leaves(rng, 1, 4, 2, 60, 60)
    grads, calls = [], []
    for attend in _ours_and_oracle(q, k, v):
        table = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
        calls.append(0)

        def doubled(g):
            calls[-1] += 1
            return g * 2

        table.register_hook(doubled)

        def biased(score, b, h, q_idx, kv_idx):
            return score + table[(q_idx - kv_idx).abs().clamp(max=7)] * 0.3

        attend(biased).square().sum().backward()
        grads.append(table.grad)
    assert calls == [1, 1]
    _assert_grads(grads[:1], grads[1:], tol=1e-6)


@pytest.mark.parametrize("registered", [False, True])
def test_a_copy_the_mod_makes_at_its_first_call_and_keeps(flashinfer_on_cpu, rng, registered):
    """A mod that makes a tensor from its table at its first call and keeps it (a device copy: the
    library's mods register theirs, core/versions.copied_from; a user's need not): the table's
    gradient still comes through the kept copy (it was None, read through stand-ins only)."""
    from flex_flash_infer.core.versions import copied_from

    q, k, v = _leaves(rng, 1, 4, 2, 60, 60)
    grads, calls = [], []
    for attend in _ours_and_oracle(q, k, v):
        table = torch.randn(8, generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
        calls.append(0)
        table.register_hook(lambda g: calls.__setitem__(-1, calls[-1] + 1))
        kept = {}

        def through_kept(score, b, h, q_idx, kv_idx):
            # made at its first call on real tensors (learned_tensors' recording call, not the trace)
            if "copy" not in kept and isinstance(score, torch.Tensor):
                kept["copy"] = table * 1.0
                if registered:
                    copied_from(kept["copy"], table)
            return score + kept.get("copy", table)[(q_idx - kv_idx).abs().clamp(max=7)] * 0.3

        attend(through_kept).square().sum().backward()
        grads.append(table.grad)
    _assert_grads(grads[:1], grads[1:], tol=1e-6)
    assert calls == [1, 1]   # the copy is an input of its own, read through a stand-in


def test_a_kept_copy_of_a_derived_table_beside_its_parameter(flashinfer_on_cpu, rng):
    """w and bias = w * 2 both reachable, the mod reading a copy of bias it made at its first call
    and keeps, bias retaining its gradient and a hook scaling w's: every gradient is the oracle's
    and each hook runs once (through the tables themselves w got bias's share twice: 2x, and the
    hook acted in the recomputation too)."""
    q, k, v = _leaves(rng, 1, 4, 2, 40, 40)
    results = []
    for attend in _ours_and_oracle(q, k, v):
        w = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        calls = []
        w.register_hook(lambda g: (calls.append(1), g * 3)[1])
        bias = w * 2
        bias.retain_grad()
        kept = {}

        def mod(score, b, h, q_idx, kv_idx):
            if "copy" not in kept and isinstance(score, torch.Tensor):
                kept["copy"] = bias * 1.0
            return score + kept.get("copy", bias)[(q_idx - kv_idx).abs().clamp(max=7)] * 0.3 + w[h] * 0.1

        attend(mod).square().sum().backward()
        results.append(([w.grad, bias.grad], len(calls)))
    (got, got_calls), (want, want_calls) = results
    assert got_calls == want_calls == 1
    _assert_grads(got, want, tol=1e-6)


def test_a_table_from_a_parameter_also_used_directly_out_of_sight(flashinfer_on_cpu, rng):
    """bias = w * 2 read from a closure and w itself read through a class attribute (which the
    search cannot reach): w's gradient holds both uses, once each."""
    class Config:
        w = torch.randn(8, generator=rng, dtype=torch.float64, requires_grad=True)

    bias = Config.w * 2

    def both(score, b, h, q_idx, kv_idx):
        return score + bias[h] * 0.3 - Config.w[h] * (q_idx - kv_idx).abs() * 0.01

    q, k, v = _leaves(rng, 1, 4, 2, 60, 60)
    out = flex_attention(q, k, v, score_mod=both, enable_gqa=True, backend="flashinfer")
    got = torch.autograd.grad(out.square().sum(), [q, Config.w], retain_graph=True)   # bias's graph, for the oracle
    want_out, _ = dense_grad_oracle(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), both)
    want = torch.autograd.grad(want_out.square().sum(), [q, Config.w])
    _assert_grads(got, want, tol=1e-6)


def test_a_gradient_of_a_gradient_raises_on_the_flashinfer_path(flashinfer_on_cpu, rng):
    """create_graph=True (a gradient penalty) through the FlashInfer backend raises naming the
    reference backend, where it gave first-order gradients without a graph: a second-order term
    silently 0 (|d loss / dk| 364 instead of 2764)."""
    q, k, v = _leaves(rng, 1, 2, 2, 64, 64)
    bm = create_block_mask(get_mask_fn("causal"), None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    out = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
    with pytest.raises(RuntimeError, match="gradient of a gradient.*backend='reference'"):
        torch.autograd.grad(out.square().sum(), [q], create_graph=True)
    out = flex_attention(q, k, v, block_mask=bm, backend="reference")   # the alternative it names works
    (dq,) = torch.autograd.grad(out.square().sum(), [q], create_graph=True)
    assert dq.requires_grad


def test_nothing_visible_still_reaches_a_learned_table(rng):
    """Every row empty, frozen q, k, v and a learned table, on the reference backend: the output
    carries a graph to the table, whose gradient is 0 (autograd.grad raised before)."""
    table = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.detach() for t in _leaves(rng, 1, 4, 2, 20, 20))
    bm = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx < 0, None, None, 20, 20, device="cpu")
    out = flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + table[h], block_mask=bm,
                         enable_gqa=True, backend="reference")
    (got,) = torch.autograd.grad(out.sum(), [table])
    assert torch.equal(got, torch.zeros_like(table))


def test_inference_without_no_grad_costs_nothing_extra(flashinfer_on_cpu, monkeypatch, rng):
    """Inputs that do not require grad (eval mode without torch.no_grad()): the kernels run alone,
    no autograd.Function, no reference computation, output without grad_fn."""
    def forbidden(*args, **kwargs):
        raise AssertionError("autograd machinery used for inputs that need no gradient")

    for name in ("with_recomputed_gradients", "reference_attention", "reference_gradients"):
        monkeypatch.setattr(api, name, forbidden)
    q, k, v = (t.detach() for t in _leaves(rng, 1, 4, 2, 80, 80))
    bm = create_block_mask(get_mask_fn("causal"), None, None, 80, 80, device="cpu", BLOCK_SIZE=32)
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    assert out.grad_fn is None and lse.grad_fn is None and not out.requires_grad
    out = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s * 0.5, block_mask=bm, enable_gqa=True,
                         backend="flashinfer")
    assert out.grad_fn is None


@pytest.mark.parametrize("mask_mod", [lambda b, h, q, kv: kv > q + 1000, _causal_from_5],
                         ids=["every-row-empty", "some-rows-empty"])
def test_reference_keeps_the_graph_when_rows_see_nothing(rng, mask_mod):
    q, k, v = _leaves(rng, 2, 4, 2, 40, 40)
    bm = create_block_mask(mask_mod, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="reference")
    assert out.requires_grad and lse.requires_grad
    got = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum(), [q, k, v])
    want_out, want_lse = dense_grad_oracle(q, k, v, mask_mod(*_grid(2, 4, 40, 40)))
    want = torch.autograd.grad(want_out.sum() + torch.where(torch.isfinite(want_lse), want_lse, 0.0).sum(), [q, k, v])
    _assert_grads(got, want)


def test_reference_gradients_chunk_by_chunk(rng):
    """The FlashInfer doors' backward, with chunks of a few rows, equals the reference's own
    autograd (and bounds memory to one chunk's graph)."""
    q, k, v = _leaves(rng, 1, 4, 2, 37, 50)
    table = torch.randn(4, 50, generator=rng, dtype=torch.float64, requires_grad=True)

    def score_mod(s, b, h, q_idx, kv_idx):
        return s + table[h, kv_idx]

    bm = create_block_mask(_causal_from_5, None, None, 37, 50, device="cpu", BLOCK_SIZE=8)
    out, lse = reference.reference_attention(q, k, v, bm, score_mod, None)
    g_out, g_lse = _seeds(rng, out, lse)
    want = torch.autograd.grad([out, lse], [q, k, v, table], [g_out, g_lse])
    got = reference.reference_gradients(q, k, v, [table], bm, score_mod, None, g_out, g_lse, [True] * 4,
                                        chunk_elements=4 * 50 * 3)
    _assert_grads(got, want)
    partial = reference.reference_gradients(q, k, v, [table], bm, score_mod, None, g_out, g_lse,
                                            [False, True, False, True])
    assert partial[0] is None and partial[2] is None
    _assert_grads([partial[1], partial[3]], [want[1], want[3]])


@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "varlen"])
@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
def test_seed_api_gradients(flashinfer_on_cpu, monkeypatch, rng, backend, packed):
    from flex_flash_infer import varlen, wrapper

    if backend == "reference":
        monkeypatch.setattr(wrapper, "choose_backend", lambda *args: "reference")
    Hq, Hkv, D = 4, 2, 16
    lens = [90, 1, 60] if packed else [120]
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    table = torch.randn(Hq, 65, generator=rng, dtype=torch.float64, requires_grad=True)
    score_mod = generate_relative_position_bias_score_mod(table)
    window = get_mask_fn("sliding_window", window_size=30)
    flex = FlexFlashInfer(device="cpu").prepare(
        mask_fn=window, seq_len_q=cu[-1], seq_len_kv=cu[-1], num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
        dtype=torch.float64, score_mod=score_mod, block_size_row=32, block_size_col=32,
        **({"cu_seqlens_q": cu, "cu_seqlens_kv": cu} if packed else {}))
    assert flex.active_backend == backend
    q = torch.randn(cu[-1], Hq, D, generator=rng, dtype=torch.float64, requires_grad=True)
    k = torch.randn(cu[-1], Hkv, D, generator=rng, dtype=torch.float64, requires_grad=True)
    v = torch.randn(cu[-1], Hkv, D, generator=rng, dtype=torch.float64, requires_grad=True)
    out, lse = flex(q, k, v, return_lse=True)
    assert out.grad_fn is not None
    g_out, g_lse = _seeds(rng, out, lse)
    got = torch.autograd.grad([out, lse], [q, k, v, table], [g_out, g_lse])
    outs, lses = [], []
    for i in range(len(lens)):
        rows = slice(cu[i], cu[i + 1])
        o, s = dense_grad_oracle(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)),
                                 window(*_grid(1, Hq, lens[i], lens[i])), score_mod)
        outs.append(o[0].transpose(0, 1))
        lses.append(s[0].transpose(0, 1))
    want = torch.autograd.grad([torch.cat(outs), torch.cat(lses)], [q, k, v, table], [g_out, g_lse.double()])
    _assert_grads(got, want)


def test_seed_api_without_keys_keeps_the_graph(rng):
    """A packed batch in which no query sees a key (reference backend): zeros that still reach q."""
    flex = FlexFlashInfer(device="cpu")
    flex.prepare(mask_fn=lambda q_idx, kv_idx: kv_idx > q_idx + 100, seq_len_q=6, seq_len_kv=6, num_qo_heads=2,
                 num_kv_heads=2, head_dim=8, dtype=torch.float64, cu_seqlens_q=[0, 3, 6], cu_seqlens_kv=[0, 3, 6])
    q, k, v = (torch.randn(6, 2, 8, generator=rng, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = flex(q, k, v)
    assert out.requires_grad and torch.equal(out, torch.zeros_like(out))
    dq, dk, dv = torch.autograd.grad(out.sum(), [q, k, v])
    assert not dq.any() and not dk.any() and not dv.any()


def test_paged_flashinfer_backward_says_forward_only(flashinfer_on_cpu, rng):
    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 70], [1, 5], 16)
    attn = PagedFlexAttention(device="cpu", backend="flashinfer")
    attn.plan(get_mask_fn("sliding_window", window_size=20), qo_indptr, kv_indptr, indices, last, 4, 2, 16, 16,
              dtype=torch.float64)
    out = attn.run(q.requires_grad_(), (kc, vc))
    assert out.grad_fn is not None
    with pytest.raises(RuntimeError, match=r"forward-only.*PagedFlexAttention\(backend='reference'\).*FlexAttention"):
        out.sum().backward()
    with torch.no_grad():
        assert attn.run(q, (kc, vc)).grad_fn is None
    # a learned table the score_mod reads, with frozen inputs: still no silent loss
    table = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)
    attn.plan(get_mask_fn("causal"), qo_indptr, kv_indptr, indices, last, 4, 2, 16, 16, dtype=torch.float64,
              score_mod=lambda s, b, h, q_idx, kv_idx: s + table[h])
    out = attn.run(q.detach(), (kc, vc))
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()


def test_paged_reference_gradients(rng):
    from paged_cases import dense_oracle

    q, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 23], [3, 5], 8)
    for t in (q, kc, vc):
        t.requires_grad_()
    mod = get_mask_fn("sliding_window", window_size=10)
    attn = PagedFlexAttention(device="cpu", backend="reference")
    attn.plan(mod, qo_indptr, kv_indptr, indices, last, 4, 2, 16, 8, dtype=torch.float64)
    out, lse = attn.run(q, (kc, vc), return_lse=True)
    g_out = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad(out, [q, kc, vc], g_out)
    want_out, _ = dense_oracle(mod, q, kc, vc, qo_indptr, kv_indptr, indices, last, 8)
    want = torch.autograd.grad(want_out, [q, kc, vc], g_out)
    _assert_grads(got, want, tol=1e-5)   # the paged reference computes in float32
    # no request sees a key: zeros that still reach the inputs
    attn.plan(lambda b, h, q_idx, kv_idx: kv_idx > q_idx + 1000, qo_indptr, kv_indptr, indices, last, 4, 2, 16, 8,
              dtype=torch.float64)
    out = attn.run(q, (kc, vc))
    assert out.requires_grad and not torch.autograd.grad(out.sum(), q)[0].any()


def test_captured_tensors_search():
    table = torch.zeros(3, requires_grad=True)
    frozen = torch.zeros(3)
    holder = types.SimpleNamespace(table=table)

    def closure(s, b, h, q, kv):
        return s + table[h] + frozen[h]

    def default(s, b, h, q, kv, t=table):
        return s + t[h]

    def through_object(s, b, h, q, kv):
        return s + holder.table[h]

    import functools

    def with_table(t, s, b, h, q, kv):
        return s + t[h]

    for mod in (closure, default, through_object, functools.partial(with_table, table)):
        found = autograd.captured_tensors(mod)
        assert len(found) == 1 and found[0] is table, mod
    assert autograd.captured_tensors(lambda s, b, h, q, kv: s * 2) == []


def test_a_table_and_its_copy_get_the_gradient_once(flashinfer_on_cpu, rng):
    """A mod capturing a learned table and a tensor computed from it (the copy a library mod keeps of
    a table on another device): the gradient reaches the table once, through the copy."""
    q, k, v = (t.detach() for t in _leaves(rng, 1, 4, 2, 50, 50))
    table = torch.randn(4, generator=rng, dtype=torch.float64, requires_grad=True)
    copies = {"cpu": table, "other": table * 1.0}

    def through_copy(score, b, h, q_idx, kv_idx):
        return score + copies["other"][h]

    # both are inputs: the copy gets the gradient of its use, which autograd carries to the table
    assert {id(t) for t in autograd.captured_tensors(through_copy)} == {id(table), id(copies["other"])}
    out = flex_attention(q, k, v, score_mod=through_copy, enable_gqa=True, backend="flashinfer")
    (got,) = torch.autograd.grad(out.square().sum(), [table], retain_graph=True)   # the copy's graph, for the oracle
    want_out, _ = dense_grad_oracle(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), through_copy)
    (want,) = torch.autograd.grad(want_out.square().sum(), [table])
    _assert_grads([got], [want])


@pytest.mark.parametrize("backend", ["flashinfer", "reference"])
def test_a_score_mod_that_ignores_the_score(flashinfer_on_cpu, rng, backend):
    """The recomputed LSE then has no graph of its own: backward still gives q, k, v their
    (zero for q and k) gradients instead of autograd's 'does not require grad' error."""
    bias = torch.randn(2, generator=rng, dtype=torch.float64)
    q, k, v = _leaves(rng, 1, 2, 2, 130, 130)
    out = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: bias[h], backend=backend)
    out.sum().backward()
    for t in (q, k):   # torch's autograd leaves an unused input's grad None: zero either way
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))
    assert torch.allclose(v.grad, torch.ones_like(v))   # uniform weights: each key gets 130 * 1/130


def test_flexflashinfer_follows_a_learned_table_through_training_steps(flashinfer_on_cpu, rng):
    """A learned relative-position table stepped by an optimizer after prepare(): the FlashInfer
    path's kernels read it as it is at each call (their copy is refreshed when it was written in
    place), as the reference backend and the backward do; before, they kept the copy of prepare()
    (3.9 off after one step). A table frozen at prepare() and unfrozen later gets its gradient
    (it was silently None)."""
    from flex_flash_infer import FlexFlashInfer

    Hq, Hkv, L, D = 4, 2, 96, 16
    table = torch.randn(Hq, 2 * L + 1, generator=rng)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + L]

    args = dict(mask_fn=get_mask_fn("causal"), seq_len_q=L, seq_len_kv=L, num_qo_heads=Hq, num_kv_heads=Hkv,
                head_dim=D, dtype=torch.float32, score_mod=rel_bias)
    ours = FlexFlashInfer(device="cpu").prepare(**args)
    assert ours.active_backend == "flashinfer"
    table.requires_grad_()   # unfrozen after prepare()
    opt = torch.optim.SGD([table], lr=5.0)
    q = torch.randn(L, Hq, D, generator=rng)
    k, v = torch.randn(L, Hkv, D, generator=rng), torch.randn(L, Hkv, D, generator=rng)
    for _ in range(3):
        got = ours(q, k, v)
        with torch.no_grad():
            want, _ = dense_grad_oracle(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                        get_mask_fn("causal")(*_grid(1, Hq, L, L)), rel_bias)
        assert (got - want[0].transpose(0, 1)).abs().max() < 1e-4
        opt.zero_grad()
        got.square().sum().backward()
        assert table.grad is not None and table.grad.abs().sum() > 0
        opt.step()


def test_a_0d_tensor_compiled_in_and_changed_after_planning_raises(flashinfer_on_cpu, rng):
    """A score_mod reading a 0-d tensor (a temperature) has its value compiled into the kernel as a
    constant: written in place after prepare() / plan(), the next call raises saying so, where it
    silently kept the old value; a table indexed by position is followed instead."""
    from paged_cases import random_cache

    temperature = torch.tensor(2.0)
    slope = torch.tensor([0.1, 0.2])

    def mod(score, b, h, q_idx, kv_idx):
        return score / temperature - slope[h] * (q_idx - kv_idx).abs() * 0.01

    flex = FlexFlashInfer(device="cpu").prepare(mask_fn=get_mask_fn("causal"), seq_len_q=64, seq_len_kv=64,
                                                num_qo_heads=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                                                score_mod=mod)
    q = torch.randn(64, 2, 16, generator=rng)
    before = flex(q, q, q)
    slope.add_(1.0)   # a table: followed
    assert not torch.allclose(flex(q, q, q), before)
    temperature.add_(1.0)
    with pytest.raises(ValueError, match="0-d tensor.*written in place.*call prepare\\(\\) again"):
        flex(q, q, q)
    paged = PagedFlexAttention(device="cpu", backend="flashinfer")
    qp, kc, vc, qo_indptr, kv_indptr, indices, last = random_cache(rng, [40, 70], [1, 1], 16, Hq=2, Hkv=2)
    paged.plan(None, qo_indptr, kv_indptr, indices, last, 2, 2, 16, 16, dtype=torch.float64, score_mod=mod)
    paged.run(qp, (kc, vc))
    temperature.add_(1.0)
    with pytest.raises(ValueError, match="0-d tensor.*call plan\\(\\) again"):
        paged.run(qp, (kc, vc))


def test_tables_made_under_inference_mode(flashinfer_on_cpu, rng):
    """A serving process makes its tables under torch.inference_mode(), whose tensors keep no
    version counter: planning and running with them works (reading the counter raised)."""
    from flex_flash_infer.mods import generate_relative_position_bias_score_mod

    with torch.inference_mode():
        table = torch.randn(2, 65, generator=rng)
        temperature = torch.tensor(2.0)
        q = torch.randn(64, 2, 16, generator=rng)
        rel = generate_relative_position_bias_score_mod(table)

        def mod(score, b, h, q_idx, kv_idx):
            return rel(score, b, h, q_idx, kv_idx) / temperature

        flex = FlexFlashInfer(device="cpu").prepare(mask_fn=get_mask_fn("causal"), seq_len_q=64, seq_len_kv=64,
                                                    num_qo_heads=2, num_kv_heads=2, head_dim=16,
                                                    dtype=torch.float32, score_mod=mod)
        out = flex(q, q, q)
    assert flex.active_backend == "flashinfer"   # not a fall back to the reference
    grid = _grid(1, 2, 64, 64)
    want, _ = dense_grad_oracle(*(t.transpose(0, 1)[None].clone() for t in (q, q, q)),
                                get_mask_fn("causal")(*grid), lambda s, *ix: mod(s, *ix))
    assert (out - want[0].transpose(0, 1)).abs().max() < 1e-4
