"""Traced mods compiled as host C++ (g++) agree with the torch functions: every op, every library
mod, and randomly generated expressions. This is the code that goes into FlashInfer variants."""
import random

import pytest
import torch

from flex_flash_infer.compile.codegen import graph_key
from flex_flash_infer import get_mask_fn
from flex_flash_infer.mods import (generate_alibi_score_mod, generate_causal_decay_score_mod,
                                   generate_relative_position_bias_score_mod, generate_softcap_score_mod,
                                   generate_temperature_score_mod)
from flex_flash_infer.core.trace import TraceError, trace
from hostcheck import compile_host
from library_masks import LIBRARY


def grid(rng, n=4000, heads=8, batch=3, span=300):
    score = torch.randn(n, generator=rng) * 4
    b = torch.randint(0, batch, (n,), generator=rng, dtype=torch.int32)
    h = torch.randint(0, heads, (n,), generator=rng, dtype=torch.int32)
    q = torch.randint(0, span, (n,), generator=rng, dtype=torch.int32)
    kv = torch.randint(0, span, (n,), generator=rng, dtype=torch.int32)
    return score, b, h, q, kv


def check_score_mod(mod, rng, **kw):
    score, b, h, q, kv = grid(rng, **kw)
    got = compile_host(trace(mod, "score_mod"))(score, b, h, q, kv)
    want = mod(score, b, h, q, kv).float()
    assert torch.allclose(got, want, rtol=2e-6, atol=2e-6, equal_nan=True), (got - want).abs().max()


def check_mask_mod(mod, rng, **kw):
    _, b, h, q, kv = grid(rng, **kw)
    got = compile_host(trace(mod, "mask_mod"))(0.0, b, h, q, kv)
    assert torch.equal(got.bool(), mod(b, h, q, kv))


