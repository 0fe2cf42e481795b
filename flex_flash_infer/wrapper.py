"""FlexFlashInfer: the seed's plan-once / run-many wrapper in FlashInfer's [S, H, D] layout, for one
sequence or a packed variable-length batch (cu_seqlens)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .backends.autograd import LearnedMemo, anchored, learned_tensors, needs_grad, with_recomputed_gradients
from .backends.backend_choice import check_backend_name, choose_backend
from .core.notices import warn_once
from .core.read_guard import only_read_tables, read_guard
from .block_mask import BlockMask, LazyBlockMask, create_block_mask
from .backends.flashinfer_backend import FlashInferPlan, planned_for
from .core.mask_eval import as_mask_mod, check_score_mod, mask_dependence
from .mods.combinators import noop_mask
from .backends.reference import reference_attention, reference_gradients
from . import varlen
from .core.trace import ReadsMemo, TraceError, current_reads, read_state, stale_constants_message, tensors_read, trace, traced_once_per_call
from .core.versions import KeptReads, moved, snapshot, source_of, warn_unwatched
from .planning.linear_masks import LOWERING_HINTS, with_linear_band_hint
from .varlen import single_band_flags
from .core.validation import (check_heads, check_object_device, check_positive_int, check_same_device_dtype, check_scale,
                              check_tensor, check_workspace)
from .core.hints import pass_hints, stated_hint


@dataclass
class _Segment:
    """One sequence of the (packed) batch: its rows in q and k/v, its mask and its plan."""
    q0: int
    q1: int
    kv0: int
    kv1: int
    block_mask: BlockMask | None   # None when the sequence has no keys
    score_mod: object
    plan: FlashInferPlan | None


@dataclass
class _Prepared:
    segments: list
    seq_len_q: int
    seq_len_kv: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float | None
    backend: str
    ragged: object = None          # varlen.RaggedBatch: the whole packed batch in one launch
    score_mod: object = None       # as given: the tensors requiring grad it reads are found per call
    constants: tuple = ()          # on the FlashInfer path: the 0-d tensors it compiled in, with their versions
    mask_reads: tuple = ()         # on the FlashInfer path: the tensors the mask_fn reads, with their versions
    score_reads: list | None = None   # on the FlashInfer path: (tensor, its memory) the score_mod read when prepared
    mask_fn: object = None         # the mask_mod planned (the mask_fn as a four-argument mod)
    mask_state: object = None      # what the mask read when prepared (core/versions.KeptReads), None if untraced
    score_numbers: tuple = ()      # on the FlashInfer path: its numbers and expression when prepared (compiled in)
    reads_memo: object = None      # core/trace.ReadsMemo: the mods traced again at a call only once what they reach changed
    learned_memo: object = None    # backends/autograd.LearnedMemo: the score_mod's learned tensors, searched again likewise
    untraced_guard: object = None  # core/read_guard.ReadGuard over what a mask_fn that does not trace can reach


def _pointer(t) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()


def _same_reads(now, before) -> bool:
    """Whether the tensors a score_mod reads now hold what the kernel was built from: the same
    tensor (written in place or not), a view made again of the same memory, or a tensor made
    again with equal values (a constant built inside the mod); not a re-bound table."""
    if len(now) != len(before):
        return False
    for a, (b, b_ptr) in zip(map(source_of, now), before):
        if a is b:   # the same tensor, unless its memory was replaced (`.data =`, swap_tensors)
            if _pointer(a) != b_ptr:
                return False
            continue
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if _pointer(a) == b_ptr and a.stride() == b.stride():
            continue
        if not torch.equal(a, b):
            return False
    return True


class FlexFlashInfer:
    """Attention with a FlexAttention-style mask on FlashInfer kernels.

    >>> flex = FlexFlashInfer(device="cuda")
    >>> flex.prepare(mask_fn=get_mask_fn("causal"), seq_len_q=1024, seq_len_kv=1024,
    ...              num_qo_heads=8, num_kv_heads=8, head_dim=64, dtype=torch.float16)
    >>> out = flex(q, k, v)   # q [seq_q, Hq, D], k/v [seq_kv, Hkv, D] -> out [seq_q, Hq, D]

    prepare() does all planning once; each call only launches kernels. On CPU (or where
    FlashInfer cannot run the problem) it computes with the reference backend.
    """

    def __init__(self, device="cuda", workspace_buffer: torch.Tensor | None = None, backend: str = "auto"):
        self.device = check_object_device(device)
        self.workspace_buffer = check_workspace(workspace_buffer)
        self.backend = check_backend_name(backend)
        self._prepared: _Prepared | None = None
        self._stand_ins = _StandIns()   # none made yet

    @property
    def block_mask(self) -> BlockMask:
        """The prepared BlockMask (of the first sequence, for a packed batch: see block_masks)."""
        return self._require_prepared().segments[0].block_mask

    @property
    def block_masks(self) -> list:
        """One BlockMask per sequence (None for a sequence without keys)."""
        return [s.block_mask for s in self._require_prepared().segments]

    @property
    def active_backend(self) -> str:
        """'flashinfer' or 'reference': what the last prepare() chose."""
        return self._require_prepared().backend

    @traced_once_per_call
    def prepare(self, mask_fn=None, seq_len_q=None, seq_len_kv=None, num_qo_heads=None, num_kv_heads=None,
                head_dim=None, block_size_row: int = 128, block_size_col: int = 128, dtype=torch.float16,
                score_mod=None, scale=None, cu_seqlens_q=None, cu_seqlens_kv=None,
                compile_block_mask: bool = False) -> "FlexFlashInfer":
        """Plan attention for one shape and mask; replaces any earlier plan only on success.

        mask_fn takes (q_idx, kv_idx) or (b, h, q_idx, kv_idx); None means full attention.
        cu_seqlens_q / cu_seqlens_kv ([0, len0, len0 + len1, ...], as FlashAttention's varlen and
        FlashInfer's indptr) describe a packed batch: q is [total_q, Hq, D], k/v [total_kv, Hkv, D];
        mask_fn and score_mod see positions within each sequence and b = the sequence's index.
        compile_block_mask=True builds the block mask with torch.compile (as FlexAttention's
        create_block_mask(_compile=True)): about a second of compiling the first time a mask
        function, its captured values or the shape change, then a build that never writes the mask
        to memory (docs/benchmarks.md, "Planning"). Not with cu_seqlens (each sequence's index would be a new
        captured value).
        """
        # kept by this object only once this prepare() succeeds (a failed one holds nothing of its function)
        stand_ins = self._stand_ins.of(mask_fn)
        mask_mod = stand_ins.mask_mod
        score_mod = check_score_mod(score_mod)
        offsets_q, offsets_kv = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_kv)
        if not isinstance(compile_block_mask, bool):
            raise TypeError(f"compile_block_mask must be True or False, got {compile_block_mask!r}")
        if compile_block_mask and offsets_q is not None:
            raise ValueError("compile_block_mask=True is for one sequence; with cu_seqlens_q / cu_seqlens_kv "
                             "each sequence's block mask is built eagerly (pass compile_block_mask=False)")
        if offsets_q is not None:
            for name, offsets in (("cu_seqlens_q", offsets_q), ("cu_seqlens_kv", offsets_kv)):
                if offsets[-1] == 0:
                    raise ValueError(f"{name} holds no token at all ({offsets[:8]}): a packed batch needs at least "
                                     "one query and one key")
            seq_len_q = _total("seq_len_q", seq_len_q, offsets_q[-1])
            seq_len_kv = _total("seq_len_kv", seq_len_kv, offsets_kv[-1])
        else:
            offsets_q, offsets_kv = [0, seq_len_q], [0, seq_len_kv]
        seq_len_q = check_positive_int("seq_len_q", seq_len_q)
        seq_len_kv = check_positive_int("seq_len_kv", seq_len_kv)
        num_qo_heads = check_positive_int("num_qo_heads", num_qo_heads)
        num_kv_heads = check_positive_int("num_kv_heads", num_kv_heads)
        head_dim = check_positive_int("head_dim", head_dim)
        block = (check_positive_int("block_size_row", block_size_row), check_positive_int("block_size_col", block_size_col))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
        scale = check_scale(scale)
        check_heads(num_qo_heads, num_kv_heads, names=("num_qo_heads", "num_kv_heads"))
        backend = choose_backend(self.backend, self.device, dtype, head_dim, head_dim, scale)
        kernel_scale = scale if scale is not None else head_dim ** -0.5
        segments = []
        for i in range(len(offsets_q) - 1):
            q0, q1, kv0, kv1 = offsets_q[i], offsets_q[i + 1], offsets_kv[i], offsets_kv[i + 1]
            seq_mask, seq_score = stand_ins.sequence_mask(mask_mod, i), _for_sequence(score_mod, i, 5)
            block_mask = None
            if q1 > q0 and kv1 > kv0:
                _, uses_h = mask_dependence(seq_mask, 1, num_qo_heads, q1 - q0, kv1 - kv0, self.device)
                block_mask = _block_mask(seq_mask, num_qo_heads if uses_h else 1, q1 - q0, kv1 - kv0, self.device,
                                         block, compile_block_mask, lazy=backend == "flashinfer",
                                         hinted=stand_ins.hinted)
            segments.append(_Segment(q0, q1, kv0, kv1, block_mask, seq_score, None))
        ragged = None
        if backend == "flashinfer":
            # each sequence's plan first, its FlashInfer runners only where they will run: a packed
            # batch that one ragged launch serves planned a wrapper per sequence that never ran
            # (16 MB of buffers and a FlashInfer plan() each)
            try:
                planned = [None if s.block_mask is None else
                           planned_for(s.block_mask, 1, s.q1 - s.q0, s.kv1 - s.kv0, num_qo_heads, num_kv_heads,
                                       head_dim, self.device, s.score_mod, None, kernel_scale) for s in segments]
                if len(segments) > 1:
                    flags = single_band_flags(segments, planned)
                    if flags is not None:
                        ragged = varlen.RaggedBatch(offsets_q, offsets_kv, flags, num_qo_heads, num_kv_heads,
                                                    head_dim, dtype, kernel_scale, self.device, self.workspace_buffer)
                if ragged is None:
                    segments = [s if p is None else dataclasses.replace(s, plan=FlashInferPlan(
                        s.block_mask, 1, s.q1 - s.q0, s.kv1 - s.kv0, num_qo_heads, num_kv_heads, head_dim, dtype,
                        kernel_scale, self.device, self.workspace_buffer, score_mod=s.score_mod, planned=p))
                        for s, p in zip(segments, planned)]
            except TraceError as e:
                if self.backend == "flashinfer":
                    raise
                warn_once(f"flex_flash_infer: running on the slow reference backend because {e}")
                backend, ragged = "reference", None   # segments hold no plan until every one is made
        constants, score_reads, score_numbers = (), None, ()
        if backend == "flashinfer" and score_mod is not None:
            try:
                graph = trace(score_mod, "score_mod")
                constants = tuple(graph.constants)
                score_reads = [(t, _pointer(t)) for t in map(source_of, [t for _, t in graph.tensors]
                                                             + [t for t, _ in graph.constants])]
                score_numbers = read_state(score_mod, "score_mod").scalars
            except TraceError:   # such a mod did not take a compiled kernel
                pass
        # the plan's bands and bits come from the values of the tensors the mask reads
        # (on either backend: the reference reads the plan's tile tables too)
        mask_reads = snapshot(tensors_read(mask_mod, "mask_mod"))
        reads_memo = ReadsMemo()
        mask_state = current_reads(mask_mod, "mask_mod", reads_memo)
        # values compared too on the CPU (a .data or numpy write moves no counter; the
        # reference backend plans its tiles here as well)
        mask_state = KeptReads(mask_state) if mask_state is not None else None
        untraced_guard = None
        if mask_state is None and mask_mod is not None and backend == "flashinfer":
            # a mask the tracer cannot read (torch.bucketize): its tensors are unknown to the plan,
            # so everything it can reach is watched instead (a document table rewritten in place
            # would run the old documents); one reaching what cannot be watched is said once
            untraced_guard = read_guard(mask_mod)
            if untraced_guard is None or not only_read_tables(untraced_guard, []):
                untraced_guard = None
                warn_once("FlexFlashInfer: the mask_fn does not trace and reaches objects whose changes cannot be "
                          "watched: after changing what it reads, call prepare() again")
        warn_unwatched(mask_reads + constants, "FlexFlashInfer", "mask_fn or score_mod", "prepare()")
        self._stand_ins = stand_ins
        self._prepared = _Prepared(segments, seq_len_q, seq_len_kv, num_qo_heads, num_kv_heads,
                                   head_dim, dtype, scale, backend, ragged, score_mod, constants, mask_reads,
                                   score_reads, mask_mod, mask_state, score_numbers, reads_memo, LearnedMemo(),
                                   untraced_guard)
        return self

    def _require_prepared(self) -> _Prepared:
        if self._prepared is None:
            raise RuntimeError("FlexFlashInfer: call prepare(mask_fn=..., seq_len_q=..., ...) before running attention")
        return self._prepared

    def _check_inputs(self, p: _Prepared, q, k, v) -> None:
        # inputs as prepared, told in one pass (host work of every call); else the checks below
        # say what is wrong (prepare() took a floating dtype: a tensor of it is floating point)
        if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
                and q.dtype == p.dtype and k.dtype == p.dtype and v.dtype == p.dtype
                and q.shape == (p.seq_len_q, p.num_qo_heads, p.head_dim)
                and k.shape == v.shape == (p.seq_len_kv, p.num_kv_heads, p.head_dim)
                and q.device == k.device == v.device and q.device.type == self.device.type):
            return
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, 3, "[seq, heads, head_dim]")
        check_same_device_dtype(q=q, k=k, v=v)
        expected = {"q": (p.seq_len_q, p.num_qo_heads, p.head_dim),
                    "k": (p.seq_len_kv, p.num_kv_heads, p.head_dim),
                    "v": (p.seq_len_kv, p.num_kv_heads, p.head_dim)}
        for name, t in (("q", q), ("k", k), ("v", v)):
            if tuple(t.shape) != expected[name]:
                seq, heads, dim = expected[name]
                swapped = (f"; it looks like [heads, seq, head_dim]: FlexFlashInfer takes FlashInfer's [seq, heads, "
                           f"head_dim], pass {name}.transpose(0, 1)" if tuple(t.shape) == (heads, seq, dim) else "")
                raise ValueError(f"{name} must have shape {expected[name]} ([seq, heads, head_dim]) as prepared, "
                                 f"got {tuple(t.shape)}{swapped}")
        if q.dtype != p.dtype:
            raise TypeError(f"q has dtype {q.dtype} but prepare() was given dtype={p.dtype}")
        if q.device.type != self.device.type:
            raise ValueError(f"q is on {q.device} but this FlexFlashInfer was made for device {self.device}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False):
        """out [seq_q, Hq, D] (and natural-log lse [seq_q, Hq] float32 when return_lse).

        Differentiable on both backends: on FlashInfer, when q, k, v or a tensor the score_mod
        captures requires grad, the backward recomputes attention in plain torch (autograd.py)."""
        p = self._require_prepared()
        self._check_inputs(p, q, k, v)
        stale = stale_constants_message(p.constants, "FlexFlashInfer")
        if stale:
            raise ValueError(stale.replace("plan again", "call prepare() again"))
        if (moved(p.mask_reads) or (p.untraced_guard is not None and not p.untraced_guard.holds())
                or (p.mask_state is not None
                    and not p.mask_state.holds(current_reads(p.mask_fn, "mask_mod", p.reads_memo)))):
            raise ValueError("FlexFlashInfer: a tensor or number the mask_fn reads was written in place or re-bound "
                             "after prepare(), which planned the mask from its values: call prepare() again")
        # traced once per call: checked here, and watched between forward and backward below
        score_state = current_reads(p.score_mod, "score_mod", p.reads_memo) if p.score_reads is not None else None
        score_now = [t for t, _, _ in score_state.tensors] if score_state is not None else []
        if score_state is not None and score_state.scalars != p.score_numbers:
            # the kernel compiled in the numbers and expression prepare() traced (a closure's
            # number, a module global, a factor folded into the scale)
            raise ValueError("FlexFlashInfer: a number the score_mod reads (a closure variable, a module global, a "
                             "0-d tensor written through .data or numpy) or what it computes changed after prepare(), "
                             "which compiled them into the FlashInfer kernel: call prepare() again")
        if p.score_reads is not None and not _same_reads(score_now, p.score_reads):
            # traced again at each call: the kernels hold the tensors prepare() found, which a
            # re-bound attribute, a new Parameter, .data = or load_state_dict(assign=True) replaces
            raise ValueError("FlexFlashInfer: the score_mod now reads a different tensor (or storage) than the one "
                             "prepare() compiled into the kernel (a re-bound attribute, a new Parameter, `.data =`, "
                             "load_state_dict(assign=True), model.to(...)): call prepare() again")
        # FlashInfer's kernels record nothing for autograd: the backward (autograd.py) needs the
        # learned tensors the score_mod reads, found at each call (one unfrozen or made after
        # prepare() counts; searched again only once something the search reaches changed)
        learned = (learned_tensors(p.score_mod, self.device, p.learned_memo)
                   if p.backend == "flashinfer" and p.score_mod is not None and torch.is_grad_enabled() else [])
        if p.backend != "flashinfer" or not needs_grad(q, k, v, *learned):
            out, lse = self._forward(p, q, k, v, return_lse)
            # no sequence sees a key (on FlashInfer nothing here needs grad: the test above said so,
            # and searching the score_mod again was most of a score_mod call's host work)
            if p.backend != "flashinfer" and not out.requires_grad and torch.is_grad_enabled():
                inputs = (q, k, v, *learned_tensors(p.score_mod, self.device))
                if needs_grad(*inputs):
                    out, lse = anchored(inputs, out, lse)
            return (out, lse) if return_lse else out

        def backward(saved, grad_out, grad_lse, needs):
            return _segment_gradients(p, saved, grad_out, grad_lse, needs)

        out, lse = with_recomputed_gradients(lambda: self._forward(p, q, k, v, True), backward, (q, k, v, *learned),
                                             p.mask_reads + snapshot([t for t in score_now if not t.requires_grad]))
        return (out, lse) if return_lse else out

    def _forward(self, p: _Prepared, q, k, v, return_lse: bool):
        if p.ragged is not None:
            return p.ragged.run(q.contiguous(), k.contiguous(), v.contiguous(), return_lse)
        if len(p.segments) == 1 and p.segments[0].block_mask is not None:
            return self._run_segment(p, p.segments[0], q, k, v, return_lse)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for seg in p.segments:
            if seg.block_mask is None:
                continue  # no keys: the rows stay 0 with lse -inf
            o, s = self._run_segment(p, seg, q[seg.q0:seg.q1], k[seg.kv0:seg.kv1], v[seg.kv0:seg.kv1], return_lse)
            out[seg.q0:seg.q1] = o
            if return_lse:
                lse[seg.q0:seg.q1] = s
        return out, lse

    @staticmethod
    def _run_segment(p: _Prepared, seg: _Segment, q, k, v, return_lse: bool):
        if p.backend == "flashinfer":
            return seg.plan.run(q.contiguous(), k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous(),
                                return_lse=return_lse)
        out, lse = reference_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       seg.block_mask, seg.score_mod, p.scale)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1)

    run = __call__


def _segment_gradients(p: _Prepared, saved, grad_out, grad_lse, needs) -> list:
    """Gradients of each sequence's reference attention (in [seq, heads, dim] layout), with respect
    to q, k, v and the captured tensors; the FlashInfer backend's backward."""
    q, k, v, *captured = saved
    grads = [torch.zeros_like(t) if need else None for t, need in zip(saved, needs)]

    def bhsd(t, lo, hi):
        return t[lo:hi].transpose(0, 1)[None]

    for seg in p.segments:
        if seg.block_mask is None:
            continue
        seg_grads = reference_gradients(bhsd(q, seg.q0, seg.q1), bhsd(k, seg.kv0, seg.kv1), bhsd(v, seg.kv0, seg.kv1),
                                        captured, seg.block_mask, seg.score_mod, p.scale,
                                        bhsd(grad_out, seg.q0, seg.q1),
                                        None if grad_lse is None else bhsd(grad_lse, seg.q0, seg.q1), needs)
        for i, (lo, hi) in enumerate(((seg.q0, seg.q1), (seg.kv0, seg.kv1), (seg.kv0, seg.kv1))):
            if seg_grads[i] is not None:
                grads[i][lo:hi] += seg_grads[i][0].transpose(0, 1)
        for i in range(3, len(saved)):
            if seg_grads[i] is not None:
                grads[i] += seg_grads[i]
    return grads


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_kv):
    """Offsets as lists of ints, or (None, None) when no packed batch is given."""
    if cu_seqlens_q is None and cu_seqlens_kv is None:
        return None, None
    if cu_seqlens_q is None or cu_seqlens_kv is None:
        raise ValueError("a packed batch needs both cu_seqlens_q and cu_seqlens_kv")
    result = []
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_kv", cu_seqlens_kv)):
        t = torch.as_tensor(x)
        if t.dim() != 1 or t.numel() < 2 or t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer sequence [0, len0, len0 + len1, ...], got {x!r:.80}")
        offsets = [int(v) for v in t.tolist()]
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{name} must start at 0 and never decrease, got {offsets[:8]}...")
        result.append(offsets)
    if len(result[0]) != len(result[1]):
        raise ValueError(f"cu_seqlens_q has {len(result[0]) - 1} sequences but cu_seqlens_kv has {len(result[1]) - 1}")
    return result


