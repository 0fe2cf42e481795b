"""Planner hints a function states about itself (a library mask's bands, a soft cap's cap, a
relative bias's constant beyond its reach): the planner trusts some of them without checking, so
a hint counts only on the very function object that stated it. functools.wraps copies a
function's attributes onto a wrapper that may compute something else (a causal mask that also
hides key 0): such a copy is an attribute, not a stated hint, and the planner reads the wrapper's
expression instead."""
from __future__ import annotations

import weakref

import torch

_STATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# every hint the library states (planning/linear_masks.LOWERING_HINTS and the score_mod ones)
HINT_NAMES = ("band_hint", "document_ids", "key_columns_hint", "logits_soft_cap", "constant_beyond")


def state_hint(fn, name: str, value) -> None:
    """fn states the hint `name`: set as its attribute (for a reader's eye) and registered. A mod
    made while torch.compile traces (a factory called inside a compiled function around torch's
    own flex_attention) states none: dynamo replays the registry's weak reference on a function
    that is gone ("weak object has gone away"), and the hints serve this library's planner only."""
    if torch.compiler.is_compiling():
        return
    setattr(fn, name, value)
    _STATED.setdefault(fn, {})[name] = value


def stated_hint(fn, name: str):
    """The hint fn itself stated and still carries, or None (an attribute copied from another
    function, set by hand, or changed since)."""
    try:
        stated = _STATED.get(fn)
    except TypeError:   # an object that cannot be weakly referenced states nothing
        return None
    if not stated or name not in stated:
        return None
    value = stated[name]
    return value if getattr(fn, name, None) is value else None


def states_hints(fn) -> bool:
    """Whether fn stated any hint: a function the library made (its structure fixed when made)."""
    try:
        stated = _STATED.get(fn)
    except TypeError:
        return False
    return bool(stated) and any(getattr(fn, name, None) is value for name, value in stated.items())


# functions the library wrapped around a user's mod to state a hint read off its expression: they
# state hints, but what they read is the user's and may change between calls
_AROUND_USERS: "weakref.WeakSet" = weakref.WeakSet()


def around_users_mod(fn):
    """Mark fn, which states hints, as computing a user's mod (what it reads is checked at every call)."""
    _AROUND_USERS.add(fn)
    return fn


def made_by_library(fn) -> bool:
    """A function the library made whose numbers and structure are fixed when made (it states
    hints and wraps no user's mod)."""
    return states_hints(fn) and fn not in _AROUND_USERS


def pass_hints(fn, mod, names=HINT_NAMES) -> None:
    """fn states the hints mod stated (a wrapper that still computes what mod computes); a wrapper
    of a function around a user's mod is one too (what it reads is the user's)."""
    for name in names:
        value = stated_hint(mod, name)
        if value is not None:
            state_hint(fn, name, value)
    try:
        around = mod in _AROUND_USERS
    except TypeError:   # an object that cannot be weakly referenced wraps nothing of a user's
        around = False
    if around:
        _AROUND_USERS.add(fn)
