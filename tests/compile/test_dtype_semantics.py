"""Integer types narrower than int32, bool arithmetic and int64 values past 2^31 (issue 20, class 5).

torch wraps an int8 / int16 / uint8 / int32 value to its type after every op, converts a Python int
to the type of the tensor it meets (q.to(torch.int8) < 200 compares with -56), adds bools as a
logical or and keeps int64 table values whole. The tile bounds (tile_bounds.py) must give exact
tile states for such masks, and the compiled mods (trace.py, codegen.py) must compute what torch
computes: checked here on the host compile (the same prelude and expression the CUDA variants
hold), as device code with nvcc where it is installed, and on a GPU where there is one."""
import random
import shutil
import sys

import pytest
import torch

from flex_flash_infer import create_block_mask
from flex_flash_infer.masks.block_build import EMPTY, FULL, PARTIAL
from flex_flash_infer.core.trace import TraceError, trace
from hostcheck import compile_device, compile_host, host_source

BIG = torch.tensor([2**33 + 7, -2**40, 5, 2**31, 3 * 2**31 + 1, -2**31 - 1, 0])   # int64, values past int32
SMALL8 = torch.tensor([-128, 127, 3, -1, 100, 0, -77], dtype=torch.int8)
TABLE256 = torch.linspace(-1, 1, 256)