def _total(name: str, given, total: int) -> int:
    if given is not None and given != total:
        raise ValueError(f"{name}={given} disagrees with its cu_seqlens, whose total is {total}")
    return total


# far_bias, native_soft_cap: each holds for every b, so for a fixed one too
SCORE_MOD_HINTS = ("constant_beyond", "logits_soft_cap")


def _block_mask(mask_mod, heads: int, q_len: int, kv_len: int, device, block, compile_block_mask: bool, lazy: bool,
                hinted: dict | None = None):
    """The sequence's BlockMask; for the FlashInfer backend and a mask with a lowering hint, a
    LazyBlockMask: its route needs no tile tables (on the CPU machine they were 95% of a
    32768-token causal prepare), and whatever reads them builds them then."""
    def build():
        return create_block_mask(mask_mod, 1, heads, q_len, kv_len, device=device, BLOCK_SIZE=block,
                                 _compile=compile_block_mask)

    if lazy:
        # a user's own causal or window mask gets the hint a library mask carries (linear_masks.py)
        mask_mod = with_linear_band_hint(mask_mod, q_len, kv_len, hinted)
        if any(stated_hint(mask_mod, hint) is not None for hint in LOWERING_HINTS):
            return LazyBlockMask(build, (1, heads), (q_len, kv_len), block, mask_mod, device)
    return build()


