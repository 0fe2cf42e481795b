"""Trace a score_mod / mask_mod into a small expression graph, without running it on data.

The mod is called once on symbolic values (Sym). Operators, torch functions (through
__torch_function__) and indexing of captured tensors build nodes; captured Python numbers
become named scalar parameters (the closure is rebuilt with symbolic stand-ins), so their
values are kernel arguments and changing them does not change the graph. Python control flow
on a traced value cannot be expressed and raises TraceError naming the line.

Every node carries torch's dtype of its value, found by running the op itself on stand-ins of
its operands (ones of the operand's dtype; a Python number or a 0-d tensor as itself), so type
promotion follows torch exactly: an int8 sum wraps in int8, bool + bool is a bool, a Python int
compared with an int8 tensor is first converted to int8, int32 + an int64 table value is int64.
torch's own errors (bool - bool, a where or clamp value out of the dtype's range, an integer to
a negative power) surface as TraceError. What the kernels cannot compute as torch does (ops whose
result is float16 / bfloat16, unsigned types past uint8, tables indexed by bool, uint8, int8 or
int16 values) raises TraceError, and the call runs on the reference backend.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import operator
import threading
import types
import weakref
from dataclasses import dataclass, field

import torch

from .hints import made_by_library
from .read_guard import only_read_tables, read_guard
from .versions import ReadState, moved, version_of

KINDS = ("bool", "int", "float")


class TraceError(TypeError):
    """A mod that cannot be compiled into a kernel; the message names the op and the line."""


@dataclass(eq=False)
class Node:
    op: str
    args: tuple
    kind: str
    attr: object = None
    # torch's dtype of the value; a Python number has bool, int64 or float64 (what C computes it in)
    dtype: torch.dtype | None = None
    # torch's promotion ranks: 2 a tensor with dims, 1 a 0-d tensor, 0 a Python number
    tier: int = 2
    value: object = None            # tiers 0 and 1: the value at trace time (a Python number)
    compute: torch.dtype | None = None   # comparisons: the dtype both sides are converted to


@dataclass
class Graph:
    output: Node
    inputs: tuple            # names of the mod's arguments in order
    scalars: list = field(default_factory=list)   # (name, kind, value)
    tensors: list = field(default_factory=list)   # (name, tensor)
    # captured 0-d tensors, whose values are compiled in as constants: (tensor, its version counter
    # when traced); a plan that keeps the kernel is stale once one is written in place
    constants: list = field(default_factory=list)



def _kind_of_dtype(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


# dtypes a node's value may have (the kernels compute each exactly as torch does); float16 and
# bfloat16 only as table elements (converted exactly to float32), never as an op's result
VALUE_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32,
                torch.float64)
TABLE_DTYPES = VALUE_DTYPES + (torch.float16, torch.bfloat16)
_PYTHON_DTYPE = {bool: torch.bool, int: torch.int64, float: torch.float64}
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _python_number(x):
    """A Python bool, int or float (numbers.Integral / Real otherwise, numpy's included)."""
    if isinstance(x, bool):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    return float(x)


def _checked_python(value, what: str):
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise TraceError(f"{what} {value} does not fit in 64 bits, at {_user_line()}; use backend='reference'")
    return value


def _stand_in_value(node: "Node"):
    """What torch sees for this operand when the dtype of an op is worked out."""
    if node.tier == 0:
        return node.value
    if node.tier == 1:
        return torch.tensor(node.value, dtype=node.dtype)
    return torch.ones(1, dtype=node.dtype)


def _min_max(op):
    """torch.minimum / maximum, with a Python number as clamp takes it (range checked)."""
    def f(a, b):
        if not isinstance(a, torch.Tensor):
            a, b = b, a
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b) if op == "min" else torch.clamp(a, min=b)
        return torch.minimum(a, b) if op == "min" else torch.maximum(a, b)
    return f


def _float_fn(name):
    fn = getattr(torch, name)
    return lambda x: fn(x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64))


_TORCH_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq, "ne": operator.ne,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor, "bitnot": operator.invert,
    "not": torch.logical_not, "neg": operator.neg, "abs": operator.abs, "min": _min_max("min"), "max": _min_max("max"),
    "where": torch.where, **{n: _float_fn(n) for n in ("exp", "log", "tanh", "sigmoid", "sqrt")},
}


