"""Plan a mask over a paged KV cache (decode and chunked prefill; pure torch, tested on CPU).

Request r holds kv_len[r] keys in its pages (FlashInfer's layout: kv_page_indptr / indices /
last_page_len) and qo_len[r] new queries, the newest tokens: query i sits at position
kv_len[r] - qo_len[r] + i, and mask_mod(b=r, h, q_pos, kv_pos) sees those absolute positions.

Every (request, page) is classified from the traced mask's bounds over the page's positions
(tile_bounds.box_bounds: a decode step of a streaming or document mask leaves a few pages per
request undecided), and by evaluating the mask on its qo_len x page_len elements where they do
not decide it (or the mask does not trace):
  * full pages go to an unmasked launch (FlashInfer's decode kernel when every request has one
    query, else paged prefill);
  * partial pages go to fa2 paged prefill with a bit mask over those pages only, merged by
    log-sum-exp; a request without partial pages gets one dummy key whose bit is 0;
  * empty pages are skipped;
  * when every partial page is a trailing page whose mask is plain causal (chunked prefill
    with causal, sliding-window or sink masks whose edge is page-aligned), full and partial pages
    run as one causal launch: FlashInfer aligns causal masks to the bottom right, which is
    exactly q_pos >= kv_pos for the newest-token queries.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..masks.block_build import EMPTY, FULL, PARTIAL
from ..masks.tile_bounds import box_bounds
from .linear_masks import paged_flags
from . import planner
from ..core.mask_eval import INDEX_DTYPE, evaluate_mask_mod
from ..core.notices import warn_once
from ..core.trace import TraceError, trace
from ..core.hints import made_by_library, stated_hint
from ..core.transfers import to_device_queued

CHUNK_ELEMENTS = 1 << 24
# a streaming mask's sinks run as their own masked launch up to this many pages a request
MAX_COLUMN_PAGES = 4


@dataclass
class PagedLaunchSpec:
    # kv_indices lies on the plan's device; the other tables on the host or on the device
    kv_indptr: torch.Tensor        # int32 [R + 1]
    kv_indices: torch.Tensor       # int32 [pages]: page ids in the cache
    last_page_len: torch.Tensor    # int32 [R]
    causal: bool = False
    window_left: int = -1          # FlashInfer's sliding window (with causal), bottom-right aligned
    mask: torch.Tensor | None = None   # flat bool: per request row-major [qo_len, kv_len of this launch]
    kv_positions: torch.Tensor | None = None   # int32 [pages]: first key position of each, -1 for a dummy


@dataclass
class PagedPlan:
    qo_indptr: torch.Tensor        # int32 [R + 1], on the host (FlashInfer's plan() reads it there)
    full: PagedLaunchSpec | None
    partial: PagedLaunchSpec | None
    decode: bool                   # one query per request and a full page in each: the decode kernel fits
    states: torch.Tensor | Callable[[], torch.Tensor]   # page_states, or what works them out when asked
    q_start: torch.Tensor | None = None   # int64 [R]: position of each request's first query
    max_kv_len: int = 0
    total_q: int = 0               # host ints for run()'s checks, which must not sync
    max_page_id: int = -1

    @property
    def page_states(self) -> torch.Tensor:
        """int8 [pages listed in the input]: EMPTY / PARTIAL / FULL. A plan from a mask's flags
        works them out only when asked (nothing at run time needs them; a decode step's plan
        would spend most of its time on them)."""
        if callable(self.states):
            self.states = self.states()
        return self.states


def _int_vector(name: str, x, device=None, keep_int32: bool = False) -> torch.Tensor:
    """x as a checked 1-D integer tensor on device (None: where it is; a list goes to the host)."""
    if (isinstance(x, torch.Tensor) and x.dim() == 1 and (x.dtype == torch.int64 or keep_int32 and x.dtype == torch.int32)
            and (device is None or x.device == torch.device(device))):
        return x   # what a server passes at every step: nothing to convert
    # an empty list would come out float32
    t = torch.as_tensor(x, device=device, dtype=torch.int64 if isinstance(x, (list, tuple)) and not x else None)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
    return t if keep_int32 and t.dtype == torch.int32 else t.long()


def pages_of_requests(counts: torch.Tensor, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request, page of the request) of counts[r] pages from page first[r] of each request r, in
    order: host int64 tensors. Worked out in numpy, as every per-page table of a plan on the host
    is gathered with index_select: torch's CPU advanced indexing and repeat_interleave hand a few
    thousand entries to its thread pool, which stalls a decode step's plan on a host whose cores
    are busy (docs/design.md, section 4)."""
    req, local = _pages_of_requests(counts.numpy(), first.numpy())
    return torch.from_numpy(req), torch.from_numpy(local)


def _pages_of_requests(counts, first):
    """pages_of_requests on numpy int64 arrays."""
    req = np.repeat(np.arange(counts.size), counts)
    local = np.arange(req.size) - (np.cumsum(counts) - counts)[req] + first[req]
    return req, local


