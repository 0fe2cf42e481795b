"""A user's mod is traced again at a call only once something its last trace could reach changed
(core/read_guard.py): whatever is changed between calls, the memo's answer is the answer of a
fresh trace, and a change that matters is seen by both."""
import builtins
import types

import numpy as np
import pytest
import torch

from flex_flash_infer import and_masks, get_mask_fn
from flex_flash_infer.core.read_guard import read_guard
from flex_flash_infer.core.trace import ReadsMemo, current_reads, read_state


def _module_function(source: str, name: str, **globals_):
    """A function defined in its own module namespace (its globals), as a user's file would."""
    namespace = {"torch": torch, "__builtins__": builtins, **globals_}
    exec(compile(source, f"<user module {name}>", "exec"), namespace)
    return namespace[name], namespace


def _agrees(mod, memo, kind="mask_mod"):
    got, fresh = current_reads(mod, kind, memo), read_state(mod, kind)
    assert got is not None and fresh is not None
    assert got.scalars == fresh.scalars
    assert got.same_as(fresh) and fresh.same_as(got)
    return fresh


_UNDO = []   # what a scenario patched on torch itself, put back after it


def _patch(owner, name, value):
    _UNDO.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _scenarios():
    """name -> () -> (mod, change): change() alters what mod computes."""
    def global_number():
        mod, g = _module_function("def mask(b, h, q, kv):\n    return (q >= kv) & (q - kv < W)\n", "mask", W=3)
        return mod, lambda: g.__setitem__("W", 5)

    def closure_rebound():
        w = 3

        def mask(b, h, q, kv):
            return (q >= kv) & (q - kv < w)

        def change():
            nonlocal w
            w = 5
        return mask, change

    def list_item():
        widths = [3, 4]
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < widths[0])), lambda: widths.__setitem__(0, 5)

    def dict_item():
        cfg = {"w": 3}
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < cfg["w"])), lambda: cfg.__setitem__("w", 5)

    def object_attribute():
        cfg = types.SimpleNamespace(w=3)
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < cfg.w)), lambda: setattr(cfg, "w", 5)

    def helper_reads_a_global():
        helper, g = _module_function("def helper(q, kv):\n    return q - kv < W\n", "helper", W=3)
        mask, _ = _module_function("def mask(b, h, q, kv):\n    return (q >= kv) & helper(q, kv)\n", "mask",
                                   helper=helper)
        return mask, lambda: g.__setitem__("W", 5)

    def helper_rebound():
        mask, g = _module_function("def helper(q, kv):\n    return q - kv < 3\n"
                                   "def mask(b, h, q, kv):\n    return (q >= kv) & helper(q, kv)\n", "mask")
        return mask, lambda: g.__setitem__("helper", lambda q, kv: q - kv < 5)

    def default_argument():
        def mask(b, h, q, kv, w=3):
            return (q >= kv) & (q - kv < w)
        return mask, lambda: setattr(mask, "__defaults__", (5,))

    def function_attribute_rebound():
        mask, _ = _module_function("def mask(b, h, q, kv):\n    return (q >= kv) & (q - kv < mask.widths[h])\n",
                                   "mask")
        mask.widths = torch.tensor([3, 4, 5, 6])
        return mask, lambda: setattr(mask, "widths", torch.tensor([9, 4, 5, 6]))

    def function_dict_replaced():
        mask, _ = _module_function("def mask(b, h, q, kv):\n    return (q >= kv) & (q - kv < mask.w)\n", "mask")
        mask.w = 3
        return mask, lambda: setattr(mask, "__dict__", {"w": 5})

    def helper_wearing_a_library_functions_name():   # functools.wraps copies __module__ and __qualname__
        import functools

        from flex_flash_infer import noop_mask

        helper, g = _module_function("def helper(b, h, q, kv):\n    return q - kv < W\n", "helper", W=3)
        helper = functools.wraps(noop_mask)(helper)
        mask = lambda b, h, q, kv: (q >= kv) & helper(b, h, q, kv)
        return mask, lambda: g.__setitem__("W", 5)

    def tensor_method_patched():
        table = torch.tensor([3, 4, 5, 6])
        clamp = torch.Tensor.clamp
        mask = lambda b, h, q, kv: (q >= kv) & (q - kv < table.clamp(max=4)[h])
        return mask, lambda: _patch(torch.Tensor, "clamp", lambda self, max=None: clamp(self, max=max - 2))

    def torch_function_replaced_by_a_python_one():   # once crashed the guard (a set grew while read)
        inverted, _ = _module_function("def where(c, a, b):\n    return torch_where(c, ~a, b)\n", "where",
                                       torch_where=torch.where)   # names a global: the guard's names grow
        mask = lambda b, h, q, kv: torch.where(q >= kv, q - kv < 3, False)
        return mask, lambda: _patch(torch, "where", inverted)

    def attribute_of_a_library_mask_rebound():
        from flex_flash_infer.mods import generate_document_mask_mod

        doc = generate_document_mask_mod(document_ids=torch.tensor([0] * 8 + [1] * 8))
        mask, _ = _module_function("def mask(b, h, q, kv):\n    ids = doc.document_ids\n"
                                   "    return (ids[q] == ids[kv]) & (q >= kv)\n", "mask", doc=doc)
        return mask, lambda: setattr(doc, "document_ids", torch.tensor([0] * 4 + [1] * 12))

    def module_imported_inside_the_mod():   # import takes it from sys.modules, not from a global
        import sys

        config = types.ModuleType("test_read_guard_config")
        config.W = 3
        sys.modules["test_read_guard_config"] = config
        mask, _ = _module_function("def mask(b, h, q, kv):\n    import test_read_guard_config as cfg\n"
                                   "    return (q >= kv) & (q - kv < cfg.W)\n", "mask")
        return mask, lambda: setattr(config, "W", 5)

    def global_looked_up_by_name():
        mod, g = _module_function("def mask(b, h, q, kv):\n    return (q >= kv) & (q - kv < globals()['W'])\n",
                                  "mask", W=3)
        return mod, lambda: g.__setitem__("W", 5)

    def attribute_set_on_a_trusted_module():
        import flex_flash_infer.mods as library_mods

        library_mods.test_read_guard_window = 3
        mask = lambda b, h, q, kv: (q >= kv) & (q - kv < library_mods.test_read_guard_window)
        return mask, lambda: setattr(library_mods, "test_read_guard_window", 5)

    def torch_grad_mode():
        mask = lambda b, h, q, kv: (q >= kv) & (q - kv < (3 if torch.is_grad_enabled() else 5))
        return mask, lambda: torch.set_grad_enabled(not torch.is_grad_enabled())

    def attribute_set_on_a_tensor():
        table = torch.tensor([3, 4])
        table.window = 3
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < table.window)), lambda: setattr(table, "window", 5)

    def code_replaced():
        def mask(b, h, q, kv):
            return (q >= kv) & (q - kv < 3)

        def other(b, h, q, kv):
            return (q >= kv) & (q - kv < 5)
        return mask, lambda: setattr(mask, "__code__", other.__code__)

    def builtin_shadowed():
        mask, g = _module_function("def mask(b, h, q, kv):\n    return (q >= kv) & (q - kv < min(3, 9))\n", "mask")
        return mask, lambda: g.__setitem__("min", max)

    def python_level_tensor_read_written_through_numpy():
        t = torch.tensor([3, 4])
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < int(t[0]))), lambda: t.numpy().__setitem__(0, 5)

    def python_level_tensor_read_data_rebound():
        t = torch.tensor([3, 4])
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < int(t[0]))), lambda: setattr(t, "data", torch.tensor([5, 4]))

    def zero_d_constant_written_through_numpy():
        c = torch.tensor(3)
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < c)), lambda: c.numpy().__setitem__((), 5)

    def zero_d_constant_written_in_place():
        c = torch.tensor(3)
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < c)), lambda: c.fill_(5)

    def table_written_in_place():
        table = torch.tensor([3, 4, 5, 6])
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < table[h])), lambda: table.__setitem__(0, 9)

    def table_re_bound_in_a_dict():
        on_device = {"cpu": torch.tensor([3, 4, 5, 6])}
        return ((lambda b, h, q, kv: (q >= kv) & (q - kv < on_device["cpu"][h])),
                lambda: on_device.__setitem__("cpu", torch.tensor([9, 4, 5, 6])))

    def library_mask_around_a_users():
        mask, g = _module_function("def mine(b, h, q, kv):\n    return kv != W\n", "mine", W=3)
        return and_masks(get_mask_fn("sliding_window", window_size=8), mask), lambda: g.__setitem__("W", 5)

    def float_constant_under_a_new_default_dtype():
        def mask(b, h, q, kv):
            return (q >= kv) & (torch.tensor(0.5) * (q - kv) < 3)
        previous = torch.get_default_dtype()

        def change():
            torch.set_default_dtype(torch.float64 if previous == torch.float32 else torch.float32)
        return mask, change

    return {f.__name__: f for f in (global_number, closure_rebound, list_item, dict_item, object_attribute,
                                    helper_reads_a_global, helper_rebound, default_argument, function_attribute_rebound,
                                    global_looked_up_by_name, function_dict_replaced, attribute_of_a_library_mask_rebound,
                                    module_imported_inside_the_mod,
                                    helper_wearing_a_library_functions_name, tensor_method_patched,
                                    torch_function_replaced_by_a_python_one, attribute_set_on_a_trusted_module, torch_grad_mode,
                                    attribute_set_on_a_tensor, code_replaced,
                                    builtin_shadowed, python_level_tensor_read_written_through_numpy,
                                    python_level_tensor_read_data_rebound, zero_d_constant_written_through_numpy,
                                    zero_d_constant_written_in_place, table_written_in_place, table_re_bound_in_a_dict,
                                    library_mask_around_a_users, float_constant_under_a_new_default_dtype)}


