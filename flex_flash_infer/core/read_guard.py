"""Whether a user's mod could trace differently than last time, told without tracing it again.

A plan made from a user's mask_mod holds while what the mod reads is unchanged: a global number,
a closure's value, a helper function, a table. trace.current_reads() used to trace the mod at every
call to find out (most of a short call's host work). A ReadGuard instead records
every Python object the mod's trace can reach, by identity: its code, defaults, closure cells and
attributes (`mask.widths`), the globals and builtins its code (and its nested functions' code)
names, the items of the lists, tuples and dicts among them, recursively through the functions it
calls, the attributes its code names on the trusted modules it reaches (`torch.x = ...` set by
hand), torch's default dtype and device; and, for each tensor it reaches, its write counter,
memory, shape and strides, and on the CPU its values (a Python-level read such as int(t[0]) puts a
value into the trace, and a numpy or `.data` write moves no counter).

A mod that reaches anything whose contents can change without any of that changing gets no guard
and is traced at every call, as before: an object's attributes (an nn.Module, a namespace, a tensor
with attributes set on it), a user module, a functools.partial, a bound method, a subclass of a
container, a CPU tensor past _MAX_COPIED_BYTES, a tensor made under inference_mode that the trace
does not read as a table, a globals mapping that is not a dict, and code naming a way to read what
its names do not show (globals(), getattr, eval) or torch's global state (grad mode, random
numbers). Modules and module-level functions of torch, math, operator and this library are taken
as they are (a mod calling torch.where does not depend on torch's globals), closures made there
are followed (and_masks holds a user's mods); a function the library made that states hints is
fixed when made, as trace._LIBRARY_READS already assumes.
"""
from __future__ import annotations

import builtins
import dis
import sys
import types

import torch

from .hints import made_by_library
from .versions import _memory, same_values, source_of, version_of

_MISSING = object()
# a guard past these many checks is not worth keeping (a mod reaching a large structure)
_MAX_CHECKS = 256
# a CPU tensor copied to be compared by value at each call: at most this many bytes
_MAX_COPIED_BYTES = 4096
# exact types (a subclass may carry attributes): immutable, and holding nothing else
_LEAF_TYPES = frozenset((type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, range,
                         type(Ellipsis), type(NotImplemented)))
# names through which code reads what its names do not show (globals()['W'], getattr, eval) or
# torch's global state and random numbers: a mod naming one is traced at every call
_DYNAMIC_NAMES = frozenset((
    "globals", "locals", "vars", "getattr", "eval", "exec", "__import__", "compile", "sys", "importlib", "os",
    "is_grad_enabled", "is_inference_mode_enabled", "are_deterministic_algorithms_enabled", "get_default_device",
    "get_num_threads", "is_autocast_enabled", "get_float32_matmul_precision", "get_rng_state", "initial_seed",
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "random", "uniform", "exponential", "seed", "manual_seed"))
# modules whose globals a mod's trace takes as they are: torch's, Python's own, and this library's
_TRUSTED_MODULES = ("torch", "math", "operator", "builtins", "numbers", "flex_flash_infer")


class _Unguardable(Exception):
    """The mod reaches something whose contents a guard cannot watch."""


def _defined_in_trusted_module(obj) -> bool:
    """Whether obj is what a trusted module holds under obj's own name: functools.wraps copies a
    library function's __module__ and __qualname__ onto a user's function, which must not pass."""
    name = getattr(obj, "__module__", None)
    if not _trusted_module_name(name):
        return False
    found = sys.modules.get(name)
    for part in getattr(obj, "__qualname__", "<unknown>").split("."):
        found = getattr(found, part, None)
    return found is obj


def _trusted_module_name(name) -> bool:
    return isinstance(name, str) and (name in _TRUSTED_MODULES or name.split(".", 1)[0] in _TRUSTED_MODULES)


_NAMES_OF_CODE: dict = {}


def code_names(code: types.CodeType) -> tuple:
    """Every name code and the code nested in it (lambdas, inner functions) may look up as a global
    (attribute names among them: looking those up too only adds checks)."""
    names = _NAMES_OF_CODE.get(code)
    if names is None:
        found, stack = set(), [code]
        while stack:
            c = stack.pop()
            found.update(c.co_names)
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        names = _NAMES_OF_CODE[code] = tuple(sorted(found))
    return names


def _default_device_context():
    """The object torch.set_default_device() installs (a new one at each call), or None: what a
    tensor the mod makes (torch.empty(0)) lands on. Read by identity: get_default_device() costs
    more than the rest of holds()."""
    context = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)
    return getattr(context, "device_context", None) if context is not None else torch.get_default_device()


_IMPORTS_OF_CODE: dict = {}


def _imports(code: types.CodeType) -> bool:
    """Whether code (or code nested in it) imports: `import cfg` inside a mod takes the module from
    sys.modules, which no name of its globals shows."""
    found = _IMPORTS_OF_CODE.get(code)
    if found is None:
        stack, found = [code], False
        while stack and not found:
            c = stack.pop()
            found = any(i.opname in ("IMPORT_NAME", "IMPORT_FROM") for i in dis.get_instructions(c))
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        _IMPORTS_OF_CODE[code] = found
    return found


