"""Trace a score_mod / mask_mod into a small expression graph, without running it on data.

The mod is called once on symbolic values (Sym). Operators, torch functions (through
__torch_function__) and indexing of captured tensors build nodes; captured Python numbers
become named scalar parameters (the closure is rebuilt with symbolic stand-ins), so their
values are kernel arguments and changing them does not change the graph. Python control flow
on a traced value cannot be expressed and raises TraceError naming the line.
"""
from __future__ import annotations

import hashlib
import inspect
import numbers
import types
from dataclasses import dataclass, field

import torch

KINDS = ("bool", "int", "float")
_RANK = {"bool": 0, "int": 1, "float": 2}


class TraceError(TypeError):
    """A mod that cannot be compiled into a kernel; the message names the op and the line."""


@dataclass(eq=False)
class Node:
    op: str
    args: tuple
    kind: str
    attr: object = None


@dataclass
class Graph:
    output: Node
    inputs: tuple            # names of the mod's arguments in order
    scalars: list = field(default_factory=list)   # (name, kind, value)
    tensors: list = field(default_factory=list)   # (name, tensor)

    def key(self) -> str:
        """Stable hash of the structure (not of captured values)."""
        from .codegen import emit_expression

        text = emit_expression(self, lambda n: n, lambda n: n)
        meta = [(n, k) for n, k, _ in self.scalars] + [(n, str(t.dtype), t.dim()) for n, t in self.tensors]
        return hashlib.sha256(repr((text, meta, self.inputs)).encode()).hexdigest()[:16]


def _promote(*kinds) -> str:
    return max(kinds, key=_RANK.__getitem__)


def _kind_of_dtype(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


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
        self._tensor_names = {}

    def tensor_name(self, t: torch.Tensor) -> str:
        if id(t) not in self._tensor_names:
            name = f"t{len(self.tensors)}"
            self._tensor_names[id(t)] = name
            self.tensors.append((name, t))
        return self._tensor_names[id(t)]


_ACTIVE: list = []


def lift(x) -> "Sym":
    if isinstance(x, Sym):
        return x
    if isinstance(x, bool):
        return Sym(Node("const", (), "bool", x))
    if isinstance(x, numbers.Integral):
        return Sym(Node("const", (), "int", int(x)))
    if isinstance(x, numbers.Real):
        return Sym(Node("const", (), "float", float(x)))
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        return lift(x.item())
    raise TraceError(f"cannot use a value of type {type(x).__name__} ({x!r:.40}) in a traced mod at {_user_line()}")


def _binary(op, a, b, kind=None):
    a, b = lift(a), lift(b)
    return Sym(Node(op, (a.node, b.node), kind or _promote(a.node.kind, b.node.kind)))


def _unary(op, a, kind=None):
    a = lift(a)
    return Sym(Node(op, (a.node,), kind or a.node.kind))


def _logic(op, a, b):
    a, b = lift(a), lift(b)
    kind = "bool" if a.node.kind == b.node.kind == "bool" else _promote(a.node.kind, b.node.kind)
    if kind == "float":
        raise TraceError(f"'{op}' of floating values is not defined, at {_user_line()}")
    return Sym(Node(op, (a.node, b.node), kind))


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
    def __neg__(self): return _unary("neg", self, _promote(self.node.kind, "int"))
    def __abs__(self): return _unary("abs", self, _promote(self.node.kind, "int"))
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
    def bool(self): return self.to(torch.bool)

    def to(self, dtype=None, *args, **kwargs):
        if not isinstance(dtype, torch.dtype):
            return self  # .to(device) and friends do not change the value
        return Sym(Node("cast", (self.node,), _kind_of_dtype(dtype)))

    def new_ones(self, *args, **kwargs): return lift(True if kwargs.get("dtype") == torch.bool else 1)
    def new_zeros(self, *args, **kwargs): return lift(False if kwargs.get("dtype") == torch.bool else 0)

    def __bool__(self):
        raise TraceError(f"Python control flow on a traced value (if / and / or / while) at {_user_line()}; "
                         "use torch.where(...) or & | ~, or run this mod with backend='reference'")

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
    cond, a, b = lift(cond), lift(a), lift(b)
    if cond.node.kind != "bool":
        cond = cond.to(torch.bool)
    return Sym(Node("where", (cond.node, a.node, b.node), _promote(a.node.kind, b.node.kind)))


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
    name = _ACTIVE[-1].tensor_name(tensor)
    return Sym(Node("load", tuple(i.node for i in idx), _kind_of_dtype(tensor.dtype), name))


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
    cells = []
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__):
        try:
            value = cell.cell_contents
        except ValueError:
            cells.append(cell)
            continue
        cells.append(types.CellType(_stand_in(var, value, tracer, seen)))
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    seen[id(fn)] = new
    return new


def _stand_in(var, value, tracer, seen):
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        kind = "int" if isinstance(value, numbers.Integral) else "float"
        name = f"s{len(tracer.scalars)}_{var}"
        tracer.scalars.append((name, kind, value))
        return Sym(Node("scalar", (), kind, name))
    if isinstance(value, types.FunctionType):
        return _parametrize(value, tracer, seen)
    if isinstance(value, (tuple, list)) and any(isinstance(v, types.FunctionType) for v in value):
        return type(value)(_stand_in(var, v, tracer, seen) for v in value)
    return value


def trace(mod, kind: str) -> Graph:
    """Trace a 'score_mod' (score, b, h, q_idx, kv_idx) or a 'mask_mod' (b, h, q_idx, kv_idx)."""
    names = ("score", "b", "h", "q_idx", "kv_idx") if kind == "score_mod" else ("b", "h", "q_idx", "kv_idx")
    tracer = _Tracer()
    fn = _parametrize(mod, tracer, {})
    args = [Sym(Node("input", (), "float" if n == "score" else "int", n)) for n in names]
    _ACTIVE.append(tracer)
    try:
        out = fn(*args)
    except TraceError:
        raise
    except Exception as e:
        raise TraceError(f"{kind} {getattr(mod, '__name__', mod)!r} could not be traced: {type(e).__name__}: {e} "
                         f"(at {_user_line()}); use backend='reference'") from e
    finally:
        _ACTIVE.pop()
    out = lift(out)
    if kind == "mask_mod" and out.node.kind != "bool":
        raise TraceError(f"mask_mod {getattr(mod, '__name__', mod)!r} must return a bool, got a {out.node.kind} value")
    return Graph(out.node, names, tracer.scalars, tracer.tensors)