def dense_states(mask_mod, B, H, L, S, bq, bkv):
    """Tile states from the dense mask: FULL only where every in-range pair is visible and the tile
    has no padded keys, EMPTY only where none is."""
    b, h = torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1)
    q, kv = torch.arange(L).view(1, 1, -1, 1).int(), torch.arange(S).view(1, 1, 1, -1).int()
    dense = mask_mod(b.int(), h.int(), q, kv).expand(B, H, L, S)
    nq, nkv = -(-L // bq), -(-S // bkv)
    padded = torch.zeros(B, H, nq * bq, nkv * bkv, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[..., :L, :S], valid[..., :L, :S] = dense, True
    tiles = padded.view(B, H, nq, bq, nkv, bkv).transpose(3, 4)
    counts = tiles.sum((-1, -2))
    rows = valid[..., :, 0].view(B, H, nq, bq).sum(-1, keepdim=True)
    full = (counts == rows * bkv) & torch.tensor([(k + 1) * bkv <= S for k in range(nkv)])
    return torch.where(full, FULL, torch.where(counts > 0, PARTIAL, EMPTY)).to(torch.int8)


def assert_block_mask_exact(mask_mod, B, H, L, S, bq, bkv):
    want = dense_states(mask_mod, B, H, L, S, bq, bkv)
    got = create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=(bq, bkv)).states
    assert torch.equal(got.expand_as(want), want), (got.expand_as(want) != want).nonzero()[:5].tolist()


# ---- the tile bounds --------------------------------------------------------------------------

def test_int8_comparison_at_256_tokens_is_full_where_it_wraps():
    """q.to(int8) >= kv.to(int8): keys 128..255 wrap to negative, so the query tile 0 sees all of
    key tile 1 (it was called empty) and the query tile 1 none of key tile 0."""
    def int8_causal(b, h, q, kv):
        return q.to(torch.int8) >= kv.to(torch.int8)

    states = create_block_mask(int8_causal, None, None, 256, 256, device="cpu").states[0, 0]
    assert states.tolist() == [[PARTIAL, FULL], [EMPTY, PARTIAL]]
    assert_block_mask_exact(int8_causal, 1, 1, 256, 256, 128, 128)


NARROW_MASKS = {
    "int8_ge": lambda b, h, q, kv: q.to(torch.int8) >= kv.to(torch.int8),
    "int8_python_int_wraps": lambda b, h, q, kv: q.to(torch.int8) < 200,            # 200 is -56 in int8
    "int8_sum_wraps": lambda b, h, q, kv: (q.to(torch.int8) + 100) > kv.to(torch.int8),
    "int8_floordiv_by_wrapped": lambda b, h, q, kv: (kv.to(torch.int8) // 300) == (q.to(torch.int8) // 300),
    "uint8": lambda b, h, q, kv: (q.to(torch.uint8) - kv.to(torch.uint8)) < 40,
    "int16_product": lambda b, h, q, kv: (q.to(torch.int16) * 300) > (kv.to(torch.int16) * 300),
    "int32_product_wraps": lambda b, h, q, kv: q * 2**23 >= kv * 2**23,
    "bool_sum": lambda b, h, q, kv: ((q >= kv) + (kv < 40)).int() == 1,
    "bool_product": lambda b, h, q, kv: (((q >= kv) * (q - kv < 90)) + (kv % 97 == 0)),
    "bool_sum_as_int": lambda b, h, q, kv: ((q >= kv) + (kv < 40) + (q < 10)) > 0,
    "int64_table": lambda b, h, q, kv: (BIG[q % 7] - BIG[kv % 7]) > 2**31,
    "int64_table_to_int32": lambda b, h, q, kv: BIG[kv % 7].int() < q,
    "int8_table_abs": lambda b, h, q, kv: torch.abs(SMALL8[kv % 7]) + q.to(torch.int8) > 0,
    "head_and_batch": lambda b, h, q, kv: (q.to(torch.int8) + h * 64 + b * 32).to(torch.int8) >= kv.to(torch.int8),
}


@pytest.mark.parametrize("name", NARROW_MASKS)
@pytest.mark.parametrize("shape", [(2, 3, 300, 300, 64, 64), (1, 2, 700, 513, 128, 64), (1, 1, 131, 1000, 16, 128)])
def test_narrow_int_masks_give_exact_tile_states(name, shape):
    assert_block_mask_exact(NARROW_MASKS[name], *shape)


def test_bounds_decide_every_tile_a_wrap_point_does_not_cross():
    """q.to(int8) over a 64-row tile never crosses a wrap point (a multiple of 128): its interval
    is exact, so bounds alone decide every tile but the mixed ones (the diagonals of each 256)."""
    from flex_flash_infer.masks.tile_bounds import tile_bounds

    mask_mod = NARROW_MASKS["int8_ge"]
    graph = trace(mask_mod, "mask_mod")
    certain, possible = tile_bounds(graph, 1, 1, 1024, 1024, 64, 64, torch.device("cpu"))
    mixed = dense_states(mask_mod, 1, 1, 1024, 1024, 64, 64)[0, 0] == PARTIAL
    assert torch.equal((possible & ~certain)[0, 0], mixed)
    assert bool(certain[0, 0, 0, 2:4].all())   # queries 0..63 see every key 128..255 (wrapped negative)


# ---- random masks: tile states against the dense mask ------------------------------------------

def _random_int(r: random.Random, depth: int) -> str:
    if depth <= 0 or r.random() < 0.2:
        return r.choice(["q", "kv", "h", "b", str(r.randint(-300, 300)), "BIG[(q + kv) % 7]", "SMALL8[kv % 7]",
                         "(q - kv)", "(q * 97 + kv)"])
    a = _random_int(r, depth - 1)
    op = r.choice(["+", "-", "*", "//", "%", "cast", "cast", "abs", "neg", "where", "min", "max", "boolsum"])
    if op in "+-*":
        return f"({a} {op} {_random_int(r, depth - 1)})"
    if op in ("//", "%"):
        return f"({a} {op} {r.choice([-7, -3, -1, 3, 7, 100, 300])})"
    if op == "cast":
        return f"({a}).to(torch.{r.choice(['int8', 'int16', 'uint8', 'int32', 'int64'])})"
    if op == "abs":
        return f"torch.abs({a})"
    if op == "neg":
        return f"(-({a}))"
    if op == "where":
        return f"torch.where({_random_bool(r, depth - 1)}, {a}, {_random_int(r, depth - 1)} + q * 0)"
    if op in ("min", "max"):
        return f"torch.{'minimum' if op == 'min' else 'maximum'}({a} + q * 0, {_random_int(r, depth - 1)} + kv * 0)"
    return f"({_random_bool(r, depth - 1)} + {_random_bool(r, depth - 1)}).to(torch.int32)"


def _random_bool(r: random.Random, depth: int) -> str:
    op = r.choice(["cmp", "cmp", "cmp", "sum", "prod", "and", "or", "xor", "not"])
    if op == "cmp" or depth <= 0:
        return f"({_random_int(r, depth - 1)} {r.choice(['<', '<=', '>', '>=', '==', '!='])} {_random_int(r, depth - 1)})"
    sym = {"sum": "+", "prod": "*", "and": "&", "or": "|", "xor": "^"}.get(op)
    if sym:
        return f"({_random_bool(r, depth - 1)} {sym} {_random_bool(r, depth - 1)})"
    return f"(~{_random_bool(r, depth - 1)})"


def _random_mod(r, make):
    while True:
        source = make(r)
        mod = eval(f"lambda b, h, q, kv: {source}", {"torch": torch, "BIG": BIG, "SMALL8": SMALL8})
        try:   # torch itself refuses some (an out-of-range number in where, a zero divisor once wrapped)
            out = mod(*(torch.arange(n, dtype=torch.int32).view(shape) for n, shape in
                        ((2, (-1, 1, 1, 1)), (2, (1, -1, 1, 1)), (50, (1, 1, -1, 1)), (50, (1, 1, 1, -1)))))
        except (RuntimeError, ZeroDivisionError, AttributeError, TypeError):
            continue
        # a tree of constants alone evaluates to a Python bool: not a mask_mod's answer, draw again
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            return source, mod


@pytest.mark.parametrize("seed", range(30))
def test_random_integer_masks_give_exact_tile_states(rng, seed):
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)) + seed)
    source, mod = _random_mod(r, lambda r: _random_bool(r, 3))
    L, S = r.choice([(300, 300), (257, 700), (1000, 130)])
    bq, bkv = r.choice([(64, 64), (128, 32), (16, 128)])
    try:
        assert_block_mask_exact(mod, r.choice([1, 2]), r.choice([1, 3]), L, S, bq, bkv)
    except AssertionError as e:
        raise AssertionError(f"{source} at {L}x{S}, blocks {bq}x{bkv}: {e}") from e