@pytest.mark.parametrize("name", list(_scenarios()))
def test_a_memo_answers_as_a_fresh_trace_after_any_change(name):
    mod, change = _scenarios()[name]()
    default_dtype, grad_mode = torch.get_default_dtype(), torch.is_grad_enabled()
    memo = ReadsMemo()
    try:
        before = _agrees(mod, memo)
        _agrees(mod, memo)   # the second call may answer from the memo
        change()
        after = _agrees(mod, memo)
        # the change matters: a plan made before no longer holds, by either answer
        assert not after.same_as(before)
        assert not current_reads(mod, "mask_mod", memo).same_as(before)
        _agrees(mod, memo)
    finally:
        torch.set_default_dtype(default_dtype)
        torch.set_grad_enabled(grad_mode)
        while _UNDO:
            owner, attribute, value = _UNDO.pop()
            setattr(owner, attribute, value)


def test_plain_masks_are_kept_and_objects_are_traced_at_every_call():
    """The memo is used (else the test above tests nothing): a mod reading numbers, tables, lists
    and helper functions keeps its trace; one reading an object's attribute has no guard."""
    table, widths = torch.tensor([3, 4, 5, 6]), [3]

    def mask(b, h, q, kv):
        return (q >= kv) & (q - kv < table[h]) & (q - kv < widths[0] + 8)

    memo = ReadsMemo()
    current_reads(mask, "mask_mod", memo)
    assert memo.entries["mask_mod"][0] is mask
    cfg = types.SimpleNamespace(w=3)
    assert read_guard(lambda b, h, q, kv: q - kv < cfg.w) is None
    layer = torch.nn.Module()
    assert read_guard(lambda b, h, q, kv: q - kv < 3 + layer.training) is None