class ReadGuard:
    """What a mod's trace can reach, as recorded by read_guard(); holds() tells whether all of it is
    as it was."""

    __slots__ = ("cells", "entries", "functions", "sequences", "mappings", "tensors", "copies", "default_dtype",
                 "device_context", "modules", "names")

    def __init__(self):
        self.modules = []      # trusted modules reached: the attributes the code names are watched on them
        self.names = set()     # every name the visited code names
        self.cells = []        # (cell, its contents)
        self.entries = []      # (dict, key, value or _MISSING): globals, builtins, keyword defaults
        self.functions = []    # (function, code, defaults, keyword defaults dict)
        self.sequences = []    # (list, its items as a tuple)
        self.mappings = []     # (dict, its items as a tuple, in order)
        self.tensors = []      # (tensor, version, memory, shape, strides, dtype, device)
        self.copies = []       # (CPU tensor, a copy of its values)
        self.default_dtype = torch.get_default_dtype()
        self.device_context = _default_device_context()

    def size(self) -> int:
        return (len(self.cells) + len(self.entries) + len(self.functions) + len(self.sequences)
                + len(self.mappings) + len(self.tensors))

    def holds(self) -> bool:
        if torch.get_default_dtype() is not self.default_dtype or _default_device_context() is not self.device_context:
            return False
        for fn, code, defaults, kwdefaults, attributes in self.functions:
            if (fn.__code__ is not code or fn.__defaults__ is not defaults or fn.__kwdefaults__ is not kwdefaults
                    or fn.__dict__ is not attributes):   # fn.__dict__ = {...} replaces the dict whose items are watched
                return False
        for cell, value in self.cells:
            try:
                if cell.cell_contents is not value:
                    return False
            except ValueError:   # emptied since
                return False
        for mapping, key, value in self.entries:
            if mapping.get(key, _MISSING) is not value:
                return False
        for seq, items in self.sequences:
            if len(seq) != len(items) or any(a is not b for a, b in zip(seq, items)):
                return False
        for mapping, items in self.mappings:
            if len(mapping) != len(items) or any(k is not k2 or v is not v2
                                                 for (k, v), (k2, v2) in zip(mapping.items(), items)):
                return False
        for t, version, memory, shape, strides, dtype, device in self.tensors:
            if (version_of(t) != version or t.shape != shape or t.dtype != dtype or t.device != device
                    or t.stride() != strides or _memory(t) != memory or t.__dict__):   # an attribute set since
                return False
        return all(same_values(t, copy) for t, copy in self.copies)


def read_guard(mod) -> ReadGuard | None:
    """A guard over everything mod's trace can reach, or None where that includes something a guard
    cannot watch (then the mod must be traced at every call)."""
    guard = ReadGuard()
    seen = set()
    try:
        _visit(mod, guard, seen, top=True)
        _watch_module_attributes(guard, seen)
    except _Unguardable:
        return None
    return guard if guard.size() <= _MAX_CHECKS else None


def _watch_module_attributes(guard: ReadGuard, seen: set) -> None:
    """On every trusted module reached (torch, math, this library, and their submodules reached
    through them), and on torch.Tensor's class, each attribute the code names: one set or replaced
    by hand (torch.my_window = 16, math.floor = ..., torch.Tensor.clamp = ...) changes what the mod
    computes without changing the module object. Repeated until no new name or module appears (a
    function found there names more)."""
    done = {}   # id(namespace) -> the names watched on it
    namespaces = [vars(torch.Tensor), vars(torch._C.TensorBase)] if guard.tensors else []
    while True:
        while guard.modules:
            namespaces.append(vars(guard.modules.pop()))
        pending = [(ns, name) for ns in namespaces for name in tuple(guard.names)
                   if name not in done.setdefault(id(ns), set())]
        if not pending:
            return
        for namespace, name in pending:
            done[id(namespace)].add(name)
            found = namespace.get(name, _MISSING)
            guard.entries.append((namespace, name, found))
            if found is not _MISSING:
                _visit(found, guard, seen)


def only_read_tables(guard: ReadGuard, tables) -> bool:
    """After tracing, the value comparisons the guard needs: each CPU tensor it reached is compared
    by value at each call (a Python-level read such as int(t[0]), or a 0-d constant, puts its value
    into the trace, and a numpy or `.data` write moves no counter). False where that cannot be done:
    a CPU tensor past _MAX_COPIED_BYTES (traced at every call instead), an inference tensor not
    read as a table (`tables`, the graph's tensors)."""
    read_ids = {id(source_of(t)) for t in tables} | {id(t) for t in tables}
    for t, version, *_ in guard.tensors:
        as_table = id(t) in read_ids
        if version is None and not as_table:
            return False
        if t.device.type != "cpu":
            continue   # trusted by its counter and memory, as the FlashInfer path trusts device tables
        if t.numel() * t.element_size() > _MAX_COPIED_BYTES:
            return False
        guard.copies.append((t, t.detach().clone()))
    return True


