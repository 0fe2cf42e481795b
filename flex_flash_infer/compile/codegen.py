"""Emit C++ for a traced mod: one expression, valid in CUDA device code and in host C++.

emit_expression(graph, scalar_ref, tensor_ref) renders the graph with the caller choosing how
scalars and captured tensors are reached (kernel params on the GPU, plain arrays on the host).
Captured tensors are read as contiguous float32 / int32 / uint8 arrays with runtime strides
(the last dimension's is 1), so new values or shapes of a captured tensor never change the code.
"""
from __future__ import annotations

import hashlib
import math

import torch

from ..core.trace import Graph, Node

# The compiled kernels see batch entries, heads and positions below this (their planner checks it),
# so an int expression of them has a known range; converting one whose range lies within
# +-EXACT_FLOAT_INT to float takes the ffi_i2f_exact bit trick instead of an I2F instruction.
POSITION_BOUND = 2**21


def position_bound_for(batch: int, heads: int, q_len: int, kv_len: int) -> int | None:
    """POSITION_BOUND when every b, h and position a kernel sees lies below it (padded tail
    tiles reach 127 past the lengths), else None: ints then convert to float with I2F."""
    return POSITION_BOUND if max(batch, heads, q_len + 128, kv_len + 128) <= POSITION_BOUND else None
EXACT_FLOAT_INT = 2**22
# The narrower ints are held in an int and wrapped to their range after each op that can leave it.
NARROW = {torch.int8: "int8_t", torch.int16: "int16_t", torch.uint8: "uint8_t"}
# What a captured table's elements are stored as for the kernel (float16 / bfloat16 exactly as
# float32), and that element's C type.
KERNEL_DTYPE = {torch.bool: torch.uint8, torch.uint8: torch.uint8, torch.int8: torch.int8, torch.int16: torch.int16,
                torch.int32: torch.int32, torch.int64: torch.int64, torch.float16: torch.float32,
                torch.bfloat16: torch.float32, torch.float32: torch.float32, torch.float64: torch.float64}
_STORED_CTYPE = {torch.uint8: "uint8_t", torch.int8: "int8_t", torch.int16: "int16_t", torch.int32: "int",
                 torch.int64: "int64_t", torch.float32: "float", torch.float64: "double"}

