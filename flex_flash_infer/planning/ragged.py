"""FlashInfer's batch ragged prefill wrapper made and planned in one place: the band runner, the
compiled score_mod bands and the far keys of a relative-position split all launch it."""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from ..compile import native_copy
from .fa3_schedule import keys_and_values_fit, rebalance_by_head_windows

# planned wrappers, by everything their construction and plan() were given, while some plan still
# holds them: a prepare() of the same launch (a model's next layer, the same mask prepared again)
# reuses one instead of paying FlashInfer's plan() again, the largest part of a long prepare()
# (docs/benchmarks.md). A plan only ever runs its wrappers, never plans them again, and a
# wrapper's run() keeps nothing of a call, so plans may share one (prepared on the same stream).
# Weak: when the last plan holding a wrapper goes, so do its buffers (8 MB on the device and 8 MB
# pinned each).
_planned = weakref.WeakValueDictionary()
_HANDING = threading.Lock()


@contextlib.contextmanager
def handed_module(module, name: str):
    """While a wrapper is made: FlashInfer's module getter returns `module` (already built and
    loaded: the LTO module of backends/lto_score_mods.py) when asked for the module `name`, instead
    of building one from jit_args, which for the generic variant would compile its files without
    any score_mod's code. FlashInfer's wrapper asks flashinfer.prefill.get_customize_batch_prefill_module
    (backend, name, ...) for its module in __init__ (0.7.2; scripts/lto_launch_check.py ran it so on
    the H100). Any other name asked meanwhile (another thread's wrapper) gets FlashInfer's own
    getter's answer. module None: FlashInfer's own getter."""
    if module is None:
        yield
        return
    import flashinfer

    prefill = flashinfer.prefill
    with _HANDING:
        original = prefill.get_customize_batch_prefill_module

        def getter(backend, uri, *args, **kwargs):
            return module if uri == name else original(backend, uri, *args, **kwargs)
        prefill.get_customize_batch_prefill_module = getter
        try:
            yield
        finally:
            prefill.get_customize_batch_prefill_module = original


def _plan_alone_sets_the_mask(wrapper_type) -> bool:
    """Whether the wrapper's run() takes causal from what plan() stored (self._causal) and nothing
    else of plan() depends on it but the schedule: so in FlashInfer 0.7's source (prefill.py and
    PrefillSM90Plan in scheduler.cuh, where causal only prices each query tile). Checked by the
    names the two methods use: a FlashInfer that stores the mask elsewhere is never balanced."""
    import inspect

    try:
        plan, run = (inspect.unwrap(getattr(wrapper_type, name)) for name in ("plan", "run"))
        return "_causal" in plan.__code__.co_names and "_causal" in run.__code__.co_names
    except AttributeError:
        return False


def schedules_by_window(backend: str, causal: bool, window_left: int, qo_indptr, kv_indptr) -> bool:
    """Whether a causal window launch on fa3 is better planned as if it were not causal. FlashInfer's
    fa3 scheduler hands query tiles to CTAs by their causal cost (the keys up to the diagonal) and
    never sees the window: under a window narrower than half the keys every late tile costs about
    the same as the window, yet is priced as many times more, and some CTAs get many more tiles than
    others (scripts/fa3_schedule_sim.py). Priced as not causal, every tile of requests of one length
    costs the same, and the CTAs get equal counts. Requests of different lengths keep the causal
    price (the simulation found mixes where it balances better)."""
    if backend != "fa3" or not causal or window_left < 0 or qo_indptr.numel() < 2:
        return False
    q_lens, kv_lens = qo_indptr.diff(), kv_indptr.diff()
    if bool((q_lens != q_lens[0]).any()) or bool((kv_lens != kv_lens[0]).any()):
        return False
    return 2 * (window_left + 1) <= int(kv_lens[0])