def _python_where(c, a, b):
    kinds = {type(a), type(b)}
    out = a if c else b
    return float(out) if float in kinds else int(out) if int in kinds else out


_PYTHON_OPS = {**_TORCH_OPS, "min": min, "max": max, "not": operator.not_, "where": _python_where}


def _describe(node: "Node") -> str:
    if node.tier == 0:
        return f"a Python {type(node.value).__name__}"
    return ("a 0-d " if node.tier == 1 else "") + str(node.dtype).replace("torch.", "")


# (op, cast dtype, torch's default dtype, each operand's tier and dtype, and a number's type and
# repr) -> (dtype, compute) of an op with a tensor operand (tier 2): what running it on stand-ins
# gave, kept, since it depends on nothing else: a user's mod is traced again whenever what it
# reads may have changed, and running the stand-ins was a large share of each trace. Failures are
# not kept (their error is raised again).
_TIER2_DTYPES: dict = {}
_TIER2_DTYPES_MAX = 4096


def _tier2_key(op, nodes, dtype):
    return (op, dtype, torch.get_default_dtype(),
            tuple((2, n.dtype) if n.tier == 2 else (n.tier, n.dtype, type(n.value), repr(n.value)) for n in nodes))


def _node(op: str, operands, attr=None, dtype: torch.dtype | None = None) -> "Sym":
    """The node of op on operands (Syms or Python values), with torch's dtype: the op is run on
    stand-ins (_stand_in_value), or, on Python numbers alone, in Python as the mod would run it.
    A cast gives dtype."""
    nodes = [lift(x).node for x in operands]
    tier = max((n.tier for n in nodes), default=0)
    if op == "cast":
        tier = max(tier, 1)
    key = None
    if tier == 2:
        key = _tier2_key(op, nodes, dtype)
        kept = _TIER2_DTYPES.get(key)
        if kept is not None:
            return Sym(Node(op, tuple(nodes), _kind_of_dtype(kept[0]), attr, kept[0], 2, None, kept[1]))
    try:
        if op == "cast":
            out = _stand_in_value(nodes[0])
            out = (out if isinstance(out, torch.Tensor) else torch.tensor(out)).to(dtype)
        elif tier == 0 and op not in ("exp", "log", "tanh", "sigmoid", "sqrt"):
            out = _PYTHON_OPS[op](*(n.value for n in nodes))
        else:
            out = _TORCH_OPS[op](*(_stand_in_value(n) for n in nodes))
    except TraceError:
        raise
    except Exception as e:   # torch's own error: the reference backend raises it too
        raise TraceError(f"'{op}' on {', '.join(_describe(n) for n in nodes)} fails in torch "
                         f"({type(e).__name__}: {e}), at {_user_line()}") from e
    if isinstance(out, torch.Tensor) and tier > 0:
        dtype, value = out.dtype, (out.item() if tier < 2 else None)
    else:
        value = _checked_python(_python_number(out), "a Python number")
        dtype = _PYTHON_DTYPE[type(value)]
    if dtype not in VALUE_DTYPES:
        raise TraceError(f"'{op}' gives a {str(dtype).replace('torch.', '')} value, which compiled kernels do not "
                         f"compute as torch does (it rounds every op to that type), at {_user_line()}; "
                         "use backend='reference'")
    compute = None
    if op in ("lt", "le", "gt", "ge", "eq", "ne"):
        if tier == 0:
            compute = torch.float64 if any(n.dtype.is_floating_point for n in nodes) else torch.int64
        else:
            compute = torch.result_type(*(_stand_in_value(n) for n in nodes))
    if key is not None and isinstance(out, torch.Tensor):
        if len(_TIER2_DTYPES) >= _TIER2_DTYPES_MAX:
            _TIER2_DTYPES.clear()
        _TIER2_DTYPES[key] = (dtype, compute)
    return Sym(Node(op, tuple(nodes), _kind_of_dtype(dtype), attr, dtype, tier, value, compute))


def _user_line() -> str:
    """file:line of the innermost frame outside this module (the user's mod)."""
    for frame in inspect.stack()[2:]:
        if frame.filename != __file__ and "torch/" not in frame.filename.replace("\\", "/"):
            code = (frame.code_context or [""])[0].strip()
            return f"{frame.filename}:{frame.lineno}: {code}"
    return "<unknown line>"


