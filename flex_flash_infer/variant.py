"""A FlashInfer fa3 attention variant that applies a traced score_mod inside the kernel.

It serves the band route: each request is a band of one batch entry, run by FlashInfer's ragged
prefill with its native causal / window flags, so only the score_mod needs custom code. The
variant's LogitsTransform scales the logit (FlexAttention's score = q.k * scale), maps the
request-local (qo_idx, kv_idx) to absolute positions with three small per-request tables, and
returns score_mod(score, b, h, q, kv); the softmax then runs in base 2 with log2(e) as its scale.

Status: compiled against FlashInfer's headers in CPU tests (nvcc, no GPU), run by
score_mod_kernels.ScoreModBands, and checked against the reference on an H100 (17 GPU tests,
2026-11-25). It is correct but 2.9-3.5x slower than the same mask without a score_mod
(benchmarks/README.md). There is no fa2 (pre-Hopper) variant yet.
"""
from __future__ import annotations

from dataclasses import dataclass

from .codegen import ELEMENT_CTYPE, PRELUDE, element_kind, emit_expression
from .trace import Graph

REQUEST_TABLES = ("ffi_req_q0", "ffi_req_kv0", "ffi_req_b")
SCALE_NAME = "ffi_sm_scale"
INPUT_NAMES = {"score": "ffi_score", "b": "ffi_b", "h": "ffi_h", "q_idx": "ffi_q", "kv_idx": "ffi_kv"}
_SCALAR_CTYPE = {"int": "int64_t", "float": "double"}


@dataclass
class VariantSpec:
    name: str
    decl: str
    tensor_names: list
    tensor_dtypes: list
    scalar_names: list
    scalar_dtypes: list

    def jit_args(self, uri: str, dtype, head_dim: int, idtype, use_sliding_window: bool) -> list:
        """FlashInfer's gen_customize_batch_prefill_module arguments, in order."""
        return [uri, dtype, dtype, dtype, idtype, head_dim, head_dim, self.tensor_names, self.tensor_dtypes,
                self.scalar_names, self.scalar_dtypes, self.name, self.decl, 0, use_sliding_window]


def fa3_score_mod_variant(graph: Graph) -> VariantSpec:
    name = f"FlexScoreMod_{graph.key()}"
    tensor_names = list(REQUEST_TABLES) + [f"ffi_{n}" for n, _ in graph.tensors]
    tensor_dtypes = ["int32_t"] * 3 + [ELEMENT_CTYPE[element_kind(t)] for _, t in graph.tensors]
    # strides of captured tensors travel as int64 scalars (4 per tensor, unused ones 0)
    scalar_names = [SCALE_NAME] + [f"ffi_{n}" for n, _, _ in graph.scalars] + [
        f"ffi_{n}_stride{d}" for n, t in graph.tensors for d in range(t.dim())]
    scalar_dtypes = ["double"] + [_SCALAR_CTYPE[k] for _, k, _ in graph.scalars] + [
        "int64_t" for _, t in graph.tensors for _ in range(t.dim())]
    p = "params.additional_params."
    expr = emit_expression(graph, scalar_ref=lambda n: p + f"ffi_{n}", tensor_ref=lambda n: p + f"ffi_{n}",
                           stride_ref=lambda n, d: p + f"ffi_{n}_stride{d}", input_ref=INPUT_NAMES.__getitem__)
    decl = f"""{PRELUDE}
struct {name} : AttentionVariantBase {{
  float sm_scale_log2;
  uint32_t kv_len_;
  int q0_, kv0_, b_;
  template <typename MainloopParams, typename BlockCoord>
  __device__ {name}(const MainloopParams& params, const BlockCoord& block_coord) {{
    auto [q_tile_idx, qo_head_idx, kv_head_idx, qo_indptr, kv_indptr, qo_len, kv_len, batch_idx] = block_coord;
    sm_scale_log2 = math::log2e;  // LogitsTransform returns scores already scaled
    kv_len_ = kv_len;
    q0_ = {p}ffi_req_q0[batch_idx];
    kv0_ = {p}ffi_req_kv0[batch_idx];
    b_ = {p}ffi_req_b[batch_idx];
  }}
  template <int NUM_ROWS_PER_THREAD>
  __device__ auto GetAttentionUpdater() {{ return OnlineSoftmax<NUM_ROWS_PER_THREAD, true>(sm_scale_log2); }}
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {{
    if (kv_idx >= kv_len_) return -math::inf;  // fa3 also calls this on the padded tail tile
    const float ffi_score = float(logits) * float({p}{SCALE_NAME});
    const int ffi_b = b_, ffi_h = int(qo_head_idx), ffi_q = q0_ + int(qo_idx), ffi_kv = kv0_ + int(kv_idx);
    (void)ffi_b; (void)ffi_h; (void)ffi_q; (void)ffi_kv;
    return ({expr});
  }})
}};
"""
    return VariantSpec(name, decl, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes)