PRELUDE = r"""
#ifndef FFI_PRELUDE
#define FFI_PRELUDE
#ifdef __CUDACC__
#define FFI_HD __host__ __device__ __forceinline__
#else
#define FFI_HD static inline
#endif
// Integer ops wrap as torch's do (two's complement, through unsigned: a signed overflow in C is
// undefined, and the optimizer may assume it away). The narrower ints are held in an int and
// wrapped after each op by the emitted code. A division by 0 gives 0 instead of trapping (torch
// raises on the CPU); INT_MIN / -1 wraps to INT_MIN as in torch (C traps on the host).
FFI_HD int ffi_add(int a, int b) { return (int)((unsigned)a + (unsigned)b); }
FFI_HD long long ffi_add(long long a, long long b) { return (long long)((unsigned long long)a + (unsigned long long)b); }
FFI_HD int ffi_sub(int a, int b) { return (int)((unsigned)a - (unsigned)b); }
FFI_HD long long ffi_sub(long long a, long long b) { return (long long)((unsigned long long)a - (unsigned long long)b); }
FFI_HD int ffi_mul(int a, int b) { return (int)((unsigned)a * (unsigned)b); }
FFI_HD long long ffi_mul(long long a, long long b) { return (long long)((unsigned long long)a * (unsigned long long)b); }
FFI_HD int ffi_neg(int a) { return (int)(0u - (unsigned)a); }
FFI_HD long long ffi_neg(long long a) { return (long long)(0ull - (unsigned long long)a); }
FFI_HD int ffi_floordiv(int a, int b) {
  if (b == 0) return 0;
  if (b == -1) return ffi_neg(a);
  const int q = a / b; return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}
FFI_HD long long ffi_floordiv(long long a, long long b) {
  if (b == 0) return 0;
  if (b == -1) return ffi_neg(a);
  const long long q = a / b; return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}
FFI_HD int ffi_mod(int a, int b) {
  if (b == 0 || b == -1) return 0;
  const int r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
FFI_HD long long ffi_mod(long long a, long long b) {
  if (b == 0 || b == -1) return 0;
  const long long r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
// torch's float floor division and remainder (c10::div_floor_floating, its remainder kernel); the
// float overloads by name, so that no float op runs in double
FFI_HD float ffi_fmod(float a, float b) { return fmodf(a, b); }
FFI_HD double ffi_fmod(double a, double b) { return fmod(a, b); }
FFI_HD float ffi_floor(float a) { return floorf(a); }
FFI_HD double ffi_floor(double a) { return floor(a); }
FFI_HD float ffi_copysign(float a, float b) { return copysignf(a, b); }
FFI_HD double ffi_copysign(double a, double b) { return copysign(a, b); }
template <typename T> FFI_HD T ffi_floordiv_float(T a, T b) {
  if (b == T(0)) return a / b;
  const T mod = ffi_fmod(a, b);
  T div = (a - mod) / b;
  if (mod != T(0) && ((b < T(0)) != (mod < T(0)))) div -= T(1);
  if (div == T(0)) return ffi_copysign(T(0), a / b);
  T floordiv = ffi_floor(div);
  if (div - floordiv > T(0.5)) floordiv += T(1);
  return floordiv;
}
template <typename T> FFI_HD T ffi_mod_float(T a, T b) {
  T mod = ffi_fmod(a, b);
  if (mod != T(0) && ((b < T(0)) != (mod < T(0)))) mod += b;
  return mod;
}
FFI_HD float ffi_floordiv(float a, float b) { return ffi_floordiv_float(a, b); }
FFI_HD double ffi_floordiv(double a, double b) { return ffi_floordiv_float(a, b); }
FFI_HD float ffi_mod(float a, float b) { return ffi_mod_float(a, b); }
FFI_HD double ffi_mod(double a, double b) { return ffi_mod_float(a, b); }
FFI_HD int ffi_abs(int a) { return a < 0 ? ffi_neg(a) : a; }
FFI_HD long long ffi_abs(long long a) { return a < 0 ? ffi_neg(a) : a; }
FFI_HD float ffi_abs(float a) { return fabsf(a); }
FFI_HD double ffi_abs(double a) { return fabs(a); }
FFI_HD int ffi_min(int a, int b) { return a < b ? a : b; }
FFI_HD long long ffi_min(long long a, long long b) { return a < b ? a : b; }
FFI_HD float ffi_min(float a, float b) { return (a != a || b != b) ? NAN : fminf(a, b); }
FFI_HD double ffi_min(double a, double b) { return (a != a || b != b) ? NAN : fmin(a, b); }
FFI_HD int ffi_max(int a, int b) { return a > b ? a : b; }
FFI_HD long long ffi_max(long long a, long long b) { return a > b ? a : b; }
FFI_HD float ffi_max(float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); }
FFI_HD double ffi_max(double a, double b) { return (a != a || b != b) ? NAN : fmax(a, b); }
// torch's integer power (powi): wrapping products; a negative exponent gives 0 but for bases 1 and -1
FFI_HD long long ffi_ipow(long long a, long long b) {
  if (b < 0) return a == 1 ? 1 : (a == -1 ? ((b & 1) ? -1 : 1) : 0);
  unsigned long long r = 1, x = (unsigned long long)a;
  for (; b; b >>= 1, x *= x) if (b & 1) r *= x;
  return (long long)r;
}
// a table index as torch takes it: a negative one counts from the end of its dimension
FFI_HD int ffi_index(int i, int n) { return i < 0 ? i + n : i; }
FFI_HD long long ffi_index(long long i, long long n) { return i < 0 ? i + n : i; }
FFI_HD double ffi_sigmoid(double a) { return 1.0 / (1.0 + exp(-a)); }
FFI_HD double ffi_tanh(double a) { return tanh(a); }
FFI_HD float ffi_sigmoid(float a) { return 1.f / (1.f + expf(-a)); }
// float(x) for |x| < 2^22, exactly, in two full-rate instructions: I2F issues at a quarter rate on
// the unit the softmax's exp2 uses. 1.5 * 2^23 (bits 0x4B400000) has a last mantissa bit of 1, so
// adding x to its bits gives the float 1.5 * 2^23 + x.
FFI_HD float ffi_i2f_exact(int x) {
  const int bits = 0x4B400000 + x;
  float f;
#ifdef __CUDA_ARCH__
  f = __int_as_float(bits);
#else
  __builtin_memcpy(&f, &bits, sizeof f);
#endif
  return f - 12582912.0f;
}
// one MUFU instruction on the GPU (as FlashInfer's own logits soft cap): tanhf costs two MUFU
// and a dozen more instructions per score, in a loop whose exp2 already saturates that unit
FFI_HD float ffi_tanh(float a) {
#ifdef __CUDA_ARCH__
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(a));
  return y;
#else
  return tanhf(a);
#endif
}
#endif
"""


