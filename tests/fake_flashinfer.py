"""A stand-in for the few FlashInfer calls the library makes, computed by the CPU model in
paged_simulator.py, so the glue around the kernels (layouts, LSE bases, merges) runs in CPU tests."""
import functools
import math
import sys
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from paged_simulator import attend
from paged_simulator import merge_state as _merge_state
from paged_simulator import paged_prefill

from flex_flash_infer.compile import native_copy
from flex_flash_infer.compile.lean_modules import KEPT_MODES, kept_modes
from flex_flash_infer.compile import lto_variants
from flex_flash_infer.compile.codegen import element_ctype, graph_key
from flex_flash_infer.compile.variant_paged import MASKED_PAGE_FLAG

# FlashInfer's kernels record nothing for autograd: their outputs never carry a grad_fn. The
# model's torch ops would, so every kernel entry point runs under no_grad.
def _tensors(values):
    for x in values:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (tuple, list)):
            yield from _tensors(x)


def kernel(fn):
    """torch.no_grad(), and what FlashInfer's kernels assume of every tensor they read or write:
    a unit-stride last dimension (they take the other dimensions' strides, never that one's)."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        for t in _tensors(list(args) + list(kwargs.values())):
            assert t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1, \
                f"a tensor of shape {tuple(t.shape)} with last-dimension stride {t.stride(-1)}: FlashInfer reads it as 1"
        global _IN_KERNEL
        _IN_KERNEL += 1   # a capture (capture()) records the kernel as one launch, not its model's operators
        try:
            with torch.no_grad():
                return fn(*args, **kwargs)
        finally:
            _IN_KERNEL -= 1
    return checked


_IN_KERNEL = 0


# What FlashInfer 0.7.2's wrappers and kernels do with the tensors they are given, beyond the
# numbers: a kernel reads every tensor it gets through a raw pointer on the wrapper's device (the
# workspace's); plan() computes with some tables before it moves any (a host/device mix there
# raises, as torch does); the kernels read the tables as the module's IdType. On the CPU every
# tensor is on the host and only the dtypes are checked; under tests/simulated_cuda.py (tensors
# marked as on the GPU) the devices are checked too.
_CTYPES = {"uint8_t": torch.uint8, "int8_t": torch.int8, "int16_t": torch.int16, "int": torch.int32,
           "int32_t": torch.int32, "int64_t": torch.int64, "float": torch.float32, "double": torch.float64}


def on_device(device, what, *tensors):
    """Every tensor a kernel reads lies on `device` (a host pointer handed to a CUDA kernel is an
    illegal memory access, or FlashInfer's CHECK_CUDA / CHECK_DEVICE)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            assert t.device == torch.device(device), \
                f"{what}: a tensor on {t.device} handed to a FlashInfer kernel on {device}"


def check_idtype(idtype, what, **tables):
    """FlashInfer's C++ reads these tables as the module's IdType (static_cast<IdType*>, no check):
    another dtype is read as garbage on the GPU."""
    for name, t in tables.items():
        assert t.dtype == idtype, f"{what}: {name} is {t.dtype}, the module reads it as {idtype}"


def check_variant_tensors(jit_args, args, device, what):
    """A compiled variant's tensors (run()'s arguments, in jit_args[7]'s order less the buffers the
    wrapper fills itself) are read by the kernel as declared (jit_args[8]), on the wrapper's device."""
    names = [(n, d) for n, d in zip(jit_args[7], jit_args[8]) if n not in WRAPPER_BUFFERS]
    assert len(args) >= len(names), f"{what}: {len(args)} arguments for {len(names)} variant tensors"
    for (name, ctype), t in zip(names, args):
        if t is None and name.startswith("maybe_"):   # FlashInfer passes null for an optional tensor
            continue
        assert isinstance(t, torch.Tensor), f"{what}: variant argument {name} is not a tensor"
        on_device(device, f"{what}: variant tensor {name}", t)
        if ctype in _CTYPES:
            assert t.dtype == _CTYPES[ctype], f"{what}: variant tensor {name} is {t.dtype}, the kernel reads {ctype}"
        assert t.is_contiguous(), f"{what}: variant tensor {name} is not contiguous (the kernel reads it flat)"


def planned_dtypes(q_data_type, kv_data_type):
    """(q dtype, kv dtype) a plan() was given (FlashInfer's defaults: float16, kv as q)."""
    q = getattr(torch, q_data_type) if isinstance(q_data_type, str) else q_data_type
    kv = q if kv_data_type is None else getattr(torch, kv_data_type) if isinstance(kv_data_type, str) else kv_data_type
    return q, kv


def check_run_dtypes(dtypes, q, k, what):
    """_check_cached_qkv_data_type: run() raises ValueError when q or k is not of the planned dtype."""
    assert (q.dtype, k.dtype) == tuple(dtypes), \
        f"{what}: q {q.dtype} and k {k.dtype} on a wrapper planned for q_data_type {dtypes[0]}, kv_data_type {dtypes[1]}"


def check_window_flag(backend, jit_args, window_left, what, paged=False):
    """FlashInfer's fa3 kernels take the window from the module (gen_customize_batch_prefill_module's
    use_sliding_window, jit_args[14]; the mainloops' LEFT_SLIDING_WINDOW), not from the launch: a
    launch planned with window_left -1 on a module built with it masks every key it would see
    (key < query + 1: rows 0, LSE -inf, no error), and a window planned on a module built without
    it is ignored (keys it should hide are seen). The head-window module reads its table instead.
    fa2's ragged variants read the launch's window (-1: none); its paged variants none at all."""
    if jit_args is None or len(jit_args) <= 14 or jit_args[7][0] == HEAD_WINDOW_TABLE:
        return
    if backend == "fa3":
        assert (window_left >= 0) == bool(jit_args[14]), \
            (f"{what}: {jit_args[0]} is built {'with' if jit_args[14] else 'without'} a window and planned "
             f"with window_left {window_left}")
    elif paged:
        assert window_left < 0, f"{what}: the fa2 paged variant {jit_args[0]} ignores a window (planned {window_left})"


def check_variant_mask_mode(backend, has_variant, causal, custom_mask, owns_mask=False):
    """A variant's module is built with only the mask modes lean_modules keeps for its backend:
    a plan asking it for another would fail on the GPU (FlashInfer plans a variant that owns its
    mask with its bit-mask mode)."""
    if has_variant:
        mode = 2 if custom_mask is not None or owns_mask else 1 if causal else 0
        assert mode in KEPT_MODES[backend], f"a {backend} variant planned with mask mode {mode}"


class BatchPrefillWithPagedKVCacheWrapper:
    def __init__(self, workspace, layout="NHD", backend="auto", jit_args=None, variant_owns_mask=False,
                 use_cuda_graph=False, qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None,
                 paged_kv_last_page_len_buf=None, custom_mask_buf=None, mask_indptr_buf=None):
        assert layout == "NHD"
        assert not variant_owns_mask or (backend == "fa2" and jit_args is not None)  # as FlashInfer checks
        self.backend = backend
        self.owns_mask = variant_owns_mask
        self.device = workspace.device   # FlashInfer's wrapper: self.device = float_workspace_buffer.device
        self.jit_args = jit_args
        self.variant = None if jit_args is None else PagedVariantModel(VARIANTS[jit_args[11]], jit_args[7], jit_args[9])
        self.prefill_graph = None
        if use_cuda_graph:   # FlashInfer's CUDA-graph mode: the tables live in these, the batch size is theirs
            tables = (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf)
            assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int32 for t in tables)
            assert len(paged_kv_indptr_buf) == len(qo_indptr_buf) == len(paged_kv_last_page_len_buf) + 1
            on_device(self.device, "paged prefill (CUDA-graph buffers)", *tables, custom_mask_buf, mask_indptr_buf)
            # the model keeps the bits unpacked: a bool buffer as long as the packed one's bits
            bits = None if custom_mask_buf is None else torch.zeros(8 * len(custom_mask_buf), dtype=torch.bool)
            self.prefill_graph = (tables, custom_mask_buf, bits)
            self.max_rows = None

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim_qk=None,
             page_size=None, causal=False, sm_scale=None, custom_mask=None, q_data_type="float16", kv_data_type=None,
             o_data_type=None, window_left=-1, logits_soft_cap=None, disable_split_kv=False, **_):
        # the module's IdType: jit_args[4], else kv_indptr's dtype; its plan() reads qo_indptr and
        # kv_indptr (host copies) as IdType, its kernels the four tables
        idtype = self.jit_args[4] if self.jit_args is not None else kv_indptr.dtype
        check_idtype(idtype, "paged prefill plan()", qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices,
                     last_page_len=last_page_len)
        assert len(qo_indptr) == len(kv_indptr) == len(last_page_len) + 1
        if custom_mask is not None:
            assert self.backend == "fa2" and custom_mask.dtype == torch.bool and not self.owns_mask
            # as FlashInfer's plan() does first, on the tables as given (before it moves any):
            # _compute_page_mask_indptr, the bit mask's offsets per request from qo_indptr and the
            # launch's tables together (a host/device mix raises here, as torch does on the GPU)
            mask_indptr = torch.empty_like(qo_indptr)
            mask_indptr[0] = 0
            mask_indptr[1:] = torch.cumsum((qo_indptr[1:] - qo_indptr[:-1])
                                           * ((kv_indptr[1:] - kv_indptr[:-1] - 1) * page_size + last_page_len), 0)
            # then segment_packbits(custom_mask, mask_indptr.to(custom_mask.device)): a CUDA kernel
            on_device(self.device, "segment_packbits (the bit mask)", custom_mask)
            assert int(mask_indptr[-1]) == custom_mask.numel(), \
                f"the bit mask has {custom_mask.numel()} bits, the tables ask for {int(mask_indptr[-1])}"
        check_variant_mask_mode(self.backend, self.variant is not None, causal, custom_mask, self.owns_mask)
        check_window_flag(self.backend, self.jit_args, window_left, "paged prefill plan()", paged=True)
        self.dtypes = planned_dtypes(q_data_type, kv_data_type)
        self.args = (qo_indptr.cpu(), kv_indptr.cpu(), kv_indices.cpu(), last_page_len.cpu())
        self.causal, self.mask = causal, None if custom_mask is None else custom_mask.cpu()
        if self.prefill_graph is not None:
            self._into_graph_buffers(qo_indptr, kv_indptr, kv_indices, last_page_len, custom_mask, mask_indptr
                                     if custom_mask is not None else None)
        self.heads = (num_qo_heads, num_kv_heads)
        self.scale = kernel_scale(sm_scale, head_dim_qk)
        self.window_left, self.soft_cap = window_left, logits_soft_cap or 0.0
        # fa2's kernels may split a request's keys and merge the parts (dropping a NaN LSE); fa3's do not
        self.split_kv = self.backend != "fa3" and not disable_split_kv

    def _into_graph_buffers(self, qo_indptr, kv_indptr, kv_indices, last_page_len, custom_mask, mask_indptr):
        """FlashInfer's CUDA-graph plan: the batch size and the most query rows are the first plan's;
        the tables are copied into the fixed buffers (the page ids and the bits without a wait only
        from the GPU), and the kernels read the buffers."""
        (qo_buf, indptr_buf, indices_buf, last_buf), mask_buf, bits = self.prefill_graph
        rows = int(qo_indptr[-1])
        self.max_rows = rows if self.max_rows is None else self.max_rows
        if len(last_page_len) != len(last_buf):
            raise ValueError("The batch size should be fixed during the lifecycle of the wrapper in cuda graph mode")
        if rows > self.max_rows:
            raise ValueError("The total number of rows in qo_indptr in cuda graph mode cannot exceed the first plan's")
        if len(kv_indices) > len(indices_buf):
            raise ValueError("The length of paged_kv_indices exceeds the allocated buffer size.")
        on_device(self.device, "paged prefill plan() (the page ids, copied without a wait)", kv_indices)
        for buf, table in ((qo_buf, qo_indptr), (indptr_buf, kv_indptr), (last_buf, last_page_len)):
            buf.copy_(table)
        indices_buf[:len(kv_indices)].copy_(kv_indices)
        if custom_mask is not None:
            assert mask_buf is not None, "custom_mask_buf must be initialized in cuda graph mode"
            segments = (mask_indptr[1:] - mask_indptr[:-1]).cpu()
            packed = int(((segments + 7) // 8).sum())
            # (FlashInfer copies the packed bits into custom_mask_buf[:packed]: a shorter buffer fails)
            assert packed <= len(mask_buf), f"{packed} bytes of packed bits for a {len(mask_buf)}-byte custom_mask_buf"
            bits.zero_()
            bits[:custom_mask.numel()] = custom_mask.cpu()
            self.mask = bits
        self.args = (qo_buf, indptr_buf, indices_buf, last_buf)

    @kernel
    def run(self, q, kv_cache, *variant_args, return_lse=False):
        k, v = kv_cache if isinstance(kv_cache, (tuple, list)) else kv_cache.unbind(1)
        assert q.shape[1] == self.heads[0] and k.shape[2] == self.heads[1]
        assert bool(variant_args) == (self.variant is not None)
        on_device(self.device, "paged run()", q, k, v)
        check_run_dtypes(self.dtypes, q, k, "paged run()")
        if self.jit_args is not None:
            check_variant_tensors(self.jit_args, variant_args, self.device, "paged run()")
        variant = self.variant.bind(variant_args, self.args, k.shape[1], self.owns_mask) if self.variant else None
        if variant is None and self.soft_cap > 0:   # FlashInfer's own logits soft cap
            cap, scale = self.soft_cap, self.scale

            def variant(r, s):
                return cap * torch.tanh(s * scale / cap)
        # what the kernel launch holds: the tables it reads (by pointer) and its numbers
        launch = (self.args, 1.0 if variant else self.scale, self.mask, self.causal, variant, self.window_left,
                  self.split_kv)

        def compute():
            tables, scale, mask, causal, variant_, window_left, split_kv = launch
            out, lse = paged_prefill(q.cpu(), k.cpu(), v.cpu(), *(t.cpu() for t in tables), scale, mask,
                                     causal=causal, variant=variant_, window_left=window_left, split_kv=split_kv)
            return out.to(q.dtype).to(q.device), lse.float().to(q.device)
        out, lse = compute()
        if CAPTURED is not None:   # a CUDA graph's replay: this launch again, on what its tables hold then
            assert self.variant is None, "the capture model covers FlashInfer's own kernels"

            def replay():
                again = compute()
                out.copy_(again[0])
                lse.copy_(again[1])
            CAPTURED.append(replay)
        return (out, lse) if return_lse else out


# Set to a list while capture() records: each kernel launch made meanwhile appends its replay.
CAPTURED = None


class capture(TorchDispatchMode):
    """torch.cuda.graph's model: every kernel made inside, FlashInfer's (the paged runs and
    merge_state) and torch's operators between them (a query negated, an LSE repaired), replayed
    later in order as a graph does: with the numbers they were launched with, on what their
    tensors hold at replay (a launch reads through pointers fixed at capture), each writing into
    the tensor it first returned. A read back of a value to the host cannot be captured (CUDA
    raises during capture): here it raises too."""

    def __enter__(self):
        global CAPTURED
        assert CAPTURED is None
        CAPTURED = self.launches = []
        return super().__enter__()

    def __exit__(self, *exc):
        global CAPTURED
        CAPTURED = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _IN_KERNEL or CAPTURED is None:
            return out
        assert func not in _READ_BACKS, f"{func} reads a value back to the host: a CUDA graph cannot capture it"
        if func.is_view:   # no kernel: the view reads what its base holds
            return out

        def replay():
            again = func(*args, **kwargs)
            for mine, new in zip(_flat(out), _flat(again)):
                if isinstance(mine, torch.Tensor) and mine is not new:
                    mine.copy_(new)
        CAPTURED.append(replay)
        return out

    def replay(self):
        with torch.no_grad():
            for launch in self.launches:
                launch()


_READ_BACKS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.is_nonzero.default)


def _flat(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


class BatchDecodeWithPagedKVCacheWrapper(BatchPrefillWithPagedKVCacheWrapper):
    def __init__(self, workspace, layout="NHD", use_tensor_cores=False, backend="auto", use_cuda_graph=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        super().__init__(workspace, layout, backend)
        self.use_tensor_cores = use_tensor_cores
        self.requested_backend = backend
        self.graph_buffers = None
        if use_cuda_graph:   # FlashInfer's checks, and its kernels read these on the workspace's device
            buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)
            assert all(isinstance(b, torch.Tensor) and b.dtype == torch.int32 for b in buffers)
            on_device(self.device, "decode plan() (CUDA-graph buffers)", *buffers)
            assert len(paged_kv_indptr_buffer) == len(paged_kv_last_page_len_buffer) + 1
            self.graph_buffers = buffers

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):
        # the decode kernel checks int32 tables (CHECK_INPUT_TYPE); the tensor-core path plans a
        # host int32 qo_indptr of its own, read as the module's IdType (indptr's dtype)
        check_idtype(torch.int32, "decode plan()", indptr=indptr, indices=indices, last_page_len=last_page_len)
        if self.graph_buffers is not None:
            # as FlashInfer's CUDA-graph mode: the batch size is the buffers', the tables are copied
            # into them (the page ids without a wait only from the GPU: a host table's copy waits)
            indptr_buf, indices_buf, last_buf = self.graph_buffers
            if len(last_page_len) != len(last_buf):
                raise ValueError("The batch size should be fixed in cudagraph mode")
            if len(indices) > len(indices_buf):
                raise ValueError("The size of indices should be less than or equal to the allocated buffer")
            on_device(self.device, "decode plan() (the page ids, copied without a wait)", indices)
            indptr_buf.copy_(indptr)
            last_buf.copy_(last_page_len)
            indices_buf[:len(indices)].copy_(indices)
            indptr, indices, last_page_len = indptr_buf, indices_buf, last_buf
        else:
            # each table is moved on its own (indptr.to(device), ...) and the lengths are computed on
            # host copies: no mix of the caller's tables in FlashInfer's decode plan()
            indptr, indices, last_page_len = (t.to(self.device) for t in (indptr, indices, last_page_len))
        qo_indptr = torch.arange(indptr.numel(), dtype=torch.int32, device=self.device)
        super().plan(qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                     q_data_type=kw.get("q_data_type", "float16"), kv_data_type=kw.get("kv_data_type"),
                     sm_scale=kw.get("sm_scale"), window_left=kw.get("window_left", -1),
                     logits_soft_cap=kw.get("logits_soft_cap"), disable_split_kv=kw.get("disable_split_kv", False))
        if self.graph_buffers is not None:   # the kernels read the buffers themselves, as they hold at each launch
            self.args = (self.args[0], indptr_buf, indices_buf, last_buf)


# A custom attention variant (jit_args) is modelled by the host-compiled code of its score_mod:
# tests register hostcheck.compile_host(graph) under the variant's name.
VARIANTS = {}
WRAPPER_BUFFERS = ("maybe_custom_mask", "maybe_mask_indptr", "maybe_alibi_slopes", "maybe_prefix_len_ptr")


class PagedVariantModel:
    """A variant of variant_paged.py: the positions its five tables give (as its C++ maps them),
    the host-compiled score_mod and, when it owns the mask, the host-compiled mask_mod.
    VARIANTS holds {"score": f or None, "mask": f or None} under the variant's name, and
    "fa3_mask": True for fa3's one launch, which evaluates the mask on pages whose ffi_page_kv0
    entry carries MASKED_PAGE_FLAG."""

    def __init__(self, mods, tensor_names, scalar_names):
        self.score, self.mask = mods["score"], mods["mask"]
        self.fa3_mask = mods.get("fa3_mask", False)
        # as FlashInfer's wrapper does, names it knows are filled from its own buffers, not from run()'s arguments
        self.tensor_names = [n for n in tensor_names if n not in WRAPPER_BUFFERS]
        assert self.tensor_names[:5] == ["ffi_req_q0", "ffi_req_b", "ffi_req_h0", "ffi_req_page0", "ffi_page_kv0"]
        assert list(scalar_names[:2]) == ["ffi_sm_scale", "ffi_kv_end"]
        self.num_args = len(self.tensor_names) + len(scalar_names)

    def bind(self, args, plan_args, page_size, owns_mask):
        assert len(args) == self.num_args and all(isinstance(a, torch.Tensor) for a in args[:len(self.tensor_names)])
        tables = [a.cpu().long() for a in args[:5]]
        # the captured tensors as passed (the kernel reads its arguments): the score_mod's, then the mask_mod's
        captured = list(args[5:len(self.tensor_names)])
        n_score = len(self.score.tables) if self.score is not None else 0
        score_tables, mask_tables = captured[:n_score], captured[n_score:]
        scale, kv_end = float(args[len(self.tensor_names)]), int(args[len(self.tensor_names) + 1])
        kernel_scale(scale, 1)
        req_q0, req_b, req_h0, req_page0, page_kv0 = tables
        kv_indptr = plan_args[1].long()
        assert torch.equal(req_page0, kv_indptr[:-1])

        flagged = torch.zeros_like(page_kv0, dtype=torch.bool)
        if self.fa3_mask:
            flagged = (page_kv0 >= 0) & (page_kv0 & MASKED_PAGE_FLAG != 0)
            page_kv0 = torch.where(page_kv0 >= 0, page_kv0 & (MASKED_PAGE_FLAG - 1), page_kv0)

        def apply(r, s):   # s [H, n, m]: request r's scores over its concatenated pages
            h, n, m = s.shape
            kv_idx = torch.arange(m)
            page = page_kv0[int(req_page0[r]) + kv_idx // page_size]
            masked_page = flagged[int(req_page0[r]) + kv_idx // page_size].view(1, 1, -1)
            kv = (page + kv_idx % page_size).view(1, 1, -1)
            filler = ((page < 0) | (page + kv_idx % page_size >= kv_end)).view(1, 1, -1)
            b, hh = req_b[r], (req_h0[r] + torch.arange(h)).view(-1, 1, 1)
            qq = (req_q0[r] + torch.arange(n)).view(1, -1, 1)
            out = s * scale
            if self.score is not None:
                out = torch.where(filler, out, self.score(out.float(), b, hh, qq, kv.clamp(0, kv_end - 1),
                                                          tables=score_tables).double())
            if owns_mask:
                keep = self.mask(torch.zeros(()), b, hh, qq, kv.clamp(0, kv_end - 1), tables=mask_tables).bool() & ~filler
                out = out.masked_fill(~keep, -math.inf)
            if self.fa3_mask:
                keep = self.mask(torch.zeros(()), b, hh, qq, kv.clamp(0, kv_end - 1), tables=mask_tables).bool() & ~filler
                out = out.masked_fill(masked_page & ~keep, -math.inf)
            return out

        return apply


LTO_VARIANT = lto_variants.VARIANT_NAME


class FakeLtoModule:
    """What the stubbed device-LTO build (register_lto_build) loads for a score_mod: the model runs
    its graph's host-compiled code, fed from the generic slots exactly as the score file reads
    them (lto_variants.score_source: slot_names' mapping), so a wrong slot, type or stride fails.
    One module serves every score_mod of the same code (the key is the score file's text): the
    numbers and tables come from the slots, never from the graph it was built for."""

    def __init__(self, name, graph, position_bound, dtype, head_dim, use_sliding_window):
        from hostcheck import compile_host

        self.name, self.graph, self.position_bound = name, graph, position_bound
        self.config = (dtype, head_dim, use_sliding_window)
        self.score = compile_host(graph)

    def __repr__(self):
        return f"FakeLtoModule({self.name})"

    def decode(self, slots):
        """(tables, numbers, scale) from run()'s arguments after the three request tables: the tensor
        slots, the scale, the int and the float slots (lto_variants.generic_arguments' order)."""
        G = lto_variants
        assert len(slots) == G.GENERIC_TENSORS + 1 + G.GENERIC_INTS + G.GENERIC_FLOATS, \
            f"{len(slots)} generic arguments after the request tables"
        tensors = list(slots[:G.GENERIC_TENSORS])
        scale = slots[G.GENERIC_TENSORS]
        ints = slots[G.GENERIC_TENSORS + 1:G.GENERIC_TENSORS + 1 + G.GENERIC_INTS]
        floats = slots[G.GENERIC_TENSORS + 1 + G.GENERIC_INTS:]
        # the FFI takes each slot as declared: int64 for the int slots, double for the rest
        assert isinstance(scale, float) and all(isinstance(f, float) for f in floats), "a float slot not a float"
        assert all(isinstance(i, int) and not isinstance(i, bool) for i in ints), "an int slot not an int"
        t_slots, s_slots, shape = G.slot_names(self.graph)
        names = list(t_slots)
        tables = tensors[:len(names)]
        assert all(t is None for t in tensors[len(names):]), "an unused tensor slot not None"
        for (name, source), t in zip(self.graph.tensors, tables):
            assert isinstance(t, torch.Tensor), f"captured tensor {name}: its slot holds {t!r}"
            # the score file casts the untyped slot to this element type
            assert t.dtype == _CTYPES[element_ctype(source)], \
                f"captured tensor {name} is {t.dtype}, the score file reads {element_ctype(source)}"
            assert t.dim() == source.dim(), f"captured tensor {name}: {t.dim()} dimensions, traced {source.dim()}"

        def slot(name):
            i = int(name[len("ffi_i"):]) if name.startswith("ffi_i") else int(name[len("ffi_f"):])
            return ints[i] if name.startswith("ffi_i") else floats[i]

        numbers = [slot(s_slots[name]) for name, _, _ in self.graph.scalars]
        by_name = dict(zip(names, tables))
        for (name, what, d), where in shape.items():   # the code indexes the table by these
            actual = by_name[name].stride(d) if what == "stride" else by_name[name].shape[d]
            assert slot(where) == actual, f"{name}'s {what} {d}: slot {where} holds {slot(where)}, the tensor has {actual}"
        used = set(s_slots.values()) | set(shape.values())
        assert all(v == 0 for i, v in enumerate(ints) if G.int_slot(i) not in used), "an unused int slot not 0"
        return tables, numbers, kernel_scale(scale, 1)


def _fake_module_getter(backend, *jit_args, **_):
    """flashinfer.prefill.get_customize_batch_prefill_module: FlashInfer would build the module from
    jit_args. For the generic LTO variant that would be its files without any score_mod's code
    (the library must hand the LTO module in: planning/ragged.handed_module)."""
    if len(jit_args) > 11 and jit_args[11] == LTO_VARIANT:
        raise AssertionError(f"FlashInfer asked to build the generic variant {jit_args[0]} from source: "
                             "the LTO module was not handed to the wrapper")
    return types.SimpleNamespace(jit_args=jit_args)


def register_lto_build(monkeypatch, lto_score_mods, built=None) -> list:
    """Stub the device-LTO toolchain (nvcc, nvJitLink) for lto_score_mods: the toolchain is
    there, and each score_mod's module is a FakeLtoModule named as the real one's score part (the
    score file's key: lto_variants.score_key runs for real). Returns the names built."""
    built = [] if built is None else built

    def name(graph, position_bound, dtype, head_dim, use_sliding_window):
        return (f"ffi_lto_fake_{str(dtype).split('.')[-1]}_d{head_dim}_{'swa' if use_sliding_window else 'noswa'}_"
                f"{lto_variants.score_key(graph, position_bound)}")

    def build(*args):
        built.append(name(*args))
        return FakeLtoModule(built[-1], *args)

    monkeypatch.setattr(lto_score_mods, "toolchain_missing", lambda: None)
    monkeypatch.setattr(lto_score_mods, "module_name", name)
    monkeypatch.setattr(lto_score_mods, "build_module", build)
    monkeypatch.setattr(lto_score_mods, "_LOADED", {})
    return built


HEAD_WINDOW_TABLE = "ffi_head_window_left"   # backends/head_windows.py's module: FlashInfer's kernel, patched
TILE_STARTS = "ffi_tile_start"               # backends/tile_gather.py's module: the same, key tiles gathered
GATHER_TILE = 128                            # its key tiles (the patches make them 128 keys at head_dim 64 and 128:
                                             # tile_gather.serves holds the library to those)


def gathered_keys(x, kv_indptr, starts, tiles):
    """The tile-gather kernel's keys (or values) of each request side by side: request r lists
    kv_indptr[r + 1] - kv_indptr[r] keys, the leading ones of its tiles tiles[starts[r]:], each tile
    GATHER_TILE rows of x (rows past x's end read as zeros, as the TMA reads them)."""
    assert x.shape[0] > 0
    rows = []
    for r in range(kv_indptr.numel() - 1):
        n = int(kv_indptr[r + 1] - kv_indptr[r])
        if n == 0:
            continue
        listed = tiles[int(starts[r]):int(starts[r]) + -(-n // GATHER_TILE)].long()
        assert listed.numel() == -(-n // GATHER_TILE), "a request lists more keys than its tiles hold"
        assert bool((listed >= 0).all()) and bool((listed * GATHER_TILE < x.shape[0]).all()), "a tile outside the keys"
        index = (listed.view(-1, 1) * GATHER_TILE + torch.arange(GATHER_TILE)).flatten()[:n]
        padded = torch.cat([x, x.new_zeros(GATHER_TILE, *x.shape[1:])])
        rows.append(padded[index.clamp(max=x.shape[0]).to(x.device)])
    return torch.cat(rows) if rows else x[:0]


class BatchPrefillWithRaggedKVCacheWrapper:
    """As FlashInfer 0.7.2's: run() takes the mask from what plan() stored in self._causal (the
    library may schedule a window launch as not causal and run it causal: planning/ragged.py).
    The head-window module (jit_args naming HEAD_WINDOW_TABLE first) is FlashInfer's own kernel
    with each query head's window read from the table run() passes, when the launch has a window."""

    def __init__(self, workspace, layout="NHD", backend="auto", jit_args=None):
        assert layout == "NHD"
        self.backend = backend
        self.device = workspace.device   # FlashInfer's wrapper: self.device = float_workspace_buffer.device
        self.jit_args = jit_args
        self.head_windows = jit_args is not None and jit_args[7][0] == HEAD_WINDOW_TABLE
        self.gather = jit_args is not None and jit_args[7][0] == TILE_STARTS
        # native_copy's module: FlashInfer's DefaultAttention (soft cap or not) with one mask mode
        self.native_copy = native_copy.is_native_copy(jit_args)
        assert not self.native_copy or (backend == "fa3" and jit_args[11] == f"DefaultAttention<{str(jit_args[-1]).lower()}>")
        assert not self.head_windows or (backend == "fa3" and jit_args[11] == "DefaultAttention<false>")
        # the gather module: FlashInfer's DefaultAttention, with its logits soft cap (a run scalar) or not
        assert not self.gather or (backend == "fa3" and jit_args[11] == f"DefaultAttention<{str(jit_args[-1]).lower()}>")
        self.lto_module = None
        if jit_args is not None and jit_args[11] == LTO_VARIANT:
            # as FlashInfer's wrapper: its module from the getter (the library hands the LTO one in)
            self.lto_module = sys.modules["flashinfer"].prefill.get_customize_batch_prefill_module(backend, *jit_args)
            assert isinstance(self.lto_module, FakeLtoModule) and self.lto_module.name == jit_args[0], \
                f"the generic variant's wrapper got {self.lto_module!r}, not the LTO module {jit_args[0]}"
            assert backend == "fa3", "the LTO module is an fa3 module"
            self.variant = self.lto_module
        else:
            self.variant = (None if jit_args is None or self.head_windows or self.gather or self.native_copy
                            else VARIANTS[jit_args[11]])

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, causal=False, window_left=-1,
             sm_scale=None, logits_soft_cap=None, disable_split_kv=False, custom_mask=None, q_data_type="float16",
             kv_data_type=None, **_):
        assert custom_mask is None, "the model of the ragged wrapper has no bit mask"
        idtype = self.jit_args[4] if self.jit_args is not None else kv_indptr.dtype
        check_idtype(idtype, "ragged plan()", qo_indptr=qo_indptr, kv_indptr=kv_indptr)
        assert len(qo_indptr) == len(kv_indptr)
        self.custom_mask = custom_mask
        self.dtypes = planned_dtypes(q_data_type, kv_data_type)
        self.split_kv = self.backend != "fa3" and not disable_split_kv   # as the paged wrapper
        self.qo_indptr, self.kv_indptr = qo_indptr.cpu().long(), kv_indptr.cpu().long()
        self._causal, self.window_left = causal, window_left
        assert not (logits_soft_cap and self.variant is not None), "FlashInfer's soft cap is its default variant's"
        self.cap = logits_soft_cap or 0.0
        self.scale = kernel_scale(sm_scale, head_dim_qk)

    @kernel
    def run(self, q, k, v, *variant_args, return_lse=False, out=None, lse=None):
        out_buffer, lse_buffer = out, lse
        assert bool(variant_args) == (self.jit_args is not None)
        # the mask mode is chosen here, from what plan() stored (or was set after it), as in run()
        check_variant_mask_mode(self.backend, self.variant is not None, self._causal, self.custom_mask)
        check_window_flag(self.backend, self.jit_args, self.window_left, "ragged run()")
        on_device(self.device, "ragged run()", q, k, v, out_buffer, lse_buffer)
        check_run_dtypes(self.dtypes, q, k, "ragged run()")
        if self.jit_args is not None and not self.head_windows and not self.gather and not self.native_copy:
            check_variant_tensors(self.jit_args, variant_args, self.device, "ragged run()")
        window_left, scale = self.window_left, self.scale
        copy_cap = None
        if self.native_copy:   # FlashInfer's four optional tensors, then its four scalars
            assert len(variant_args) == 8 and all(t is None for t in variant_args[:4]), "FlashInfer's own optional tensors: None"
            assert variant_args[6] == 1.0 and variant_args[7] == 0, "no value scale, no multi-item scoring"
            # the module holds one mask mode: the one the launch runs
            assert (1 if self._causal else 0) in kept_modes("fa3", self.jit_args[0]), \
                f"{self.jit_args[0]} run with causal={self._causal}"
            assert (window_left >= 0) == bool(self.jit_args[-2]), "a window exactly where the module has one"
            cap = float(variant_args[4])
            assert (cap > 0) == bool(self.jit_args[-1]), "a soft cap exactly where the module has one"
            scale = kernel_scale(variant_args[5], q.shape[-1])
            copy_cap = _soft_cap(cap)
        if self.gather:   # the two tables, FlashInfer's four optional tensors, then its four scalars
            starts, tiles, *unfilled = variant_args[:6]
            on_device(self.device, "ragged run(): the tile tables", starts, tiles)
            assert starts.dtype == tiles.dtype == torch.int32 and starts.is_contiguous() and tiles.is_contiguous()
            assert starts.shape == (self.qo_indptr.numel() - 1,), "one start per request"
            assert all(t is None for t in unfilled), "FlashInfer's own optional tensors: None"
            assert len(variant_args) == 10 and variant_args[8] == 1.0
            assert window_left < 0, "the module is built without a window"
            scale = kernel_scale(variant_args[7], q.shape[-1])
            cap = float(variant_args[6])
            assert (cap > 0) == bool(self.jit_args[-1]), "a soft cap exactly where the module has one"
            gather_cap = _soft_cap(cap)
            k, v = (gathered_keys(x, self.kv_indptr, starts.cpu(), tiles.cpu()) for x in (k, v))
        if self.head_windows:   # the table, FlashInfer's four optional tensors, then its four scalars
            table, *unfilled = variant_args[:5]
            on_device(self.device, "ragged run(): the window table", table)
            assert table.dtype == torch.int32 and table.shape == (q.shape[1],) and table.is_contiguous()
            assert all(t is None for t in unfilled), "FlashInfer's own optional tensors: None"
            assert variant_args[5] == 0.0 and variant_args[7] == 1.0, "no soft cap, no value scale"
            # the scalars the module declares, in order (the sinks' module: the sink count last)
            sinks = "ffi_sink_len" in self.jit_args[9]
            assert len(variant_args) == 5 + len(self.jit_args[9]) == 9 + sinks, "the module's tensors and scalars"
            scale = kernel_scale(variant_args[6], q.shape[-1])
            sink_len = int(variant_args[9]) if sinks else 0
            # the module is generated with its window on (jit_args' last): the kernel reads the
            # table whatever window_left the launch was planned with
            window_left = (table.cpu().long(), sink_len)
        # what the real kernels read of a caller's buffers: the LSE by its pointer alone (a
        # contiguous [rows, heads]); the output by its strides on fa3 (o_stride_n, o_stride_h),
        # contiguous on fa2
        if out_buffer is not None:
            assert out_buffer.shape == (*q.shape[:-1], v.shape[-1]) and out_buffer.dtype == q.dtype
            assert out_buffer.stride(-1) == 1 and (self.backend == "fa3" or out_buffer.is_contiguous()), \
                "FlashInfer's fa2 kernel writes a contiguous output"
        if lse_buffer is not None:
            assert lse_buffer.shape == q.shape[:2] and lse_buffer.is_contiguous(), "the LSE is written by its pointer"
        transform = (self._transform(variant_args) if self.variant is not None
                     else gather_cap if self.gather else copy_cap if self.native_copy else _soft_cap(self.cap))
        out, lse = ragged_prefill(q, k, v, self.qo_indptr, self.kv_indptr, self._causal, window_left,
                                  1.0 if self.variant is not None else scale, transform, self.split_kv)
        if out_buffer is not None:
            out_buffer.copy_(out)
            out = out_buffer
        if lse_buffer is not None:
            lse_buffer.copy_(lse)
            lse = lse_buffer
        return (out, lse) if return_lse else out

    def _transform(self, variant_args):
        """The variant's arguments are the request tables (first query, first key, batch entry),
        the captured tensors, then the scale; the score_mod sees absolute positions. The LTO
        module's: the same tables, then its generic slots (FakeLtoModule.decode)."""
        req_q0, req_kv0, req_b = (t.cpu().long() for t in variant_args[:3])
        if self.lto_module is not None:
            tables, numbers, scale = self.lto_module.decode(variant_args[3:])
            score = functools.partial(self.lto_module.score, scalars=numbers)
            return _positions_transform(score, req_q0, req_kv0, req_b, tables, scale)
        tables = [a for a in variant_args[3:] if isinstance(a, torch.Tensor)]   # read as passed, as the kernel does
        scale = kernel_scale(float(next(a for a in variant_args[3:] if not isinstance(a, torch.Tensor))), 1)
        return _positions_transform(self.variant, req_q0, req_kv0, req_b, tables, scale)


def _positions_transform(score, req_q0, req_kv0, req_b, tables, scale):
    """The transform of a compiled band variant: request r's logits [H, n, m] scaled, then the
    score_mod at absolute positions (the request tables' first query, first key, batch entry)."""

    def transform(r, logits):   # logits [H, n, m] of request r
        h, n, m = logits.shape
        pos = (torch.arange(h).view(-1, 1, 1), req_q0[r] + torch.arange(n).view(1, -1, 1),
               req_kv0[r] + torch.arange(m).view(1, 1, -1))
        return score((logits * scale).float(), req_b[r], *pos, tables=tables).double()

    return transform


def ragged_prefill(q, k, v, qo_indptr, kv_indptr, causal, window_left, scale, transform=None, split_kv=False):
    """Per request: queries aligned to the bottom right of its keys, as FlashInfer's flags mean;
    a variant's transform applies before those masks, as in FlashInfer's fa3 kernels. window_left:
    an int, or for the head-window module (a tensor of one per query head, the sink count: keys
    below it spared the window). split_kv:
    fa2's split of a request's keys, merged as merge_state does (paged_simulator.paged_prefill),
    modelled at its worst, one part per 16 keys."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    for r in range(qo_indptr.numel() - 1):
        q0, q1, k0, k1 = (int(x) for x in (qo_indptr[r], qo_indptr[r + 1], kv_indptr[r], kv_indptr[r + 1]))
        if q1 == q0 or k1 == k0:
            continue
        kk = k[k0:k1].double().cpu().repeat_interleave(group, 1)
        vv = v[k0:k1].double().cpu().repeat_interleave(group, 1)
        s = torch.einsum("nhd,khd->hnk", q[q0:q1].double().cpu(), kk) * scale
        if transform is not None:
            s = transform(r, s)
        pos = torch.arange(q1 - q0).view(-1, 1) + (k1 - k0) - (q1 - q0)
        kv = torch.arange(k1 - k0).view(1, -1)
        keep = torch.ones_like(kv <= pos)
        if causal:
            keep &= kv <= pos
        if isinstance(window_left, tuple):   # the head-window module: (per-head table, sinks)
            table, sinks = window_left
            keep = keep & ((kv >= pos - table.view(-1, 1, 1)) | (kv < sinks))
        elif window_left >= 0:
            keep &= kv >= pos - window_left
        s = s.masked_fill(~keep, -math.inf)
        part = 16 if split_kv else s.shape[-1]
        o_r = l_r = None
        for i in range(0, s.shape[-1], part):
            o_p, l_p = attend(s[..., i:i + part], vv[i:i + part])
            o_r, l_r = (o_p, l_p) if o_r is None else _merge_state(o_r, l_r, o_p, l_p)
        out[q0:q1], lse[q0:q1] = o_r, l_r
    return out.to(q.dtype).to(q.device), lse.float().to(q.device)


def _soft_cap(cap):
    """FlashInfer's logits soft cap on scaled scores, or None without one."""
    return (lambda r, s: cap * torch.tanh(s / cap)) if cap > 0 else None


def kernel_scale(sm_scale, head_dim: int) -> float:
    """FlashInfer's kernels give NaN for every row at sm_scale <= 0 (seen on an H200 by the GPU
    fuzzer): the model refuses one, so the library's CPU tests catch a call that would pass it."""
    scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
    assert scale > 0, f"sm_scale {scale}: FlashInfer's kernels give NaN for a scale <= 0"
    # the kernels hold it as a float32: 1e-300 is 0 there
    f32 = torch.finfo(torch.float32)
    assert f32.tiny <= scale <= f32.max, f"sm_scale {scale} is not a normal float32 (0 or inf in the kernels)"
    return scale


@kernel
def single_prefill_with_kv_cache(q, k, v, causal=False, window_left=-1, sm_scale=None, return_lse=False,
                                 logits_soft_cap=None, pos_encoding_mode="NONE", **_):
    assert pos_encoding_mode == "NONE", "the CPU model has no ALiBi"
    on_device(q.device, "single_prefill_with_kv_cache", k, v)   # its workspace and output are on q.device
    ends = (torch.tensor([0, q.shape[0]]), torch.tensor([0, k.shape[0]]))
    transform = _soft_cap(logits_soft_cap or 0.0)
    out, lse = ragged_prefill(q, k, v, *ends, causal, window_left, kernel_scale(sm_scale, q.shape[-1]),
                              transform)
    return (out, lse) if return_lse else out


def check_merge_inputs(what, v_a, s_a, v_b, s_b):
    """cascade.cu: CHECK_INPUT (CUDA, contiguous) and CHECK_DEVICE of all four, v 3-D, s 2-D, same
    shapes (s is first converted to float32 by the Python wrapper, a copy only when it is not)."""
    on_device(v_a.device, what, s_a, v_b, s_b)
    for name, t in (("v_a", v_a), ("v_b", v_b), ("s_a", s_a), ("s_b", s_b)):
        contiguous = t.is_contiguous() or (name[0] == "s" and t.dtype != torch.float32)
        assert contiguous, f"{what}: {name} of shape {tuple(t.shape)} is not contiguous (FlashInfer's CHECK_INPUT)"
    assert v_a.dim() == 3 and s_a.dim() == 2 and v_a.shape == v_b.shape and s_a.shape == s_b.shape, what
    assert tuple(v_a.shape[:2]) == tuple(s_a.shape), what


@kernel
def merge_state(o_a, s_a, o_b, s_b):
    check_merge_inputs("merge_state", o_a, s_a, o_b, s_b)

    def compute():
        out, lse = _merge_state(o_a.double(), s_a.double(), o_b.double(), s_b.double())
        return out.to(o_a.dtype), lse.float()
    out, lse = compute()
    if CAPTURED is not None:   # replayed after the launches it merges (capture order)
        def replay():
            again = compute()
            out.copy_(again[0])
            lse.copy_(again[1])
        CAPTURED.append(replay)
    return out, lse


@kernel
def merge_state_in_place(v, s, v_other, s_other, mask=None):
    assert mask is None, "the CPU model merges every row"
    check_merge_inputs("merge_state_in_place", v, s, v_other, s_other)
    # the Python wrapper converts s with s.to(torch.float32): another dtype is a copy, which the
    # kernel updates in place while the caller's s keeps the old LSE
    assert s.dtype == torch.float32, f"merge_state_in_place: s is {s.dtype}, its merged LSE would be lost"
    out, lse = merge_state(v, s, v_other, s_other)
    v.copy_(out)
    s.copy_(lse)


def module():
    return types.SimpleNamespace(BatchPrefillWithPagedKVCacheWrapper=BatchPrefillWithPagedKVCacheWrapper,
                                 BatchPrefillWithRaggedKVCacheWrapper=BatchPrefillWithRaggedKVCacheWrapper,
                                 single_prefill_with_kv_cache=single_prefill_with_kv_cache,
                                 BatchDecodeWithPagedKVCacheWrapper=BatchDecodeWithPagedKVCacheWrapper,
                                 merge_state=merge_state, merge_state_in_place=merge_state_in_place,
                                 prefill=types.SimpleNamespace(gen_batch_prefill_module=native_module_spec,
                                                               get_customize_batch_prefill_module=_fake_module_getter),
                                 __version__="fake")


def native_module_spec(backend, *args):
    """FlashInfer's spec of its native batch-prefill module, as on a machine where it is neither
    prebuilt nor built: the library then runs its own one-mode copy (compile/native_copy.py), so
    every band route the suite and the fuzzer run on the model goes through that copy."""
    assert backend == "fa3" and len(args) == 10, "FlashInfer 0.7's gen_batch_prefill_module arguments"
    return types.SimpleNamespace(is_aot=False, is_compiled=False)


def register_paged_variants(monkeypatch, tile_kernels) -> list:
    """Wrap the paged variant builders tile_kernels calls so that each variant they generate is
    registered in VARIANTS with the host-compiled code of its graphs; returns the names built."""
    from hostcheck import compile_host

    built = []
    for name in ("fa3_paged_score_mod_variant", "fa2_paged_variant"):
        real = getattr(tile_kernels, name)

        def registering(*args, _real=real, **kw):
            spec = _real(*args, **kw)
            fa2 = _real.__name__ == "fa2_paged_variant"
            graphs = list(args[:2]) if fa2 else [args[0], kw.get("mask_graph")]
            mods = {"score": graphs[0] and compile_host(graphs[0]), "mask": graphs[1] and compile_host(graphs[1]),
                    "fa3_mask": not fa2 and graphs[1] is not None}
            monkeypatch.setitem(VARIANTS, spec.name, mods)
            built.append(spec.name)
            return spec

        monkeypatch.setattr(tile_kernels, name, registering)
    return built


def register_band_variants(monkeypatch, score_mod_kernels) -> list:
    """Register each band score_mod variant score_mod_kernels traces (fa3 and fa2 names) with the
    host-compiled code of its graph, and stub the device-LTO build (register_lto_build): on fa3
    the bands run the LTO module where the score_mod fits, as on the GPU. Returns the names of
    the LTO modules built."""
    from hostcheck import compile_host

    built = register_lto_build(monkeypatch, score_mod_kernels.lto_score_mods)

    real_trace = score_mod_kernels.trace

    def registering_trace(fn, kind):
        graph = real_trace(fn, kind)
        host = compile_host(graph)
        monkeypatch.setitem(VARIANTS, f"FlexScoreMod_{graph_key(graph)}", host)
        monkeypatch.setitem(VARIANTS, f"FlexScoreModFa2_{graph_key(graph)}<use_custom_mask>", host)
        return graph

    monkeypatch.setattr(score_mod_kernels, "trace", registering_trace)
    return built
