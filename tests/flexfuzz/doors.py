"""Run a Case through its public door and judge it against the oracles.

Doors: flex_attention (our or torch's BlockMask, or none), torch's decoding idiom (a sliced
BlockMask with shifted mods and seq_lengths), the seed API FlexFlashInfer (one sequence, or a
packed varlen batch through cu_seqlens), and PagedFlexAttention over a shuffled page table.
Each result carries the route every plan took (routes.py), for the campaign's counts.
"""
from __future__ import annotations

import linecache
import math
import time
import traceback
from dataclasses import dataclass, field

import torch

from . import oracle
from .cases import Case
from .exprs import uses
from .cpu_model import OutOfDate, patched, recording_plans
from .routes import plan_route, paged_route, varlen_routes

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Result:
    case: Case
    status: str = "pass"         # pass | fail | refused | invalid
    problems: list = field(default_factory=list)
    routes: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # torch's flex disagreeing with the float64 oracle, ...
    error: float = 0.0           # largest output error against the float64 oracle
    seconds: float = 0.0


class Invalid(Exception):
    """The case itself is broken (the oracle could not evaluate its mods): a generator bug."""


def _oracle_dense(*args):
    """oracle.dense inside a door (varlen, paged: the oracle per sequence or request): its failure
    (the GPU out of memory beside the pool's other processes, say) makes the case invalid, as the
    flex door's reference does, not a failure of the library."""
    try:
        return oracle.dense(*args)
    except Exception as e:
        raise Invalid(f"the oracle failed: {type(e).__name__}: {_short(e)}") from e


def build_mods(case: Case):
    """(mask_mod, score_mod) from the case's source, which is registered with linecache so that
    tracebacks and inspect show its lines."""
    import flex_flash_infer
    import flex_flash_infer.mods as mods

    filename = f"<fuzz case {case.name}>"
    linecache.cache[filename] = (len(case.mods), None, case.mods.splitlines(True), filename)
    namespace = {"torch": torch, **{n: getattr(mods, n) for n in mods.__all__},
                 **{n: getattr(flex_flash_infer, n) for n in ("and_masks", "or_masks", "get_mask_fn")}}
    exec(compile(case.mods, filename, "exec"), namespace)
    return namespace["build"](case.device)


def call_build(build, device):
    """build(device), or build() for a build() written without the device argument."""
    import inspect

    try:
        takes_device = bool(inspect.signature(build).parameters)
    except (TypeError, ValueError):
        takes_device = False
    return build(device) if takes_device else build()


def four_args(mask_fn):
    """The seed's two-argument mask_fn(q_idx, kv_idx) as a mask_mod, for the oracles."""
    import inspect

    if mask_fn is None:
        return None
    try:
        n = len([p for p in inspect.signature(mask_fn).parameters.values() if p.default is p.empty])
    except (TypeError, ValueError):
        n = 4
    if n == 2:
        return lambda b, h, q_idx, kv_idx: mask_fn(q_idx, kv_idx)
    return mask_fn


def _visible(mask_mod, case: Case, device):
    """The oracle's mask of the whole problem (it decides whether a block mask may broadcast)."""
    try:
        return oracle.visible(mask_mod, range(case.B), case.Hq, range(case.L), range(case.S), device)
    except Exception as e:
        raise Invalid(f"the oracle cannot evaluate the mask_mod: {type(e).__name__}: {e}") from e


def _inputs(case: Case, q_shape, kv_shape, device, v_dim: int = 0, layout: str = "", seed_offset: int = 0,
            dtype: str = ""):
    """q, k, v drawn from the case's input seed. layout "bshd": [B, S, H, D] memory seen as
    [B, H, S, D] (a model's transposed projections); "sliced": rows twice as long as the head_dim
    (a slice of a fused projection); "dstrided": the last dimension not unit-stride (kernels
    that read it as unit-stride get it wrong). The values are the same whatever the layout."""
    g = torch.Generator().manual_seed(case.input_seed + seed_offset)
    dtype = DTYPES[dtype or case.dtype]
    q = torch.randn(q_shape, generator=g, dtype=torch.float64) * case.amplitude
    k = torch.randn(kv_shape, generator=g, dtype=torch.float64) * case.amplitude
    v = torch.randn((*kv_shape[:-1], v_dim or kv_shape[-1]), generator=g, dtype=torch.float64)
    t = q if case.nan == "q" else k
    if case.nan and t.numel():   # one row of one head of q or k, as a NaN that crept in upstream would be
        lead = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in t.shape[:-1])
        t[lead] = math.nan
    out = []
    for x in (q, k, v):
        x = x.to(dtype).to(device)
        if layout == "bshd" and x.dim() == 4:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "sliced":
            x = torch.cat([x, torch.zeros_like(x)], -1)[..., :x.shape[-1]]
        elif layout == "dstrided":   # the head_dim strided: [.., D, S] memory seen transposed
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        out.append(x)
    return tuple(out)