def test_a_mod_that_changes_what_it_reads_while_traced_is_not_kept():
    calls = [0]

    def counting(b, h, q, kv):
        calls[0] += 1
        return q - kv < calls[0]

    memo = ReadsMemo()
    first = current_reads(counting, "mask_mod", memo)
    assert "mask_mod" not in memo.entries
    assert not current_reads(counting, "mask_mod", memo).same_as(first)


def test_a_large_cpu_tensor_read_only_at_python_level_has_no_guard():
    big = torch.zeros(100_000)

    def mask(b, h, q, kv):
        return q - kv < int(big[0]) + 3

    memo = ReadsMemo()
    current_reads(mask, "mask_mod", memo)
    assert "mask_mod" not in memo.entries
    np.asarray(big.numpy())[0] = 7
    assert current_reads(mask, "mask_mod", memo).scalars == read_state(mask, "mask_mod").scalars


def test_a_mask_that_names_itself_or_reads_a_captured_library_masks_attribute_traces(flashinfer_on_cpu):
    """The trace copies captured functions (their numbers become parameters): the copy recursed
    forever on a closure naming itself, and lost the attributes a mod reads (mask.window,
    doc.document_ids), raising where the reference backend runs."""
    from flex_flash_infer import create_block_mask, flex_attention
    from flex_flash_infer.mods import generate_document_mask_mod

    def window_factory(width):
        def mask(b, h, q, kv):
            return (q >= kv) & (q - kv < mask.window)
        mask.window = width
        return mask

    def documents_factory():
        doc = generate_document_mask_mod(document_ids=torch.tensor([0] * 40 + [1] * 24))

        def mask(b, h, q, kv):
            ids = doc.document_ids
            return (ids[q] == ids[kv]) & (q >= kv)
        return mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    for mask in (window_factory(5), documents_factory()):
        assert read_state(mask, "mask_mod") is not None
        bm = create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
        got = flex_attention(q, k, v, block_mask=bm, backend="flashinfer")
        want = flex_attention(q, k, v, block_mask=bm, backend="reference")
        assert (got - want).abs().max() < 1e-5
