"""FlashInfer variants for the paged launches of the tiles route (tile_kernels.py): a traced
score_mod, and on fa2 optionally a traced mask_mod, evaluated inside the kernel.

A request of a paged launch is one query tile; its keys are the concatenation of its pages.
Five int32 tables map the kernel's request-local indices to the positions the mods see:
  ffi_req_q0[r]    first query position of request r      q  = ffi_req_q0[r] + qo_idx
  ffi_req_b[r]     its batch entry                         b  = ffi_req_b[r]
  ffi_req_h0[r]    head offset (head-major layouts)        h  = ffi_req_h0[r] + qo_head_idx
  ffi_req_page0[r] its first entry in ffi_page_kv0 (the launch's kv_indptr)
  ffi_page_kv0[i]  first key position of the request's i-th listed page, -1 for a filler page
                                                           kv = ffi_page_kv0[page0 + kv_idx / P] + kv_idx % P
P, the page size, is a compile-time constant (128 for key tiles, 1 for gathered key columns).

fa3 (Hopper) runs full tiles: only the score_mod, FlashInfer's own causal flag masks. fa2 runs
partial tiles: its LogitsMask either reads FlashInfer's bit mask (use_custom_mask) or, with a
mask graph, evaluates mask_mod itself (FlashInfer's variant_owns_mask: no bit mask is built).

Status: compiles as device code against FlashInfer's headers in CPU tests (nvcc, no GPU), its
tables are checked through the CPU model, and both variants pass the GPU tests.
"""
from __future__ import annotations

from .codegen import PRELUDE, graph_key
from ..core.trace import Graph
from .variant import (SCALE_NAME, VariantSpec, fa2_variant_head, graph_arguments, graph_expression, hoisted_code,
                      with_fa2_mask_buffers)

PAGED_TABLES = ("ffi_req_q0", "ffi_req_b", "ffi_req_h0", "ffi_req_page0", "ffi_page_kv0")
# the keys of a batch entry: the last key tile is zero-padded to a whole page, and the padding
# (never in a full tile) must not reach the mask_mod
KV_END = "ffi_kv_end"
# no kernel sets it any more; tests/fake_flashinfer.py still imports it (drop it there, then here)
MASKED_PAGE_FLAG = 1 << 30


def paged_arguments(score_graph: Graph | None, mask_graph: Graph | None):
    """Kernel arguments in jit order: the five tables, the score_mod's then the mask_mod's
    captured tensors; the scale, the sequence's key count, then each graph's numbers and strides."""
    s = graph_arguments(score_graph, "ffi_")
    m = graph_arguments(mask_graph, "ffi_mask_")
    return (list(PAGED_TABLES) + s[0] + m[0], ["int32_t"] * len(PAGED_TABLES) + s[1] + m[1],
            [SCALE_NAME, KV_END] + s[2] + m[2], ["double", "int64_t"] + s[3] + m[3])


def _name(prefix: str, score_graph, mask_graph, page_size: int) -> str:
    parts = [prefix, f"P{page_size}", f"S{graph_key(score_graph)}" if score_graph else "S0",
             f"M{graph_key(mask_graph)}" if mask_graph else "M0"]
    return "_".join(parts)


def fa3_paged_score_mod_variant(score_graph: Graph | None, page_size: int,
                                position_bound: int | None = None) -> VariantSpec:
    """Full tiles on fa3 with a score_mod (no per-element mask: full tiles need none)."""
    name = _name("FlexPagedScore", score_graph, None, page_size)
    tensor_names, tensor_dtypes, scalar_names, scalar_dtypes = paged_arguments(score_graph, None)
    p = "params.additional_params."
    hoisted = []
    expr = graph_expression(score_graph, p, ("b", "h"), position_bound, hoisted) if score_graph else "ffi_score"
    positions = f"""const int ffi_kv = pages_[kv_idx / {page_size}u] + int(kv_idx % {page_size}u);
    (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;"""
    members, statements = hoisted_code(hoisted)
    decl = f"""{PRELUDE}
struct {name} : AttentionVariantBase {{
  float sm_scale_log2, sm_scale_;
  uint32_t qo_len_, kv_len_;
  int q0_, b_, h_;
  const int* pages_;
{members}  template <typename MainloopParams, typename BlockCoord>
  __device__ {name}(const MainloopParams& params, const BlockCoord& block_coord) {{
    auto [q_tile_idx, qo_head_idx, kv_head_idx, qo_indptr, kv_indptr, qo_len, kv_len, batch_idx] = block_coord;
    sm_scale_log2 = math::log2e;  // LogitsTransform returns scores already scaled
    sm_scale_ = float({p}{SCALE_NAME});
    qo_len_ = qo_len;
    kv_len_ = kv_len;
    q0_ = {p}ffi_req_q0[batch_idx];
    b_ = {p}ffi_req_b[batch_idx];
    h_ = {p}ffi_req_h0[batch_idx] + int(qo_head_idx);
    pages_ = {p}ffi_page_kv0 + {p}ffi_req_page0[batch_idx];
    const int ffi_b = b_, ffi_h = h_;
    (void)ffi_b; (void)ffi_h;
{statements}  }}
  template <int NUM_ROWS_PER_THREAD>
  __device__ auto GetAttentionUpdater() {{ return OnlineSoftmax<NUM_ROWS_PER_THREAD, true>(sm_scale_log2); }}
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    // the padded tail of the last tile: its page-table entry may belong to the next request
    if (kv_idx >= kv_len_ || qo_idx >= qo_len_) return -math::inf;
    const float ffi_score = float(logits) * sm_scale_;
    const int ffi_b = b_, ffi_h = h_, ffi_q = q0_ + int(qo_idx);
    {positions}
    return ({expr});
  }})
}};
"""
    return VariantSpec(name, decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes)