class _Tracer:
    def __init__(self):
        self.scalars = []
        self.tensors = []
        self.constants = []
        self._tensor_names = {}

    def tensor_name(self, t: torch.Tensor) -> str:
        if id(t) not in self._tensor_names:
            name = f"t{len(self.tensors)}"
            self._tensor_names[id(t)] = name
            self.tensors.append((name, t))
        return self._tensor_names[id(t)]


_TRACING = threading.local()   # per thread: prepare() may trace in several threads at once (the demo's checks)


def active_tracers() -> list:
    """This thread's tracers, the innermost last (a mod traced while tracing another's stand-ins)."""
    stack = getattr(_TRACING, "stack", None)
    if stack is None:
        stack = _TRACING.stack = []
    return stack


def lift(x) -> "Sym":
    if isinstance(x, Sym):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, torch.Tensor):
        value = _checked_python(_python_number(x), "a Python number")
        dtype = _PYTHON_DTYPE[type(value)]
        return Sym(Node("const", (), _kind_of_dtype(dtype), value, dtype, 0, value))
    if isinstance(x, torch.Tensor) and x.dim() == 0:   # a 0-d tensor: its dtype, promoted as torch ranks it
        if x.dtype not in VALUE_DTYPES:
            raise TraceError(f"a captured 0-d tensor of dtype {x.dtype} is not supported in a compiled mod, "
                             f"at {_user_line()}; use backend='reference'")
        value = x.item()
        tracers = active_tracers()
        if tracers and all(t is not x for t, _ in tracers[-1].constants):
            tracers[-1].constants.append((x, version_of(x)))
        return Sym(Node("const", (), _kind_of_dtype(x.dtype), value, x.dtype, 1, value))
    raise TraceError(f"cannot use a value of type {type(x).__name__} ({x!r:.40}) in a traced mod at {_user_line()}")


def _binary(op, a, b, kind=None):
    return _node(op, (a, b))


def _unary(op, a, kind=None):
    return _node(op, (a,))


def _logic(op, a, b):
    a, b = lift(a), lift(b)
    if "float" in (a.node.kind, b.node.kind):
        raise TraceError(f"'{op}' of floating values is not defined, at {_user_line()}")
    return _node(op, (a, b))


FLOAT_FUNCS = {"exp", "log", "tanh", "sigmoid", "sqrt"}