def _scale(case: Case) -> float:
    return case.scale if case.scale is not None else case.D ** -0.5


# ------------------------------------------------------------------------------------------ doors
def _flex(case: Case, mask_mod, score_mod, device, want):
    from flex_flash_infer import create_block_mask, flex_attention

    B, Hq, Hkv, L, S, D = case.B, case.Hq, case.Hkv, case.L, case.S, case.D
    q, k, v = _inputs(case, (B, Hq, L, D), (B, Hkv, S, D), device, case.Dv, case.layout)
    if case.grad:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    seen = _visible(mask_mod, case, device)
    bB = None if case.broadcast and bool((seen == seen[:1]).all()) else B
    bH = None if case.broadcast and bool((seen == seen[:, :1]).all()) else Hq
    block_mask = None
    if mask_mod is None:
        pass
    elif case.block_mask == "ours":
        block_mask = create_block_mask(mask_mod, bB, bH, L, S, device=device, BLOCK_SIZE=case.block)
    elif case.block_mask == "torch":
        from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

        block_mask = torch_block_mask(mask_mod, bB, bH, L, S, device=device, BLOCK_SIZE=case.block)
    elif case.block_mask == "tables":
        block_mask = _tables_made_elsewhere(create_block_mask(mask_mod, bB, bH, L, S, device=device,
                                                              BLOCK_SIZE=case.block), seen, S)
    elif case.block_mask == "mutated":
        block_mask = _rewritten_in_place(case, create_block_mask(mask_mod, bB, bH, L, S, device=device,
                                                                 BLOCK_SIZE=case.block), score_mod, device)
    if case.block_mask == "ours" and block_mask is not None:
        want["tiles"] = oracle.tile_problems(block_mask.states, seen, block_mask.BLOCK_SIZE)
    if (case.repeat or case.changed) and block_mask is not None:
        # another batch size only where the mods never read b (a table indexed by b has B entries)
        _earlier_call(case, block_mask, score_mod, bB is None and not uses(case.mods, "b"), device)
    if case.changed:   # the score_mod's numbers and tables, after a call planned from them
        change_captured(score_mod)
    aux = {}
    if case.aux:
        from flex_flash_infer import AuxRequest

        aux = {"return_aux": AuxRequest(lse=True, max_scores=case.aux == "max")}
    with recording_plans() as plans:
        result = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=case.scale,
                                enable_gqa=Hq != Hkv, return_lse=case.return_lse and not aux, backend=case.backend,
                                kernel_options={"ROUTE": case.route} if case.route else None, **aux)
    if aux:
        out, lse = result[0], result[1].lse
        if case.aux == "max":
            want["max_scores"] = result[1].max_scores
    else:
        out, lse = result if case.return_lse else (result, None)
    want.update(oracle_rows=(range(B), range(L), range(S)), inputs=(q, k, v), mask=mask_mod, score=score_mod)
    routes = [plan_route(p) + ("/forced" if case.route else "") for p in plans[:1]] \
        if case.backend == "flashinfer" else ["reference"]
    return out, lse, routes


def _as_tables(states):
    """FlexAttention's four tables of an int8 state map (partial 1, full 2)."""
    tables = []
    for value in (1, 2):
        selected = states == value
        tables += [selected.sum(-1).to(torch.int32),
                   torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)]
    return tables


def _tables_made_elsewhere(built, seen, S):
    """built's tables, with the padded last key tile listed full wherever the mask holds on every
    key it has (as hand-made or refilled tables list it; the library's builder keeps it partial)."""
    from flex_flash_infer.block_mask import BlockMask

    states = built.states.clone()
    bq, bkv = built.BLOCK_SIZE
    if S % bkv:
        tail = seen[..., (states.shape[-1] - 1) * bkv:]   # [B, Hq, L, keys of the tail tile]
        rows = torch.nn.functional.pad(tail.all(-1), (0, states.shape[2] * bq - tail.shape[2]), value=True)
        whole = rows.view(*rows.shape[:2], states.shape[2], bq).all(-1)[:states.shape[0], :states.shape[1]]
        states[..., -1] = torch.where(whole & (states[..., -1] == 1), 2, states[..., -1]).to(torch.int8)
    num, idx, full_num, full_idx = _as_tables(states)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=built.BLOCK_SIZE,
                                    mask_mod=built.mask_mod, seq_lengths=built.seq_lengths)