def planned_ragged(workspace: torch.Tensor, backend: str, qo_indptr, kv_indptr, shape, dtype, causal: bool,
                   window_left: int = -1, sm_scale=None, logits_soft_cap=None, jit_args=None,
                   balance_window: bool = True, shared_module: bool = False, head_windows=None,
                   sink_len: int = 0, module=None):
    """A BatchPrefillWithRaggedKVCacheWrapper on backend ("fa3" or "fa2"), planned for the requests
    of qo_indptr / kv_indptr (int32, on the host); shape is (batch, q_len, kv_len, Hq, Hkv, D).
    jit_args: a compiled variant's (which applies its own scale). balance_window: a causal window
    launch may be scheduled as not causal (schedules_by_window); False where the launch's tiles are
    not a window's (the tile-gather launch). shared_module: jit_args name a module whose code holds
    nothing of one plan (the head-window kernel, which takes its table at run time), so its planned
    wrapper may be shared like FlashInfer's own.
    head_windows: each query head's window_left (the head-window kernel's launch; sink_len its
    streaming sinks): the plan's work items are dealt again by each head's window where that
    balances them better (fa3_schedule.py), and the wrapper is shared only with plans of the same
    windows. module: the loaded module jit_args name, handed to the wrapper (handed_module)."""
    import flashinfer

    _, _, _, hq, hkv, head_dim = shape
    copy_args = None
    if jit_args is None and backend == "fa3" and not native_copy.flashinfer_has_its_own(
            dtype, head_dim, window_left >= 0, bool(logits_soft_cap)):
        # FlashInfer's kernels for this launch's one mask mode, as a module of our own
        # (compile/native_copy.py); its scale and soft cap go to run(), as FlashInfer's own run() passes them
        jit_args = native_copy.jit_args(dtype, head_dim, causal, window_left >= 0, bool(logits_soft_cap))
        copy_args = native_copy.run_arguments(logits_soft_cap, head_dim ** -0.5 if sm_scale is None else sm_scale)
        shared_module, sm_scale, logits_soft_cap = True, None, None
    balanced = (balance_window and qo_indptr.device.type == "cpu" and kv_indptr.device.type == "cpu"
                and schedules_by_window(backend, causal, window_left, qo_indptr, kv_indptr)
                and _plan_alone_sets_the_mask(flashinfer.BatchPrefillWithRaggedKVCacheWrapper))
    key = None
    # FlashInfer's own kernels and shared modules only: a compiled variant's wrapper is its plan's
    # alone (the CPU model of FlashInfer binds a variant's host code, values included, to its
    # wrapper); host tables only (reading device ones would wait for the GPU)
    if (jit_args is None or shared_module) and qo_indptr.device.type == "cpu" and kv_indptr.device.type == "cpu":
        # FlashInfer's plan() copies its tables to the GPU on the stream current then, unsynchronised:
        # a wrapper is shared only with plans made on the same stream, which its run is ordered after
        stream = None
        if workspace.device.type == "cuda" and torch.cuda.is_available():
            stream = getattr(torch.cuda.current_stream(workspace.device), "cuda_stream", None)
        key = (workspace.data_ptr(), str(workspace.device), stream, backend, tuple(qo_indptr.tolist()),
               tuple(kv_indptr.tolist()), tuple(shape), dtype, bool(causal), int(window_left),
               None if sm_scale is None else float(sm_scale),
               None if logits_soft_cap is None else float(logits_soft_cap), balanced,
               None if jit_args is None else jit_args[0], id(flashinfer),
               None if head_windows is None else tuple(head_windows), int(sink_len))
        key += (copy_args,)
        wrapper = _planned.get(key)
        if wrapper is not None:
            return wrapper
    with handed_module(module, None if jit_args is None else jit_args[0]):
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend, jit_args=jit_args)
    # no split-KV: its merge would drop a NaN LSE (nan_merge.py)
    wrapper.plan(qo_indptr, kv_indptr, hq, hkv, head_dim, causal=causal and not balanced, window_left=window_left,
                 sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, q_data_type=dtype, kv_data_type=dtype,
                 o_data_type=dtype, disable_split_kv=True)
    if balanced:
        wrapper._causal = True   # scheduled as not causal, run causal (schedules_by_window)
    if (head_windows is not None and backend == "fa3" and workspace.device.type == "cuda"
            and torch.backends.cuda.is_built() and torch.cuda.is_available()):
        # FlashInfer's plan gives one CTA per multiprocessor (PrefillSM90Plan)
        props = torch.cuda.get_device_properties(workspace.device)
        key_bytes = 2 * int(kv_indptr[-1]) * hkv * head_dim * dtype.itemsize
        if keys_and_values_fit(key_bytes, getattr(props, "L2_cache_size", 0)):
            rebalance_by_head_windows(wrapper, head_windows, props.multi_processor_count, sink_len)
    if copy_args is not None:
        wrapper = NativeCopy(wrapper, copy_args)
    if key is not None:
        _planned[key] = wrapper
    return wrapper


class NativeCopy:
    """A planned wrapper on native_copy's module, run as FlashInfer's own native one is: run(q, k,
    v, out=, lse=, return_lse=) adds the module's arguments (its scale and soft cap)."""

    def __init__(self, wrapper, run_arguments: tuple):
        self.wrapper = wrapper
        self.run_arguments = run_arguments

    def run(self, q, k, v, **kwargs):
        return self.wrapper.run(q, k, v, *self.run_arguments, **kwargs)