# ---- compiled mods: the host compile against torch ---------------------------------------------

W = 3
SCORE_MODS = {
    "bool_plus_bool": lambda s, b, h, q, kv: s + ((q > kv) + (kv % 3 == 0)).float(),
    "bool_times_bool": lambda s, b, h, q, kv: s + ((q > kv) * (kv > 500)).float(),
    "int8_cast": lambda s, b, h, q, kv: s + q.to(torch.int8) * 0.01,
    "int8_compare": lambda s, b, h, q, kv: torch.where(q.to(torch.int8) >= kv.to(torch.int8), s, -s),
    "int8_python_int": lambda s, b, h, q, kv: torch.where(q.to(torch.int8) < 200, s, -s),
    "int8_arith": lambda s, b, h, q, kv: s + (q.to(torch.int8) * 3 + 100) * 0.01,
    "int8_floordiv_mod": lambda s, b, h, q, kv: s + (q.to(torch.int8) // -7) + (kv.to(torch.int8) % 300),
    "int8_min_over_minus_one": lambda s, b, h, q, kv: s + (q.to(torch.int8) // -1) + torch.abs(kv.to(torch.int8)),
    "int16": lambda s, b, h, q, kv: s + (q * 100).to(torch.int16) * 1e-3 + (q.to(torch.int16) * kv.to(torch.int16)) * 1e-4,
    "uint8": lambda s, b, h, q, kv: s + (q.to(torch.uint8) - kv.to(torch.uint8)) * 0.01 + (-q.to(torch.uint8)),
    "uint8_plus_int8": lambda s, b, h, q, kv: s + (q.to(torch.uint8) + kv.to(torch.int8)) * 0.01,
    "int64_table": lambda s, b, h, q, kv: s + (BIG[q % 7] - BIG[kv % 7] + q) * 1e-9,
    "int64_table_compare": lambda s, b, h, q, kv: torch.where(BIG[q % 7] > 2**31 + q, s, -s),
    "int64_table_to_int32": lambda s, b, h, q, kv: s + (BIG[q % 7].int() % 1000),
    "int32_wraps": lambda s, b, h, q, kv: s + ((q * 2**22 + kv * 2**30) % 1000),
    "captured_number_wraps_in_int8": lambda s, b, h, q, kv: s + (q.to(torch.int8) + W * 100) * 0.01,
    "int_power": lambda s, b, h, q, kv: s + ((q - kv) ** 3 % 1000) + q.to(torch.int8) ** 5 * 0.01,
    "bool_power": lambda s, b, h, q, kv: s + (q > kv) ** 2,
    "float64": lambda s, b, h, q, kv: (s.double() + 1e10 - 1e10) * 2 + q.double() / 3,
    "zero_dim_int64": lambda s, b, h, q, kv: s + (q.to(torch.int8) + torch.tensor(1000)) * 0.01,
    "new_ones": lambda s, b, h, q, kv: s + b.new_ones(()) + (q.to(torch.int8) + q.new_zeros(())),
    "bool_min_max": lambda s, b, h, q, kv: s + torch.maximum(q > kv, kv > 300) + torch.minimum(q > kv, kv > 300).int(),
    "bitwise_narrow": lambda s, b, h, q, kv: s + ((q.to(torch.int8) & 1000) ^ ~kv.to(torch.int16)),
    "int8_table": lambda s, b, h, q, kv: s + SMALL8[kv % 7] * 2 + SMALL8[q % 7].to(torch.int16) * 300,
    "float_floordiv_mod": lambda s, b, h, q, kv: s % 0.7 + s // 0.3 + (s * 1e5) % -3.1,
    "negative_table_index": lambda s, b, h, q, kv: s + SMALL8[(kv - q) % 7 - 7] + BIG[h - 7].float() * 1e-12,
    # ~ on a uint8 is 255 - x in torch; C promotes to int first (~200 = -201)
    "uint8_bitnot": lambda s, b, h, q, kv: s + (~q.to(torch.uint8)) * 0.01 + (~SMALL8[kv % 7].to(torch.uint8)),
    "uint8_bitnot_as_index": lambda s, b, h, q, kv: s + TABLE256[(~kv.to(torch.uint8)).int()],
    # a finite Python float past float32's range is inf once it meets a float32
    "float32_overflowing_literals": lambda s, b, h, q, kv: torch.where(q >= kv, s, s - 1e39) + (s < 1e40) + s * 1e-50,
}


def _grid(rng, n=6000):
    score = torch.randn(n, generator=rng) * 4
    b = torch.randint(0, 3, (n,), generator=rng, dtype=torch.int32)
    h = torch.randint(0, 8, (n,), generator=rng, dtype=torch.int32)
    q = torch.randint(0, 70000, (n,), generator=rng, dtype=torch.int32)
    kv = torch.randint(0, 70000, (n,), generator=rng, dtype=torch.int32)
    return score, b, h, q, kv


@pytest.mark.parametrize("name", SCORE_MODS)
def test_compiled_score_mods_compute_as_torch(rng, name):
    mod = SCORE_MODS[name]
    inputs = _grid(rng)
    want = mod(*inputs).float()
    got = compile_host(trace(mod, "score_mod"))(*inputs)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got - want).abs().max()


def _random_int_score_mod(rng, seed):
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)) + seed)
    source, _ = _random_mod(r, lambda r: f"(({_random_int(r, 4)}) + q * 0 > 0)")
    int_source = source[2:source.rindex(") + q * 0 > 0")]
    return int_source, eval(f"lambda s, b, h, q, kv: ({int_source}) + q * 0", {"torch": torch, "BIG": BIG, "SMALL8": SMALL8})