def ctype(dtype: torch.dtype) -> str:
    """The C type a value of this torch dtype is computed in."""
    if dtype == torch.bool:
        return "bool"
    if dtype == torch.int64:
        return "long long"
    if dtype == torch.float64:
        return "double"
    return "float" if dtype.is_floating_point else "int"


def element_ctype(t: torch.Tensor) -> str:
    """The C type of a captured table's elements as the kernel reads them."""
    return _STORED_CTYPE[KERNEL_DTYPE[t.dtype]]


def check_kernel_size(t: torch.Tensor) -> None:
    if t.numel() >= 2**31:
        raise ValueError(f"a tensor captured by a score_mod or mask_mod has {t.numel()} elements; "
                         "compiled kernels index them with 32-bit offsets (fewer than 2**31 expected)")


def kernel_tensor(t: torch.Tensor) -> torch.Tensor:
    """A captured tensor as the kernel reads it: a contiguous copy, of its KERNEL_DTYPE."""
    check_kernel_size(t)
    # a copy whatever its dtype: the plan reads the table once, when planned (a float64 table, read
    # as float32 before, was copied by that conversion; one changed afterwards changes no plan)
    return t.detach().to(KERNEL_DTYPE[t.dtype], copy=True).contiguous()


def dtype_range(dtype: torch.dtype):
    """(min, max) of an integer or bool dtype."""
    if dtype == torch.bool:
        return 0, 1
    info = torch.iinfo(dtype)
    return info.min, info.max


def wrap_int(value: int, dtype: torch.dtype):
    """value converted to an integer (or bool) dtype as torch converts a Python int: modulo 2^bits."""
    if dtype == torch.bool:
        return bool(value)
    lo, hi = dtype_range(dtype)
    return (value - lo) % (hi - lo + 1) + lo


def _int_literal(v: int, dtype: torch.dtype) -> str:
    if dtype == torch.int64:
        return f"{v}LL" if v > -2**63 else "(-9223372036854775807LL - 1)"
    return str(v) if v > -2**31 else "(-2147483647 - 1)"


