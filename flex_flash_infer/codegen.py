"""Emit C++ for a traced mod: one expression, valid in CUDA device code and in host C++.

emit_expression(graph, scalar_ref, tensor_ref) renders the graph with the caller choosing how
scalars and captured tensors are reached (kernel params on the GPU, plain arrays on the host).
Captured tensors are read as contiguous float32 / int32 / uint8 arrays with runtime strides
(the last dimension's is 1), so new values or shapes of a captured tensor never change the code.
"""
from __future__ import annotations

import math

import torch

from .trace import Graph, Node

CTYPE = {"bool": "bool", "int": "int", "float": "float"}
# The compiled kernels see batch entries, heads and positions below this (their planner checks it),
# so an int expression of them has a known range; converting one whose range lies within
# +-EXACT_FLOAT_INT to float takes the ffi_i2f_exact bit trick instead of an I2F instruction.
POSITION_BOUND = 2**21


def position_bound_for(batch: int, heads: int, q_len: int, kv_len: int) -> int | None:
    """POSITION_BOUND when every b, h and position a kernel sees lies below it (padded tail
    tiles reach 127 past the lengths), else None: ints then convert to float with I2F."""
    return POSITION_BOUND if max(batch, heads, q_len + 128, kv_len + 128) <= POSITION_BOUND else None
EXACT_FLOAT_INT = 2**22
ELEMENT_CTYPE = {"bool": "uint8_t", "int": "int", "float": "float"}

PRELUDE = r"""
#ifndef FFI_PRELUDE
#define FFI_PRELUDE
#ifdef __CUDACC__
#define FFI_HD __host__ __device__ __forceinline__
#else
#define FFI_HD static inline
#endif
FFI_HD int ffi_floordiv(int a, int b) { int q = a / b; return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q; }
FFI_HD float ffi_floordiv(float a, float b) { return floorf(a / b); }
FFI_HD int ffi_mod(int a, int b) { int r = a % b; return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }
FFI_HD float ffi_mod(float a, float b) { return a - floorf(a / b) * b; }
FFI_HD int ffi_abs(int a) { return a < 0 ? -a : a; }
FFI_HD float ffi_abs(float a) { return fabsf(a); }
FFI_HD int ffi_min(int a, int b) { return a < b ? a : b; }
FFI_HD float ffi_min(float a, float b) { return (a != a || b != b) ? NAN : fminf(a, b); }
FFI_HD int ffi_max(int a, int b) { return a > b ? a : b; }
FFI_HD float ffi_max(float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); }
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
FFI_HD int ffi_float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  int i; __builtin_memcpy(&i, &f, sizeof i); return i;
#endif
}
FFI_HD float ffi_bits_float(int i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
#else
  float f; __builtin_memcpy(&f, &i, sizeof f); return f;
#endif
}
// tanh without the MUFU unit, in about 15 full-rate instructions (|error| < 1.5e-4, exact at 0,
// NaN stays NaN): tanh|a| = (1 - e) / (1 + e) with e = exp(-2|a|) = 2^u, u = j + f (j an integer,
// |f| <= 1/2), 2^f = 1 + f q(f) with q a quadratic, 2^j an add to its exponent bits, and 1 / (1 + e)
// a quartic on [0, 1] (minimax fits, weighted so that tanh's own error is the one minimised).
// The variant can run it on half of a tile's scores (variant.TANH_FMA_SHARE, off: slower on an
// H200, where the loop is bound by instruction issue rather than by the exp2 unit).
FFI_HD float ffi_tanh_fma(float a) {
  float u = fabsf(a) * -2.8853900817779268f;   // -2 log2(e) |a|
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800   // max.NaN: sm_80 and later
  asm("max.NaN.f32 %0, %0, 0fC2800000;" : "+f"(u));   // u >= -64 (tanh is 1 in float long before), NaN kept
#else
  u = (u != u) ? u : fmaxf(u, -64.f);
#endif
  const float r = u + 12582912.f;   // 1.5 * 2^23: j = round(u) in the low mantissa bits
  const float f = u - (r - 12582912.f);
  const float p = fmaf(f, fmaf(fmaf(0.0550087805f, f, 0.24221083f), f, 0.693282929f), 1.f);
  const float e = ffi_bits_float(int(unsigned(ffi_float_bits(p)) + (unsigned(ffi_float_bits(r)) << 23)));   // p * 2^j
  const float h = fmaf(fmaf(fmaf(fmaf(0.214865425f, e, -0.637922095f), e, 0.920033451f), e, -0.993588232f), e,
                       0.999919778f);   // 1 / (1 + e)
  return copysignf(fmaf(-e, h, h), a);
}
// on_fma picks the unit; in the fa3 variant it is a constant of the kernel's unrolled loop (no branch)
FFI_HD float ffi_tanh_split(float a, bool on_fma) { return on_fma ? ffi_tanh_fma(a) : ffi_tanh(a); }
#endif
"""


