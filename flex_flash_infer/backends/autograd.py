"""Gradients through the FlashInfer backend.

FlashInfer's kernels compute the forward pass only: their outputs record nothing for autograd,
so a training loop that swapped torch's flex_attention for this one would get no gradient
through attention, and no error. The FlashInfer doors wrap their kernels in an autograd.Function
whose backward recomputes attention with the reference backend's differentiable torch ops (row
chunk by row chunk, so its memory stays bounded) and returns the gradients of q, k, v and of the
tensors the score_mod captures (a learned bias table). That backward is plain torch: correct,
not fast; training at speed is torch FlexAttention's job (its compiled backward kernels).

When nothing requires grad (inference, with or without torch.no_grad()) the kernels run as
they are, with nothing recorded.
"""
from __future__ import annotations

import functools
import types

import torch

from ..core.read_guard import _MAX_CHECKS, _MISSING, ReadGuard, _Unguardable, code_names, read_guard, watch_tensor
from ..core.trace import tensors_read
from ..core.versions import moved, snapshot, source_of

FORWARD_ONLY = ("the FlashInfer backend is forward-only (its kernels have no backward pass): for gradients use "
                "backend='reference' (plain torch, differentiable) or torch's own FlexAttention "
                "(torch.nn.attention.flex_attention.flex_attention, compiled, with a fused backward)")

DOUBLE_BACKWARD = ("a gradient of a gradient (create_graph=True: a gradient penalty, a Hessian product) through the "
                   "FlashInfer backend is not supported: its backward recomputes attention outside autograd; use "
                   "backend='reference' (plain torch, differentiable to any order)")

# how far the search goes: a mod's tables sit a few references away, and a mod naming a large
# object (a config, a model) must not cost more than a plan
_MAX_DEPTH = 6
_MAX_OBJECTS = 4096


def captured_tensors(fn, guard: ReadGuard | None = None) -> list:
    """The tensors requiring grad that a mod can reach: its closure, defaults, the globals its
    code names, functools.partial arguments, a bound method's object, an nn.Module's parameters
    and buffers, objects' attributes, and the containers among them. These are the score_mod's
    learned inputs (a bias table) that a gradient must reach as well as q, k and v.

    guard: filled with everything the search visits (each function's code, defaults, closure
    cells, attributes and the globals it names, the items of lists and dicts, every tensor), so
    that while it holds the search finds the same tensors; raises read_guard._Unguardable where
    the search reads what a guard cannot watch (a user's object's attributes, an nn.Module, a
    functools.partial, a set) or stops at its limits."""
    found: dict = {}
    seen: set = set()

    def visit(x, depth: int) -> None:
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                found.setdefault(id(x), x)
            if guard is not None:
                watch_tensor(guard, x)
            return
        if (depth > _MAX_DEPTH or len(seen) > _MAX_OBJECTS or id(x) in seen or x is None
                or isinstance(x, (str, bytes, int, float, bool, types.ModuleType, type))):
            if guard is not None and id(x) not in seen and not isinstance(
                    x, (type(None), str, bytes, int, float, bool, types.ModuleType, type)):
                raise _Unguardable   # past the search's limits
            return
        seen.add(id(x))
        if guard is not None:
            _watch(x, guard)
        if isinstance(x, torch.nn.Module):
            for t in (*x.parameters(), *x.buffers()):
                visit(t, depth + 1)
        elif isinstance(x, types.MethodType):
            visit(x.__func__, depth + 1)
            visit(x.__self__, depth + 1)
        elif isinstance(x, functools.partial):
            for item in (x.func, *x.args, *x.keywords.values()):
                visit(item, depth + 1)
        elif isinstance(x, types.FunctionType):
            for cell in x.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:   # a cell not yet filled
                    pass
            for item in (*(x.__defaults__ or ()), *(x.__kwdefaults__ or {}).values(), *vars(x).values()):
                visit(item, depth + 1)
            for name in code_names(x.__code__):
                if name in x.__globals__:
                    visit(x.__globals__[name], depth + 1)
        elif isinstance(x, (tuple, list, set, frozenset)):
            for item in x:
                visit(item, depth + 1)
        elif isinstance(x, dict):
            for item in x.values():
                visit(item, depth + 1)
        elif isinstance(getattr(x, "__dict__", None), dict):   # an object holding them as attributes
            for item in vars(x).values():
                visit(item, depth + 1)

    visit(fn, 0)
    if guard is not None and guard.size() > _MAX_CHECKS:
        raise _Unguardable   # not worth keeping
    return list(found.values())