def _page_lengths(req, local, pages, host_last, page_size: int) -> torch.Tensor:
    """Keys in each listed page: a request's last page holds kv_last_page_len of them."""
    return torch.where(local == pages.index_select(0, req) - 1, host_last.index_select(0, req), page_size)


def _page_places(host_kv, req, local) -> torch.Tensor:
    """Host int64: where the listed pages (request req, its page local) lie in kv_page_indices."""
    return host_kv.index_select(0, req) + local


def _first_page_places(host_kv, num_ids: int) -> torch.Tensor:
    """Host int64 [R]: where each request's first page lies in kv_page_indices (a request without
    pages, which has no queries: any place there is)."""
    return host_kv[:-1].clamp(max=num_ids - 1)


def request_lengths(q, kv, last, page_size: int):
    """(qo_len, kv_len, pages per request), checked: the queries are the newest cached tokens.
    numpy int64 arrays (qo_indptr, kv_page_indptr, kv_last_page_len on the host) in and out: plan()
    runs at every decode step, and each torch operator costs microseconds of dispatch on a few
    dozen entries."""
    if q.size != kv.size:
        raise ValueError(f"qo_indptr and kv_page_indptr must have one entry per request plus one, got "
                         f"{q.size} and {kv.size}")
    qo_len, pages = q[1:] - q[:-1], kv[1:] - kv[:-1]
    if last.size != pages.size:
        raise ValueError(f"kv_last_page_len must have one entry per request ({pages.size}), got {last.size}")
    if (qo_len < 0).any() or (pages < 0).any() or q[0] != 0 or kv[0] != 0:
        raise ValueError("qo_indptr and kv_page_indptr must start at 0 and never decrease")
    bad = ((last < 1) | (last > page_size)) & (pages > 0)
    if bad.any():
        r = int(bad.nonzero()[0][0])
        raise ValueError(f"kv_last_page_len must lie in 1..page_size ({page_size}) for requests with pages; "
                         f"request {r} has {int(last[r])}")
    kv_len = np.where(pages > 0, (pages - 1) * page_size + last, 0)
    over = qo_len > kv_len
    if over.any():
        r = int(over.nonzero()[0][0])
        raise ValueError(f"request {r} has {int(qo_len[r])} queries but {int(kv_len[r])} cached keys: the queries "
                         "are the newest tokens, so append their keys to the cache before planning")
    return qo_len, kv_len, pages