def _literal(value, dtype: torch.dtype) -> str:
    """A number as a C literal of dtype, converted as torch converts it (ints wrap, floats round)."""
    if dtype == torch.bool:
        return "true" if value else "false"
    if not dtype.is_floating_point:
        if isinstance(value, float):
            return f"(({ctype(dtype)})({_literal(value, torch.float64)}))"   # as C converts (torch too)
        return _int_literal(wrap_int(int(value), dtype), dtype)
    v = float(value)
    if dtype != torch.float64:   # rounded once, to float32: 1e39 is inf there, as in torch
        v = torch.tensor(v, dtype=torch.float32).item()
    if math.isnan(v):
        return "NAN" if dtype != torch.float64 else "((double)NAN)"
    if math.isinf(v):
        return ("INFINITY" if v > 0 else "(-INFINITY)") if dtype != torch.float64 else \
            ("((double)INFINITY)" if v > 0 else "((double)-INFINITY)")
    if dtype == torch.float64:
        return repr(v)
    return repr(v) + "f"


def convert(code: str, src: torch.dtype, dst: torch.dtype) -> str:
    """C code of a src value as torch converts it to dst."""
    if src == dst:
        return code
    if dst == torch.bool:
        return f"(({code}) != 0)"
    if dst in NARROW:
        via = "(int)" if src.is_floating_point else ""   # float to int truncates, then wraps
        return f"((int)({NARROW[dst]}){via}({code}))"
    if ctype(src) == ctype(dst):
        return code   # a narrower int widened, or a float16 table element read as float32
    return f"(({ctype(dst)})({code}))"


def _wrap(code: str, dtype: torch.dtype) -> str:
    """An int op's result computed in int, wrapped to a narrower dtype."""
    return f"((int)({NARROW[dtype]})({code}))" if dtype in NARROW else code


def int_range(node: Node, bound: int, memo: dict):
    """(lo, hi) that an integer or bool node's value lies in when the inputs b, h, q_idx and kv_idx
    lie in [0, bound), or None where unknown (captured numbers and tables can change without a
    recompile, so they are unknown). Operands are taken in the op's dtype and the result in the
    node's: a range past a narrower int's is that int's whole range, past int32's unknown."""
    if id(node) in memo:
        return memo[id(node)]
    op, a = node.op, node.args
    r = None
    if node.dtype == torch.bool:
        r = (0, 1)
    elif node.kind != "int":
        r = None
    elif op == "input":
        r = (0, bound - 1)
    elif op == "const":
        r = (int(node.attr), int(node.attr))
    elif op == "cast" and a[0].kind in ("int", "bool"):
        r = int_range(a[0], bound, memo)
    elif op in ("add", "sub", "mul", "min", "max", "where", "neg", "abs", "bitnot", "floordiv", "mod"):
        rs = [_range_as(x, node.dtype, bound, memo) if (k > 0 or op != "where") else None
              for k, x in enumerate(a)]
        if all(x is not None for x in (rs[1:] if op == "where" else rs)):
            r = _combine(op, rs)
    r = _range_as_dtype(r, node.dtype)
    memo[id(node)] = r
    return r


def nonnegative(node: Node, bound: int, memo: dict) -> bool:
    """Whether an int node's value is provably >= 0 for inputs in [0, bound): from its range, or
    from a max with such a value, a min or where of two, a remainder by a positive constant (what
    a clamped table index such as clamp(x, max=2 * M).clamp(min=0) is)."""
    r = int_range(node, bound, memo)
    if r is not None:
        return r[0] >= 0
    op, a = node.op, node.args
    if op == "max":
        return any(nonnegative(x, bound, memo) for x in a)
    if op == "min":
        return all(nonnegative(x, bound, memo) for x in a)
    if op == "where":
        return all(nonnegative(x, bound, memo) for x in a[1:])
    if op == "mod":   # (by the divisor as the op's dtype has it: 200 is -56 to an int8)
        return a[1].op == "const" and not isinstance(a[1].attr, float) and wrap_int(int(a[1].attr), node.dtype) > 0
    return False


def _range_as_dtype(r, dtype):
    if r is None:
        return None
    lo, hi = dtype_range(dtype) if dtype != torch.int64 else (-2**31, 2**31 - 1)
    if lo <= r[0] and r[1] <= hi:
        return r
    return (lo, hi) if dtype in NARROW else None