class Sym:
    """A traced value."""

    __slots__ = ("node",)

    def __init__(self, node: Node):
        self.node = node

    # arithmetic
    def __add__(self, o): return _binary("add", self, o)
    def __radd__(self, o): return _binary("add", o, self)
    def __sub__(self, o): return _binary("sub", self, o)
    def __rsub__(self, o): return _binary("sub", o, self)
    def __mul__(self, o): return _binary("mul", self, o)
    def __rmul__(self, o): return _binary("mul", o, self)
    def __truediv__(self, o): return _binary("div", self, o, "float")
    def __rtruediv__(self, o): return _binary("div", o, self, "float")
    def __floordiv__(self, o): return _binary("floordiv", self, o)
    def __rfloordiv__(self, o): return _binary("floordiv", o, self)
    def __mod__(self, o): return _binary("mod", self, o)
    def __rmod__(self, o): return _binary("mod", o, self)
    def __pow__(self, o): return _binary("pow", self, o, "float")
    def __rpow__(self, o): return _binary("pow", o, self, "float")
    def __neg__(self): return _unary("neg", self)
    def __abs__(self): return _unary("abs", self)
    # comparisons
    def __lt__(self, o): return _binary("lt", self, o, "bool")
    def __le__(self, o): return _binary("le", self, o, "bool")
    def __gt__(self, o): return _binary("gt", self, o, "bool")
    def __ge__(self, o): return _binary("ge", self, o, "bool")
    def __eq__(self, o): return _binary("eq", self, o, "bool")  # noqa: E731
    def __ne__(self, o): return _binary("ne", self, o, "bool")
    __hash__ = object.__hash__
    # logic
    def __and__(self, o): return _logic("and", self, o)
    def __rand__(self, o): return _logic("and", o, self)
    def __or__(self, o): return _logic("or", self, o)
    def __ror__(self, o): return _logic("or", o, self)
    def __xor__(self, o): return _logic("xor", self, o)
    def __rxor__(self, o): return _logic("xor", o, self)
    def __invert__(self):
        if self.node.kind == "float":
            raise TraceError(f"'~' of a floating value is not defined, at {_user_line()}")
        return _unary("not" if self.node.kind == "bool" else "bitnot", self)

    @property
    def device(self):
        # Mods that move captured tensors to their indices' device keep them on the host
        # while tracing; the backend puts kernel arguments on the GPU.
        return torch.device("cpu")

    # methods mirroring torch.Tensor
    def abs(self): return abs(self)
    def exp(self): return _unary("exp", self, "float")
    def log(self): return _unary("log", self, "float")
    def tanh(self): return _unary("tanh", self, "float")
    def sigmoid(self): return _unary("sigmoid", self, "float")
    def sqrt(self): return _unary("sqrt", self, "float")
    def clamp(self, min=None, max=None): return _clamp(self, min, max)
    def minimum(self, o): return _binary("min", self, o)
    def maximum(self, o): return _binary("max", self, o)
    def float(self): return self.to(torch.float32)
    def int(self): return self.to(torch.int32)
    def long(self): return self.to(torch.int64)
    def double(self): return self.to(torch.float64)
    def short(self): return self.to(torch.int16)
    def char(self): return self.to(torch.int8)
    def byte(self): return self.to(torch.uint8)
    def half(self): return self.to(torch.float16)
    def bfloat16(self): return self.to(torch.bfloat16)
    def bool(self): return self.to(torch.bool)

    def to(self, dtype=None, *args, **kwargs):
        dtype = kwargs.get("dtype", dtype)
        if not isinstance(dtype, torch.dtype):
            return self  # .to(device) and friends do not change the value
        if dtype not in VALUE_DTYPES:
            raise TraceError(f"a cast to {dtype} is not supported in a compiled mod (the kernels compute "
                             f"{', '.join(str(d).replace('torch.', '') for d in VALUE_DTYPES)}), at {_user_line()}; "
                             "use backend='reference'")
        if dtype == self.node.dtype and self.node.tier == 2:
            return self
        return _node("cast", (self,), dtype=dtype)

    def _new_full(self, fill, size, kwargs):
        # a tensor of this one's dtype unless told; of no dims (a 0-d tensor) for an empty size
        dtype = kwargs.get("dtype") or self.node.dtype
        if dtype not in VALUE_DTYPES:
            raise TraceError(f"new_ones / new_zeros of {dtype} is not supported in a compiled mod, at {_user_line()}")
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        value = torch.full((), fill, dtype=dtype).item()
        return Sym(Node("const", (), _kind_of_dtype(dtype), value, dtype, 1 if len(shape) == 0 else 2, value))

    def new_ones(self, *size, **kwargs): return self._new_full(1, size, kwargs)
    def new_zeros(self, *size, **kwargs): return self._new_full(0, size, kwargs)

    def __bool__(self):
        raise TraceError(f"Python control flow on a traced value (if / and / or / while) at {_user_line()}; "
                         "use torch.where(...) or & | ~ (no backend runs it: torch's FlexAttention hands a mod "
                         "tensors too)")

    def __index__(self):
        raise TraceError(f"a traced value used as a Python int at {_user_line()}; use backend='reference'")

    __int__ = __float__ = __index__

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        handler = _TORCH_FUNCS.get(name)
        if handler is None:
            raise TraceError(f"torch op '{name}' is not supported in a compiled mod, at {_user_line()}; "
                             "supported: " + ", ".join(sorted(_TORCH_FUNCS)) + "; or use backend='reference'")
        return handler(*args, **kwargs)


def _clamp(x, min=None, max=None):
    out = lift(x)
    if min is not None:
        out = _binary("max", out, min)
    if max is not None:
        out = _binary("min", out, max)
    return out


def _where(cond, a, b):
    cond = lift(cond)
    if cond.node.kind != "bool":
        cond = cond.to(torch.bool)
    return _node("where", (cond, a, b))