def _watch(x, guard: ReadGuard) -> None:
    """Record in guard what captured_tensors reads of x (at its first visit), or raise
    _Unguardable where that may change unseen. Whatever the search does not look into (a module,
    a class, an object without attributes) is left out: it does not change what the search finds
    (what the mod's code reaches is read_guard's)."""
    if isinstance(x, types.FunctionType):
        guard.functions.append((x, x.__code__, x.__defaults__, x.__kwdefaults__, x.__dict__))
        for cell in x.__closure__ or ():
            try:
                guard.cells.append((cell, cell.cell_contents))
            except ValueError:   # a cell not yet filled: it may be filled later
                raise _Unguardable from None
        for attributes in (x.__kwdefaults__ or {}, x.__dict__):
            guard.mappings.append((attributes, tuple(attributes.items())))
        for name in code_names(x.__code__):
            guard.entries.append((x.__globals__, name, x.__globals__.get(name, _MISSING)))
    elif isinstance(x, (torch.nn.Module, functools.partial, set)):
        raise _Unguardable   # parameters registered, arguments or items changed in place
    elif isinstance(x, list):
        guard.sequences.append((x, tuple(x)))
    elif isinstance(x, dict):
        guard.mappings.append((x, tuple(x.items())))
    elif isinstance(x, (tuple, frozenset, types.MethodType)):
        pass   # fixed; their items, function and object are visited
    elif isinstance(getattr(x, "__dict__", None), dict):   # the search reads its attributes
        if not (type(x).__module__.startswith("flex_flash_infer.") and not hasattr(type(x), "__slots__")):
            raise _Unguardable   # a user's object: its attributes may change
        guard.mappings.append((vars(x), tuple(vars(x).items())))   # one of this library's, watched like a dict


def learned_tensors(score_mod, device, memo: "LearnedMemo | None" = None) -> list:
    """The tensors requiring grad a score_mod's result depends on, which a gradient must reach as
    well as q, k and v (a learned bias table): those it reads itself, as captured_tensors finds
    them, as its traced expression indexes them, and as torch operations are given them when it is
    called at position 0 (_recorded_reads: a class attribute, an object's __slots__, a 0-d tensor).
    A table computed from a parameter (bias = w * 2) is an input itself: it gets its own gradient
    (autograd.grad, retain_grad, its hooks) and autograd carries that on to the parameter. The
    backward reads each through a stand-in (StandIns), so a tensor and one derived from it, both
    inputs, each get the gradient of their own use only. Called with grad enabled only.

    memo: a LearnedMemo kept by the caller's plan: the search is made again only once something it
    could reach changed."""
    if score_mod is None:
        return []
    if memo is not None:
        if memo.mod is score_mod and memo.device == device and memo.holds():
            return list(memo.found)
        memo.mod = None
        guards = _search_guards(score_mod)   # before the search: a search that changes what it reads is not kept
    read = {id(t): t for t in captured_tensors(score_mod)}
    for t in (*_traced_tensors(score_mod), *_recorded_reads(score_mod, device)):
        read.setdefault(id(t), t)
    found = list(read.values())
    if memo is not None and guards is not None:
        memo.keep(score_mod, device, guards, found)
    return found