@pytest.mark.parametrize("seed", range(30))
def test_random_integer_expressions_compile_exactly(rng, seed):
    """Random int / bool expression trees, host-compiled, against torch, bit for bit."""
    source, mod = _random_int_score_mod(rng, seed)
    inputs = _grid(rng, 3000)
    want = mod(*inputs).float()
    got = compile_host(trace(mod, "score_mod"))(*inputs)
    assert torch.equal(got, want), f"{source}: {got[got != want][:4]} vs {want[got != want][:4]}"


@pytest.mark.parametrize("mod,match", [
    (lambda s, b, h, q, kv: s.to(torch.float16), "float16"),
    (lambda s, b, h, q, kv: s.half() + 1, "float16"),
    (lambda s, b, h, q, kv: s + (q.to(torch.bfloat16) * 2), "bfloat16"),
    (lambda s, b, h, q, kv: s + ((q > kv) - (kv > 3)), "Subtraction"),
    (lambda s, b, h, q, kv: s + torch.where(q > kv, q.to(torch.int8), 1000), "overflow"),
    (lambda s, b, h, q, kv: s + q ** -1, "negative integer powers"),
    (lambda s, b, h, q, kv: s + BIG[q.to(torch.int8)], "int8"),
    (lambda s, b, h, q, kv: s + BIG[(q > kv).to(torch.uint8)], "uint8"),
    (lambda s, b, h, q, kv: s + q.to(torch.uint16), "uint16"),
])
def test_what_kernels_cannot_compute_as_torch_refuses_to_trace(mod, match):
    with pytest.raises(TraceError, match=match):
        trace(mod, "score_mod")