def watch_tensor(guard: ReadGuard, t: torch.Tensor) -> None:
    """guard watches t's write counter, memory and form; a tensor with Python attributes (t.window,
    which a mod may read) cannot be watched."""
    if t.__dict__:
        raise _Unguardable
    guard.tensors.append((t, version_of(t), _memory(t), t.shape, t.stride(), t.dtype, t.device))


def _visit(value, guard: ReadGuard, seen: set, top: bool = False) -> None:
    kind = type(value)
    if kind in _LEAF_TYPES:
        return
    if kind is slice:
        for part in (value.start, value.stop, value.step):
            _visit(part, guard, seen)
        return
    key = id(value)
    if key in seen:
        return
    seen.add(key)
    if guard.size() > _MAX_CHECKS:
        raise _Unguardable
    if isinstance(value, torch.Tensor):
        if kind not in (torch.Tensor, torch.nn.Parameter) or value.__dict__:
            raise _Unguardable   # a subclass, or Python attributes set on it (t.window = 16)
        watch_tensor(guard, value)
        return
    if isinstance(value, types.ModuleType):
        if _trusted_module_name(value.__name__):
            guard.modules.append(value)
            return
        raise _Unguardable
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        owner = getattr(value, "__self__", None)
        if owner is None or isinstance(owner, types.ModuleType) or owner is builtins:
            return   # a builtin function (len, min, torch.where): nothing of it changes
        raise _Unguardable   # a builtin method bound to an object (some_dict.get)
    if isinstance(value, type):
        if value.__module__ == "builtins" or _defined_in_trusted_module(value):
            return
        raise _Unguardable
    if isinstance(value, types.FunctionType):
        _visit_function(value, guard, seen, top)
        return
    if kind is tuple:
        for item in value:
            _visit(item, guard, seen)
        return
    if kind is list:
        guard.sequences.append((value, tuple(value)))
        for item in value:
            _visit(item, guard, seen)
        return
    if type(value) is dict:
        items = tuple(value.items())
        guard.mappings.append((value, items))
        for k, item in items:
            _visit(k, guard, seen)
            _visit(item, guard, seen)
        return
    if (type(value).__module__.startswith("flex_flash_infer.") and hasattr(value, "__dict__")
            and not hasattr(type(value), "__slots__")):
        # one of this library's objects (a mask callable in the seed's form too): its class's code
        # is the library's, its attributes (the mods it wraps) are watched like a dict's items
        attributes = vars(value)
        guard.mappings.append((attributes, tuple(attributes.items())))
        for item in attributes.values():
            _visit(item, guard, seen)
        return
    if isinstance(value, (types.MethodDescriptorType, types.WrapperDescriptorType, types.ClassMethodDescriptorType,
                          types.GetSetDescriptorType, types.MemberDescriptorType)):
        return   # a C type's unbound method or attribute (torch.Tensor.add, .device): nothing of it changes
    raise _Unguardable   # an object (an nn.Module, a namespace, a partial): its attributes may change


def _visit_function(fn: types.FunctionType, guard: ReadGuard, seen: set, top: bool) -> None:
    if not top and made_by_library(fn):
        # what it computes is fixed when made, but a user's code may read its attributes
        # (doc.document_ids) and re-bind them: their identities are watched
        guard.functions.append((fn, fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__dict__))
        guard.mappings.append((fn.__dict__, tuple(fn.__dict__.items())))
        return
    if not top and fn.__closure__ is None and _defined_in_trusted_module(fn):
        return   # a module-level function of torch or this library (a closure made there may hold a user's mod)
    if type(fn.__globals__) is not dict:
        raise _Unguardable   # a mapping whose lookups may answer what .get() does not (__missing__)
    names = code_names(fn.__code__)
    if not _DYNAMIC_NAMES.isdisjoint(names) or _imports(fn.__code__):
        raise _Unguardable
    guard.names.update(names)
    guard.functions.append((fn, fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__dict__))
    attributes = fn.__dict__   # fn.window = 16, read by the mod as an attribute of itself or a helper
    guard.mappings.append((attributes, tuple(attributes.items())))
    for item in attributes.values():
        _visit(item, guard, seen)
    for item in fn.__defaults__ or ():
        _visit(item, guard, seen)
    if fn.__kwdefaults__:
        for name, item in fn.__kwdefaults__.items():
            guard.entries.append((fn.__kwdefaults__, name, item))
            _visit(item, guard, seen)
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:
            raise _Unguardable from None   # a cell not yet filled: it may be filled later
        guard.cells.append((cell, contents))
        _visit(contents, guard, seen)
    fn_globals, fn_builtins = fn.__globals__, getattr(fn, "__builtins__", builtins.__dict__)
    if not isinstance(fn_builtins, dict):
        fn_builtins = getattr(fn_builtins, "__dict__", builtins.__dict__)
    for name in names:
        found = fn_globals.get(name, _MISSING)
        guard.entries.append((fn_globals, name, found))
        if found is _MISSING:
            found = fn_builtins.get(name, _MISSING)
            guard.entries.append((fn_builtins, name, found))
            if found is _MISSING:
                continue
        _visit(found, guard, seen)
