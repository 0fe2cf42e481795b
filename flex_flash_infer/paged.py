"""Attention with a mask_mod over a paged KV cache: decode and chunked prefill in a serving loop.

    paged = PagedFlexAttention(device="cuda")
    paged.plan(mask_mod, qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len,
               num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype=torch.bfloat16)
    out = paged.run(q, (k_cache, v_cache))     # q [total queries, Hq, D]; caches [pages, page_size, Hkv, D]

plan() once per step does the host work (paged_plan.py); run() only launches FlashInfer kernels.
The queries of a request are its newest tokens: query i of request r sits at position
kv_len[r] - qo_len[r] + i, and mask_mod(b=r, h, q_pos, kv_pos) sees absolute positions, so
sliding windows, sinks, attamba and tree masks hold during generation. A score_mod, and a
mask_mod that reads h (per-head masks), run compiled into the kernels (paged_kernels.py). On a
CPU (or with backend="reference") run() computes the same thing in plain torch.
"""
from __future__ import annotations

import functools
import math

import torch

from .core import nan_merge
from .backends.autograd import FORWARD_ONLY, LearnedMemo, anchored, forward_only, learned_tensors, needs_grad
from .backends.backend_choice import check_backend_name
from .core.notices import warn_once
from .backends.flashinfer_backend import LN2, _is_hopper, default_workspace, unsupported_reason
from .core.mask_eval import (INDEX_DTYPE, as_mask_mod, check_score_mod, evaluate_mask_mod, evaluate_score_mod,
                             mask_dependence)
from .mods.causal import generate_causal_mask_mod
from .planning.native_soft_cap import native_soft_cap
from .planning.score_folding import fold_score_mod
from .backends.paged_graph import check_same_shape, decode_buffers, graph_shape, masked_buffers
from .backends.paged_kernels import paged_request_tables, paged_variants
from .planning.paged_plan import plan_paged
from .core.hints import states_hints
from .core.trace import TraceError, current_reads, stale_constants_message, trace, traced_once_per_call
from .core.versions import moved, snapshot, warn_unwatched
from .core.validation import check_object_device, check_positive_int, check_scale, check_workspace


def use_tensor_core_decode(num_qo_heads: int, num_kv_heads: int, use_tensor_cores: bool | None = None) -> bool:
    """Whether decode runs FlashInfer's tensor-core decode (its prefill kernel on one query per
    request) rather than its CUDA-core decode kernel. use_tensor_cores forces it; None chooses:
    GQA groups of 4 or more query heads per KV head (measured faster so; `bench --decode` times
    both)."""
    if use_tensor_cores is not None:
        return use_tensor_cores
    return num_qo_heads // num_kv_heads >= 4


# the streaming multiprocessors assumed where there is no GPU to ask (the CPU model): an H100's
MODEL_SM_COUNT = 132


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda" or not torch.backends.cuda.is_built():   # (a simulated CUDA device too)
        return MODEL_SM_COUNT
    # asked at every decode step's plan: torch's device-properties call costs tens of
    # microseconds of Python on some hosts
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_SM_COUNTS: dict[int, int] = {}


