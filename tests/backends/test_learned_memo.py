"""The learned tensors a score_mod reads are searched again at a call only once something the
search could reach changed (backends/autograd.LearnedMemo): whatever is changed between calls, the
memo's answer is a fresh search's, and a mod whose reach cannot be watched is searched every time."""
import builtins
import types

import pytest
import torch

from flex_flash_infer.backends.autograd import LearnedMemo, learned_tensors
from flex_flash_infer.mods import generate_alibi_score_mod

DEVICE = torch.device("cpu")


def _module_function(source: str, name: str, **globals_):
    """A function defined in its own module namespace (its globals), as a user's file would."""
    namespace = {"torch": torch, "__builtins__": builtins, **globals_}
    exec(compile(source, f"<user module {name}>", "exec"), namespace)
    return namespace[name], namespace


def _agrees(mod, memo):
    got, fresh = learned_tensors(mod, DEVICE, memo), learned_tensors(mod, DEVICE)
    assert [id(t) for t in got] == [id(t) for t in fresh]
    return got


def _table(requires_grad=True):
    return torch.randn(8, dtype=torch.float64, requires_grad=requires_grad)


def _scenarios():
    """name -> () -> (mod, change): change() alters which tensors requiring grad mod reads."""
    def closure_table_unfrozen():
        table = _table(False)
        return (lambda s, b, h, q, kv: s + table[h]), lambda: table.requires_grad_(True)

    def closure_table_frozen():
        table = _table()
        return (lambda s, b, h, q, kv: s + table[h]), lambda: table.requires_grad_(False)

    def closure_rebound():
        table = _table()

        def mod(s, b, h, q, kv):
            return s + table[h]

        def change():
            nonlocal table
            table = _table()
        return mod, change

    def global_rebound():
        mod, g = _module_function("def mod(s, b, h, q, kv):\n    return s + T[h]\n", "mod", T=_table())
        return mod, lambda: g.__setitem__("T", _table())

    def global_defined_later():
        mod, g = _module_function("def mod(s, b, h, q, kv):\n    return s + globals().get('T', Z)[h]\n", "mod",
                                  Z=torch.zeros(8, dtype=torch.float64))
        return mod, lambda: g.__setitem__("T", _table())

    def function_attribute_rebound():
        mod, _ = _module_function("def mod(s, b, h, q, kv):\n    return s + mod.bias[h]\n", "mod")
        mod.bias = _table()
        return mod, lambda: setattr(mod, "bias", _table())

    def list_item_replaced():
        tables = [_table()]
        return (lambda s, b, h, q, kv: s + tables[0][h]), lambda: tables.__setitem__(0, _table())

    def dict_item_replaced():
        tables = {"bias": _table()}
        return (lambda s, b, h, q, kv: s + tables["bias"][h]), lambda: tables.__setitem__("bias", _table())

    def default_replaced():
        def mod(s, b, h, q, kv, bias=_table()):
            return s + bias[h]
        return mod, lambda: setattr(mod, "__defaults__", (_table(),))

    def helper_rebound():
        mod, g = _module_function("def helper(h):\n    return T[h]\n"
                                  "def mod(s, b, h, q, kv):\n    return s + helper(h)\n", "mod", T=_table())
        other = _table()
        return mod, lambda: g.__setitem__("helper", lambda h: other[h])

    def derived_table_rebound():
        w = _table()
        holder = [w * 2]
        return (lambda s, b, h, q, kv: s + holder[0][h]), lambda: holder.__setitem__(0, w * 3)

    def kept_copy_made_at_first_call():
        table, kept = _table(), {}

        def mod(s, b, h, q, kv):
            if "copy" not in kept and isinstance(s, torch.Tensor):
                kept["copy"] = table * 1.0
            return s + kept.get("copy", table)[h]
        return mod, lambda: kept.__setitem__("copy", table * 2.0)

    def library_mod_slopes_unfrozen():
        slopes = torch.rand(8)
        return generate_alibi_score_mod(slopes=slopes), lambda: slopes.requires_grad_(True)

    def object_attribute():   # no memo: searched at every call
        cfg = types.SimpleNamespace(bias=_table())
        return (lambda s, b, h, q, kv: s + cfg.bias[h]), lambda: setattr(cfg, "bias", _table())

    def module_parameter():   # no memo
        layer = torch.nn.Module()
        layer.bias = torch.nn.Parameter(_table())

        def change():
            layer.bias = torch.nn.Parameter(_table())
        return (lambda s, b, h, q, kv: s + layer.bias[h]), change

    def class_attribute():   # no memo
        class Config:
            bias = _table()

        return (lambda s, b, h, q, kv: s + Config.bias[h]), lambda: setattr(Config, "bias", _table())

    def function_dict_replaced():   # fn.__dict__ = {...}: a new dict, the old one's items unchanged
        mod, _ = _module_function("def mod(s, b, h, q, kv):\n    return s + mod.bias[h]\n", "mod")
        mod.bias = _table()
        return mod, lambda: setattr(mod, "__dict__", {"bias": _table()})

    def attribute_set_on_a_tensor_later():
        table = _table()

        def mod(s, b, h, q, kv):
            return s + (table.delta if hasattr(table, "delta") else table)[h]
        return mod, lambda: setattr(table, "delta", _table())

    return {f.__name__: f for f in (closure_table_unfrozen, closure_table_frozen, closure_rebound, global_rebound,
                                    function_dict_replaced, attribute_set_on_a_tensor_later,
                                    global_defined_later, function_attribute_rebound, list_item_replaced,
                                    dict_item_replaced, default_replaced, helper_rebound, derived_table_rebound,
                                    kept_copy_made_at_first_call, library_mod_slopes_unfrozen, object_attribute,
                                    module_parameter, class_attribute)}