class _StandIns:
    """What prepare() made of a mask function: its mask_mod, each sequence's stand-in (b fixed) and
    the band-hinted stand-in of a linear one. A FlexFlashInfer keeps those of the function its last
    successful prepare() was given; given the same function again (a model's every layer and
    step), prepare() takes them instead of making new ones, so the lowering kept on them (a linear
    mask's bands, remembered per length and worked out again when something the mask reads
    changed) is done once. Held here, not on the function: another function (a wrapper copying
    its attributes with functools.wraps) never finds them, and they go with this object or when
    another function is prepared."""

    __slots__ = ("mask_fn", "code", "mask_mod", "sequences", "hinted")
    KEPT = 64   # sequences of a packed batch whose stand-ins are kept

    def __init__(self, mask_fn=None, mask_mod=None):
        self.mask_fn, self.code, self.mask_mod = mask_fn, getattr(mask_fn, "__code__", None), mask_mod
        self.sequences, self.hinted = {}, {}

    def of(self, mask_fn) -> "_StandIns":
        """These, when mask_fn is the function they were made for (its code unchanged: how it is
        called depends on its arguments), else new ones for it."""
        if self.mask_mod is not None and mask_fn is self.mask_fn and getattr(mask_fn, "__code__", None) is self.code:
            return self
        return _StandIns(mask_fn, noop_mask if mask_fn is None else as_mask_mod(mask_fn, "mask_fn"))

    def sequence_mask(self, mask_mod, index: int):
        """mask_mod with b fixed to the sequence's index (kept for this object's own mask_mod)."""
        if mask_mod is not self.mask_mod:
            return _for_sequence(mask_mod, index, 4)
        kept = self.sequences.get(index)
        if kept is None:
            kept = _for_sequence(mask_mod, index, 4)
            if len(self.sequences) < self.KEPT:
                self.sequences[index] = kept
        return kept


def _for_sequence(mod, index: int, n_args: int):
    """The mod with b fixed to this sequence's index (each sequence is planned on its own)."""
    if mod is None:
        return None
    if n_args == 4:
        def sequence_mask(b, h, q_idx, kv_idx):
            return mod(b * 0 + index, h, q_idx, kv_idx)
        return _with_hints(sequence_mask, mod, LOWERING_HINTS)

    def sequence_score(score, b, h, q_idx, kv_idx):
        return mod(score, b * 0 + index, h, q_idx, kv_idx)
    return _with_hints(sequence_score, mod, SCORE_MOD_HINTS)


def _with_hints(fn, mod, hints):
    """fn named as mod and carrying mod's planning hints: they still describe it."""
    fn.__name__ = getattr(mod, "__name__", fn.__name__)
    pass_hints(fn, mod, hints)
    return fn