def _getitem(tensor, index):
    if not isinstance(tensor, torch.Tensor):
        raise TraceError(f"indexing a traced value is not supported, at {_user_line()}")
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != tensor.dim():
        raise TraceError(f"a captured tensor of {tensor.dim()} dims must be indexed by {tensor.dim()} indices, "
                         f"got {len(index)}, at {_user_line()}")
    idx = [lift(i) for i in index]
    for i in idx:
        if i.node.kind == "float":
            raise TraceError(f"a captured tensor indexed by a floating value, at {_user_line()}")
        if i.node.tier > 0 and i.node.dtype not in (torch.int32, torch.int64):
            # torch reads bool and uint8 indices as masks and refuses int8 / int16 ones
            raise TraceError(f"a captured tensor indexed by a {i.node.dtype} value (torch takes bool and uint8 "
                             f"indices as masks, and no other narrow int type), at {_user_line()}; index with "
                             "int32 or int64 values, or use backend='reference'")
    if tensor.dtype not in TABLE_DTYPES:
        raise TraceError(f"a captured tensor of dtype {tensor.dtype} is not supported in a compiled mod, at "
                         f"{_user_line()}; use backend='reference'")
    name = active_tracers()[-1].tensor_name(tensor)
    nodes = tuple(i.node for i in idx)
    if all(n.tier < 2 for n in nodes):   # every index a number: torch gives a 0-d tensor
        try:
            value = tensor[tuple(n.value for n in nodes)].item()
        except IndexError as e:
            raise TraceError(f"captured tensor index out of range ({e}), at {_user_line()}") from e
        return Sym(Node("load", nodes, _kind_of_dtype(tensor.dtype), name, tensor.dtype, 1, value))
    return Sym(Node("load", nodes, _kind_of_dtype(tensor.dtype), name, tensor.dtype, 2))


def _minmax(op):
    def f(a, b=None, *args, **kwargs):
        if b is None or isinstance(b, int) and not isinstance(a, Sym) and not isinstance(b, Sym):
            raise TraceError(f"torch.{op} over a dimension is a reduction, not supported in a mod, at {_user_line()}")
        return _binary(op, a, b)
    return f


_TORCH_FUNCS = {
    "where": _where, "abs": lambda x: abs(lift(x)), "exp": lambda x: lift(x).exp(), "log": lambda x: lift(x).log(),
    "tanh": lambda x: lift(x).tanh(), "sigmoid": lambda x: lift(x).sigmoid(), "sqrt": lambda x: lift(x).sqrt(),
    "clamp": _clamp, "clip": _clamp, "minimum": _minmax("min"), "maximum": _minmax("max"),
    "min": _minmax("min"), "max": _minmax("max"), "__getitem__": _getitem,
    "add": lambda a, b: lift(a) + b, "sub": lambda a, b: lift(a) - b, "mul": lambda a, b: lift(a) * b,
    "logical_and": lambda a, b: lift(a).to(torch.bool) & lift(b).to(torch.bool),
    "logical_or": lambda a, b: lift(a).to(torch.bool) | lift(b).to(torch.bool),
    "logical_not": lambda a: ~lift(a).to(torch.bool),
    "__and__": lambda a, b: lift(a) & b, "__or__": lambda a, b: lift(a) | b, "__invert__": lambda a: ~lift(a),
    "__add__": lambda a, b: lift(a) + b, "__radd__": lambda a, b: lift(b) + a, "__sub__": lambda a, b: lift(a) - b,
    "__rsub__": lambda a, b: lift(b) - a, "__mul__": lambda a, b: lift(a) * b, "__rmul__": lambda a, b: lift(b) * a,
    "__truediv__": lambda a, b: lift(a) / b, "__rtruediv__": lambda a, b: lift(b) / a,
    "__floordiv__": lambda a, b: lift(a) // b, "__rfloordiv__": lambda a, b: lift(b) // a,
    "__mod__": lambda a, b: lift(a) % b, "__rmod__": lambda a, b: lift(b) % a,
    "__lt__": lambda a, b: lift(a) < b, "__le__": lambda a, b: lift(a) <= b, "__gt__": lambda a, b: lift(a) > b,
    "__ge__": lambda a, b: lift(a) >= b, "__eq__": lambda a, b: lift(a) == b, "__ne__": lambda a, b: lift(a) != b,
    "__neg__": lambda a: -lift(a),
}


def _parametrize(fn, tracer: _Tracer, seen: dict):
    """A copy of fn whose captured numbers are symbolic scalar parameters (recursively for
    captured functions, and tuples/lists of them)."""
    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    if id(fn) in seen:
        return seen[id(fn)]
    # the copy exists (in seen) before its cells are filled: a closure that names itself, or two
    # that name each other, get the copies instead of recursing; it keeps fn's attributes, which
    # the mod may read (mask.window)
    cells, filled = [], []
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__):
        try:
            value = cell.cell_contents
        except ValueError:
            cells.append(cell)
            continue
        cells.append(types.CellType())
        filled.append((cells[-1], var, value))
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    seen[id(fn)] = new
    for cell, var, value in filled:
        cell.cell_contents = _stand_in(var, value, tracer, seen)
    return new