def _classify(mask_mod, req, local, page_len, q_start, qo_len, page_size, keep_partial_bits, max_q, heads=1):
    """States of the listed pages, whether each is plain causal, and the visible bits
    [partial pages, max qo_len, page_size] of the partial ones (in listed order; only for
    heads == 1). With heads > 1 the mask is evaluated for every query head: a page is full
    (empty) only when it is full (empty) for all of them."""
    n = req.numel()
    device = req.device
    states = torch.empty(n, dtype=torch.int8, device=device)
    causal_ok = torch.ones(n, dtype=torch.bool, device=device)
    bits = []
    rows = torch.arange(max(max_q, 1), device=device).view(1, 1, -1, 1)
    cols = torch.arange(page_size, device=device).view(1, 1, 1, -1)
    per_chunk = max(1, CHUNK_ELEMENTS // (max(max_q, 1) * page_size * heads))
    head = torch.arange(heads, dtype=INDEX_DTYPE, device=device).view(1, -1, 1, 1)
    for e0 in range(0, n, per_chunk):
        sl = slice(e0, e0 + per_chunk)
        r = req[sl]
        q_pos = q_start[r].view(-1, 1, 1, 1) + rows
        kv_pos = (local[sl] * page_size).view(-1, 1, 1, 1) + cols
        valid = (rows < qo_len[r].view(-1, 1, 1, 1)) & (cols < page_len[sl].view(-1, 1, 1, 1))
        q_eval = torch.minimum(q_pos, (q_start[r] + qo_len[r] - 1).clamp(min=0).view(-1, 1, 1, 1))
        kv_eval = torch.minimum(kv_pos, (local[sl] * page_size + page_len[sl] - 1).view(-1, 1, 1, 1))
        visible = evaluate_mask_mod(mask_mod, r.to(INDEX_DTYPE).view(-1, 1, 1, 1), head, q_eval.to(INDEX_DTYPE),
                                    kv_eval.to(INDEX_DTYPE)) & valid
        visible = visible.expand(-1, heads, -1, -1)
        seen, total = visible.sum((1, 2, 3)), valid.sum((1, 2, 3)) * heads
        states[sl] = torch.where(seen == 0, EMPTY, torch.where(seen == total, FULL, PARTIAL)).to(torch.int8)
        causal_ok[sl] = ((visible == ((q_pos >= kv_pos) & valid)) | ~valid).flatten(1).all(1)
        if keep_partial_bits and heads == 1:
            bits.append(visible[states[sl] == PARTIAL][:, 0])
    bits = torch.cat(bits) if bits else torch.zeros(0, max(max_q, 1), page_size, dtype=torch.bool, device=device)
    return states, causal_ok, bits


def _classify_pages(mask_mod, req, local, page_len, q_start, qo_len, page_size, max_q, heads):
    """_classify's (states, causal_ok, bits), with the pages the mask's bounds decide (full or
    empty for every query and head of the page) left out of the element-wise evaluation."""
    decided = _bounded_states(mask_mod, req, local, page_len, q_start, qo_len, page_size, heads)
    if decided is None:
        return _classify(mask_mod, req, local, page_len, q_start, qo_len, page_size, True, max_q, heads)
    undecided = (decided < 0).nonzero().flatten()
    states = decided.to(torch.int8)
    causal_ok = torch.ones(req.numel(), dtype=torch.bool, device=req.device)   # read for partial pages only
    if undecided.numel() == 0:
        return states, causal_ok, torch.zeros(0, max(max_q, 1), page_size, dtype=torch.bool, device=req.device)
    # the partial pages are among these, in listed order: their bits keep the order _classify gives
    part, part_causal, bits = _classify(mask_mod, req[undecided], local[undecided], page_len[undecided], q_start,
                                        qo_len, page_size, True, max_q, heads)
    states[undecided] = part
    causal_ok[undecided] = part_causal
    return states, causal_ok, bits


def _bounded_states(mask_mod, req, local, page_len, q_start, qo_len, page_size, heads):
    """int64 per listed page: FULL or EMPTY where the mask's interval bounds over the page's
    queries and keys decide it (a request without queries: EMPTY), -1 where they do not; None when
    the mask does not trace or its bounds fail (every page is then evaluated)."""
    try:
        graph = trace(mask_mod, "mask_mod")
    except TraceError:
        return None
    device = req.device
    b = req.view(-1, 1)
    h = torch.arange(heads, dtype=torch.int64, device=device).view(1, -1)
    q_first = q_start[req].view(-1, 1)
    q_last = torch.maximum(q_first, q_first + qo_len[req].view(-1, 1) - 1)   # never before first
    kv_first = (local * page_size).view(-1, 1)
    kv_last = kv_first + page_len.view(-1, 1) - 1
    try:
        certain, possible = box_bounds(graph, b, h, (q_first, q_last), (kv_first, kv_last), device)
    except Exception as e:   # a gap in the interval rules must cost speed, never a plan
        warn_once(f"flex_flash_infer: page bounds failed on mask_mod {getattr(mask_mod, '__name__', mask_mod)!r} "
                  f"({type(e).__name__}: {e}); its pages are evaluated element by element")
        return None
    shape = (req.numel(), heads)
    certain, possible = certain.expand(shape).all(1), possible.expand(shape).any(1)
    decided = torch.where(certain, FULL, torch.where(possible, -1, EMPTY))
    return torch.where(qo_len[req] > 0, decided, EMPTY)


def _spec(selected, req, local, page_len, kv_page_indices, num_requests, page_size):
    """CSR launch over the selected listed pages (they keep their order within each request)."""
    device = selected.device
    counts = torch.bincount(req[selected], minlength=num_requests)
    indptr = torch.zeros(num_requests + 1, dtype=torch.int64, device=device)
    indptr[1:] = counts.cumsum(0)
    idx = selected.nonzero().flatten()
    last_len = torch.zeros(num_requests, dtype=torch.int64, device=device)
    if idx.numel():
        last_of_request = indptr[1:][counts > 0] - 1
        last_len[counts > 0] = page_len[idx[last_of_request]]
    return PagedLaunchSpec(indptr.to(torch.int32), kv_page_indices[idx].to(torch.int32), last_len.to(torch.int32),
                           kv_positions=(local[idx] * page_size).to(torch.int32)), idx


def plan_paged(mask_mod, qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len, page_size: int,
               device=None, heads: int = 1, native_window: bool = True, positions: bool = True,
               check_ids: bool = True, window_skipped_from: int | None = None, masked_launch_always: bool = False,
               _hints: bool = True) -> PagedPlan:
    """heads > 1: the mask differs across query heads; pages are classified over all of them and
    the partial launch carries no bit mask (the kernel must evaluate mask_mod itself).
    native_window: a sliding window may run as FlashInfer's own window_left (its plain kernels;
    not a compiled variant's launch). positions: the launches' kv_positions are wanted (compiled
    variants read them); a plan from a mask's flags leaves them out otherwise. check_ids: the page
    ids' range is read (a host table's in numpy; a device table's costs a wait for the GPU);
    False leaves a device table's unread and max_page_id unknown (-1). window_skipped_from: a
    window's decode step of at least this many requests lists every page, as causal's does, with
    no gather of the window's page ids, for a launch that skips the keys before a window itself
    (FlashInfer's tensor-core decode, its prefill kernel, starts each request's loop at its
    window) and a batch that fills the GPU without splitting a request's keys (the split is sized
    by the pages listed: a few requests would leave most of their chunks before the window);
    None: never. masked_launch_always: a streaming mask's sinks get their masked launch even at a
    step where no query needs them (every request then lists one hidden key), so that every step
    runs the same launches (a CUDA graph replays the first step's)."""
    device = torch.device(device) if device is not None else torch.as_tensor(kv_page_indices).device
    # int32 tables (FlashInfer's type) stay so: no conversion kernels each step. The per-request
    # tables stay where the caller keeps them: the plan reads them on the host (FlashInfer's own
    # plan() asks for them there), so a host table is never copied over and back
    host_ids = _int_vector("kv_page_indices", kv_page_indices, None if isinstance(kv_page_indices, torch.Tensor)
                           else "cpu", keep_int32=True)
    # a host table's range is read before it goes over: no device kernel, no wait for the GPU
    id_range = None
    if host_ids.device.type == "cpu":
        ids = host_ids.numpy()
        id_range = (int(ids.min()), int(ids.max())) if ids.size else (0, -1)
    # (queued: torch's plain copy from host memory would wait for the GPU)
    kv_page_indices = (to_device_queued(host_ids, device) if host_ids.device.type == "cpu" else
                       _int_vector("kv_page_indices", host_ids, device, keep_int32=True))
    # a copy the plan made (host ids sent over) is the plan's own; the caller's tensor is copied
    # where a launch keeps it (a server writes its next step into the same buffer)
    ids_owned = kv_page_indices is not host_ids and host_ids.device.type == "cpu"
    small = [_int_vector(name, t, None if isinstance(t, torch.Tensor) else "cpu", keep_int32=True)
             for name, t in (("qo_indptr", qo_indptr), ("kv_page_indptr", kv_page_indptr),
                             ("kv_last_page_len", kv_last_page_len))]
    # what lies on the device (the page ids' range, unless read on the host or not asked for)
    # comes back in one copy: one wait for the GPU instead of one per table and check
    if id_range is None and (not check_ids or kv_page_indices.numel() == 0):
        id_range = (0, -1)   # unchecked: the caller vouches for its ids; run() cannot check them
    tables = small + ([] if id_range is not None else [torch.stack(torch.aminmax(kv_page_indices))])
    away = [i for i, t in enumerate(tables) if t.device.type != "cpu"]
    if away:
        back = torch.cat([tables[i].to(tables[away[0]].device) for i in away]).cpu()
        for i, t in zip(away, back.split([tables[i].numel() for i in away])):
            tables[i] = t
    # host copies of the caller's tables (a server writes its next step into the same buffers),
    # in numpy: a decode step's plan is a few dozen operations on a few dozen entries, and numpy's
    # cost less than torch's dispatch
    host_q, host_kv, host_last = (t.numpy().astype(np.int64) for t in tables[:3])
    min_id, max_id = id_range if id_range is not None else tables[3].tolist()
    if min_id < 0:
        raise ValueError("kv_page_indices must be non-negative page ids")
    qo_len, kv_len, pages = request_lengths(host_q, host_kv, host_last, page_size)
    R = pages.size
    if kv_page_indices.numel() != int(host_kv[-1]):
        raise ValueError(f"kv_page_indices must have kv_page_indptr[-1] = {int(host_kv[-1])} entries, "
                         f"got {kv_page_indices.numel()}")
    all_decode = bool((qo_len == 1).all())
    max_q = int(qo_len.max()) if R else 0
    max_kv = int(kv_len.max()) if R else 0
    # a user's own causal or window mask states no hint: its flags come from its expression, read
    # at every plan (a mask reading a global may change between steps)
    flags = (_hinted_flags(mask_mod, max_kv) or paged_flags(mask_mod)) if heads == 1 and _hints else None
    if flags is not None and flags[1] >= 0 and not native_window:
        flags = None
    if flags is not None:
        return _plan_from_flags(flags, kv_page_indices, host_q, host_kv, host_last, qo_len, kv_len,
                                pages, page_size, all_decode, max_kv, device, positions, max_id, window_skipped_from,
                                ids_owned)
    columns = _hinted_window_columns(mask_mod) if _hints and heads == 1 and native_window else None
    if columns is not None:
        window = _plan_from_flags((True, columns[0]), kv_page_indices, host_q, host_kv, host_last, qo_len,
                                  kv_len, pages, page_size, all_decode, max_kv, device, positions, max_id)
        if columns[1] >= columns[2]:   # no column keys (no sinks): the window alone
            return window
        # the pages' states depend on the positions alone: worked out from the plan's own host
        # copies of the tables (a server writes its next step into the same buffers), with stand-in
        # page ids
        num_ids = kv_page_indices.numel()

        def page_states():   # asked by tests and tools only: the pages as evaluating them decides
            return plan_paged(mask_mod, torch.from_numpy(host_q), torch.from_numpy(host_kv), torch.arange(num_ids),
                              torch.from_numpy(host_last), page_size, device, positions=positions,
                              _hints=False).page_states

        plan = _with_column_pages(window, columns, kv_page_indices, host_kv, host_last, qo_len, kv_len, pages,
                                  page_size, device, page_states, masked_launch_always)
        if plan is not None:
            return plan
    # evaluating the pages works in torch, from host views of the numpy copies
    host_kv, host_last, qo_len, kv_len, pages = (torch.from_numpy(t) for t in (host_kv, host_last, qo_len, kv_len,
                                                                              pages))
    req, local = pages_of_requests(pages, torch.zeros_like(pages))
    page_len = _page_lengths(req, local, pages, host_last, page_size)
    qo_len, kv_len, pages, req, local, page_len = (t.to(device) for t in (qo_len, kv_len, pages, req, local, page_len))
    q_start = kv_len - qo_len
    states, causal_ok, bits = _classify_pages(mask_mod, req, local, page_len, q_start, qo_len, page_size, max_q,
                                              heads)
    full, partial = states == FULL, states == PARTIAL

    # one causal launch: partial pages trail each request, are plain causal, and every full page
    # lies at or before the first query's position (so the causal launch hides nothing of it).
    # The launch lists only full and partial pages and aligns causal to the bottom right of what
    # it lists, so a key at position p shows to a query at q_pos when p + (keys of empty pages
    # after p in its request) <= q_pos: a full page followed by skipped pages must still end at
    # or before the first query once those are counted
    first_partial = torch.full((R,), 1 << 62, dtype=torch.int64, device=device)
    first_partial.scatter_reduce_(0, req[partial], local[partial], "amin")
    n_partial = torch.bincount(req[partial], minlength=R)
    trailing = torch.where(n_partial > 0, first_partial + n_partial == pages, True)
    skipped = torch.where(states == EMPTY, page_len, 0)
    skipped_in_request = torch.zeros(R, dtype=torch.int64, device=device).scatter_add_(0, req, skipped)
    skipped_in_later_requests = skipped_in_request.flip(0).cumsum(0).flip(0) - skipped_in_request
    skipped_after = skipped.flip(0).cumsum(0).flip(0) - skipped - skipped_in_later_requests[req]
    full_end = local * page_size + page_len - 1
    full_before = ~full | ((local < first_partial[req]) & (full_end + skipped_after <= q_start[req]))
    has_full = torch.bincount(req[full], minlength=R) > 0
    any_partial, any_full, one_causal, full_in_each = torch.stack([
        partial.any(), full.any(),
        (causal_ok | ~partial).all() & trailing.all() & full_before.all(), has_full.all()]).tolist()
    host = dict(total_q=int(host_q[-1]), max_page_id=max_id, q_start=q_start, max_kv_len=max_kv)
    if any_partial and one_causal:
        spec, _ = _spec(full | partial, req, local, page_len, kv_page_indices, R, page_size)
        spec.causal = True
        return PagedPlan(torch.from_numpy(host_q.astype(np.int32)), spec, None, False, states, **host)

    full_spec = partial_spec = None
    if any_full:
        full_spec, _ = _spec(full, req, local, page_len, kv_page_indices, R, page_size)
    if any_partial:
        partial_spec, idx = _spec(partial, req, local, page_len, kv_page_indices, R, page_size)
        partial_spec = _with_bits(partial_spec, idx, req, page_len, qo_len,
                                  _own_first_pages(kv_page_indices, host_kv, device),
                                  bits if heads == 1 else None, page_size)
    decode = bool(any_full and all_decode and full_in_each)
    return PagedPlan(torch.from_numpy(host_q.astype(np.int32)), full_spec, partial_spec, decode, states, **host)


# a library mask's band hint -> its flags (or None) at the lengths _hinted_flags asks besides the
# cache's own: its answers are fixed when it is made, and a server plans every step with it
_FIXED_LENGTH_FLAGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
FIXED_LENGTHS = (7, 300, 4099)


def _hinted_flags(mask_mod, max_kv: int) -> tuple[bool, int] | None:
    """(causal, window_left) when the mask is the library's causal, sliding-window or full mask
    (its band hint gives one band with those flags for any square length): then the pages need
    no evaluation, since the queries are the newest tokens and FlashInfer aligns its causal mask
    and window to the bottom right. None otherwise. The longest request is among the lengths asked:
    a hint whose answer changes with the length (a prefix-LM of 5000 is full below 5000) must hold
    up to the keys the cache holds."""
    hint = stated_hint(mask_mod, "band_hint")
    if hint is None:
        return None
    # a hint around a user's mod reads what the user's reads, which may change: asked every time
    fixed = made_by_library(mask_mod)
    flags = _FIXED_LENGTH_FLAGS.get(hint, False) if fixed else False
    if flags is False:
        flags = _flags_at(hint, FIXED_LENGTHS)
        if fixed:
            _FIXED_LENGTH_FLAGS[hint] = flags
    if flags is None:
        return None
    n = max(1, max_kv)
    try:
        same = hint(n, n) == [(0, n, 0, n, *flags)]
    except Exception:   # a hint that cannot answer: evaluate the mask instead
        return None
    return flags if same else None


def _flags_at(hint, lengths) -> tuple[bool, int] | None:
    """(causal, window_left) when the hint gives one band with those flags at each of the lengths."""
    try:
        lowered = {n: hint(n, n) for n in lengths}
    except Exception:   # a hint that cannot answer: evaluate the mask instead
        return None
    first = lowered[lengths[0]]
    if not (isinstance(first, list) and len(first) == 1 and len(first[0]) == 6):
        return None
    causal, window_left = bool(first[0][4]), int(first[0][5])
    if not causal and window_left >= 0:
        return None
    if all(bands == [(0, n, 0, n, causal, window_left)] for n, bands in lowered.items()):
        return causal, window_left
    return None


def _hinted_window_columns(mask_mod) -> tuple[int, int, int] | None:
    """(window_left, first, stop) when the mask is a causal window plus the keys first .. stop - 1
    (the library's streaming mask: its sinks), as its key_columns_hint states; None otherwise."""
    hint = stated_hint(mask_mod, "key_columns_hint")
    if hint is None or len(hint) != 4:
        return None
    window, first, step, stop = hint
    if step != 1 or stop is None or not 0 <= first or window < 1:
        return None
    return int(window) - 1, int(first), int(stop)   # first >= stop: no column (a window alone)


def _with_column_pages(window, columns, kv_page_indices, host_kv, host_last, qo_len, kv_len, pages, page_size,
                       device, page_states, always: bool = False) -> PagedPlan | None:
    """The window's plan (FlashInfer's causal window flags over the pages from each request's
    first query's window) and a masked launch over the pages holding the key columns (the
    sinks): its bits show a column key to a query outside the window's reach (kv <= q - window
    - 1), so no key is counted twice; the launches merge by log-sum-exp. Worked out per request
    on the host over the column pages only: a decode step's cost does not grow with the cache.
    None (evaluate the pages instead) when the columns span more than MAX_COLUMN_PAGES pages or
    their bits more than CHUNK_ELEMENTS: many sink pages are better read by the unmasked launch
    where every query sees them, and a long prefill's rows would pad every decode request's.
    always: the masked launch even when no request needs a column page (each then lists its dummy key).
    The tables are numpy int64 host copies (request_lengths')."""
    window_left, first, stop = columns
    R = pages.size
    q_start = kv_len - qo_len
    # each request's pages holding keys first .. stop - 1 (clipped to its keys)
    lo, hi = np.minimum(first, kv_len), np.minimum(stop, kv_len)
    page_lo = lo // page_size
    page_hi = np.where(hi > lo, (hi - 1) // page_size + 1, page_lo)
    # a request whose last query sees every column key inside its window needs none of them
    reaches = (hi > lo) & (qo_len > 0) & (lo <= q_start + qo_len - 1 - window_left - 1)
    counts = np.where(reaches, page_hi - page_lo, 0)
    max_q = int(qo_len.max()) if R else 0
    total = int(counts.sum())
    if (int(counts.max()) if R else 0) > MAX_COLUMN_PAGES or total * max_q * page_size > CHUNK_ELEMENTS:
        return None
    if total == 0 and not always:
        window.states = page_states
        return window
    req, local = _pages_of_requests(counts, page_lo)
    page_len = np.where(local == pages[req] - 1, host_last[req], page_size)
    rows = np.arange(max_q).reshape(1, -1, 1)
    cols = np.arange(page_size).reshape(1, 1, -1)
    q_pos = q_start[req].reshape(-1, 1, 1) + rows
    kv_pos = (local * page_size).reshape(-1, 1, 1) + cols
    bits = ((rows < qo_len[req].reshape(-1, 1, 1)) & (cols < page_len.reshape(-1, 1, 1)) & (kv_pos >= first)
            & (kv_pos < stop) & (kv_pos <= q_pos - window_left - 1))
    kept = bits.reshape(bits.shape[0], max_q * page_size).any(1)   # a page no query's row reaches: left out
    req, local, page_len, bits = req[kept], local[kept], page_len[kept], bits[kept]
    counts = np.bincount(req, minlength=R)
    indptr = np.zeros(R + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    last_len = np.where(counts > 0, page_len[np.maximum(indptr[1:] - 1, 0)], 0) if req.size else np.zeros(R, np.int64)
    # worked out in numpy on the host (on the device this took a decode step's plan a few dozen
    # small launches and two waits for the GPU; in torch on the host, as many dispatches), with
    # each page's place in kv_page_indices standing for its id; then one gather of the ids and one
    # copy of the bits (FlashInfer packs them there)
    host_kv, req, local, page_len, qo_len, bits = (torch.from_numpy(t) for t in (host_kv, req, local, page_len,
                                                                                qo_len, bits))
    spec = PagedLaunchSpec(torch.from_numpy(indptr.astype(np.int32)), _page_places(host_kv, req, local).to(torch.int32),
                           torch.from_numpy(last_len.astype(np.int32)), kv_positions=(local * page_size).to(torch.int32))
    first_places = _first_page_places(host_kv, kv_page_indices.numel()).to(torch.int32)
    spec = _with_bits(spec, torch.arange(req.numel()), req, page_len, qo_len, first_places, bits, page_size)
    spec.kv_indices = kv_page_indices.index_select(0, to_device_queued(spec.kv_indices, device)).to(torch.int32)
    spec.mask = to_device_queued(spec.mask, device)
    return PagedPlan(window.qo_indptr, window.full, spec, window.decode, page_states, q_start=window.q_start,
                     max_kv_len=window.max_kv_len, total_q=window.total_q, max_page_id=window.max_page_id)


def _plan_from_flags(flags, kv_page_indices, host_q, host_kv, host_last, qo_len, kv_len, pages,
                     page_size, all_decode, max_kv, device, positions, max_id, window_skipped_from=None,
                     ids_owned=False) -> PagedPlan:
    """The plan of a causal, sliding-window or full mask without evaluating it: one launch (a
    decode step's on the decode kernel) over each request's pages from the first its first query
    sees, causal and window aligned to the bottom right as FlashInfer does. A page is partial when
    it holds keys past a request's first query or before its last query's window; the pages of a
    request without queries, or before every window, are empty. The tables are numpy int64 host
    copies (request_lengths'); worked out per request in numpy (plan() runs at every decode step):
    per-page work only where a window skips pages (one gather of the page ids) or when positions
    or page_states are asked for."""
    causal, window_left = flags
    q_start = kv_len - qo_len
    spec = None
    skips_window = window_skipped_from is not None and pages.size >= window_skipped_from
    if all_decode and (window_left < 0 or skips_window) and not positions and pages.size:
        # a decode step of a causal or full mask (the serving loop's common step), or a window's
        # whose kernel skips the keys before it: every request has its one query and lists all its
        # pages, so the caller's tables (copied) are the launch's
        first = np.zeros_like(pages)
        spec = PagedLaunchSpec(torch.from_numpy(host_kv.astype(np.int32)),
                               kv_page_indices.to(torch.int32, copy=not ids_owned),
                               torch.from_numpy(host_last.astype(np.int32)), window_left=window_left)
    else:
        # first listed page of each request: the page of its first query's first key (pages
        # before it hold only keys no query sees); all of them for a request without queries
        first = (np.maximum(q_start - window_left, 0) // page_size if window_left >= 0
                 else np.zeros_like(pages))
        first = np.where(qo_len > 0, first, pages)
        counts = pages - first
        if counts.sum():
            indptr = np.zeros(pages.size + 1, dtype=np.int32)
            np.cumsum(counts, out=indptr[1:])
            every_page = bool((counts == pages).all())
            req, local = (pages_of_requests(torch.from_numpy(counts), torch.from_numpy(first))
                          if positions else (None, None))
            # a copy either way: a caller writing its next step into the same buffer must not change this plan
            if every_page:
                indices = kv_page_indices.to(torch.int32, copy=not ids_owned)
            else:   # request r's listed pages lie at host_kv[r] + first[r] onwards in kv_page_indices
                places = np.repeat(host_kv[:-1] + first - indptr[:-1], counts) + np.arange(int(indptr[-1]))
                indices = kv_page_indices.index_select(0, to_device_queued(torch.from_numpy(places), device))
            # the per-request tables and positions stay on the host: FlashInfer's plan() reads its
            # tables there (a device table costs it a synchronising copy back) and copies them to
            # the GPU itself; the compiled variants' tables are copied over where they are built
            kv_positions = (local * page_size).to(torch.int32) if positions else None
            # a page holds keys past its request's first query (causal's diagonal) when a request
            # has more than one query; with one query its own key is the request's last
            spec = PagedLaunchSpec(torch.from_numpy(indptr), indices.to(torch.int32),
                                   torch.from_numpy(np.where(counts > 0, host_last, 0).astype(np.int32)),
                                   causal=causal and bool((qo_len > 1).any()),
                                   window_left=window_left, kv_positions=kv_positions)
    page_states = _flag_page_states(causal, window_left, host_last, qo_len, pages, first, q_start, page_size, device)
    decode = spec is not None and all_decode and bool((pages > 0).all())
    return PagedPlan(torch.from_numpy(host_q.astype(np.int32)), spec, None, decode, page_states,
                     q_start=torch.from_numpy(q_start), max_kv_len=max_kv, total_q=int(host_q[-1]),
                     max_page_id=max_id)


def _flag_page_states(causal, window_left, host_last, qo_len, pages, first, q_start, page_size, device):
    """What works out a flags plan's page_states when asked (tests and tools only): a page before
    its request's first listed one is empty, a listed one partial where it holds keys past the
    request's first query (causal) or before its last query's window."""
    def page_states():
        t_pages, t_first, t_q_start = torch.from_numpy(pages), torch.from_numpy(first), torch.from_numpy(q_start)
        req, local = pages_of_requests(t_pages, torch.zeros_like(t_pages))
        page_len = _page_lengths(req, local, t_pages, torch.from_numpy(host_last), page_size)
        first_key, last_key = local * page_size, local * page_size + page_len - 1
        listed = local >= t_first[req]
        partial = torch.zeros(req.numel(), dtype=torch.bool)
        if causal:
            partial |= last_key > t_q_start[req]
        if window_left >= 0:
            # the last query's window
            partial |= first_key < (t_q_start + torch.from_numpy(qo_len) - 1)[req] - window_left
        return torch.where(listed, torch.where(partial & listed, PARTIAL, FULL), EMPTY).to(torch.int8).to(device)
    return page_states


def _own_first_pages(kv_page_indices, host_kv, device) -> torch.Tensor:
    """int32 [R]: each request's first page id (a request without pages, which has no queries, any)."""
    if kv_page_indices.numel() == 0:
        return torch.zeros(host_kv.numel() - 1, dtype=torch.int32, device=device)
    return kv_page_indices[to_device_queued(_first_page_places(host_kv, kv_page_indices.numel()), device)].to(torch.int32)


def _with_bits(spec, idx, req, page_len, qo_len, own_first_page, bits, page_size):
    """Add the bit mask (none when bits is None); a request with no partial page gets one dummy
    key from its own first page (own_first_page [R], _own_first_pages; bit 0, position -1: a
    kernel that evaluates the mask itself must hide it). Works on the device of qo_len; the
    spec's kv_indices and own_first_page may be page ids or their places in kv_page_indices
    (gathered after), as long as both are the same kind."""
    R = qo_len.numel()
    device = qo_len.device
    counts = (spec.kv_indptr[1:] - spec.kv_indptr[:-1]).long()
    first_listed = spec.kv_indptr[:-1].long()      # before dummies: where each request starts in idx
    empty = counts == 0
    if bool(empty.any()):  # FlashInfer's masked path needs a page per request
        indptr = torch.zeros(R + 1, dtype=torch.int64, device=device)
        indptr[1:] = (counts + empty.long()).cumsum(0)
        indices = torch.empty(int(indptr[-1]), dtype=torch.int32, device=device)
        owner = torch.repeat_interleave(torch.arange(R, device=device), counts + empty.long())
        is_dummy = empty[owner] & (torch.arange(indices.numel(), device=device) == indptr[:-1][owner])
        indices[~is_dummy] = spec.kv_indices
        # the dummy key is the request's own first page: its value times the hidden score's 0 is
        # NaN where the value is (as the GPU's matrix product gives), and another request's NaN
        # or inf must never reach this one (a request without pages has no queries)
        indices[is_dummy] = own_first_page[empty]
        positions = torch.full_like(indices, -1)
        positions[~is_dummy] = spec.kv_positions
        spec = PagedLaunchSpec(indptr.to(torch.int32), indices, torch.where(empty, 1, spec.last_page_len).to(torch.int32),
                               kv_positions=positions)
        counts = counts + empty.long()
    if bits is None:
        return spec
    kv_len = (counts - 1) * page_size + spec.last_page_len.long()
    sizes = qo_len * kv_len
    total = int(sizes.sum())
    planner.check_mask_bits(total, "the partial pages' launch")
    offset = torch.zeros(R, dtype=torch.int64, device=device)
    offset[1:] = sizes.cumsum(0)[:-1]
    mask = torch.zeros(total, dtype=torch.bool, device=device)
    # bits holds the partial pages in listed order, which is idx's order: scatter them all at once
    r = req[idx].view(-1, 1, 1)
    rank = (torch.arange(idx.numel(), device=device) - first_listed[req[idx]]).view(-1, 1, 1)
    rows = torch.arange(bits.shape[1], device=device).view(1, -1, 1)
    cols = torch.arange(page_size, device=device).view(1, 1, -1)
    valid = (rows < qo_len[r]) & (cols < page_len[idx].view(-1, 1, 1))
    dst = offset[r] + rows * kv_len[r] + rank * page_size + cols
    mask[dst[valid]] = bits[valid]
    spec.mask = mask
    return spec