def fa2_paged_variant(score_graph: Graph | None, mask_graph: Graph | None, page_size: int,
                      position_bound: int | None = None) -> VariantSpec:
    """Partial tiles on fa2: the score_mod (identity when None) and, with a mask graph, the
    mask_mod in LogitsMask (plan the wrapper with variant_owns_mask=True); without one the
    variant reads FlashInfer's bit mask (plan with custom_mask)."""
    base = _name("FlexPagedFa2", score_graph, mask_graph, page_size)
    tensor_names, tensor_dtypes, scalar_names, scalar_dtypes = paged_arguments(score_graph, mask_graph)
    if mask_graph is None:   # the bit mask path reads FlashInfer's buffers
        tensor_names, tensor_dtypes = with_fa2_mask_buffers(tensor_names, tensor_dtypes)
    p = "params."
    hoisted = []
    score = graph_expression(score_graph, p, ("b",), position_bound, hoisted) if score_graph else "ffi_score"
    mask = graph_expression(mask_graph, p, ("b",), position_bound, hoisted, "ffi_mask_") if mask_graph else None
    members, statements = hoisted_code(hoisted)
    if mask is None:
        mask_setup = "if constexpr (use_custom_mask) { custom_mask_ptr = params.maybe_custom_mask + params.maybe_mask_indptr[batch_idx]; }"
        mask_check = """if constexpr (use_custom_mask) {
      const uint64_t offset = static_cast<uint64_t>(qo_idx) * kv_len + kv_idx;
      if (!((custom_mask_ptr[offset / 8] >> (offset % 8)) & 1)) return false;
    }
    return true;"""
    else:   # variant_owns_mask: there is no bit mask buffer to read
        mask_setup = "custom_mask_ptr = nullptr;"
        mask_check = f"""if (page + int(kv_idx % {page_size}u) >= kv_end_) return false;   // the padded tail
    const int ffi_b = b_, ffi_h = h0_ + int(qo_head_idx), ffi_q = q0_ + int(qo_idx);
    const int ffi_kv = page + int(kv_idx % {page_size}u);
    (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;
    return bool({mask});"""
    decl = f"""{PRELUDE}
{fa2_variant_head(base)}  int q0_, b_, h0_, kv_end_;
  const int* pages_;
{members}  template <typename Params>
  __device__ __host__ {base}(const Params& params, uint32_t batch_idx, uint8_t* smem_ptr) {{
    qo_len = params.get_qo_len(batch_idx);
    kv_len = params.get_kv_len(batch_idx);
    window_left = kv_len;
    sm_scale_log2 = math::log2e;  // LogitsTransform returns scores already scaled
    sm_scale_ = float({p}{SCALE_NAME});
    q0_ = {p}ffi_req_q0[batch_idx];
    b_ = {p}ffi_req_b[batch_idx];
    h0_ = {p}ffi_req_h0[batch_idx];
    kv_end_ = int({p}{KV_END});
    pages_ = {p}ffi_page_kv0 + {p}ffi_req_page0[batch_idx];
    {mask_setup}
    const int ffi_b = b_;
    (void)ffi_b;
{statements}  }}
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    const float ffi_score = float(logits) * sm_scale_;
    // outside the request or on a filler page the mask removes the score: no table is read there
    if (qo_idx >= qo_len || kv_idx >= kv_len) return ffi_score;
    const int page = pages_[kv_idx / {page_size}u];
    const int ffi_kv = page + int(kv_idx % {page_size}u);
    if (page < 0 || ffi_kv >= kv_end_) return ffi_score;
    const int ffi_b = b_, ffi_h = h0_ + int(qo_head_idx), ffi_q = q0_ + int(qo_idx);
    (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;
    return ({score});
  }})
  REGISTER_LOGITS_MASK(params, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    if (qo_idx >= qo_len || kv_idx >= kv_len) return false;
    const int page = pages_[kv_idx / {page_size}u];
    if (page < 0) return false;   // a filler page: a request with no partial tile
    {mask_check}
  }})
}};
"""
    return VariantSpec(f"{base}<use_custom_mask>", decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes)
