"""Per-head causal windows in one launch (backends/head_windows.py) and the patched header copies
it compiles against (compile/patched_headers.py), on CPU: the patches on a stand-in include tree,
which per-head plans qualify and their window table, and the launch's wiring with the kernel
replaced by a float64 model of what the patched kernel computes (each query head its own window,
base-2 LSE)."""
import functools
import math
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask, get_mask_fn
from flex_flash_infer.backends import flashinfer_backend, head_windows, own_modules
from flex_flash_infer.compile import lean_modules, patched_headers
from flex_flash_infer.planning.plan import plan_attention
from flexfuzz.routes import plan_route


def _tree(tmp_path, texts):
    for rel, text in texts.items():
        path = tmp_path / "src" / "flashinfer" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "src"


def _fitting_texts():
    """The texts every head_windows patch expects, as often as it expects them."""
    texts = {}
    for rel, old, _, times in patched_headers.PATCH_SETS["head_windows"]:
        texts[rel] = texts.get(rel, "// header\n") + (old + "\n") * times
    return texts


def test_patches_apply_once_to_a_copy_and_refuse_another_version(tmp_path):
    source = _tree(tmp_path, _fitting_texts())
    root = patched_headers.patched_tree("head_windows", source, tmp_path / "cache")
    assert root is not None and root != source
    for rel, old, new, times in patched_headers.PATCH_SETS["head_windows"]:
        text = (root / "flashinfer" / rel).read_text()
        assert text.count(new) >= times
    assert "FFI_WINDOW_LEFT(mainloop_params, qo_head_idx)" in (root / "flashinfer/attention/hopper/prefill_sm90.cuh").read_text()
    # the installed headers are never touched, and a second ask reuses the copy
    assert "FFI_WINDOW_LEFT" not in (source / "flashinfer/attention/hopper/utils.cuh").read_text()
    assert patched_headers.patched_tree("head_windows", source, tmp_path / "cache") == root
    # a text found a different number of times (another FlashInfer): no copy, and the refusal is kept
    other = _fitting_texts()
    other["attention/hopper/prefill_sm90.cuh"] = "mainloop_params.window_left\n"   # once, not twice
    assert patched_headers.patched_tree("head_windows", _tree(tmp_path / "b", other), tmp_path / "cache2") is None
    assert list((tmp_path / "cache2").glob("*.refused"))
    assert not [p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]   # no half-made tree left


def test_a_module_asking_for_patched_headers_gets_them_first_on_its_path(tmp_path, monkeypatch):
    class Spec:   # FlashInfer's JitSpec is a dataclass; this stands in with the one field used
        pass

    import dataclasses

    Spec = dataclasses.make_dataclass("Spec", [("name", str), ("extra_include_dirs", list)])
    monkeypatch.setattr(patched_headers, "include_root", lambda name: tmp_path / name)
    args = head_windows.jit_args(torch.bfloat16, 128)
    spec = lean_modules.with_patched_headers(Spec("m", ["/other"]), args[1:])
    assert spec.extra_include_dirs == [tmp_path / "head_windows", "/other"]
    plain = lean_modules.with_patched_headers(Spec("m", []), ["#include<flashinfer/attention/hopper/variants.cuh>"])
    assert plain.extra_include_dirs == []
    monkeypatch.setattr(patched_headers, "include_root", lambda name: None)
    with pytest.raises(RuntimeError, match="head_windows"):
        lean_modules.with_patched_headers(Spec("m", []), args[1:])


def _plan(mod, H, L, S):
    bm = create_block_mask(mod, None, H, L, S, device="cpu", BLOCK_SIZE=64)
    return plan_attention(bm, 1, L, S, H, 2, 16, torch.device("cpu"), None, False, None, 1.0)


def test_which_per_head_plans_run_as_one_launch():
    widths = torch.tensor([64, 129, 0, 300])   # 0: plain causal

    def windows(b, h, q, kv):
        w = widths[h % 4]
        return (kv <= q) & ((q - kv < w) | (w == 0))

    plan = _plan(windows, 8, 500, 500)
    assert plan.route == "bands-per-head"
    assert head_windows.head_window_table(plan.head_bands, 8, 500, 500) == [63, 128, 500, 299] * 2
    prefixes = torch.tensor([64, 129, 0, 300])

    def per_head_prefixes(b, h, q, kv):   # a full block then a causal band: more than a window
        return (kv <= q) | (kv < prefixes[h % 4])

    plan = _plan(per_head_prefixes, 8, 500, 500)
    assert plan.route == "bands-per-head" and head_windows.head_window_table(plan.head_bands, 8, 500, 500) is None