def _stand_in(var, value, tracer, seen):
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        kind = "int" if isinstance(value, numbers.Integral) else "float"
        name = f"s{len(tracer.scalars)}_{var}"
        value = _checked_python(_python_number(value), f"captured number {var} =")
        tracer.scalars.append((name, kind, value))
        return Sym(Node("scalar", (), kind, name, _PYTHON_DTYPE[type(value)], 0, value))
    if isinstance(value, types.FunctionType):
        return _parametrize(value, tracer, seen)
    if isinstance(value, (tuple, list)) and any(isinstance(v, types.FunctionType) for v in value):
        return type(value)(_stand_in(var, v, tracer, seen) for v in value)
    return value


def tensors_read(mod, kind: str) -> list:
    """The captured tensors a mod's traced expression reads (tables, then 0-d values), or [] for a
    mod that does not trace."""
    try:
        graph = trace(mod, kind)
    except TraceError:
        return []
    return [t for _, t in graph.tensors] + [t for t, _ in graph.constants]


def read_state(mod, kind: str) -> ReadState | None:
    """What a plan made from mod's captured values depends on (core/versions.ReadState), or None
    for a mod that does not trace."""
    try:
        graph = trace(mod, kind)
    except TraceError:
        return None
    return ReadState(_numbers(graph), [t for _, t in graph.tensors] + [t for t, _ in graph.constants])


def _numbers(graph: Graph) -> list:
    """What a plan made from graph depends on besides its tensors: the numbers it was traced with
    (its captured scalars, and every constant in its expression in order: a module global read by
    the mod is traced in as a constant), as reprs (0.0 and -0.0 differ, a NaN equals itself), and
    the expression's structure (a global function or a flag read by the mod may change what it
    computes with the same numbers)."""
    consts, structure, index = [], [], {}
    stack = [(graph.output, False)]
    pop, push = stack.pop, stack.append
    while stack:   # post-order: a node's arguments are numbered before it
        node, expanded = pop()
        if id(node) in index:
            continue
        args = node.args
        if not expanded:
            push((node, True))
            for arg in reversed(args):
                if isinstance(arg, Node):
                    push((arg, False))
            continue
        if node.op == "const":
            consts.append(repr(node.attr))
            attr = None
        else:
            attr = repr(node.attr)
        # dtypes as themselves and the structure as a tuple, not their reprs: equal exactly when
        # the reprs are (a dtype is one object per type), without writing it out at every call
        structure.append((node.op, node.kind, attr, node.dtype, node.tier, node.compute,
                          tuple(index[id(a)] if isinstance(a, Node) else repr(a) for a in args)))
        index[id(node)] = len(structure) - 1
    return [repr(scalar) for scalar in graph.scalars] + consts + [tuple(structure)]


_LIBRARY_READS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ReadsMemo:
    """current_reads()'s last trace of a user's mods, each with a ReadGuard over what that trace
    could reach, for an object that checks them at every call (a prepared plan, a block mask): the
    trace is made again only once the guard no longer holds. Kept on that object, which holds the
    mods anyway, so it lives no longer than they do."""

    __slots__ = ("entries",)

    def __init__(self):
        self.entries = {}   # kind -> (mod, ReadGuard, numbers, tensors read)


def current_reads(mod, kind: str, memo: ReadsMemo | None = None) -> ReadState | None:
    """read_state(mod): traced once per object for a function the library made (its numbers are
    fixed when made; its tensors' counters and memory are read at every call); for any other (a
    user's mask may read a global number that changes), a library wrapper around a user's mod
    included, traced at every call, or, with a memo, again only once something its last trace
    could reach changed (read_guard.py)."""
    if not made_by_library(mod):
        return read_state(mod, kind) if memo is None else _guarded_reads(mod, kind, memo)
    cached = _LIBRARY_READS.get(mod)
    if cached is None:
        try:
            graph = trace(mod, kind)
        except TraceError:
            return None
        cached = _LIBRARY_READS.setdefault(mod, (_numbers(graph),
                                                 [t for _, t in graph.tensors] + [t for t, _ in graph.constants]))
    return ReadState(*cached)