def test_a_float16_table_is_read_exactly():
    """A float16 / bfloat16 table read into a float32 op is exact in float32 (no op rounds to half)."""
    table = torch.randn(7).to(torch.bfloat16)
    mod = lambda s, b, h, q, kv: s + table[kv % 7]   # noqa: E731
    inputs = _grid(torch.Generator().manual_seed(0), 500)
    assert torch.equal(compile_host(trace(mod, "score_mod"))(*inputs), mod(*inputs))


def test_untraceable_score_mod_falls_back_to_the_reference_with_a_warning(monkeypatch):
    """A TraceError on the FlashInfer path runs the call on the reference backend, with a warning."""
    import fake_flashinfer
    from flex_flash_infer import api, flex_attention
    from flex_flash_infer.backends import flashinfer_backend
    from flex_flash_infer.core import notices

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(api, "choose_backend", lambda *args: "flashinfer")   # as on a GPU
    monkeypatch.setattr(notices, "_warned", set())
    q, k, v = (torch.randn(1, 2, 130, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))

    def half_bias(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx).to(torch.float16) * 0.01

    with pytest.warns(UserWarning, match="reference"):
        out = flex_attention(q, k, v, score_mod=half_bias, backend="auto")
    assert torch.allclose(out, flex_attention(q, k, v, score_mod=half_bias, backend="reference"))


# ---- the CUDA source ---------------------------------------------------------------------------