def _range_as(node: Node, dtype, bound, memo):
    """The range of node converted to dtype (an op's operand)."""
    r = int_range(node, bound, memo)
    return None if node.kind == "float" else _range_as_dtype(r, dtype)


def _combine(op, rs):
    if op in ("add", "sub", "mul"):
        (a0, a1), (b0, b1) = rs
        if op == "add":
            return a0 + b0, a1 + b1
        if op == "sub":
            return a0 - b1, a1 - b0
        products = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
        return min(products), max(products)
    if op in ("min", "max"):
        (a0, a1), (b0, b1) = rs
        return (min(a0, b0), min(a1, b1)) if op == "min" else (max(a0, b0), max(a1, b1))
    if op == "where":
        (t0, t1), (f0, f1) = rs[1], rs[2]
        return min(t0, f0), max(t1, f1)
    (a0, a1) = rs[0]
    if op == "neg":
        return -a1, -a0
    if op == "abs":
        return (0 if a0 <= 0 <= a1 else min(abs(a0), abs(a1))), max(abs(a0), abs(a1))
    if op == "bitnot":
        return -a1 - 1, -a0 - 1
    divisor = rs[1]
    if divisor[0] != divisor[1] or divisor[0] in (0, -1):
        return None   # only by a known constant (not -1: it may wrap)
    c = divisor[0]
    if op == "floordiv":
        ends = [a0 // c, a1 // c]
        return min(ends), max(ends)
    return (0, c - 1) if c > 0 else (c + 1, 0)   # Python's % takes the divisor's sign


_FLOAT_FNS = {"exp": ("expf", "exp"), "log": ("logf", "log"), "sqrt": ("sqrtf", "sqrt")}


def emit_expression(graph: Graph, scalar_ref, tensor_ref, stride_ref=None, input_ref=None, size_ref=None,
                    hoisted: list | None = None, invariant_inputs=(), position_bound: int | None = None) -> str:
    """The graph as one C++ expression. With a hoisted list, each subexpression that reads no
    input outside invariant_inputs (say b and h, fixed for a whole tile) is appended to it as
    (name, ctype, code), in dependency order, and the expression refers to name instead, so a
    kernel can compute it once (captured tables indexed by head, scalars converted to float);
    a division by such a value becomes a multiplication by its hoisted reciprocal. With a
    position_bound (the inputs b, h, q_idx, kv_idx lie in [0, position_bound)), an int whose range
    stays within +-EXACT_FLOAT_INT converts to float with ffi_i2f_exact.

    Every value is computed as torch computes it, in its node's dtype (ctype): operands are
    converted to the op's dtype first (a Python int wraps to an int8 operand's type, say), int
    ops wrap (ffi_add and friends; the narrower ints after each op), bool + bool is a logical or."""
    stride_ref = stride_ref or (lambda name, i: f"{name}_stride{i}")
    size_ref = size_ref or (lambda name, i: f"{name}_size{i}")
    input_ref = input_ref or (lambda name: name)
    index_ranges, sizes = {}, {}
    memo, varies, strides, ranges, converted = {}, {}, {}, {}, {}
    # kernel_tensor makes every captured table contiguous: its last dimension's stride is 1,
    # so that index needs no multiply (the other strides stay kernel arguments)
    last_dim = {name: t.dim() - 1 for name, t in graph.tensors}
    element = {name: element_ctype(t) for name, t in graph.tensors}

    def strided(node: Node, d: int, index: str, stride: str) -> str:
        return index if d == last_dim.get(node.attr) else f"{index} * {stride}"

    def variant(node: Node) -> bool:
        if id(node) not in varies:
            if node.op == "input":
                varies[id(node)] = node.attr not in invariant_inputs
            else:
                varies[id(node)] = any(variant(a) for a in node.args if isinstance(a, Node))
        return varies[id(node)]

    def hoist(code: str, c_type: str) -> str:
        name = f"ffi_hoisted{len(hoisted)}"
        hoisted.append((name, c_type, code))
        return name

    def go(node: Node) -> str:
        """The node's value as C of ctype(node.dtype)."""
        if id(node) in memo:
            return memo[id(node)]
        code = emit(node)
        # a captured number is read where it is converted (below), so that one conversion is hoisted
        if hoisted is not None and node.op not in ("const", "input", "scalar") and not variant(node):
            code = hoist(code, ctype(node.dtype))
        memo[id(node)] = code
        return code

    def arg(node: Node, dtype: torch.dtype) -> str:
        """The node's value converted to dtype, as an operand of an op computed in dtype."""
        if node.op == "const":
            return _literal(node.attr, dtype) if node.dtype != torch.bool or dtype == torch.bool \
                else _literal(int(node.attr), dtype)
        key = (id(node), dtype)
        if key not in converted:
            if dtype == torch.float32 and ctype(node.dtype) == "int" and position_bound is not None \
                    and _fits_bit_trick(int_range(node, position_bound, ranges)):
                code = f"ffi_i2f_exact({go(node)})"
            else:
                code = convert(go(node), node.dtype, dtype)
            if hoisted is not None and node.op != "input" and not variant(node) and code != go(node):
                code = hoist(code, ctype(dtype))
            converted[key] = code
        return converted[key]

    def index(node: Node, d: int, i: Node, dtype: torch.dtype) -> str:
        """Index d of a table read, in dtype: a negative one counts from the dimension's size, as
        torch's indexing does (unless its range is provably non-negative: positions, say)."""
        code = arg(i, dtype)
        if nonnegative(i, position_bound or 2**31, index_ranges):
            return code
        if hoisted is None:
            return f"ffi_index({code}, ({ctype(dtype)})({size_ref(node.attr, d)}))"
        if (node.attr, d, dtype) not in sizes:
            sizes[node.attr, d, dtype] = hoist(f"({ctype(dtype)})({size_ref(node.attr, d)})", ctype(dtype))
        return f"ffi_index({code}, {sizes[node.attr, d, dtype]})"

    def load(node: Node) -> str:
        """The element read, as C of the element type."""
        table = f"({tensor_ref(node.attr)})"
        if hoisted is None:
            offset = " + ".join(strided(node, d, f"(long long)({index(node, d, i, torch.int64)})",
                                        stride_ref(node.attr, d)) for d, i in enumerate(node.args)) or "0"
            return f"{table}[{offset}]"
        # int32 offsets (kernel_tensor caps a table's size); the strides, and the table pointer
        # advanced by the part indexed by invariant values, are computed once, so a score pays one
        # multiply-add per varying index
        fixed = [strided(node, d, index(node, d, i, torch.int32), f"(int)({stride_ref(node.attr, d)})")
                 for d, i in enumerate(node.args) if not variant(i)]
        if fixed:
            table = hoist(f"{table} + ({' + '.join(fixed)})", f"const {element[node.attr]}*")
        terms = []
        for d, i in enumerate(node.args):
            if variant(i) and d == last_dim.get(node.attr):
                terms.append(index(node, d, i, torch.int32))
            elif variant(i):
                if (node.attr, d) not in strides:
                    strides[node.attr, d] = hoist(f"(int)({stride_ref(node.attr, d)})", "int")
                terms.append(f"{index(node, d, i, torch.int32)} * {strides[node.attr, d]}")
        return f"{table}[{' + '.join(terms) or '0'}]"

    def emit(node: Node) -> str:
        op, a, d = node.op, node.args, node.dtype
        if op == "input":
            return input_ref(node.attr)
        if op == "const":
            return _literal(node.attr, d)
        if op == "scalar":
            return f"(({ctype(d)})({scalar_ref(node.attr)}))"
        if op == "load":
            stored = element[node.attr]
            code = load(node)
            if d == torch.bool:
                return f"(({code}) != 0)"
            # (int64_t is long, not long long, on Linux: the cast picks the long long overloads)
            return code if stored == ctype(d) else f"(({ctype(d)})({code}))"
        if op == "cast":
            return arg(a[0], d)
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[op]
            return f"({arg(a[0], node.compute)} {sym} {arg(a[1], node.compute)})"
        if op == "where":
            return f"({arg(a[0], torch.bool)} ? {arg(a[1], d)} : {arg(a[2], d)})"
        if op == "div":
            if hoisted is not None and d == torch.float32 and variant(a[0]) and not variant(a[1]):
                reciprocal = hoist(f"(1.0f / {arg(a[1], d)})", "float")
                return f"({arg(a[0], d)} * {reciprocal})"
            return f"({arg(a[0], d)} / {arg(a[1], d)})"
        x = [arg(v, d) for v in a] if op != "pow" else None
        if d == torch.bool:   # torch's bool arithmetic: + and max are or, * and min are and
            if op in ("add", "or", "max"):
                return f"({x[0]} || {x[1]})"
            if op in ("mul", "and", "min"):
                return f"({x[0]} && {x[1]})"
            if op == "xor":
                return f"({x[0]} != {x[1]})"
            if op == "not":
                return f"(!{x[0]})"
            raise ValueError(f"no C++ for {op!r} of bools")
        floating = d.is_floating_point
        if op in ("add", "sub", "mul"):
            if floating:
                return f"({x[0]} {dict(add='+', sub='-', mul='*')[op]} {x[1]})"
            return _wrap(f"ffi_{op}({x[0]}, {x[1]})", d)
        if op in ("floordiv", "mod", "min", "max"):
            return _wrap(f"ffi_{op}({x[0]}, {x[1]})", d) if op == "floordiv" else f"ffi_{op}({x[0]}, {x[1]})"
        if op == "neg":
            return f"(-{x[0]})" if floating else _wrap(f"ffi_neg({x[0]})", d)
        if op == "abs":
            return f"ffi_abs({x[0]})" if floating else _wrap(f"ffi_abs({x[0]})", d)
        if op in ("and", "or", "xor"):
            return f"({x[0]} {dict([('and', '&'), ('or', '|'), ('xor', '^')])[op]} {x[1]})"
        if op == "bitnot":   # C promotes a uint8 to int first: ~200 is -201 there, 55 in torch
            return _wrap(f"(~{x[0]})", d)
        if op == "pow":
            if floating:
                return f"{'powf' if d != torch.float64 else 'pow'}({arg(a[0], d)}, {arg(a[1], d)})"
            power = f"ffi_ipow({convert(arg(a[0], d), d, torch.int64)}, {convert(arg(a[1], d), d, torch.int64)})"
            return convert(power, torch.int64, d)
        if op == "tanh":
            return f"ffi_tanh({x[0]})"
        if op in _FLOAT_FNS:
            return f"{_FLOAT_FNS[op][d == torch.float64]}({x[0]})"
        if op == "sigmoid":
            return f"ffi_sigmoid({x[0]})"
        raise ValueError(f"no C++ for op {op!r}")

    return go(graph.output)


def _fits_bit_trick(r) -> bool:
    return r is not None and -EXACT_FLOAT_INT < r[0] and r[1] < EXACT_FLOAT_INT


def graph_key(graph: Graph) -> str:
    """Stable hash of a traced graph's structure (not of its captured values): a kernel's name."""
    text = emit_expression(graph, lambda n: n, lambda n: n)
    meta = [(n, k) for n, k, _ in graph.scalars] + [(n, str(t.dtype), t.dim()) for n, t in graph.tensors]
    return hashlib.sha256(repr((text, meta, graph.inputs)).encode()).hexdigest()[:16]