def _guarded_reads(mod, kind: str, memo: ReadsMemo) -> ReadState | None:
    kept = memo.entries.get(kind)
    if kept is not None and kept[0] is mod and kept[1].holds():
        return ReadState(kept[2], kept[3])
    memo.entries.pop(kind, None)
    guard = read_guard(mod)   # before the trace: a trace that changes what it reads is not kept
    try:
        graph = trace(mod, kind)
    except TraceError:
        return None
    tables = [t for _, t in graph.tensors]
    numbers, read = _numbers(graph), tables + [t for t, _ in graph.constants]
    # a 0-d tensor read as a constant is compiled in by value: compared by value like any other
    if guard is not None and guard.holds() and only_read_tables(guard, tables):
        memo.entries[kind] = (mod, guard, numbers, read)
    return ReadState(numbers, read)


def stale_constants_message(constants, door: str) -> str | None:
    """Why a plan whose kernel compiled in these captured 0-d tensors ((tensor, its version when
    planned) pairs, as Graph.constants) no longer holds: one was written in place since; or None."""
    changed = moved(constants)
    if not changed:
        return None
    return (f"{door}: the score_mod reads a 0-d tensor that was written in place after planning (now "
            f"{changed[0].item():g}); its value is compiled into the FlashInfer kernel as a constant: plan "
            f"again after changing it (a tensor the mod indexes by position, such as one value per head read as "
            f"t[h], is read as it is at each call)")


# per thread, one {(id(mod), kind): (mod, Graph or TraceError)} per planning call running
# (traced_once_per_call): two threads planning at once keep their own
_CALL_MEMOS = threading.local()


def traced_once_per_call(method):
    """Decorate a planning call (prepare(), plan()): each mod it traces is traced once, since what
    a mod reads cannot change inside the call; otherwise every step that reads the mod (its
    hints, the reads kept for later calls, the route) traces a user's function again."""
    @functools.wraps(method)
    def once(*args, **kwargs):
        memos = _call_memos()
        memos.append({})
        try:
            return method(*args, **kwargs)
        finally:
            memos.pop()
    return once


def _call_memos() -> list:
    memos = getattr(_CALL_MEMOS, "stack", None)
    if memos is None:
        memos = _CALL_MEMOS.stack = []
    return memos


def trace(mod, kind: str) -> Graph:
    """Trace a 'score_mod' (score, b, h, q_idx, kv_idx) or a 'mask_mod' (b, h, q_idx, kv_idx)."""
    memos = _call_memos()
    if not memos:
        return _trace(mod, kind)
    memo, key = memos[-1], (id(mod), kind)
    seen = memo.get(key)
    if seen is None or seen[0] is not mod:
        try:
            seen = (mod, _trace(mod, kind))
        except TraceError as e:
            seen = (mod, e)
        memo[key] = seen   # holding mod: its id is not reused while the call runs
    if isinstance(seen[1], TraceError):
        raise seen[1].with_traceback(None)   # this raise's frames only, not every earlier one's
    return seen[1]


def _trace(mod, kind: str) -> Graph:
    names = ("score", "b", "h", "q_idx", "kv_idx") if kind == "score_mod" else ("b", "h", "q_idx", "kv_idx")
    tracer = _Tracer()
    fn = _parametrize(mod, tracer, {})
    # FlexAttention hands a mod float32 scores and int32 indices (tensors with dims)
    args = [Sym(Node("input", (), "float", n, torch.float32) if n == "score" else Node("input", (), "int", n, torch.int32))
            for n in names]
    tracers = active_tracers()
    tracers.append(tracer)
    try:
        out = fn(*args)
    except TraceError:
        raise
    except Exception as e:
        raise TraceError(f"{kind} {getattr(mod, '__name__', mod)!r} could not be traced: {type(e).__name__}: {e} "
                         f"(at {_user_line()}); use backend='reference'") from e
    finally:
        tracers.pop()
    out = lift(out)
    if kind == "mask_mod" and out.node.kind != "bool":
        raise TraceError(f"mask_mod {getattr(mod, '__name__', mod)!r} must return a bool, got a {out.node.kind} value")
    return Graph(out.node, names, tracer.scalars, tracer.tensors, tracer.constants)