OP_MODS = {
    "add_sub_mul": lambda s, b, h, q, kv: s * 2 - (q - kv) * 0.01 + b,
    "div": lambda s, b, h, q, kv: s / (h + 1) + q / (kv + 1),
    "floordiv_mod_negative": lambda s, b, h, q, kv: s + ((q - kv) // 7) * 0.1 + ((q - kv) % 5) * 0.01,
    "float_floordiv_mod": lambda s, b, h, q, kv: s // 0.7 + s % 1.3,
    "where": lambda s, b, h, q, kv: torch.where(q >= kv, s, float("-inf")),
    "where_int_branches": lambda s, b, h, q, kv: s + torch.where(q > kv, q, kv),
    "abs_method_and_fn": lambda s, b, h, q, kv: (q - kv).abs() * 0.01 + torch.abs(s),
    "min_max": lambda s, b, h, q, kv: torch.minimum(s, torch.maximum(q - kv, h * 3) * 0.1),
    "clamp": lambda s, b, h, q, kv: torch.clamp(s, -1.5, 2.0) + torch.clamp(q - kv, min=-3) * 0.1 + (q - kv).clamp(max=4),
    "exp_log_sqrt": lambda s, b, h, q, kv: torch.exp(s * 0.1) + torch.log(kv + 1.0) + torch.sqrt(q * 1.0),
    "tanh_sigmoid": lambda s, b, h, q, kv: torch.tanh(s) + torch.sigmoid(s * 2),
    "log_of_negative_is_nan": lambda s, b, h, q, kv: torch.log(s),
    "to_dtype": lambda s, b, h, q, kv: s.to(torch.int32).to(torch.float32) + (q > kv).to(torch.float32) + s.int(),
    "pow": lambda s, b, h, q, kv: s ** 2 + 2.0 ** (h * 1.0),
    "neg": lambda s, b, h, q, kv: -s + (-(q - kv)),
    "bitwise_ints": lambda s, b, h, q, kv: s + ((q & 7) | (kv ^ 3)) + (~h),
    "bool_logic": lambda s, b, h, q, kv: torch.where(((q > kv) & ~(h == 2)) | (b == 1) ^ (kv < 5), s, 0.0),
    "logical_fns": lambda s, b, h, q, kv: torch.where(torch.logical_and(q > 3, torch.logical_not(kv > 100)), s, -s),
    "reflected_ops": lambda s, b, h, q, kv: 1.0 - s + 3 * (10 // (h + 1)) + 100 % (kv + 1),
}


@pytest.mark.parametrize("name", OP_MODS)
def test_each_supported_op(rng, name):
    check_score_mod(OP_MODS[name], rng)


@pytest.mark.parametrize("name,params", LIBRARY)
def test_library_mask_mods(rng, name, params):
    check_mask_mod(get_mask_fn(name, **params), rng)


def test_document_mask_reads_its_captured_ids(rng):
    mod = get_mask_fn("document", offsets=[0, 17, 90, 200, 300])
    check_mask_mod(mod, rng)
    graph = trace(mod, "mask_mod")
    assert [name for name, _ in graph.tensors] == ["t0"]


@pytest.mark.parametrize("mod", [
    generate_softcap_score_mod(20.0),
    generate_alibi_score_mod(num_heads=8),
    generate_relative_position_bias_score_mod(torch.randn(33)),
    generate_relative_position_bias_score_mod(torch.randn(8, 65)),
    generate_temperature_score_mod(torch.rand(8) + 0.5),
    generate_causal_decay_score_mod(0.05),
], ids=["softcap", "alibi", "rel_bias_1d", "rel_bias_per_head", "temperature", "causal_decay"])
def test_library_score_mods(rng, mod):
    check_score_mod(mod, rng)


def test_captured_values_are_arguments_and_the_function_is_the_key():
    a, b = get_mask_fn("sliding_window", window_size=100), get_mask_fn("sliding_window", window_size=7)
    ga, gb = trace(a, "mask_mod"), trace(b, "mask_mod")
    assert graph_key(ga) == graph_key(gb)                       # new value: same compiled module
    assert [v for *_, v in ga.scalars] == [100] and [v for *_, v in gb.scalars] == [7]
    other = trace(get_mask_fn("causal"), "mask_mod")
    assert graph_key(other) != graph_key(ga)                    # another function: another module
    t1 = generate_temperature_score_mod(torch.ones(8))
    t2 = generate_temperature_score_mod(torch.zeros(16))
    assert graph_key(trace(t1, "score_mod")) == graph_key(trace(t2, "score_mod"))


def test_values_reach_the_compiled_code(rng):
    narrow = compile_host(trace(get_mask_fn("sliding_window", window_size=3), "mask_mod"))
    wide = compile_host(trace(get_mask_fn("sliding_window", window_size=50), "mask_mod"))
    q, kv = torch.tensor([10, 10]), torch.tensor([5, 9])
    assert narrow(0.0, 0, 0, q, kv).tolist() == [0.0, 1.0]
    assert wide(0.0, 0, 0, q, kv).tolist() == [1.0, 1.0]


def test_combinators_trace_through_nested_closures(rng):
    from flex_flash_infer import and_masks, or_masks

    mod = or_masks(and_masks(get_mask_fn("causal"), get_mask_fn("sliding_window", window_size=9)),
                   get_mask_fn("prefix_lm", prefix_len=4))
    check_mask_mod(mod, rng)
    assert sorted(v for *_, v in trace(mod, "mask_mod").scalars) == [4, 9]


def test_python_control_flow_is_an_error_naming_the_line():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:  # data-dependent Python branch
            return q_idx >= 0
        return q_idx < 0

    with pytest.raises(TraceError) as err:
        trace(branchy, "mask_mod")
    assert "test_codegen.py" in str(err.value) and "if q_idx > kv_idx" in str(err.value)
    # the way out it names is torch.where / & | ~: the reference backend refuses control flow too
    assert "use torch.where(...) or & | ~" in str(err.value) and "backend='reference'" not in str(err.value)


def test_unsupported_op_is_an_error_naming_the_op():
    with pytest.raises(TraceError, match="'sin'"):
        trace(lambda s, b, h, q, kv: torch.sin(s), "score_mod")


def test_mask_mod_must_return_bool():
    with pytest.raises(TraceError, match="bool"):
        trace(lambda b, h, q, kv: q - kv, "mask_mod")


# ---- property test: random expression trees ---------------------------------------------------
def random_expr(r: random.Random, depth: int):
    """(python source, kind) of a random well-typed expression over s, b, h, q, kv."""
    if depth == 0 or r.random() < 0.25:
        choice = r.choice(["s", "b", "h", "q", "kv", "int", "float"])
        if choice == "int":
            return str(r.randint(-9, 9)), "int"
        if choice == "float":
            return repr(round(r.uniform(-3, 3), 3)), "float"
        return choice, "float" if choice == "s" else "int"
    a, ka = random_expr(r, depth - 1)
    b, kb = random_expr(r, depth - 1)
    # torch functions need tensor arguments: tie constants to an index or the score (adds 0)
    a = f"({a} + q * 0)" if ka == "int" else f"({a} + s * 0)"
    b = f"({b} + q * 0)" if kb == "int" else f"({b} + s * 0)"
    op = r.choice(["+", "-", "*", "/", "//", "%", "where", "min", "max", "abs", "tanh", "cmp", "clamp"])
    num = "float" if "float" in (ka, kb) else "int"
    if op in "+-*":
        return f"({a} {op} {b})", num
    if op == "/":
        return f"({a} / (torch.abs({b}) + 1))", "float"
    if op in ("//", "%"):
        divisor = r.choice(["3", "7", "-4", "2.5"])
        return f"({a} {op} {divisor})", "float" if (ka == "float" or "." in divisor) else "int"
    if op == "where":
        c, _ = random_expr(r, depth - 1)
        return f"torch.where(({c} + q * 0) > 0, {a}, {b})", num
    if op in ("min", "max"):
        fn = "torch.minimum" if op == "min" else "torch.maximum"
        return f"{fn}({a}, {b})", num
    if op == "abs":
        return f"torch.abs({a})", ka
    if op == "tanh":
        return f"torch.tanh({a})", "float"
    if op == "clamp":
        return f"torch.clamp({a}, -5, 5)", ka
    return f"(({a}) < ({b})).to(torch.float32)", "float"


@pytest.mark.parametrize("seed", range(40))
def test_random_expressions(rng, seed):
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)) + seed)
    source, _ = random_expr(r, 4)
    mod = eval(f"lambda s, b, h, q, kv: ({source}) + s * 0", {"torch": torch})
    score, b, h, q, kv = grid(rng, n=2000, span=40)
    got = compile_host(trace(mod, "score_mod"))(score, b, h, q, kv)
    want = mod(score, b, h, q, kv).float()
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert close.all(), f"{source}: {got[~close][:5]} vs {want[~close][:5]}"