@pytest.mark.parametrize("name", list(_scenarios()))
def test_a_memo_answers_as_a_fresh_search_after_any_change(name):
    mod, change = _scenarios()[name]()
    learned_tensors(mod, DEVICE)   # what a mod makes at its first call (a kept copy) is made
    memo = LearnedMemo()
    before = _agrees(mod, memo)
    _agrees(mod, memo)   # may answer from the memo
    change()
    after = _agrees(mod, memo)
    assert [id(t) for t in after] != [id(t) for t in before]   # the change matters
    _agrees(mod, memo)


def test_the_memo_is_used_and_what_cannot_be_watched_is_not_kept(monkeypatch):
    """A plain mod is searched once (else the test above tests nothing); one that changes what it
    reaches at each call, or reads an object's attribute, is searched at every call."""
    from flex_flash_infer.backends import autograd

    searches = []
    real = autograd._recorded_reads
    monkeypatch.setattr(autograd, "_recorded_reads", lambda *a: (searches.append(1), real(*a))[1])
    table, calls, cfg = _table(), [0], types.SimpleNamespace(bias=_table())

    def plain(s, b, h, q, kv):
        return s + table[h]

    def counting(s, b, h, q, kv):
        calls[0] += 1
        return s + table[h]

    for mod, kept in ((plain, True), (counting, False), (lambda s, b, h, q, kv: s + cfg.bias[h], False)):
        memo = LearnedMemo()
        searches.clear()
        for _ in range(3):
            assert learned_tensors(mod, DEVICE, memo) == learned_tensors(mod, DEVICE)
        assert (memo.mod is mod) == kept
        assert len(searches) == (3 + 1 if kept else 6)


def test_a_prepared_call_searches_once(flashinfer_on_cpu, monkeypatch):
    """FlexFlashInfer's call with grad enabled: the score_mod is searched at the first call only
    while nothing it reaches changes; unfreezing its table after prepare() is seen."""
    from flex_flash_infer import FlexFlashInfer
    from flex_flash_infer.backends import autograd

    runs = []
    real = autograd._recorded_reads
    monkeypatch.setattr(autograd, "_recorded_reads", lambda *a: (runs.append(1), real(*a))[1])
    table = torch.zeros(4)

    def biased(score, b, h, q_idx, kv_idx):
        return score + table[h]

    flex = FlexFlashInfer(device="cpu", backend="flashinfer")
    flex.prepare(mask_fn=lambda b, h, q, kv: q >= kv, seq_len_q=64, seq_len_kv=64, num_qo_heads=4, num_kv_heads=2,
                 head_dim=64, dtype=torch.bfloat16, score_mod=biased)
    q, k, v = (torch.randn(64, n, 64, dtype=torch.bfloat16) for n in (4, 2, 2))
    first = flex(q, k, v)
    searched = len(runs)
    assert searched and first.grad_fn is None
    for _ in range(3):
        assert torch.equal(flex(q, k, v), first)
    assert len(runs) == searched
    table.requires_grad_(True)
    out = flex(q, k, v)
    assert out.grad_fn is not None and len(runs) > searched
    (grad,) = torch.autograd.grad(out.float().sum(), [table])
    assert grad.shape == table.shape