def requests_filling_the_gpu(device, num_kv_heads: int) -> int:
    """Decode requests whose (request, KV head) work items fill two CTAs per SM: from there
    FlashInfer's tensor-core decode splits no request's keys, so listing pages before a window
    costs nothing (its kernel starts at the window)."""
    return -(-2 * _sm_count(device) // num_kv_heads)


class PagedFlexAttention:
    def __init__(self, device="cuda", workspace_buffer: torch.Tensor | None = None, backend: str = "auto",
                 use_tensor_cores: bool | None = None, check_page_ids: bool = True, use_cuda_graph: bool = False,
                 max_num_pages: int | None = None):
        """use_tensor_cores: decode steps on FlashInfer's tensor-core decode kernel (True), on its
        CUDA-core one (False), or chosen from the GQA group size (None, use_tensor_core_decode).
        check_page_ids: plan() reads the range of the page ids, raises for a negative one, and
        run() raises for one past the cache's pages. Page ids kept on the GPU make that read wait for the
        GPU at every plan(), so a server's planning cannot overlap its previous step; False skips
        it for them (the caller vouches for its ids, as FlashInfer's own plan() trusts them).
        Ids given on the host are always checked: that costs no wait. The reference backend
        checks them at run() either way.
        use_cuda_graph: every plan() writes its tables into buffers made at the first, so a CUDA
        graph captured around run() once replays each later step (backends/paged_graph.py): decode
        steps planned as one decode launch (and a streaming mask's sinks launch), with the first
        plan's batch size, heads, dtype, scale, soft cap and window. max_num_pages (needed then):
        the most page ids a step lists."""
        self.device = check_object_device(device)
        self.backend = check_backend_name(backend)
        if use_tensor_cores is not None and not isinstance(use_tensor_cores, bool):
            raise TypeError(f"use_tensor_cores must be None, True or False, got {use_tensor_cores!r}")
        self.use_tensor_cores = use_tensor_cores
        if not isinstance(check_page_ids, bool):
            raise TypeError(f"check_page_ids must be True or False, got {check_page_ids!r}")
        self.check_page_ids = check_page_ids
        if not isinstance(use_cuda_graph, bool):
            raise TypeError(f"use_cuda_graph must be True or False, got {use_cuda_graph!r}")
        if use_cuda_graph:
            if max_num_pages is None:
                raise ValueError("use_cuda_graph=True needs max_num_pages: the most page ids a step lists (the size "
                                 "of the page-id buffer a captured graph reads)")
            max_num_pages = check_positive_int("max_num_pages", max_num_pages)
        elif max_num_pages is not None:
            raise ValueError("max_num_pages sizes the buffers of use_cuda_graph=True; pass use_cuda_graph=True too")
        self.use_cuda_graph, self.max_num_pages = use_cuda_graph, max_num_pages
        self._graph_shape = None   # what the first plan fixed for a captured graph (paged_graph.GraphShape)
        self._workspace = check_workspace(workspace_buffer)
        self._planned = None
        self._wrappers = {}   # FlashInfer's wrappers, made once and planned again at every plan()
        # what plan() learns of a mask_mod / score_mod object, kept while the same one comes back
        # (a server plans every step with the same functions): (the object, heads, the answer)
        self._mask_seen = (None, 0, None, None)   # (mask_mod, heads, per-head?, as_mask_mod of it)
        self._score_seen = (None, 0, None)        # (score_mod, heads, native soft cap or None)
        self._score_checked = None                # the score_mod whose signature was checked
        self._checked_shape = None                # (heads, head_dim, page_size, dtype) last checked
        self._reason_seen = (None, None)          # ((dtype, head_dim, scale), why FlashInfer cannot run it)

    @traced_once_per_call
    def plan(self, mask_mod, qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype = torch.bfloat16,
             scale: float | None = None, score_mod=None):
        """Plan one step. mask_mod(b, h, q_idx, kv_idx) or the seed's (q_idx, kv_idx); None = causal.
        score_mod(score, b, h, q_idx, kv_idx) sees the scaled score of each visible pair, as in
        FlexAttention; on FlashInfer it and a per-head mask_mod must be traceable (trace.py)."""
        # checked when they change: a server plans every step with the same numbers (plain ints
        # only: True == 1 must not pass as a number checked before)
        shape = (num_qo_heads, num_kv_heads, head_dim, page_size, dtype)
        if shape != self._checked_shape or not all(type(v) is int for v in shape[:4]):
            for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
                                ("head_dim", head_dim), ("page_size", page_size)):
                check_positive_int(name, value)
            if num_qo_heads % num_kv_heads:
                raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise TypeError(f"dtype must be the floating torch.dtype of q and the cache (torch.bfloat16, "
                                f"torch.float16, ...), got {dtype!r}")
            self._checked_shape = shape
        # checked once per score_mod object: reading its signature costs more than the rest of a decode step's plan
        user_score_mod = score_mod
        if score_mod is not self._score_checked:
            score_mod = check_score_mod(score_mod)
        seen_mask, seen_heads, per_head, mod = self._mask_seen
        if seen_mask is not mask_mod or seen_heads != num_qo_heads or mod is None or not states_hints(mod):
            mod = as_mask_mod(mask_mod) if mask_mod is not None else _causal
            # probed at position 0 alone: the only one every cache with a key holds (a mask
            # indexing a table as long as the cache failed on positions 1..3 of a one-token cache).
            # Kept for the library's masks; a user's is probed at every plan (one reading a global
            # may start reading h between steps)
            per_head = num_qo_heads > 1 and mask_dependence(mod, 1, num_qo_heads, 1, 1, self.device)[1]
            self._mask_seen = (mask_mod, num_qo_heads, per_head, mod)
        # the library's soft cap runs as FlashInfer's own logits_soft_cap: no compiled variant (no
        # compile, and the plan may use FlashInfer's window); a per-head mask compiles a variant
        # that takes the score_mod with it
        seen_score, seen_heads, soft_cap = self._score_seen
        if score_mod is None or seen_score is not user_score_mod or seen_heads != num_qo_heads:
            soft_cap = None if score_mod is None else native_soft_cap(score_mod, num_qo_heads)
            self._score_seen = (user_score_mod, num_qo_heads, soft_cap)
        if per_head:
            soft_cap = None
        kernel_score_mod = None if soft_cap is not None else score_mod
        scale = check_scale(scale)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        # the score_mod as this plan's kernels take it, traced once here (the fold, the variants
        # and the constants below read the same graph; a server plans every step)
        score_graph = None
        if kernel_score_mod is not None:
            try:
                score_graph = trace(kernel_score_mod, "score_mod")
            except TraceError:
                pass
        # a score_mod that is c * score runs as FlashInfer's own scale: no compiled variant
        kernel_score_mod, launch_scale = fold_score_mod(kernel_score_mod, scale, score_graph)
        plan = plan_paged(mod, qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, page_size, self.device,
                          heads=num_qo_heads if per_head else 1, native_window=kernel_score_mod is None,
                          positions=kernel_score_mod is not None or per_head, check_ids=self.check_page_ids,
                          masked_launch_always=self.use_cuda_graph,
                          window_skipped_from=(requests_filling_the_gpu(self.device, num_kv_heads) if
                                               use_tensor_core_decode(num_qo_heads, num_kv_heads, self.use_tensor_cores)
                                               else None))
        backend = self.backend
        if backend != "reference":
            seen, reason = self._reason_seen   # FlashInfer's answer for these numbers holds while the process runs
            if seen != (dtype, head_dim, scale):
                reason = unsupported_reason(self.device, dtype, head_dim, head_dim, scale)
                self._reason_seen = ((dtype, head_dim, scale), reason)
            if backend == "auto":
                backend = "flashinfer" if reason is None else "reference"
            elif reason:
                raise ValueError(f"backend='flashinfer' cannot run this plan: {reason}")
        launches = variants = None
        heads = (num_qo_heads, num_kv_heads, head_dim)
        # FlashInfer's kernels give NaN for a negative sm_scale: the launches take |scale| and run()
        # negates the query (scale * q.k = |scale| * (-q).k exactly); the reference keeps the scale
        kernel_scale = abs(launch_scale)
        if backend == "flashinfer" and (kernel_score_mod is not None or per_head):
            try:
                mask_graph = trace(mod, "mask_mod") if per_head else None
                # decode on fa2: FlashInfer's fa2 kernels fold a GQA group's heads into the query
                # rows (its tensor-core decode is that kernel), so each page is read once per group
                # the trace stands for the score_mod unless the fold took it into the scale
                kernel_graph = score_graph if kernel_score_mod is not None and score_graph is not None else kernel_score_mod
                variants = paged_variants(kernel_graph, mask_graph, plan,
                                          heads, dtype, kernel_scale, page_size,
                                          self.device, _is_hopper(self.device) and not plan.decode)
            except TraceError as e:
                if self.backend == "flashinfer":
                    raise
                warn_once(f"flex_flash_infer: the paged cache runs on the slow reference backend because {e}")
                backend = "reference"
        on_flashinfer = backend == "flashinfer"
        graph = None
        if self.use_cuda_graph:   # checked before anything is written: the graph still replays the last step
            if not on_flashinfer:
                raise ValueError("PagedFlexAttention(use_cuda_graph=True) replays FlashInfer's kernels, but this plan "
                                 "runs on the reference backend"
                                 + (f" ({self._reason_seen[1]})" if self._reason_seen[1] else ""))
            graph = graph_shape(plan, heads, dtype, page_size, kernel_scale, soft_cap,
                                use_tensor_core_decode(num_qo_heads, num_kv_heads, self.use_tensor_cores), variants)
            check_same_shape(self._graph_shape, graph, self.max_num_pages, plan.full.kv_indices.numel())
        # the 0-d tensors the kernels' score_mod reads are compiled in (or folded into the scale)
        # as constants: run() raises when one was written since
        constants = snapshot([t for t, _ in score_graph.constants]) if on_flashinfer and score_graph else ()
        # (a folded score_mod's 0-d tensors count too: its factor was read into the scale)
        # the mask's tensors as planned: FlashInfer's pages' states (and a per-head mask's kernel
        # copies) come from their values, so run() raises when one was written since (the
        # reference evaluates the mask at run())
        state = current_reads(mod, "mask_mod") if on_flashinfer else None
        mask_reads = state.watch() if state is not None else ()
        warn_unwatched(mask_reads + constants, "PagedFlexAttention", "mask_mod or score_mod", "plan()")
        # the launches last of what may raise: they plan the wrappers the current plan shares, so
        # a plan() failing after them would leave the previous plan running on this step's tables
        if on_flashinfer:
            launches = self._launches(plan, heads, page_size, dtype, kernel_scale, variants, soft_cap)
        if graph is not None:
            self._graph_shape = graph
        # the reference reads the tables themselves (FlashInfer's launches hold their own copies)
        # (copies: a caller that writes its next step into the same buffers must not change this plan)
        tables = None if launches is not None else tuple(
            torch.as_tensor(t).to(self.device, torch.long, copy=True) for t in (qo_indptr, kv_page_indptr,
                                                                                 kv_page_indices, kv_last_page_len))
        # ids plan_paged left unread (check_page_ids=False): the reference indexes the cache with
        # them, where a negative id would wrap to a page from the end; read once here, checked at run()
        id_range = (tuple(int(x) for x in torch.aminmax(tables[2]))
                    if tables is not None and plan.max_page_id < 0 < tables[2].numel() else None)
        self._score_checked = user_score_mod
        self._planned = dict(mod=mod, score_mod=score_mod, plan=plan, launches=launches, variants=variants,
                             soft_cap=soft_cap, constants=constants, mask_reads=mask_reads,
                             scale=scale, launch_scale=launch_scale, negate_query=launch_scale < 0, page_size=page_size,
                             heads=heads, dtype=dtype, tables=tables, id_range=id_range, learned_memo=LearnedMemo())
        return self

    def _launches(self, plan, heads, page_size, dtype, scale, variants, soft_cap):
        """The plan's launches on the cached wrappers. Those are shared with the previous plan: if
        this fails part way (an interrupt too), the previous plan gets fresh wrappers of its own, so
        it still runs; if that fails as well, no plan is kept (run() raises until the next plan()):
        the previous launches may hold a wrapper already planned with this step's tables."""
        try:
            return _build_launches(plan, *heads, page_size, dtype, scale, self._workspace, variants, self._wrappers,
                                   self.use_tensor_cores, soft_cap, self.max_num_pages)
        except BaseException:
            if self.use_cuda_graph:
                # the wrappers' buffers are what a captured graph reads: kept (the next plan rewrites
                # them); this one may have written part of them, so no plan runs until the next
                self._planned = None
                raise
            self._wrappers.clear()
            old = self._planned
            if old is not None and old["launches"] is not None:
                try:
                    old["launches"] = _build_launches(old["plan"], *old["heads"], old["page_size"], old["dtype"],
                                                      abs(old["launch_scale"]), self._workspace, old["variants"],
                                                      self._wrappers, self.use_tensor_cores, old["soft_cap"])
                except BaseException:
                    self._planned = None
                    self._wrappers.clear()
            raise

    @property
    def active_backend(self) -> str:
        if self._planned is None:
            raise RuntimeError("call plan(...) first")
        return "flashinfer" if self._planned["launches"] is not None else "reference"

    def run(self, q: torch.Tensor, kv_cache, return_lse: bool = False):
        if self._planned is None:
            raise RuntimeError("PagedFlexAttention.run() called before plan(...)")
        p = self._planned
        k_cache, v_cache = _split_cache(kv_cache)
        hq, hkv, d = p["heads"]
        total_q = p["plan"].total_q   # host ints from plan(): run() never syncs (CUDA graphs)
        if q.dim() != 3 or tuple(q.shape) != (total_q, hq, d):
            raise ValueError(f"q must be [total queries, num_qo_heads, head_dim] = {(total_q, hq, d)}, "
                             f"got {tuple(q.shape)}")
        if k_cache.dim() != 4 or tuple(k_cache.shape[1:]) != (p["page_size"], hkv, d) or k_cache.shape != v_cache.shape:
            raise ValueError(f"kv_cache must be (k, v), each [num_pages, page_size, num_kv_heads, head_dim] with "
                             f"page_size, num_kv_heads, head_dim = {(p['page_size'], hkv, d)}; got "
                             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        max_page_id = p["plan"].max_page_id if p["id_range"] is None else p["id_range"][1]
        if k_cache.shape[0] <= max_page_id:
            raise ValueError(f"kv_cache has {k_cache.shape[0]} pages but the plan's kv_page_indices use page "
                             f"{max_page_id}")
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dtype != p["dtype"]:
                raise TypeError(f"{name} has dtype {t.dtype} but plan() was given dtype={p['dtype']}")
            if t.device.type != self.device.type:
                raise ValueError(f"{name} is on {t.device} but this PagedFlexAttention was made for {self.device}")
        stale = stale_constants_message(p["constants"], "PagedFlexAttention")
        if stale:
            raise ValueError(stale.replace("plan again", "call plan() again"))
        if moved(p["mask_reads"]):
            raise ValueError("PagedFlexAttention: a tensor the mask_mod reads was written in place after plan(); the "
                             "plan's pages were classified from its old values: call plan() again after changing it")
        if p["launches"] is None:
            out, lse = _reference(q, k_cache, v_cache, p)
            return (out, lse) if return_lse else out
        # FlashInfer takes every stride but the last dimension's: the query is copied, a cache
        # (too large to copy per step) must be laid out so
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a unit-stride last (head_dim) dimension for FlashInfer's "
                                 f"kernels, got strides {tuple(t.stride())}; pass {name}.contiguous()")
        if q.stride(-1) != 1:
            q = q.contiguous()
        q_in = -q if p["negate_query"] else q
        if p["variants"] is not None:
            p["variants"].refresh()   # tables the score_mod reads, as they are now
        # the learned tensors the score_mod reads, found at each call in grad mode (one unfrozen
        # after plan() counts): a grad_fn whose backward says why it cannot
        learned = (learned_tensors(p["score_mod"], self.device, p["learned_memo"])
                   if p["score_mod"] is not None and torch.is_grad_enabled() else [])
        if needs_grad(q, k_cache, v_cache, *learned):
            out, lse = forward_only(lambda: _run_launches(p["launches"], q_in, (k_cache, v_cache), return_lse),
                                    "PagedFlexAttention: " + FORWARD_ONLY.replace(
                                        "backend='reference'", "PagedFlexAttention(backend='reference')"),
                                    (q, k_cache, v_cache, *learned))
        else:
            out, lse = _run_launches(p["launches"], q_in, (k_cache, v_cache), return_lse)
        if lse is not None and p["plan"].decode:   # (None unless asked for)
            # FlashInfer's decode kernel merges its split-KV parts in the kernel as merge_state does,
            # weighing a NaN part 0, so the LSE of a row that saw a NaN query or key can come back a
            # number. Put NaN back where the query is NaN (unless the row sees no key: -inf, as
            # torch) and wherever the output is NaN: after the merge a NaN key cannot be told from
            # a NaN value, so a row whose only NaN is in a value gets a NaN LSE too (torch: a
            # number). Both are [rows, heads] passes over a decode step's small q and output
            # (an output NaN because a score is +inf keeps the kernel's +inf LSE, as torch's)
            lost = ((torch.isnan(q).any(-1) & (lse != float("-inf")))
                    | (torch.isnan(out).any(-1) & (lse != float("inf"))))
            lse = lse.masked_fill(lost, float("nan"))
        return (out, lse) if return_lse else out