def test_per_score_code_leaves_tile_invariant_work_to_the_constructor():
    """What a kernel runs per score: alibi's per-head slope is read once (no load left in the
    expression), softcap's division becomes a multiplication and its tanh the one-instruction one."""
    from flex_flash_infer.compile.codegen import emit_expression

    def per_score(mod):
        hoisted = []
        expr = emit_expression(trace(mod, "score_mod"), lambda n: n, lambda n: n, hoisted=hoisted,
                               invariant_inputs=("b", "h"))
        return expr, [code for _, _, code in hoisted]

    expr, hoisted = per_score(generate_alibi_score_mod(num_heads=8))
    assert "[" not in expr and any("[" in code for code in hoisted)
    expr, hoisted = per_score(generate_softcap_score_mod(30.0))
    assert "/" not in expr and "ffi_tanh(" in expr and "tanhf" not in expr
    expr, hoisted = per_score(generate_relative_position_bias_score_mod(torch.randn(8, 31)))
    assert "[" in expr  # indexed by kv - q: stays per score


def _emit_bounded(mod):
    from flex_flash_infer.compile.codegen import POSITION_BOUND, emit_expression

    return emit_expression(trace(mod, "score_mod"), lambda n: n, lambda n: n, position_bound=POSITION_BOUND)


def test_int_to_float_takes_the_bit_trick_only_within_its_exact_range():
    """ints of known small range (positions and their sums, differences, clamps) convert with
    ffi_i2f_exact; a product of positions, a captured number or a table read does not."""
    assert "ffi_i2f_exact" in _emit_bounded(lambda s, b, h, q, kv: s + (kv - q) * 0.5)
    assert "ffi_i2f_exact" in _emit_bounded(lambda s, b, h, q, kv: s + torch.clamp(q - kv, -7, 7) + (q // 64) % 3)
    assert "ffi_i2f_exact" not in _emit_bounded(lambda s, b, h, q, kv: s + q * kv)
    offset = 5
    assert "ffi_i2f_exact" not in _emit_bounded(lambda s, b, h, q, kv: s + (q - offset))   # captured: unknown
    table = torch.arange(10, dtype=torch.int32)
    assert "ffi_i2f_exact" not in _emit_bounded(lambda s, b, h, q, kv: s + table[kv % 10])


def test_int_ranges_follow_the_ops():
    from flex_flash_infer.compile.codegen import int_range

    def rng_of(mod, bound=100):
        graph = trace(mod, "score_mod")
        return int_range(graph.output.args[1], bound, {})   # the int operand of s + (...)

    assert rng_of(lambda s, b, h, q, kv: s + (q - kv)) == (-99, 99)
    assert rng_of(lambda s, b, h, q, kv: s + (q + kv + 3)) == (3, 201)
    assert rng_of(lambda s, b, h, q, kv: s + torch.where(q > kv, q, -kv)) == (-99, 99)
    assert rng_of(lambda s, b, h, q, kv: s + (q - kv).abs()) == (0, 99)
    assert rng_of(lambda s, b, h, q, kv: s + (q - kv) // 8) == (-13, 12)
    assert rng_of(lambda s, b, h, q, kv: s + (q - kv) % 8) == (0, 7)
    assert rng_of(lambda s, b, h, q, kv: s + torch.clamp(q - kv, min=-4)) == (-4, 99)


def test_bit_trick_conversion_is_exact_up_to_the_position_bound(rng):
    """Host-compiled with the same prelude: positions near 2^21 and their differences convert
    exactly (the kernels' positions stay below the bound)."""
    from flex_flash_infer.compile.codegen import POSITION_BOUND

    mod = lambda s, b, h, q, kv: s * 0.0 + (q - kv) + (q + kv)   # noqa: E731
    code = _emit_bounded(mod)
    assert code.count("ffi_i2f_exact") >= 1
    n = 20000
    q = torch.randint(POSITION_BOUND - 4096, POSITION_BOUND, (n,), generator=rng, dtype=torch.int32)
    kv = torch.randint(0, POSITION_BOUND, (n,), generator=rng, dtype=torch.int32)
    q[:2], kv[:2] = POSITION_BOUND - 1, torch.tensor([0, POSITION_BOUND - 1], dtype=torch.int32)
    zeros = torch.zeros(n, dtype=torch.int32)
    got = compile_host(trace(mod, "score_mod"))(torch.zeros(n), zeros, zeros, q, kv)
    assert torch.equal(got, mod(torch.zeros(n), zeros, zeros, q, kv).float())