def _on_the_model(monkeypatch):
    """FlashInfer as the CPU model (fake_flashinfer, which computes what the patched kernel does:
    each query head its own window from the launch's table) on a Hopper whose FlashInfer takes the
    patches; returns the list of the ragged wrappers planned."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(head_windows, "available", lambda device, dtype, head_dim, sinks=False: True)
    planned = []
    real_plan = fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper.plan

    @functools.wraps(real_plan)   # the library reads what the real plan() does (ragged._plan_alone_sets_the_mask)
    def recording_plan(self, *args, **kwargs):
        planned.append((self, kwargs.get("causal"), kwargs.get("window_left")))
        return real_plan(self, *args, **kwargs)

    monkeypatch.setattr(fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper, "plan", recording_plan)
    return planned


def _inputs(rng, B, Hq, Hkv, L, S, D):
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=rng, dtype=torch.float64)
    return q, k, v


def _matches_the_mask(plan, mask_mod, inputs):
    """out and natural-log LSE as the dense reference's, and out alone (no LSE asked) the same."""
    q, k, v = inputs
    out, lse = _run(plan, q, k, v)
    ref_out, ref_lse = dense_attention(q, k, v, _dense(mask_mod, q.shape[1], q.shape[2], k.shape[2]))
    assert rel_err(out, ref_out) < 1e-6
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)
    alone, none = _run(plan, q, k, v, return_lse=False)
    assert none is None and torch.equal(alone, out)


def _run(plan, q, k, v, return_lse=True):
    B, Hq, L, D = q.shape
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2),
                        return_lse=return_lse)
    return out.view(B, L, Hq, D).transpose(1, 2), None if lse is None else lse.view(B, L, Hq).transpose(1, 2)


# widths by h % 6 (0: no window, the whole causal row), and whether the launch is planned as not
# causal: only when its widest window is under half the keys
_HEAD_WIDTHS = [([1, 40, 0, 130, 77, 299], False), ([1, 40, 64, 9, 77, 99], True)]


@pytest.mark.parametrize("widths,balanced", _HEAD_WIDTHS)
@pytest.mark.parametrize("B,Hq,Hkv,L", [(1, 8, 2, 300), (2, 6, 3, 200)])
def test_one_launch_for_every_head_matches_the_reference(monkeypatch, rng, B, Hq, Hkv, L, widths, balanced):
    planned = _on_the_model(monkeypatch)
    widths = torch.tensor(widths)

    def windows(b, h, q, kv):
        w = widths[h % 6]
        return (kv <= q) & ((q - kv < w) | (w == 0))

    D = 16
    bm = create_block_mask(windows, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)   # broadcast over the batch
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.head_windows is not None and plan.head_band_runs is None and len(planned) == 1
    wrapper, causal, _ = planned[0]
    # several widths: planned as not causal (run causal) when the widest is under half the keys
    assert wrapper.head_windows and causal == (not balanced) and wrapper._causal
    assert plan_route(plan) == "bands-per-head/one-launch"   # the fuzzer counts this route apart
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    dense = torch.stack([(ki <= qi) & ((qi - ki < int(widths[h % 6])) | (int(widths[h % 6]) == 0))
                         for h in range(Hq)])[None]
    ref_out, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-6
    assert torch.allclose(lse.view(B, L, Hq).transpose(1, 2).double(), ref_lse, atol=1e-4)   # natural log
    alone, none = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2),
                           return_lse=False)
    assert none is None and torch.equal(alone, out)


def _dense(mask_mod, Hq, L, S):
    qi, ki = torch.arange(L).view(1, -1, 1), torch.arange(S).view(1, 1, -1)
    return torch.stack([mask_mod(torch.tensor(0), torch.tensor(h), qi[0], ki[0]) for h in range(Hq)])[None].bool()