# mask_mod=None: the library's causal mask, whose hint plans without evaluating it
_causal = generate_causal_mask_mod()


def _split_cache(kv_cache):
    if isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2 and all(isinstance(t, torch.Tensor) for t in kv_cache):
        return kv_cache
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 5 and kv_cache.shape[1] == 2:
        return kv_cache[:, 0], kv_cache[:, 1]
    raise ValueError("kv_cache must be a (k_cache, v_cache) pair or one tensor [num_pages, 2, page_size, Hkv, D]")


def _build_launches(plan, hq, hkv, d, page_size, dtype, scale, workspace, variants=None, wrappers=None,
                    use_tensor_cores: bool | None = None, soft_cap: float | None = None,
                    graph_pages: int | None = None):
    """(full wrapper, partial wrapper, full's run() arguments, partial's); a wrapper is None when
    its launch has no page. With variants (paged_kernels.py) the launches run compiled mods.
    wrappers: FlashInfer wrappers made by earlier calls, by role and kind; one that fits is planned
    again rather than made anew (a new wrapper allocates its buffers, pinned host memory included:
    host work a decode step need not repeat). use_tensor_cores: as PagedFlexAttention's. soft_cap:
    FlashInfer's own logits soft cap on every launch (native_soft_cap.py). graph_pages: the decode
    wrapper in FlashInfer's CUDA-graph mode, its page-id buffer this long, and the sinks' masked
    wrapper in it too (paged_graph.py)."""
    import flashinfer

    if plan.full is None and plan.partial is None:   # no key visible anywhere: run() gives zeros
        return None, None, (), ()
    # the page ids lie on the cache's device (the plan's other tables may lie on the host)
    device = (plan.full if plan.full is not None else plan.partial).kv_indices.device
    workspace = default_workspace(device) if workspace is None else workspace
    wrappers = {} if wrappers is None else wrappers

    def wrapper(key, make):
        if key not in wrappers:
            wrappers[key] = make()
        return _after_its_last_plan_copied(wrappers[key])

    def prefill(role, backend, jit_args=None, owns_mask=False, graph_requests=None):
        key = (role, "prefill", backend, jit_args and jit_args[0], owns_mask, graph_requests)
        kwargs = {} if jit_args is None else {"jit_args": jit_args}
        if owns_mask:
            kwargs["variant_owns_mask"] = True

        def make():
            graph = {} if graph_requests is None else dict(use_cuda_graph=True, **masked_buffers(
                graph_requests, page_size, device))
            return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend, **kwargs, **graph)
        return wrapper(key, make)

    common = dict(sm_scale=scale, q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype, logits_soft_cap=soft_cap)

    def qo_indptr(spec):
        """The plan's qo_indptr (host) where the launch's tables are: FlashInfer's plan() works out a
        bit mask's offsets from qo_indptr and the launch's tables together before it moves any."""
        return plan.qo_indptr.to(spec.kv_indptr.device, non_blocking=True)

    # prefill launches never split a request's keys: that merge would drop a NaN LSE (nan_merge.py);
    # the decode kernel keeps its split (a small batch needs it to fill the GPU): run() repairs its LSE
    prefill_common = dict(common, disable_split_kv=True)
    full = partial = None
    full_args = partial_args = ()
    if plan.full is not None:
        f = plan.full
        if variants is not None and variants.full_jit_args is not None:   # a score_mod: never the decode kernel
            full = prefill("full", variants.full_backend, variants.full_jit_args)
            full.plan(qo_indptr(f), f.kv_indptr, f.kv_indices, f.last_page_len, hq, hkv, d, page_size,
                      causal=f.causal, **prefill_common)
            full_args = (*paged_request_tables(plan, f), *variants.full_args)
        elif plan.decode:
            tensor_cores = use_tensor_core_decode(hq, hkv, use_tensor_cores)
            # backend="fa2" is what FlashInfer's "auto" resolves a one-token decode to, but "auto"
            # re-resolves at every plan() through cuDNN's version checks, most of FlashInfer's share
            # of a decode step's plan (docs/design.md)

            def make_decode():
                graph = {} if graph_pages is None else dict(use_cuda_graph=True, **decode_buffers(
                    f.last_page_len.numel(), graph_pages, device))
                return flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores,
                                                                     backend="fa2", **graph)
            full = wrapper(("full", "decode", tensor_cores, graph_pages), make_decode)
            full.plan(f.kv_indptr, f.kv_indices, f.last_page_len, hq, hkv, d, page_size, window_left=f.window_left,
                      **common)
        else:
            full = prefill("full", "fa3" if _is_hopper(device) else "fa2")
            full.plan(qo_indptr(f), f.kv_indptr, f.kv_indices, f.last_page_len, hq, hkv, d, page_size,
                      causal=f.causal, window_left=f.window_left, **prefill_common)
    if plan.partial is not None:
        m = plan.partial
        if variants is None:   # (under graph_pages: the sinks' launch of a decode step, paged_graph.py)
            partial = prefill("partial", "fa2",
                              graph_requests=None if graph_pages is None else m.last_page_len.numel())
        else:
            # a per-head mask: the kernel evaluates mask_mod itself (the plan built no bit mask)
            partial = prefill("partial", "fa2", variants.partial_jit_args, variants.owns_mask)
            partial_args = (*paged_request_tables(plan, m), *variants.partial_args)
        partial.plan(qo_indptr(m), m.kv_indptr, m.kv_indices, m.last_page_len, hq, hkv, d, page_size,
                     custom_mask=m.mask, **prefill_common)
    for planned in (full, partial):
        if planned is not None:
            _note_plan_queued(planned, device)
    return full, partial, full_args, partial_args