def element_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.dtype.is_floating_point else "int"


def kernel_tensor(t: torch.Tensor) -> torch.Tensor:
    """A captured tensor as the kernel reads it: contiguous float32 / int32 / uint8."""
    kind = element_kind(t)
    dtype = {"bool": torch.uint8, "int": torch.int32, "float": torch.float32}[kind]
    if t.numel() >= 2**31:
        raise ValueError(f"a tensor captured by a score_mod or mask_mod has {t.numel()} elements; "
                         "compiled kernels index them with 32-bit offsets (fewer than 2**31 expected)")
    return t.detach().to(dtype).contiguous()


def _literal(node: Node) -> str:
    v = node.attr
    if node.kind == "bool":
        return "true" if v else "false"
    if node.kind == "int":
        return str(v) if -2**31 <= v < 2**31 else f"{v}LL"
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return repr(float(v)) + "f"


def _cast(code: str, src: str, dst: str) -> str:
    if src == dst:
        return code
    if dst == "bool":
        return f"(({code}) != 0)"
    return f"(({CTYPE[dst]})({code}))"


def int_range(node: Node, bound: int, memo: dict):
    """(lo, hi) that an int or bool node's value lies in when the inputs b, h, q_idx and kv_idx lie
    in [0, bound), or None where unknown (captured numbers and tables can change without a
    recompile, so they are unknown)."""
    if id(node) in memo:
        return memo[id(node)]
    op, a = node.op, node.args
    r = None
    if node.kind == "bool":
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
        rs = [int_range(x, bound, memo) if isinstance(x, Node) else None for x in a]
        if all(x is not None for x in rs):
            r = _combine(op, rs)
    memo[id(node)] = r
    return r


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
    if divisor[0] != divisor[1] or divisor[0] == 0:
        return None   # only by a known constant
    c = divisor[0]
    if op == "floordiv":
        ends = [a0 // c, a1 // c]
        return min(ends), max(ends)
    return (0, c - 1) if c > 0 else (c + 1, 0)   # Python's % takes the divisor's sign


def emit_expression(graph: Graph, scalar_ref, tensor_ref, stride_ref=None, input_ref=None,
                    hoisted: list | None = None, invariant_inputs=(), position_bound: int | None = None,
                    tanh_call=None) -> str:
    """The graph as one C++ expression. With a hoisted list, each subexpression that reads no
    input outside invariant_inputs (say b and h, fixed for a whole tile) is appended to it as
    (name, ctype, code), in dependency order, and the expression refers to name instead, so a
    kernel can compute it once (captured tables indexed by head, scalars converted to float);
    a division by such a value becomes a multiplication by its hoisted reciprocal. With a
    position_bound (the inputs b, h, q_idx, kv_idx lie in [0, position_bound)), an int whose range
    stays within +-EXACT_FLOAT_INT converts to float with ffi_i2f_exact. tanh_call(code) renders a
    tanh that varies per score (the fa3 variant's choice of unit); by default ffi_tanh."""
    stride_ref = stride_ref or (lambda name, i: f"{name}_stride{i}")
    input_ref = input_ref or (lambda name: name)
    memo, varies, strides, ranges = {}, {}, {}, {}
    # kernel_tensor makes every captured table contiguous: its last dimension's stride is 1,
    # so that index needs no multiply (the other strides stay kernel arguments)
    last_dim = {name: t.dim() - 1 for name, t in graph.tensors}

    def strided(node: Node, d: int, index: str, stride: str) -> str:
        return index if d == last_dim.get(node.attr) else f"{index} * {stride}"

    def to_float(node: Node, code: str) -> str:
        if node.kind == "int" and position_bound is not None:
            r = int_range(node, position_bound, ranges)
            if r is not None and -EXACT_FLOAT_INT < r[0] and r[1] < EXACT_FLOAT_INT:
                return f"ffi_i2f_exact({code})"
        return _cast(code, node.kind, "float")

    def variant(node: Node) -> bool:
        if id(node) not in varies:
            if node.op == "input":
                varies[id(node)] = node.attr not in invariant_inputs
            else:
                varies[id(node)] = any(variant(a) for a in node.args if isinstance(a, Node))
        return varies[id(node)]

    def hoist(code: str, kind: str) -> str:
        """kind: a graph kind, or a C++ type (a table pointer)."""
        name = f"ffi_hoisted{len(hoisted)}"
        hoisted.append((name, CTYPE.get(kind, kind), code))
        return name

    def go(node: Node) -> str:
        if id(node) in memo:
            return memo[id(node)]
        code = emit(node)
        if hoisted is not None and node.op not in ("const", "input") and not variant(node):
            code = hoist(code, node.kind)
        memo[id(node)] = code
        return code

    def arg(node: Node, kind: str) -> str:
        return to_float(node, go(node)) if kind == "float" else _cast(go(node), node.kind, kind)

    def load(node: Node) -> str:
        """The element read, as C++ of the element type."""
        table = f"({tensor_ref(node.attr)})"
        if hoisted is None:
            offset = " + ".join(strided(node, d, f"(long long)({arg(i, 'int')})", stride_ref(node.attr, d))
                                for d, i in enumerate(node.args)) or "0"
            return f"{table}[{offset}]"
        # int32 offsets (kernel_tensor caps a table's size); the strides, and the table pointer
        # advanced by the part indexed by invariant values, are computed once, so a score pays one
        # multiply-add per varying index
        fixed = [strided(node, d, arg(i, 'int'), f"(int)({stride_ref(node.attr, d)})")
                 for d, i in enumerate(node.args) if not variant(i)]
        if fixed:
            element = ELEMENT_CTYPE[node.kind]
            table = hoist(f"{table} + ({' + '.join(fixed)})", f"const {element}*")
        terms = []
        for d, i in enumerate(node.args):
            if variant(i) and d == last_dim.get(node.attr):
                terms.append(arg(i, 'int'))
            elif variant(i):
                if (node.attr, d) not in strides:
                    strides[node.attr, d] = hoist(f"(int)({stride_ref(node.attr, d)})", "int")
                terms.append(f"{arg(i, 'int')} * {strides[node.attr, d]}")
        return f"{table}[{' + '.join(terms) or '0'}]"

    def emit(node: Node) -> str:
        op, a, k = node.op, node.args, node.kind
        if op == "input":
            return input_ref(node.attr)
        if op == "const":
            return _literal(node)
        if op == "scalar":
            return f"(({CTYPE[k]})({scalar_ref(node.attr)}))"
        if op == "load":
            return _cast(load(node), "int" if k == "bool" else k, k)
        if op in ("add", "sub", "mul"):
            sym = {"add": "+", "sub": "-", "mul": "*"}[op]
            kind = "int" if k == "bool" else k
            return f"({arg(a[0], kind)} {sym} {arg(a[1], kind)})"
        if op == "div":
            if hoisted is not None and variant(a[0]) and not variant(a[1]):
                reciprocal = hoist(f"(1.0f / {arg(a[1], 'float')})", "float")
                return f"({arg(a[0], 'float')} * {reciprocal})"
            return f"({arg(a[0], 'float')} / {arg(a[1], 'float')})"
        if op in ("floordiv", "mod", "min", "max"):
            kind = "int" if k == "bool" else k
            return f"ffi_{op}({arg(a[0], kind)}, {arg(a[1], kind)})"
        if op == "pow":
            return f"powf({arg(a[0], 'float')}, {arg(a[1], 'float')})"
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[op]
            kind = max((a[0].kind, a[1].kind), key=("bool", "int", "float").index)
            kind = "int" if kind == "bool" else kind
            return f"({arg(a[0], kind)} {sym} {arg(a[1], kind)})"
        if op in ("and", "or", "xor"):
            if k == "bool":
                sym = {"and": "&&", "or": "||", "xor": "!="}[op]
                return f"({arg(a[0], 'bool')} {sym} {arg(a[1], 'bool')})"
            sym = {"and": "&", "or": "|", "xor": "^"}[op]
            return f"({arg(a[0], 'int')} {sym} {arg(a[1], 'int')})"
        if op == "not":
            return f"(!{arg(a[0], 'bool')})"
        if op == "bitnot":
            return f"(~{arg(a[0], 'int')})"
        if op == "neg":
            return f"(-{arg(a[0], k)})"
        if op == "abs":
            return f"ffi_abs({arg(a[0], k)})"
        if op == "tanh":
            if tanh_call is not None and (hoisted is None or variant(node)):
                return tanh_call(arg(a[0], 'float'))
            return f"ffi_tanh({arg(a[0], 'float')})"
        if op in ("exp", "log", "sqrt"):
            return f"{op}f({arg(a[0], 'float')})"
        if op == "sigmoid":
            return f"ffi_sigmoid({arg(a[0], 'float')})"
        if op == "cast":
            return to_float(a[0], go(a[0])) if k == "float" else _cast(go(a[0]), a[0].kind, k)
        if op == "where":
            return f"({arg(a[0], 'bool')} ? {arg(a[1], k)} : {arg(a[2], k)})"
        raise ValueError(f"no C++ for op {op!r}")

    return go(graph.output)