def _rewritten_in_place(case: Case, built, score_mod, device):
    """A block mask of another mask (every key visible, every tile full) with built's shapes, used
    by a call (its plans and states cached), then given built's tables and mask_mod in place: a
    stale state map would keep every tile full."""
    from flex_flash_infer import flex_attention
    from flex_flash_infer.block_mask import BlockMask

    states = built.states
    other = BlockMask.from_kv_blocks(*_as_tables(torch.full_like(states, 2)), BLOCK_SIZE=built.BLOCK_SIZE,
                                     mask_mod=lambda b, h, q, kv: kv >= 0, seq_lengths=built.seq_lengths)
    q, k, v = _inputs(case, (case.B, case.Hq, case.L, case.D), (case.B, case.Hkv, case.S, case.D), device,
                      seed_offset=11)
    flex_attention(q, k, v, score_mod=score_mod, block_mask=other, scale=case.scale, enable_gqa=case.Hq != case.Hkv,
                   backend=case.backend)
    for name, table in zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"),
                           _as_tables(states)):
        getattr(other, name).copy_(table)
    other.mask_mod = built.mask_mod
    return other


def change_captured(fn, seen=None) -> None:
    """Change in place what a case's mod captures, as a user changes a setting between calls: each
    number in its closure (an int + 1, a float * 1.25 + 0.125) and each floating table (+ 0.25),
    through the functions it captures. Only the case's own functions (the library's masks are
    fixed when made); integer tables are left alone (they may index other tables)."""
    import types

    seen = set() if seen is None else seen
    if fn is None or id(fn) in seen:
        return
    seen.add(id(fn))
    wrapped = getattr(fn, "_mask_mod", None) or getattr(fn, "__wrapped__", None)
    if not isinstance(fn, types.FunctionType):
        if wrapped is not None:
            change_captured(wrapped, seen)
        return
    if not fn.__code__.co_filename.startswith("<fuzz case"):
        for cell in fn.__closure__ or ():   # a library combinator: the case's functions inside it
            value = cell.cell_contents
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if callable(item):
                    change_captured(item, seen)
        return
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            cell.cell_contents = value + 1
        elif isinstance(value, float):
            cell.cell_contents = value * 1.25 + 0.125
        elif isinstance(value, torch.Tensor):
            if value.is_floating_point():
                with torch.no_grad():
                    value.add_(0.25)
        elif callable(value):
            change_captured(value, seen)


def _earlier_call(case: Case, block_mask, score_mod, batch_free: bool, device) -> None:
    """A call on the same block mask before the judged one, with other inputs and one planning
    parameter changed: what it plans and caches on the block mask must not leak into the next."""
    from flex_flash_infer import flex_attention

    B, dtype, scale = case.B, case.dtype, case.scale
    if case.repeat == "batch" and batch_free:
        B += 1
    elif case.repeat == "dtype":
        dtype = {"float32": "float64", "float16": "bfloat16", "bfloat16": "float16"}.get(case.dtype, "float32")
    elif case.repeat == "scale":
        scale = 0.3 if case.scale is None else None
    q, k, v = _inputs(case, (B, case.Hq, case.L, case.D), (B, case.Hkv, case.S, case.D), device, case.Dv,
                      seed_offset=7, dtype=dtype)
    flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=case.Hq != case.Hkv,
                   return_lse=not case.return_lse, backend=case.backend)