def _after_its_last_plan_copied(wrapper):
    """The wrapper, once the copy of its previous plan to the GPU has run. FlashInfer's plan() writes
    the schedule into the wrapper's one page-locked buffer and queues its copy to the GPU with
    nothing holding the buffer: planned again before that copy ran (a plan that does not wait for
    the GPU may run a step ahead), the previous step's launch would read this step's schedule.
    The wait is for the previous plan's copy alone, so a plan still overlaps the step before it."""
    copied = getattr(wrapper, "_ffi_plan_copied", None)
    if copied is not None:
        copied.synchronize()
    return wrapper


def _note_plan_queued(wrapper, device):
    """Mark where on the stream the wrapper's plan copy was queued (_after_its_last_plan_copied)."""
    if device.type == "cuda" and torch.backends.cuda.is_built():
        # one event per wrapper, recorded again at each plan: _after_its_last_plan_copied waited
        # for its previous record before this plan wrote the buffer
        copied = getattr(wrapper, "_ffi_plan_copied", None)
        if copied is None:
            copied = wrapper._ffi_plan_copied = torch.cuda.Event()
        copied.record()


def _run_launches(launches, q, cache, return_lse=True):
    """(out, natural-log lse, or None when not return_lse). A plan with no visible key at all
    gives zeros and -inf."""
    import flashinfer

    full, partial, full_args, partial_args = launches
    if full is None and partial is None:
        return torch.zeros_like(q), (torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
                                     if return_lse else None)
    runs = [(w, args) for w, args in ((full, full_args), (partial, partial_args)) if w is not None]
    if not return_lse and len(runs) == 1:
        return runs[0][0].run(q, cache, *runs[0][1]), None
    results = [w.run(q, cache, *args, return_lse=True) for w, args in runs]
    out, lse = results[0] if len(results) == 1 else nan_merge.merge_state(flashinfer.merge_state, *results[0],
                                                                          *results[1])
    # the merge's LSE (base 2) is needed for the merge alone unless asked for: no launch for nothing
    return out, lse * LN2 if return_lse else None