# (B, L, S, mask_mod, balanced): windows narrow and wide against the keys, fewer queries than keys
# (the window aligned to the last key), a window of one key
_PLAIN_WINDOWS = [
    (1, 300, 300, get_mask_fn("sliding_window", window_size=40), True),
    (2, 200, 200, get_mask_fn("sliding_window", window_size=130), False),   # wider than half the keys
    (1, 100, 300, lambda b, h, q, kv: (kv <= q + 200) & (q + 200 - kv <= 64), True),
    (2, 150, 150, get_mask_fn("sliding_window", window_size=1), True),
]


@pytest.mark.parametrize("B,L,S,mask_mod,balanced", _PLAIN_WINDOWS)
def test_a_plain_window_runs_on_the_exact_start_kernel(monkeypatch, rng, B, L, S, mask_mod, balanced):
    """A causal window over the whole sequence: one launch of the head-window module, every head
    the same width, scheduled as not causal where the window is under half the keys and run
    causal; out and LSE as the dense reference's."""
    planned = _on_the_model(monkeypatch)
    Hq, Hkv, D = 4, 2, 16
    bm = create_block_mask(mask_mod, None, Hq, L, S, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, S, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan_route(plan) == "bands/exact-window"
    assert isinstance(plan.band_runner, head_windows.HeadWindowRunner) and len(planned) == 1
    wrapper, causal, window_left = planned[0]
    table = plan.band_runner.table.tolist()
    assert wrapper.head_windows and len(set(table)) == 1 and table[0] == window_left >= 0
    assert causal == (not balanced) and wrapper._causal   # planned as not causal, run causal
    _matches_the_mask(plan, mask_mod, _inputs(rng, B, Hq, Hkv, L, S, D))


def test_a_window_reaching_every_key_stays_on_the_causal_kernel(monkeypatch):
    _on_the_model(monkeypatch)
    L = 200
    bm = create_block_mask(get_mask_fn("sliding_window", window_size=L), None, 4, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, 1, L, L, 4, 2, 16, torch.float64, 0.25, "cpu")
    assert not isinstance(plan.band_runner, head_windows.HeadWindowRunner)


@pytest.mark.parametrize("mask_mod", [get_mask_fn("streaming", sink_size=4, window_size=50),
                                      get_mask_fn("attamba", window_size=64, chunk_size=32)])
def test_the_window_beside_key_columns_runs_on_the_exact_start_kernel(monkeypatch, rng, mask_mod):
    """streaming's sinks and attamba's chunk ends beside the window: the band part on the window
    kernel, merged with the columns."""
    _on_the_model(monkeypatch)
    B, Hq, Hkv, L, D = 2, 4, 2, 260, 16
    bm = create_block_mask(mask_mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan_route(plan).startswith("bands+columns/exact-window")
    q, k, v = _inputs(rng, B, Hq, Hkv, L, L, D)
    out, lse = _run(plan, q, k, v)
    ref_out, ref_lse = dense_attention(q, k, v, _dense(mask_mod, Hq, L, L))
    assert rel_err(out, ref_out) < 1e-6
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)


def _later_sinks(b, h, q, kv):   # sinks seen only from row 150 on: not streaming's
    return (kv <= q) & ((q - kv < 50) | ((kv < 4) & (q >= 150)))


# (mask_mod, sinks in the launch): streaming's sinks, narrow and wider than a key tile; attamba's
# chunk ends and sinks seen only by later rows stay columns merged after the launch
_COLUMNS = [(get_mask_fn("streaming", sink_size=4, window_size=50), 4),
            (get_mask_fn("streaming", sink_size=100, window_size=20), 100),
            (get_mask_fn("attamba", window_size=64, chunk_size=32), None),
            (_later_sinks, None)]


@pytest.mark.parametrize("merge_kernel", [True, False])
@pytest.mark.parametrize("mask_mod,sinks", _COLUMNS)
def test_streaming_sinks_run_in_the_window_launch(monkeypatch, rng, mask_mod, sinks, merge_kernel):
    """Streaming's sinks go into the window kernel's one launch (its ffi_sink_len): no columns
    left to merge; other key columns keep the merge. With or without the merge kernel here (whose
    plan counts each row's columns: without it they are counted for the sinks)."""
    from flex_flash_infer.backends import column_merge

    planned = _on_the_model(monkeypatch)
    monkeypatch.setattr(column_merge, "kernel_available", lambda device, head_dim: merge_kernel)
    B, Hq, Hkv, L, D = 2, 4, 2, 300, 16
    bm = create_block_mask(mask_mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.route == "bands+columns" and isinstance(plan.band_runner, head_windows.HeadWindowRunner)
    assert plan.sinks_in_launch == (sinks is not None) and plan.band_runner.sink_len == (sinks or 0)
    assert plan.has_columns == (sinks is None) and len(planned) == 1   # one ragged launch: the window
    # the sinks' module only with sinks: in the windows' own they slowed every window
    assert planned[0][0].jit_args[0].startswith("ffi_sinkwin_" if sinks else "ffi_headwin_")
    _matches_the_mask(plan, mask_mod, _inputs(rng, B, Hq, Hkv, L, L, D))


def test_which_window_launches_are_scheduled_as_not_causal():
    from flex_flash_infer.planning.ragged import schedules_by_window

    def ptr(*lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    assert schedules_by_window("fa3", True, 99, ptr(200, 200), ptr(200, 200))
    assert schedules_by_window("fa3", True, 99, ptr(64), ptr(200))   # fewer queries than keys
    assert not schedules_by_window("fa3", True, 100, ptr(200), ptr(200))   # 2 * 101 keys > 200
    assert not schedules_by_window("fa3", True, 10, ptr(200, 100), ptr(200, 100))   # lengths differ
    assert not schedules_by_window("fa3", True, -1, ptr(200), ptr(200))   # no window
    assert not schedules_by_window("fa3", False, 10, ptr(200), ptr(200))
    assert not schedules_by_window("fa2", True, 10, ptr(200), ptr(200))   # fa2 schedules otherwise


def test_a_flashinfer_whose_run_reads_the_mask_elsewhere_is_never_balanced(monkeypatch):
    """The trick rests on run() taking causal from plan()'s self._causal: a wrapper that does not
    (another FlashInfer) keeps the causal plan."""
    from flex_flash_infer.planning import ragged

    assert ragged._plan_alone_sets_the_mask(fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper)

    class Other:
        def plan(self, causal=False):
            self.mask_mode = causal

        def run(self):
            return self.mask_mode

    assert not ragged._plan_alone_sets_the_mask(Other)
    planned = _on_the_model(monkeypatch)
    indptr = torch.tensor([0, 300], dtype=torch.int32)

    def plan():
        ragged.planned_ragged(torch.empty(8, dtype=torch.uint8), "fa3", indptr, indptr, (1, 300, 300, 4, 2, 16),
                              torch.float64, True, 20)
        return planned[-1][1:]   # (causal, window_left) that plan() was given

    assert plan() == (False, 20)   # this FlashInfer: balanced
    monkeypatch.setattr(ragged, "_plan_alone_sets_the_mask", lambda wrapper_type: False)
    assert plan() == (True, 20)


def test_plans_of_one_window_share_the_kernel_wrapper(monkeypatch):
    planned = _on_the_model(monkeypatch)
    L = 300

    def make():
        bm = create_block_mask(get_mask_fn("sliding_window", window_size=40), None, 4, L, L, device="cpu",
                               BLOCK_SIZE=64)
        return flashinfer_backend.FlashInferPlan(bm, 1, L, L, 4, 2, 16, torch.float64, 0.25, "cpu")

    first, second = make(), make()
    assert len(planned) == 1 and first.band_runner.wrapper is second.band_runner.wrapper


def test_a_window_module_that_does_not_build_falls_back_to_flashinfers_kernels(monkeypatch, rng):
    """A toolchain that rejects the patched module: said once, and the window runs on FlashInfer's
    own kernels (the same answer); per-head windows on their head sets."""
    _on_the_model(monkeypatch)
    monkeypatch.setattr(own_modules, "_UNBUILT", set())
    monkeypatch.setattr(own_modules, "_BUILT", set())
    tried = []

    def unbuildable(jit_args):
        tried.append(None)
        raise RuntimeError("Ninja build failed")

    monkeypatch.setattr(own_modules, "_build", unbuildable)
    Hq, Hkv, L, D = 4, 2, 300, 16
    window = get_mask_fn("sliding_window", window_size=40)

    def make(mask_mod):
        bm = create_block_mask(mask_mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
        return flashinfer_backend.FlashInferPlan(bm, 1, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")

    with pytest.warns(RuntimeWarning, match="did not build"):
        plan = make(window)
    assert plan_route(plan) == "bands" and len(tried) == 1
    q, k, v = _inputs(rng, 1, Hq, Hkv, L, L, D)
    out, _ = _run(plan, q, k, v)
    assert rel_err(out, dense_attention(q, k, v, _dense(window, Hq, L, L))[0]) < 1e-6
    widths = torch.tensor([10, 70])

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < widths[h % 2])

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # said once: not again, and not tried again
        again = make(window)
        heads = make(per_head)
    assert len(tried) == 1 and plan_route(again) == "bands"
    assert heads.head_windows is None and heads.head_band_runs is not None
    out, _ = _run(heads, q, k, v)
    assert rel_err(out, dense_attention(q, k, v, _dense(per_head, Hq, L, L))[0]) < 1e-6


def test_only_the_modules_build_errors_turn_the_kernel_off(monkeypatch):
    """Out of memory, or a plan that fails, while the window kernel's runner is made: raised as it
    comes, and the next plan tries the kernel again."""
    _on_the_model(monkeypatch)
    monkeypatch.setattr(own_modules, "_UNBUILT", set())
    monkeypatch.setattr(own_modules, "_BUILT", set())
    L = 300
    bm = create_block_mask(get_mask_fn("sliding_window", window_size=40), None, 4, L, L, device="cpu", BLOCK_SIZE=64)

    def make():
        return flashinfer_backend.FlashInferPlan(bm, 1, L, L, 4, 2, 16, torch.float64, 0.25, "cpu")

    real = head_windows.HeadWindowRunner
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("plan failed")):
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(head_windows, "HeadWindowRunner", failing)
        with pytest.raises(type(error)):
            make()
    monkeypatch.setattr(head_windows, "HeadWindowRunner", real)
    assert not own_modules._UNBUILT and isinstance(make().band_runner, head_windows.HeadWindowRunner)


def test_sinks_whose_module_does_not_build_keep_the_window_kernel(monkeypatch, rng):
    """The sinks' module refused here (the windows' builds): streaming runs its window on the
    window kernel and merges its sinks after it, as before the sinks had a module."""
    planned = _on_the_model(monkeypatch)
    monkeypatch.setattr(own_modules, "_UNBUILT", set())
    monkeypatch.setattr(own_modules, "_BUILT", set())
    real = own_modules._build

    def no_sinks(jit_args):
        if jit_args[0].startswith("ffi_sinkwin_"):
            raise RuntimeError("Ninja build failed")
        return real(jit_args)

    monkeypatch.setattr(own_modules, "_build", no_sinks)
    mask_mod = get_mask_fn("streaming", sink_size=4, window_size=50)
    Hq, Hkv, L, D = 4, 2, 300, 16
    bm = create_block_mask(mask_mod, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)
    with pytest.warns(RuntimeWarning, match="sinks"):
        plan = flashinfer_backend.FlashInferPlan(bm, 1, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert not plan.sinks_in_launch and plan.has_columns and plan.band_runner.sink_len == 0
    assert planned[-1][0].jit_args[0].startswith("ffi_headwin_")
    q, k, v = _inputs(rng, 1, Hq, Hkv, L, L, D)
    out, _ = _run(plan, q, k, v)
    assert rel_err(out, dense_attention(q, k, v, _dense(mask_mod, Hq, L, L))[0]) < 1e-6


def test_the_windows_module_is_the_one_prebuilt_and_measured():
    """The windows' module name hashes its code and patches: a change here makes every machine
    build it again and leaves its GPU measurements (docs/benchmarks.md) for another kernel. The
    sinks' module is apart (its logic slowed every window in the windows' module)."""
    assert head_windows.jit_args(torch.bfloat16, 128)[0] == "ffi_headwin_29201a27f2453c0c_bfloat16_d128"
    sinks = head_windows.jit_args(torch.bfloat16, 128, sinks=True)
    assert sinks[0].startswith("ffi_sinkwin_") and sinks[9][-1] == head_windows.SINKS