def _decode(case: Case, mask_mod, score_mod, device, want):
    from flex_flash_infer import create_block_mask, flex_attention

    B, Hq, Hkv, L, S, D = case.B, case.Hq, case.Hkv, case.L, case.S, case.D
    pos, rows = case.decode_pos, case.decode_rows
    q, k, v = _inputs(case, (B, Hq, L, D), (B, Hkv, S, D), device, layout=case.layout)
    mask_mod = mask_mod or (lambda b, h, q_idx, kv_idx: q_idx >= 0)
    seen = _visible(mask_mod, case, device)
    bB = None if case.broadcast and bool((seen == seen[:1]).all()) else B
    bH = None if case.broadcast and bool((seen == seen[:, :1]).all()) else Hq
    if case.block_mask == "torch":   # gpt-fast's idiom with torch's own BlockMask, handed to us
        from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

        full = torch_block_mask(mask_mod, bB, bH, L, S, device=device, BLOCK_SIZE=case.block)
    else:
        full = create_block_mask(mask_mod, bB, bH, L, S, device=device, BLOCK_SIZE=case.block)
    step = full[:, :, pos // full.BLOCK_SIZE[0]]

    def shifted_mask(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + pos, kv_idx)

    def shifted_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + pos, kv_idx)

    step.mask_mod = shifted_mask
    step.seq_lengths = (rows, S)
    with recording_plans() as plans:
        result = flex_attention(q[:, :, pos:pos + rows], k, v, score_mod=score_mod and shifted_score,
                                block_mask=step, scale=case.scale, enable_gqa=Hq != Hkv,
                                return_lse=case.return_lse, backend=case.backend)
    out, lse = result if case.return_lse else (result, None)
    want.update(oracle_rows=(range(B), range(pos, pos + rows), range(S)), inputs=(q[:, :, pos:pos + rows], k, v),
                mask=mask_mod, score=score_mod)
    routes = [plan_route(p) for p in plans[:1]] if case.backend == "flashinfer" else ["reference"]
    return out, lse, routes


def _block_sizes(case: Case):
    return case.block if isinstance(case.block, tuple) else (case.block, case.block)


def _seed(case: Case, mask_fn, score_mod, device, want):
    from flex_flash_infer import FlexFlashInfer

    Hq, Hkv, L, S, D = case.Hq, case.Hkv, case.L, case.S, case.D
    q, k, v = _inputs(case, (1, Hq, L, D), (1, Hkv, S, D), device)
    bq, bk = _block_sizes(case)
    flex = FlexFlashInfer(device=device, backend=case.backend)
    if case.repeat:   # an earlier plan on the same object, run once: prepare() must replace it whole
        qe, ke, ve = _inputs(case, (1, Hq, L + 3, D), (1, Hkv, S + 5, D), device, seed_offset=7)
        flex.prepare(seq_len_q=L + 3, seq_len_kv=S + 5, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                     dtype=DTYPES[case.dtype], block_size_row=bk, block_size_col=bq)
        flex(*(x[0].transpose(0, 1).contiguous() for x in (qe, ke, ve)), return_lse=True)
    flex = flex.prepare(
        mask_fn=mask_fn, seq_len_q=L, seq_len_kv=S, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
        block_size_row=bq, block_size_col=bk, dtype=DTYPES[case.dtype], score_mod=score_mod, scale=case.scale)
    inputs = [x[0].transpose(0, 1).contiguous() for x in (q, k, v)]
    result = flex(*inputs, return_lse=case.return_lse)
    if case.changed:   # what the mods capture, changed after a call: the next sees it or says to prepare again
        change_captured(mask_fn)
        change_captured(score_mod)
        try:
            result = flex(*inputs, return_lse=case.return_lse)
        except ValueError as e:
            if "call prepare() again" not in str(e):
                raise
            flex.prepare(mask_fn=mask_fn, seq_len_q=L, seq_len_kv=S, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                         block_size_row=bq, block_size_col=bk, dtype=DTYPES[case.dtype], score_mod=score_mod,
                         scale=case.scale)
            result = flex(*inputs, return_lse=case.return_lse)
    out, lse = result if case.return_lse else (result, None)
    out = out.transpose(0, 1)[None]
    lse = None if lse is None else lse.transpose(0, 1)[None]
    want.update(oracle_rows=(range(1), range(L), range(S)), inputs=(q, k, v), mask=four_args(mask_fn), score=score_mod)
    return out, lse, varlen_routes(flex)