class LearnedMemo:
    """learned_tensors()'s last answer for a plan's score_mod, kept while nothing it depends on
    changed: what the mod's code can reach (a read_guard.ReadGuard, as its traced expression
    depends on), what captured_tensors visits (a second guard), and each of their tensors'
    requires_grad (a table unfrozen after planning is found, one frozen is dropped). The search
    traces the mod and calls it twice at position 0 (on a GPU, a launch per zeros tensor and per
    op of the mod): host work at every call with grad enabled, on inference and training alike."""

    __slots__ = ("mod", "device", "guards", "flags", "found")

    def __init__(self):
        self.mod = None

    def keep(self, mod, device, guards, found) -> None:
        code_reach, search_reach, flags = guards
        if code_reach.holds() and search_reach.holds() and all(t.requires_grad is f for t, f in flags):
            self.mod, self.device, self.guards, self.flags, self.found = mod, device, guards[:2], flags, found

    def holds(self) -> bool:
        return (all(guard.holds() for guard in self.guards)
                and all(t.requires_grad is flag for t, flag in self.flags))


def _search_guards(score_mod):
    """(guard over what the mod's code reaches, guard over what captured_tensors visits, each of
    their tensors with its requires_grad), or None where either cannot be watched."""
    code_reach = read_guard(score_mod)
    if code_reach is None:
        return None
    search_reach = ReadGuard()
    try:
        captured_tensors(score_mod, search_reach)
    except _Unguardable:
        return None
    tensors = {id(entry[0]): entry[0] for entry in code_reach.tensors + search_reach.tensors}
    return code_reach, search_reach, [(t, t.requires_grad) for t in tensors.values()]


def _tensors_in(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield from _tensors_in(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensors_in(item)


class _RecordReads(torch.overrides.TorchFunctionMode):
    """Records the tensors requiring grad that torch operations are given and that no operation
    of the same call made: what a mod reads from outside itself."""

    def __init__(self):
        super().__init__()
        self.made, self.read = {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for x in _tensors_in((args, kwargs)):
            if x.requires_grad and id(x) not in self.made:
                self.read.setdefault(id(x), x)
        out = func(*args, **kwargs)
        for x in _tensors_in(out):
            self.made[id(x)] = x   # kept alive while recording: an id is not reused
        return out


def _recorded_reads(score_mod, device) -> list:
    """The tensors requiring grad the mod reads at position 0, called twice: a tensor it makes
    from a table at its first call and keeps (a copy for another device) is read from outside at
    the second, and is then an input with a stand-in of its own, whether or not the search finds
    it; otherwise its share reaches the table only through the table itself (reference_gradients)."""
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=device)
    recorder = _RecordReads()
    try:
        with torch.enable_grad():
            for _ in range(2):
                recorder.made.clear()
                with recorder:
                    score_mod(torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=device), zero, zero, zero, zero)
    except Exception:   # the mod's own error surfaces, explained, where it is evaluated on real positions
        pass
    return list(recorder.read.values())


class StandIns(torch.overrides.TorchFunctionMode):
    """Within it, every torch operation given one of `tensors` gets its stand-in instead: a
    backward's recomputation reads a score_mod's tables as detached copies requiring grad, so the
    gradient it asks autograd for stops there. Without them the recomputation's own autograd.grad
    ran the user's hooks on a table (a hook scaling its gradient acted twice: the table's gradient
    came out 2x), filled a retained .grad, and counted a derived table's part of its parameter's
    gradient twice."""

    def __init__(self, tensors, stand_ins):
        super().__init__()
        self.swap = {id(t): s for t, s in zip(tensors, stand_ins)}

    def _swapped(self, x):
        if isinstance(x, torch.Tensor):
            if id(x) not in self.swap:
                # a copy a library mod keeps on another device (mods/_captured.follow_device):
                # the stand-in's own copy, made once
                source = source_of(x)
                if source is x or id(source) not in self.swap:
                    return x
                self.swap[id(x)] = self.swap[id(source)].to(device=x.device, dtype=x.dtype)
            return self.swap[id(x)]
        if isinstance(x, (tuple, list)):
            return type(x)(self._swapped(item) for item in x)
        if isinstance(x, dict):
            return {key: self._swapped(item) for key, item in x.items()}
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*self._swapped(args), **self._swapped(kwargs or {}))