def _reference(q, k_cache, v_cache, p):
    """Plain torch, request by request, in float32 (float64 for float64 inputs, as the reference
    backend): the oracle and the CPU path."""
    qo_indptr, kv_page_indptr, kv_page_indices, last = p["tables"]
    if p["id_range"] is not None and p["id_range"][0] < 0:   # ids plan_paged left unread, read by plan()
        raise ValueError("kv_page_indices must be non-negative page ids")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hkv, d = p["heads"]
    page_size = p["page_size"]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[r]), int(qo_indptr[r + 1])
        pages = kv_page_indices[int(kv_page_indptr[r]):int(kv_page_indptr[r + 1])]
        if q1 == q0 or pages.numel() == 0:
            continue
        kv_len = (pages.numel() - 1) * page_size + int(last[r])
        k = k_cache[pages].reshape(-1, hkv, d)[:kv_len].to(compute).repeat_interleave(hq // hkv, 1)
        v = v_cache[pages].reshape(-1, hkv, d)[:kv_len].to(compute).repeat_interleave(hq // hkv, 1)
        # [head, query, key] index grids: a mask_mod or score_mod may read h
        q_pos = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device, dtype=INDEX_DTYPE).view(1, -1, 1)
        kv_pos = torch.arange(kv_len, device=q.device, dtype=INDEX_DTYPE).view(1, 1, -1)
        b = torch.full((1, 1, 1), r, dtype=INDEX_DTYPE, device=q.device)
        h = torch.arange(hq, dtype=INDEX_DTYPE, device=q.device).view(-1, 1, 1)
        visible = evaluate_mask_mod(p["mod"], b, h, q_pos, kv_pos)
        s = torch.einsum("nhd,khd->hnk", q[q0:q1].to(compute), k) * p["scale"]
        if p["score_mod"] is not None:   # on the scaled scores, before the mask (FlexAttention's order)
            s = evaluate_score_mod(p["score_mod"], s, b, h, q_pos, kv_pos)
        s = s.masked_fill(~visible, float("-inf"))
        # as reference.attend_rows: a NaN score gives NaN (never a hidden 0), an empty row exact zeros
        row_max = s.amax(-1, keepdim=True)
        empty = row_max == float("-inf")
        # a +inf score: no shift, so its row's LSE is +inf as torch's (inf - inf made it NaN)
        shift = torch.where(torch.isfinite(row_max), row_max.detach(), 0.0)
        weights = torch.exp(s - shift)
        total = torch.where(empty, 1.0, weights.sum(-1, keepdim=True))
        out[q0:q1] = torch.einsum("hnk,khd->nhd", weights / total, v).to(q.dtype)
        lse[q0:q1] = torch.where(empty, float("-inf"), torch.log(total) + shift).squeeze(-1).transpose(0, 1)
    if needs_grad(q, k_cache, v_cache) and not out.requires_grad:   # no request sees a key
        out, lse = anchored((q, k_cache, v_cache), out, lse)
    return out, lse