def _varlen(case: Case, mask_fn, score_mod, device, want):
    from flex_flash_infer import FlexFlashInfer

    Hq, Hkv, D = case.Hq, case.Hkv, case.D
    q, k, v = _inputs(case, (1, Hq, case.L, D), (1, Hkv, case.S, D), device)
    bq, bk = _block_sizes(case)
    flex = FlexFlashInfer(device=device, backend=case.backend).prepare(
        mask_fn=mask_fn, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size_row=bq, block_size_col=bk,
        dtype=DTYPES[case.dtype], score_mod=score_mod, scale=case.scale, cu_seqlens_q=case.cu_q,
        cu_seqlens_kv=case.cu_kv)
    result = flex(*(x[0].transpose(0, 1).contiguous() for x in (q, k, v)), return_lse=case.return_lse)
    out, lse = result if case.return_lse else (result, None)
    mask = four_args(mask_fn)
    ref_out = torch.zeros(1, Hq, case.L, D, dtype=torch.float64, device=device)
    ref_lse = torch.full((1, Hq, case.L), -math.inf, dtype=torch.float64, device=device)
    for i in range(len(case.cu_q) - 1):
        q0, q1, k0, k1 = case.cu_q[i], case.cu_q[i + 1], case.cu_kv[i], case.cu_kv[i + 1]
        o, s = _oracle_dense(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], mask, score_mod, _scale(case),
                             [i], range(q1 - q0), range(k1 - k0))
        ref_out[:, :, q0:q1], ref_lse[:, :, q0:q1] = o, s
    want.update(ref=(ref_out, ref_lse))
    out = out.transpose(0, 1)[None]
    return out, None if lse is None else lse.transpose(0, 1)[None], varlen_routes(flex)


def _paged(case: Case, mask_mod, score_mod, device, want):
    """One plan and run, or two on the same PagedFlexAttention (its FlashInfer wrappers are
    reused by the second plan); the rows of both steps are judged together."""
    from flex_flash_infer import PagedFlexAttention

    if case.paged_graph and case.backend == "flashinfer":
        graphed = _paged_graph(case, mask_mod, score_mod, device, want)
        if graphed is not None:
            return graphed
    paged = PagedFlexAttention(device=device, backend=case.backend)
    steps = [(case.kv_lens, case.qo_lens)] + ([(case.kv_lens2, case.qo_lens2)] if case.kv_lens2 else [])
    outs, lses, refs, ref_lses, routes = [], [], [], [], []
    for step, (kv_lens, qo_lens) in enumerate(steps):
        out, lse, ref_out, ref_lse = _paged_step(case, paged, kv_lens, qo_lens, step, mask_mod, score_mod, device)
        outs.append(out), lses.append(lse), refs.append(ref_out), ref_lses.append(ref_lse)
        routes.append(paged_route(paged))
    want.update(ref=(torch.cat(refs, 0).transpose(0, 1)[None], torch.cat(ref_lses, 0).transpose(0, 1)[None]))
    out = torch.cat(outs, 0).transpose(0, 1)[None]
    lse = None if lses[0] is None else torch.cat(lses, 0).transpose(0, 1)[None]
    return out, lse, routes


GRAPH_REFUSAL = "PagedFlexAttention(use_cuda_graph=True)"