def _traced_tensors(score_mod) -> list:
    from ..core.trace import TraceError, trace
    try:
        graph = trace(score_mod, "score_mod")
    except TraceError:   # such a mod runs on the reference backend, which records its own graph
        return []
    return [t for _, t in graph.tensors if t.requires_grad]


def needs_grad(*tensors) -> bool:
    """Whether an output computed from these tensors must carry a grad_fn."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _RecomputedBackward(torch.autograd.Function):
    """forward: run() (the kernels, outside autograd); backward: backward(saved inputs, grad_out,
    grad_lse, which inputs need a gradient) -> one gradient (or None) per input."""

    @staticmethod
    def forward(ctx, run, backward, watched, *inputs):
        ctx.backward_fn = backward
        ctx.watched = watched
        ctx.save_for_backward(*inputs)
        out, lse = run()
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():   # create_graph=True: these gradients would carry no graph of their own
            raise RuntimeError(DOUBLE_BACKWARD)
        if moved(ctx.watched):
            # as torch's own error for a saved tensor: the recomputation would read the new values
            raise RuntimeError("flex_flash_infer: a tensor the mask_mod, score_mod or block mask reads was modified by "
                               "an inplace operation between the forward and the backward; the backward recomputes "
                               "attention and would read its new values. Write it after backward(), or pass a copy")
        grads = ctx.backward_fn(ctx.saved_tensors, grad_out, grad_lse, ctx.needs_input_grad[3:])
        return (None, None, None, *grads)


def with_recomputed_gradients(run, backward, inputs, watched=()):
    """(out, lse) of run(), carrying a grad_fn whose backward is backward(...) (see
    _RecomputedBackward); inputs are the tensors the gradients are for; watched, a
    core/versions.snapshot of the other tensors the recomputation reads (tables), makes the
    backward raise when one was written in place since the forward."""
    return _RecomputedBackward.apply(run, backward, watched, *inputs)


def recomputation_reads(score_mod, mask_mod, block_mask=None) -> tuple:
    """A snapshot of what a backward's recomputation reads besides q, k, v and learned tensors:
    the tensors the mods' traced expressions read and the block mask's tables."""
    tables = [t for t in (getattr(block_mask, name, None) for name in
                          ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"))
              if isinstance(t, torch.Tensor)]
    mods = (tensors_read(score_mod, "score_mod") if score_mod is not None else []) + (
        tensors_read(mask_mod, "mask_mod") if mask_mod is not None else [])
    return snapshot([t for t in mods if not t.requires_grad] + tables)


def anchored(inputs, *outputs):
    """outputs unchanged in value, but reaching inputs in autograd (with zero gradients), for
    results built without touching them (every row empty): the sum of an empty slice is an
    exact 0 even where an input holds NaN or inf."""
    anchor = sum(t[..., :0].sum() for t in inputs if t.requires_grad)
    return tuple(o + anchor.to(o.dtype) for o in outputs)


class _ForwardOnly(torch.autograd.Function):
    """forward: run(); backward: raises message. Outputs that a gradient cannot be computed for
    still carry a grad_fn, so the loss of a training step says so rather than dropping them."""

    @staticmethod
    def forward(ctx, run, message, *inputs):
        ctx.message = message
        out, lse = run()
        return out, lse

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def forward_only(run, message: str, inputs):
    """(out, lse) of run(), with a grad_fn (when an input requires grad) whose backward raises message."""
    return _ForwardOnly.apply(run, message, *inputs)