DEVICE_MODS = ["bool_plus_bool", "int8_floordiv_mod", "uint8_plus_int8", "int64_table_compare", "int_power",
               "float64", "float_floordiv_mod", "negative_table_index"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_generated_cuda_source_compiles_as_device_code(tmp_path):
    """The variants' expressions for these types, with the prelude's wrapping helpers and their
    int64 / double overloads, compile as device code (one translation unit, nvcc for sm_90a)."""
    import subprocess

    sources = [host_source(trace(SCORE_MODS[n], "score_mod"), cuda=True) for n in DEVICE_MODS]
    unit = sources[0] + "".join(s[s.index("__global__"):].replace("eval_kernel", f"eval_kernel{i}")
                                .replace("eval_mod", f"eval_mod{i}") for i, s in enumerate(sources[1:], 1))
    (tmp_path / "unit.cu").write_text(unit)
    result = subprocess.run(["nvcc", "-c", "-arch=sm_90a", "-o", str(tmp_path / "unit.o"), str(tmp_path / "unit.cu")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:3000]


@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvcc") is None, reason="needs a GPU and nvcc")
@pytest.mark.parametrize("name", [n for n in SCORE_MODS if n != "float64"])
def test_generated_cuda_code_computes_as_the_host_compile_on_a_gpu(rng, name):
    """The CUDA kernel of the same expression gives the host compile's values (and torch's)."""
    mod = SCORE_MODS[name]
    inputs = _grid(rng)
    host = compile_host(trace(mod, "score_mod"))(*inputs)
    device = compile_device(trace(mod, "score_mod"))(*inputs)
    assert torch.allclose(device, host, rtol=1e-6, atol=1e-6), (device - host).abs().max()
    assert torch.allclose(device, mod(*inputs).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvcc") is None, reason="needs a GPU and nvcc")
@pytest.mark.parametrize("seed", range(10))
def test_random_integer_expressions_on_a_gpu(rng, seed):
    source, mod = _random_int_score_mod(rng, seed)
    inputs = _grid(rng, 3000)
    got = compile_device(trace(mod, "score_mod"))(*inputs)
    assert torch.equal(got, mod(*inputs).float()), source



# ---- table indices -----------------------------------------------------------------------------

TABLE_INDEX_MODS = {
    "negative_counts_from_the_end": lambda s, b, h, q, kv: s + F13[kv - q],                # kv - q < 0 below the diagonal
    "negative_per_head_and_key": lambda s, b, h, q, kv: s + T2D[h - 4, (q - kv) % 13 - 13],
    "negative_int64_index": lambda s, b, h, q, kv: s + F13[(kv - q).long() % 26 - 13],
}
F13 = torch.randn(13)
T2D = torch.randn(4, 13)


@pytest.mark.parametrize("name", TABLE_INDEX_MODS)
def test_a_negative_table_index_counts_from_the_end_as_in_torch(rng, name):
    """torch reads table[-1] as the last entry; the compiled code read before the table (garbage,
    or a fault on the GPU). Indices that are provably non-negative (positions, a max with 0) pay
    no check: the library's relative bias reads its table without one."""
    mod = TABLE_INDEX_MODS[name]
    n = 3000
    score = torch.randn(n, generator=rng)
    h = torch.randint(0, 4, (n,), generator=rng, dtype=torch.int32)
    q = torch.randint(0, 12, (n,), generator=rng, dtype=torch.int32)
    kv = torch.randint(0, 12, (n,), generator=rng, dtype=torch.int32)
    got = compile_host(trace(mod, "score_mod"))(score, h * 0, h, q, kv)
    assert torch.equal(got, mod(score, h * 0, h, q, kv))


def test_provably_non_negative_indices_pay_no_check():
    from flex_flash_infer.compile.codegen import POSITION_BOUND, emit_expression
    from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_t5_relative_bias_score_mod

    def per_score(mod):
        return emit_expression(trace(mod, "score_mod"), str, str, hoisted=[], invariant_inputs=("b", "h"),
                               position_bound=POSITION_BOUND)

    for mod in (generate_relative_position_bias_score_mod(torch.randn(8, 33)),
                generate_t5_relative_bias_score_mod(torch.randn(32, 8)),
                lambda s, b, h, q, kv: s + F13[q % 13] + T2D[h % 4, kv // 1000]):
        assert "ffi_index" not in per_score(mod)
    assert "ffi_index" in per_score(TABLE_INDEX_MODS["negative_counts_from_the_end"])


# ---- through flex_attention on the CPU model of FlashInfer -------------------------------------

@pytest.fixture
def flashinfer_on_cpu(monkeypatch):
    """backend="flashinfer" on CPU tensors: the CPU model as flashinfer, Hopper's launches, every
    compiled variant registered with the host-compiled code of its graph."""
    import fake_flashinfer
    from flex_flash_infer.backends import backend_choice, flashinfer_backend, score_mod_kernels, tile_kernels

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(backend_choice, "unsupported_reason", lambda *a: None)
    fake_flashinfer.register_band_variants(monkeypatch, score_mod_kernels)
    fake_flashinfer.register_paged_variants(monkeypatch, tile_kernels)


@pytest.mark.parametrize("name", ["bool_plus_bool", "int8_compare", "int8_floordiv_mod", "uint8", "int64_table",
                                  "int64_table_compare", "negative_table_index"])
@pytest.mark.parametrize("mask", ["causal", "random_tiles"])
def test_through_flex_attention_on_the_flashinfer_path(flashinfer_on_cpu, rng, name, mask):
    """The issue's case (errors 0.6-0.9 on the FlashInfer path): the compiled score_mod, on the bands
    route (causal) and the tiles route, against a float64 oracle that indexes as FlexAttention does
    (int32 positions)."""
    from dense_reference import dense_attention
    from flex_flash_infer import flex_attention, get_mask_fn

    B, H, L, D = 1, 2, 300, 16
    if mask == "causal":
        mask_mod = get_mask_fn("causal")
    else:
        table = torch.rand(L, L, generator=rng) < 0.5
        table[:128, :128] = True

        def mask_mod(b, h, q, kv):
            return table[q, kv] | (q == kv)
    score_mod = SCORE_MODS[name]
    bm = create_block_mask(mask_mod, B, None, L, L, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, L, D, generator=rng, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="flashinfer")
    grid = (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1), torch.arange(L).view(1, 1, -1, 1),
            torch.arange(L).view(1, 1, 1, -1))
    dense = mask_mod(*(x.int() for x in grid)).expand(B, H, L, L)

    def as_flex(s, b, h, qi, ki):   # FlexAttention hands a score_mod float32 scores and int32 indices
        return score_mod(s.float(), b.int(), h.int(), qi.int(), ki.int()).double()

    ref, _ = dense_attention(q, k, v, dense, score_fn=as_flex)
    assert (out - ref).abs().max() < 1e-4