def _paged_graph(case: Case, mask_mod, score_mod, device, want):
    """use_cuda_graph=True: the first step planned and run, run() captured (torch.cuda.graph on a
    GPU, fake_flashinfer.capture on the CPU model), the second step (if any) planned and replayed
    from that capture with its queries and cache written into the captured tensors. A step graph
    mode cannot replay raises its ValueError at plan(): at the first step the case runs as a plain
    one (None here), at the second the capture must still replay the first step as it ran."""
    from flex_flash_infer import PagedFlexAttention
    from . import simulated

    steps = [(case.kv_lens, case.qo_lens)] + ([(case.kv_lens2, case.qo_lens2)] if case.kv_lens2 else [])
    most_pages = max(sum(-(-n // case.page_size) for n in kv_lens) for kv_lens, _ in steps)
    paged = PagedFlexAttention(device=device, backend=case.backend, use_cuda_graph=True,
                               max_num_pages=max(most_pages, 1))
    real_gpu = device.type == "cuda" and not simulated.active()
    graph, held = None, {}

    def first_run(q, cache):
        """Run eagerly (judged), then capture run() on the same tensors."""
        nonlocal graph
        result = paged.run(q, cache, return_lse=case.return_lse)
        held.update(q=q, cache=cache, eager=result)
        if real_gpu:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                held["captured"] = paged.run(q, cache, return_lse=case.return_lse)
        else:
            import fake_flashinfer
            with fake_flashinfer.capture() as graph:
                held["captured"] = paged.run(q, cache, return_lse=case.return_lse)
        return result

    def replay(q, cache):
        held["q"].copy_(q)
        for mine, theirs in zip(_cache_parts(held["cache"]), _cache_parts(cache)):
            mine.zero_()
            mine[:theirs.shape[0]].copy_(theirs)
        graph.replay()
        if real_gpu:
            torch.cuda.synchronize()
        return held["captured"]

    outs, lses, refs, ref_lses, routes = [], [], [], [], []
    for step, (kv_lens, qo_lens) in enumerate(steps):
        try:
            out, lse, ref_out, ref_lse = _paged_step(case, paged, kv_lens, qo_lens, step, mask_mod, score_mod,
                                                     device, runner=first_run if step == 0 else replay,
                                                     pages=most_pages + 3)
        except ValueError as e:
            if GRAPH_REFUSAL not in str(e):
                raise
            if step == 0:
                return None
            again = replay(held["q"].clone(), tuple(c.clone() for c in _cache_parts(held["cache"])))
            eager = held["eager"]
            for name, a, b in zip(("out", "lse"), again if case.return_lse else (again,),
                                  eager if case.return_lse else (eager,)):
                if not ((a == b) | (a.isnan() & b.isnan())).all():
                    want.setdefault("door", []).append(
                        f"after the second step's plan raised, the graph's replay of the first step differs in {name}")
            routes.append("paged-graph/refused-second-step")
            break
        outs.append(out), lses.append(lse), refs.append(ref_out), ref_lses.append(ref_lse)
        routes.append(paged_route(paged) + ("/graph" if step else ""))
    want.update(ref=(torch.cat(refs, 0).transpose(0, 1)[None], torch.cat(ref_lses, 0).transpose(0, 1)[None]))
    out = torch.cat(outs, 0).transpose(0, 1)[None]
    lse = None if lses[0] is None else torch.cat(lses, 0).transpose(0, 1)[None]
    return out, lse, routes


def _cache_parts(cache):
    """(k, v) views of a cache given as a pair or one [pages, 2, ...] tensor."""
    return (cache[:, 0], cache[:, 1]) if isinstance(cache, torch.Tensor) else tuple(cache)


def _placed_tables(where: str, tables, device):
    """plan()'s tables (qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len) as the case
    keeps them (cases.TABLE_PLACES); each a buffer of its own, which the caller may overwrite."""
    on_host = {"host": (0, 1, 3), "mixed": (0, 3)}.get(where, ())
    dtype = torch.int32 if where == "device-int32" else torch.int64
    return [t.to(dtype).clone() if i in on_host else t.to(device, dtype).clone() for i, t in enumerate(tables)]


def _paged_step(case: Case, paged, kv_lens, qo_lens, step: int, mask_mod, score_mod, device, runner=None,
                pages=None):
    """(out, lse, oracle out, oracle lse) of one step, rows [total queries, Hq(, D)]. runner(q,
    cache): what runs the planned step (default paged.run); pages: the cache's pages (default the
    step's own and 3 more: a graph's cache holds every step's)."""
    Hq, Hkv, D, P = case.Hq, case.Hkv, case.D, case.page_size
    g = torch.Generator().manual_seed(case.input_seed + 1 + step)
    total_pages = pages
    pages = [-(-n // P) for n in kv_lens]
    total = sum(pages) + 3 if total_pages is None else total_pages
    order = torch.randperm(total, generator=g)[:sum(pages)]
    kv_page_indptr = torch.tensor([0] + pages).cumsum(0)
    last = torch.tensor([n - (p - 1) * P if p else 0 for n, p in zip(kv_lens, pages)])
    qo_indptr = torch.tensor([0] + list(qo_lens)).cumsum(0)
    n_q = int(qo_indptr[-1])
    q, k_cache, v_cache = _inputs(case, (1, Hq, n_q, D), (total, P, Hkv, D), device, seed_offset=step)
    q = q[0].transpose(0, 1).contiguous()
    tables = _placed_tables(case.paged_tables, (qo_indptr, kv_page_indptr, order, last), device)
    paged.plan(mask_mod, *tables, Hq, Hkv, D, P, dtype=DTYPES[case.dtype], scale=case.scale, score_mod=score_mod)
    for t in tables:   # a server writes its next step into the same buffers: the plan must not see it
        t.fill_(7)
    cache = torch.stack([k_cache, v_cache], 1) if case.cache_5d else (k_cache, v_cache)
    result = (runner or (lambda q, cache: paged.run(q, cache, return_lse=case.return_lse)))(q, cache)
    out, lse = result if case.return_lse else (result, None)
    mask = mask_mod if mask_mod is not None else (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)   # plan()'s default
    ref_out = torch.zeros(n_q, Hq, D, dtype=torch.float64, device=device)
    ref_lse = torch.full((n_q, Hq), -math.inf, dtype=torch.float64, device=device)
    for r, (n_kv, n_new) in enumerate(zip(kv_lens, qo_lens)):
        ids = order[int(kv_page_indptr[r]):int(kv_page_indptr[r + 1])].to(device)
        kr = k_cache[ids].reshape(-1, Hkv, D)[:n_kv].transpose(0, 1)[None]
        vr = v_cache[ids].reshape(-1, Hkv, D)[:n_kv].transpose(0, 1)[None]
        q0 = int(qo_indptr[r])
        o, s = _oracle_dense(q[q0:q0 + n_new].transpose(0, 1)[None], kr, vr, mask, score_mod, _scale(case), [r],
                             range(n_kv - n_new, n_kv), range(n_kv))
        ref_out[q0:q0 + n_new], ref_lse[q0:q0 + n_new] = o[0].transpose(0, 1), s[0].transpose(0, 1)
    return out, lse, ref_out, ref_lse


DOORS = {"flex": _flex, "decode": _decode, "seed": _seed, "varlen": _varlen, "paged": _paged}


# ------------------------------------------------------------------------------------------ judging
def run_case(case: Case, build=None, torch_check: bool = False) -> Result:
    """Run and judge one case. build: the mods' build() (default: the case's own source).
    torch_check: also run torch's flex_attention and note where it disagrees with the float64 oracle."""
    result = Result(case)
    start = time.perf_counter()
    device = torch.device(case.device)
    try:
        mask_mod, score_mod = build_mods(case) if build is None else call_build(build, case.device)
    except Exception as e:
        result.status, result.problems = "invalid", [f"the case's mods do not build: {type(e).__name__}: {e}"]
        return result
    want = {}
    from . import simulated
    # on the simulated device (simulated.py) the CPU model serves as FlashInfer on "cuda" too
    cpu_model = (device.type == "cpu" or simulated.active()) and case.backend == "flashinfer"
    with oracle.Largest() as largest:   # the scores' size, for float32's share of the tolerance
        return _run_and_judge(case, result, mask_mod, score_mod, device, want, cpu_model, torch_check, start, largest)


def _run_and_judge(case, result, mask_mod, score_mod, device, want, cpu_model, torch_check, start, largest):
    from flex_flash_infer.core.trace import TraceError

    try:
        with patched(case.switches, cpu_model, case.hopper, case.own_modules):
            out, lse, result.routes = DOORS[case.door](case, mask_mod, score_mod, device, want)
            grad_problems = _check_grad(case, out, want) if case.grad else []
    except (Invalid, OutOfDate) as e:
        result.status, result.problems = "invalid", [str(e)]
        return result
    except TraceError as e:
        result.status, result.problems = "refused", [f"{type(e).__name__}: {_short(e)}"]
        result.seconds = time.perf_counter() - start
        return result
    except ValueError as e:
        if case.scale == 0 and "need a finite, nonzero scale" in str(e):
            # backend='flashinfer' with scale 0: FlashInfer's kernels give NaN there, and the
            # library refuses the call by name (under 'auto' it runs on the reference)
            result.status, result.problems = "refused", [f"ValueError: {_short(e)}"]
        else:
            result.status = "fail"
            result.problems = [f"raised ValueError: {_short(e)}", _where_raised(e)]
        result.seconds = time.perf_counter() - start
        return result
    except Exception as e:
        result.status = "fail"
        result.problems = [f"raised {type(e).__name__}: {_short(e)}", _where_raised(e)]
        result.seconds = time.perf_counter() - start
        return result
    try:
        ref_out, ref_lse = _reference(case, want, device)
    except Exception as e:
        result.status, result.problems = "invalid", [f"the oracle failed: {type(e).__name__}: {_short(e)}"]
        return result
    tol_out, tol_lse = oracle.tolerance(case.dtype, largest.value)
    problems = []
    if out.dtype != want.get("inputs", (out,))[0].dtype and case.door in ("flex", "decode"):
        problems.append(f"output dtype {out.dtype}, expected the query's {want['inputs'][0].dtype}")
    problems += oracle.compare("out", out, ref_out, tol_out)
    if case.return_lse:
        problems += oracle.compare("lse", lse, ref_lse, tol_lse, lse=True)
    if "max_scores" in want:
        q, k, _ = (x.detach() for x in want["inputs"])
        bs, qs, ks = want["oracle_rows"]
        ref_max = oracle.max_scores(q, k, want["mask"], want["score"], _scale(case), list(bs), qs, ks)
        problems += oracle.compare("max_scores", want["max_scores"], ref_max, tol_lse, lse=True)
    problems += grad_problems + want.get("tiles", []) + want.get("door", [])
    result.error = oracle.max_error(out, ref_out)
    if torch_check and "inputs" in want and case.door in ("flex", "decode", "seed"):
        result.notes += _torch_disagreement(case, want, ref_out, ref_lse, (tol_out, tol_lse))
    result.problems = problems
    result.status = "fail" if problems else "pass"
    result.seconds = time.perf_counter() - start
    return result


def _reference(case: Case, want: dict, device):
    if "ref" in want:
        return want["ref"]
    q, k, v = (x.detach() for x in want["inputs"])
    bs, qs, ks = want["oracle_rows"]
    return oracle.dense(q, k, v, want["mask"], want["score"], _scale(case), list(bs), qs, ks)


def _check_grad(case: Case, out, want) -> list:
    """A FlashInfer output either carries correct gradients or its backward says it is forward-only
    (naming the reference backend); a reference output always carries correct gradients."""
    q, k, v = want["inputs"]
    if not out.requires_grad:
        return ["grad: the output of inputs that require grad has no grad_fn (the gradient is dropped silently)"]
    g = torch.Generator().manual_seed(case.input_seed + 2)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    try:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
    except Exception as e:
        if case.backend == "flashinfer" and "reference" in str(e):
            return []
        return [f"grad: backward raised {type(e).__name__}: {_short(e)}"]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    bs, qs, ks = want["oracle_rows"]
    ref, _ = oracle.dense(*leaves, want["mask"], want["score"], _scale(case), list(bs), qs, ks)
    expected = torch.autograd.grad(ref, leaves, grad_out.double(), allow_unused=True)   # a score_mod may ignore q
    expected = [torch.zeros_like(x) if e is None else e for x, e in zip(leaves, expected)]
    tol = oracle.TOLERANCE[case.dtype][0] * 10
    problems = []
    for name, got, exp in zip(("dq", "dk", "dv"), (dq, dk, dv), expected):
        got = torch.zeros_like(exp) if got is None else got
        problems += oracle.compare(f"grad {name}", got, exp, tol)
    return problems


def _torch_disagreement(case: Case, want: dict, ref_out, ref_lse, tolerance) -> list:
    q, k, v = (x.detach() for x in want["inputs"])
    bs, qs, ks = want["oracle_rows"]
    try:
        if case.door == "decode":   # torch's own run of the whole problem, then the decoded rows
            qf = _inputs(case, (case.B, case.Hq, case.L, case.D), (case.B, case.Hkv, case.S, case.D), q.device)[0]
            out, lse = oracle.torch_flex(qf, k, v, want["mask"], want["score"], case.scale, len(bs), case.L, case.S)
            out, lse = out[:, :, qs.start:qs.stop], lse[:, :, qs.start:qs.stop]
        else:
            out, lse = oracle.torch_flex(q, k, v, want["mask"], want["score"], case.scale, len(bs), len(qs), len(ks))
    except Exception as e:
        return [f"torch's flex_attention raised {type(e).__name__}: {_short(e)}"]
    tol_out, tol_lse = tolerance
    problems = oracle.compare("torch out", out, ref_out, tol_out) + oracle.compare("torch lse", lse, ref_lse, tol_lse,
                                                                                    lse=True)
    return [f"torch's flex_attention disagrees with the float64 oracle: {p}" for p in problems]


def _short(e: Exception, limit: int = 300) -> str:
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _where_raised(e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "flex_flash_infer" in f.filename] or frames
    f = ours[-1]
    return f"at {f.filename.split('flex_flash_infer/')[-1]}:{f.lineno} ({f.name})"


def check(build, **fields) -> Result:
    """Reproduce a printed case: run it with its build() and raise AssertionError on a failure."""
    case = Case(**fields)
    import inspect

    try:
        case.mods = inspect.getsource(build)
    except (OSError, TypeError):
        pass
    result = run_case(case, build, torch_check=True)
    print(f"case {case.name}: {result.status}; routes {result.routes}; max output error {result.error:.3g}")
    for line in result.problems + result.notes:
        print("  " + line)
    assert result.status in ("pass", "refused"), "\n".join(result.problems)
    return result
