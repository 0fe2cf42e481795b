"""A FlashInfer fa3 attention variant that applies a traced score_mod inside the kernel.

It serves the band route: each request is a band of one batch entry, run by FlashInfer's ragged
prefill with its native causal / window flags, so only the score_mod needs custom code. The
variant's LogitsTransform scales the logit (FlexAttention's score = q.k * scale), maps the
request-local (qo_idx, kv_idx) to absolute positions with three small per-request tables, and
returns score_mod(score, b, h, q, kv); the softmax then runs in base 2 with log2(e) as its scale.

Status: compiled against FlashInfer's headers in CPU tests (nvcc, no GPU), run by
score_mod_kernels.ScoreModBands, and checked against the reference by the GPU tests. Its first
version was about three times slower than the same mask without a score_mod. The SASS of the
softcap kernel (ptxas for sm_90a, no GPU) showed why: the scale, a double kernel argument, was
reloaded and converted (F2F.F32.F64, on the exp2 unit) for every score. The scale and every
captured number or stride are now read once in the constructor, a division by such a value is a
multiplication, tanh is one tanh.approx, and the padding guard is emitted only where a captured
table is read per score: softcap and alibi then ran about twice as fast as before.
After that, ints of known small range (positions, their differences) convert to float with a
bit trick instead of I2F (alibi's kernel: 384 I2F before, none after, by ptxas on the CPU).

fa2_score_mod_variant (any FlashInfer GPU, and FlashInfer's masked path) compiles as device code
against FlashInfer's headers in CPU tests and passed its GPU tests with fa2 forced on an H100;
GPUs before Hopper run it by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import lean_modules
from .codegen import KERNEL_DTYPE, PRELUDE, check_kernel_size, element_ctype, emit_expression, graph_key, kernel_tensor
from ..core.trace import Graph
from ..core.versions import source_of

REQUEST_TABLES = ("ffi_req_q0", "ffi_req_kv0", "ffi_req_b")

SCALE_NAME = "ffi_sm_scale"
INPUT_NAMES = {"score": "ffi_score", "b": "ffi_b", "h": "ffi_h", "q_idx": "ffi_q", "kv_idx": "ffi_kv"}
_SCALAR_CTYPE = {"int": "int64_t", "float": "double"}
# FlashInfer's fa2 bit mask: a custom variant's params hold only the arguments it names, so one
# that reads the mask names these; the wrapper fills them from its own buffers (null when unset)
FA2_MASK_BUFFERS = (("maybe_custom_mask", "uint8_t"), ("maybe_mask_indptr", "int32_t"))


def fa2_variant_head(base: str) -> str:
    """The opening of an fa2 variant struct: FlashInfer instantiates it per use_custom_mask and
    reads these members (DefaultAttention's own)."""
    return f"""template <bool use_custom_mask>
struct {base} : AttentionVariantBase {{
  static constexpr bool use_softmax = true;
  uint8_t* custom_mask_ptr;
  uint32_t qo_len, kv_len, window_left;
  float sm_scale_log2, sm_scale_;
"""


def with_fa2_mask_buffers(tensor_names: list, tensor_dtypes: list):
    """The fa2 mask buffers ahead of a variant's own tensors (the wrapper supplies them)."""
    return [n for n, _ in FA2_MASK_BUFFERS] + tensor_names, [d for _, d in FA2_MASK_BUFFERS] + tensor_dtypes


@dataclass
class VariantSpec:
    name: str
    decl: str
    tensor_names: list
    tensor_dtypes: list
    scalar_names: list
    scalar_dtypes: list

    def jit_args(self, uri: str, dtype, head_dim: int, idtype, use_sliding_window: bool) -> list:
        """FlashInfer's gen_customize_batch_prefill_module arguments, in order (its modules of
        these are built with the mask modes this library uses: lean_modules)."""
        lean_modules.install()
        return [uri, dtype, dtype, dtype, idtype, head_dim, head_dim, self.tensor_names, self.tensor_dtypes,
                self.scalar_names, self.scalar_dtypes, self.name, self.decl, 0, use_sliding_window]


def graph_arguments(graph: Graph | None, prefix: str = "ffi_"):
    """(tensor names, dtypes, scalar names, dtypes) of one graph's captured values: its tensors,
    then its numbers, its tensors' strides and their sizes (int64 scalars, as FlashInfer passes
    them; a negative index counts from a size, as torch's does)."""
    if graph is None:
        return [], [], [], []
    tensors = [f"{prefix}{n}" for n, _ in graph.tensors]
    tensor_dtypes = [element_ctype(t) for _, t in graph.tensors]
    scalars = [f"{prefix}{n}" for n, _, _ in graph.scalars] + [
        f"{prefix}{n}_{what}{d}" for what in ("stride", "size") for n, t in graph.tensors for d in range(t.dim())]
    scalar_dtypes = [_SCALAR_CTYPE[k] for _, k, _ in graph.scalars] + [
        "int64_t" for _ in range(2) for _, t in graph.tensors for _ in range(t.dim())]
    return tensors, tensor_dtypes, scalars, scalar_dtypes


class KernelCopies(list):
    """The kernel's views of a graph's captured tensors, in graph_arguments' order.

    live (a score_mod's tables): the kernel reads each table as it is at each call, as the
    backward does (an optimizer step on a learned bias table). A table already contiguous, of its
    kernel dtype and on the device is handed to the kernel itself, so every write is seen; any
    other is a copy, rewritten in place by refresh() at every call (the same memory, which a
    captured CUDA graph keeps reading): a write through .data, under torch.inference_mode() or
    through memory shared with numpy moves no version counter, so none is trusted.
    Not live (a mask's tables, which the plan's page or tile states were computed from): copies
    as planned; a door raises when the source was written since (core/versions.moved)."""

    def __init__(self, sources, device, live: bool = True):
        device = torch.device(device)
        # a copy a mod made on another device (mods/_captured.follow_device: the trace runs on the
        # host) stands for its source, the tensor an optimizer steps
        self.sources = [source_of(t) for t in sources]
        self.aliased = [live and _kernel_ready(t, device) for t in self.sources]
        super().__init__(t.detach() if same else kernel_tensor(t).to(device)
                         for t, same in zip(self.sources, self.aliased))
        self.live = live
        self._pinned = []   # host tables a captured CUDA graph copies from (refresh)

    def refresh(self) -> None:
        if not self.live:
            return
        capturing = bool(self) and self[0].is_cuda and torch.cuda.is_current_stream_capturing()
        for i, t in enumerate(self.sources):
            if self.aliased[i]:
                continue
            source = t.detach().reshape(self[i].shape)
            if capturing and not source.is_cuda:
                # a CUDA graph copies from host memory only when it is pinned: a pinned copy of
                # the table as it is now, which every replay reads (host code does not replay, so
                # a host table written after the capture is not seen: capture again after that)
                # a contiguous pinned copy: a strided one would go through a pageable temporary
                source = torch.empty(self[i].shape, dtype=self[i].dtype, pin_memory=True).copy_(source)
                self._pinned.append(source)
            self[i].copy_(source, non_blocking=bool(capturing))   # copy_ converts dtype and device


def _kernel_ready(t, device) -> bool:
    """t can be the kernel's table itself: its kernel dtype, contiguous, on the device."""
    check_kernel_size(t)
    if device.type == "cuda" and device.index is None:   # "cuda": the current GPU, not any GPU
        device = torch.device("cuda", torch.cuda.current_device())
    return KERNEL_DTYPE.get(t.dtype) == t.dtype and t.is_contiguous() and t.device == device


def graph_values(graph: Graph | None, device, live: bool = True):
    """The values behind graph_arguments, in its order: (tensors on device, a KernelCopies,
    numbers + strides + sizes). live: a score_mod's tables, read as they are at each call; else
    a mask's, as planned."""
    if graph is None:
        return KernelCopies([], device), []
    tensors = KernelCopies([t for _, t in graph.tensors], device, live)
    return tensors, ([v for _, _, v in graph.scalars] + [int(s) for t in tensors for s in t.stride()]
                     + [int(s) for t in tensors for s in t.shape])


def _kernel_arguments(graph: Graph):
    """(tensor names, tensor dtypes, scalar names, scalar dtypes) of a variant for this graph:
    the three request tables, the captured tensors, the scale, captured numbers and strides."""
    tensors, tensor_dtypes, scalars, scalar_dtypes = graph_arguments(graph)
    return (list(REQUEST_TABLES) + tensors, ["int32_t"] * 3 + tensor_dtypes,
            [SCALE_NAME] + scalars, ["double"] + scalar_dtypes)


def graph_expression(graph: Graph, p: str, invariant_inputs, position_bound, hoisted: list, prefix: str = "ffi_"):
    """The graph as C++ reading its kernel arguments (named prefix + name) through p; what reads
    only invariant_inputs (fixed for the variant object) is appended to hoisted, to be computed
    once in the constructor, not per score."""
    return emit_expression(graph, scalar_ref=lambda n: f"{p}{prefix}{n}", tensor_ref=lambda n: f"{p}{prefix}{n}",
                           stride_ref=lambda n, d: f"{p}{prefix}{n}_stride{d}", input_ref=INPUT_NAMES.__getitem__,
                           size_ref=lambda n, d: f"{p}{prefix}{n}_size{d}",
                           hoisted=hoisted, invariant_inputs=invariant_inputs, position_bound=position_bound)


def hoisted_code(hoisted: list):
    """(member declarations, constructor statements) of the hoisted subexpressions."""
    return ("".join(f"  {ctype} {name};\n" for name, ctype, _ in hoisted),
            "".join(f"    {name} = {code};\n" for name, _, code in hoisted))


def _score_expression(graph: Graph, p: str, invariant_inputs, position_bound):
    """(score_mod as C++, member declarations, constructor statements)."""
    hoisted = []
    expr = graph_expression(graph, p, invariant_inputs, position_bound, hoisted)
    return (expr, *hoisted_code(hoisted))


def fa3_score_mod_variant(graph: Graph, position_bound: int | None = None) -> VariantSpec:
    """position_bound: the caller has checked that batch entries, heads and positions the kernel
    will see are below it (codegen.POSITION_BOUND); None: every int converts to float with I2F."""
    name = f"FlexScoreMod_{graph_key(graph)}"
    tensor_names, tensor_dtypes, scalar_names, scalar_dtypes = _kernel_arguments(graph)
    p = "params.additional_params."
    # one per (tile, head)
    expr, members, statements = _score_expression(graph, p, ("b", "h"), position_bound)
    # fa3 masks the padded tail of a tile after LogitsTransform, but a captured table must not be
    # read there (its index may run past the table); without tables the check is skipped
    reads_per_score = "[" in expr   # only a table read indexes; reads fixed per tile are hoisted
    guard = "    if (kv_idx >= kv_len_ || qo_idx >= qo_len_) return -math::inf;\n" if reads_per_score else ""
    decl = f"""{PRELUDE}
struct {name} : AttentionVariantBase {{
  float sm_scale_log2, sm_scale_;
  uint32_t qo_len_, kv_len_;
  int q0_, kv0_, b_;
{members}  template <typename MainloopParams, typename BlockCoord>
  __device__ {name}(const MainloopParams& params, const BlockCoord& block_coord) {{
    auto [q_tile_idx, qo_head_idx, kv_head_idx, qo_indptr, kv_indptr, qo_len, kv_len, batch_idx] = block_coord;
    sm_scale_log2 = math::log2e;  // LogitsTransform returns scores already scaled
    // read once: a double kernel argument read per score costs a conversion on the exp2 unit
    sm_scale_ = float({p}{SCALE_NAME});
    qo_len_ = qo_len;
    kv_len_ = kv_len;
    q0_ = {p}ffi_req_q0[batch_idx];
    kv0_ = {p}ffi_req_kv0[batch_idx];
    b_ = {p}ffi_req_b[batch_idx];
    const int ffi_b = b_, ffi_h = int(qo_head_idx);
    (void)ffi_b; (void)ffi_h;
{statements}  }}
  template <int NUM_ROWS_PER_THREAD>
  __device__ auto GetAttentionUpdater() {{ return OnlineSoftmax<NUM_ROWS_PER_THREAD, true>(sm_scale_log2); }}
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
{guard}    const float ffi_score = float(logits) * sm_scale_;
    const int ffi_b = b_, ffi_h = int(qo_head_idx), ffi_q = q0_ + int(qo_idx), ffi_kv = kv0_ + int(kv_idx);
    (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;
    return ({expr});
  }})
}};
"""
    return VariantSpec(name, decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes)


def fa2_score_mod_variant(graph: Graph, position_bound: int | None = None) -> VariantSpec:
    """The same score_mod for FlashInfer's fa2 kernels (any CUDA GPU FlashInfer supports).

    fa2 hands its kernel arguments to the variant as members of params, applies causal masks in
    the kernel and leaves custom bit masks and sliding windows to the variant's LogitsMask, so
    this variant implements both (as FlashInfer's DefaultAttention does). Its name carries the
    use_custom_mask template argument that FlashInfer's fa2 instantiation files define.
    """
    base = f"FlexScoreModFa2_{graph_key(graph)}"
    tensor_names, tensor_dtypes, scalar_names, scalar_dtypes = _kernel_arguments(graph)
    tensor_names, tensor_dtypes = with_fa2_mask_buffers(tensor_names, tensor_dtypes)
    p = "params."
    expr, members, statements = _score_expression(graph, p, ("b",), position_bound)  # one per request
    decl = f"""{PRELUDE}
{fa2_variant_head(base)}  int q0_, kv0_, b_;
{members}  template <typename Params>
  __device__ __host__ {base}(const Params& params, uint32_t batch_idx, uint8_t* smem_ptr) {{
    qo_len = params.get_qo_len(batch_idx);
    kv_len = params.get_kv_len(batch_idx);
    sm_scale_log2 = math::log2e;  // LogitsTransform returns scores already scaled
    sm_scale_ = float({p}{SCALE_NAME});
    window_left = (params.window_left >= 0) ? params.window_left : kv_len;
    q0_ = {p}ffi_req_q0[batch_idx];
    kv0_ = {p}ffi_req_kv0[batch_idx];
    b_ = {p}ffi_req_b[batch_idx];
    if constexpr (use_custom_mask) {{
      custom_mask_ptr = params.maybe_custom_mask + params.maybe_mask_indptr[batch_idx];
    }}
    const int ffi_b = b_;
    (void)ffi_b;
{statements}  }}
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    const float ffi_score = float(logits) * sm_scale_;
    const int ffi_b = b_, ffi_h = int(qo_head_idx), ffi_q = q0_ + int(qo_idx), ffi_kv = kv0_ + int(kv_idx);
    (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;
    return ({expr});
  }})
  REGISTER_LOGITS_MASK(params, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    bool mask = true;
    if constexpr (use_custom_mask) {{
      if (qo_idx >= qo_len || kv_idx >= kv_len) {{
        mask = false;
      }} else {{
        const uint64_t offset = static_cast<uint64_t>(qo_idx) * kv_len + kv_idx;
        mask &= ((custom_mask_ptr[offset / 8] >> (offset % 8)) & 1);
      }}
    }}
    mask &= (kv_idx + qo_len + window_left >= kv_len + qo_idx);  // no-op without a window
    return mask;
  }})
}};
"""
    return VariantSpec(f"{base}<use_custom_mask>", decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes)

