"""Copy the generated ragged causal kernel file and its config, with the variant's score_mod
replaced by calls to extern __device__ functions defined in another TU (linked with -dlto).
Variant B ("state"): ffi_score_init fills 4 floats of per-(tile, head) state in the constructor
(the codegen's hoisted values), ffi_score_mod reads them per score.
Variant A ("plain"): ffi_score(score, b, h, q, kv, params) only, as in the brief."""
import pathlib, re, sys
GEN = pathlib.Path("/tmp/lto/ws/.cache/flashinfer/0.7.2.post1/90a/generated/ffi_49211b4c52f88279_bfloat16_d128_noswa_modes01")
OUT = pathlib.Path("/tmp/lto/study/lto_src")
cfg = (GEN / "batch_prefill_sm90_config.inc").read_text()
start = cfg.index("struct FlexScoreMod_fe4382b9fe059328 : AttentionVariantBase {")
head = cfg[:start]
STATE = r'''
// defined by the score_mod's own tiny TU, resolved by the LTO device link
struct FfiState { float v[4]; };
extern __device__ void ffi_score_init(FfiState* st, const void* additional_params, int b, int h);
extern __device__ float ffi_score_mod(float score, int b, int h, int q, int kv, const FfiState* st,
                                      const void* additional_params);
struct FlexScoreMod_fe4382b9fe059328 : AttentionVariantBase {
  float sm_scale_log2, sm_scale_;
  uint32_t qo_len_, kv_len_;
  int q0_, kv0_, b_;
  FfiState st_;
  template <typename MainloopParams, typename BlockCoord>
  __device__ FlexScoreMod_fe4382b9fe059328(const MainloopParams& params, const BlockCoord& block_coord) {
    auto [q_tile_idx, qo_head_idx, kv_head_idx, qo_indptr, kv_indptr, qo_len, kv_len, batch_idx] = block_coord;
    sm_scale_log2 = math::log2e;
    sm_scale_ = float(params.additional_params.ffi_sm_scale);
    qo_len_ = qo_len;
    kv_len_ = kv_len;
    q0_ = params.additional_params.ffi_req_q0[batch_idx];
    kv0_ = params.additional_params.ffi_req_kv0[batch_idx];
    b_ = params.additional_params.ffi_req_b[batch_idx];
    ffi_score_init(&st_, &params.additional_params, b_, int(qo_head_idx));
  }
  template <int NUM_ROWS_PER_THREAD>
  __device__ auto GetAttentionUpdater() { return OnlineSoftmax<NUM_ROWS_PER_THREAD, true>(sm_scale_log2); }
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    return ffi_score_mod(float(logits) * sm_scale_, b_, int(qo_head_idx), q0_ + int(qo_idx), kv0_ + int(kv_idx),
                         &st_, &params.additional_params);
  })
};
'''
PLAIN = r'''
// defined by the score_mod's own tiny TU, resolved by the LTO device link
extern __device__ float ffi_score(float score, int b, int h, int q, int kv, const void* additional_params);
struct FlexScoreMod_fe4382b9fe059328 : AttentionVariantBase {
  float sm_scale_log2, sm_scale_;
  uint32_t qo_len_, kv_len_;
  int q0_, kv0_, b_;
  template <typename MainloopParams, typename BlockCoord>
  __device__ FlexScoreMod_fe4382b9fe059328(const MainloopParams& params, const BlockCoord& block_coord) {
    auto [q_tile_idx, qo_head_idx, kv_head_idx, qo_indptr, kv_indptr, qo_len, kv_len, batch_idx] = block_coord;
    sm_scale_log2 = math::log2e;
    sm_scale_ = float(params.additional_params.ffi_sm_scale);
    qo_len_ = qo_len;
    kv_len_ = kv_len;
    q0_ = params.additional_params.ffi_req_q0[batch_idx];
    kv0_ = params.additional_params.ffi_req_kv0[batch_idx];
    b_ = params.additional_params.ffi_req_b[batch_idx];
  }
  template <int NUM_ROWS_PER_THREAD>
  __device__ auto GetAttentionUpdater() { return OnlineSoftmax<NUM_ROWS_PER_THREAD, true>(sm_scale_log2); }
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    return ffi_score(float(logits) * sm_scale_, b_, int(qo_head_idx), q0_ + int(qo_idx), kv0_ + int(kv_idx),
                     &params.additional_params);
  })
};
'''
for name, body in (("state", STATE), ("plain", PLAIN)):
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "batch_prefill_sm90_config.inc").write_text(head + body)
    (d / "batch_prefill_ragged_sm90_kernel_mask_1.cu").write_text((GEN / "batch_prefill_ragged_sm90_kernel_mask_1.cu").read_text())

# the per-score_mod TUs: softcap, as the codegen emitted it (ffi_tanh = one tanh.approx)
ap = '''struct AdditionalParams { int32_t* ffi_req_q0; int32_t* ffi_req_kv0; int32_t* ffi_req_b; double ffi_sm_scale; double ffi_s0_cap; };
__device__ __forceinline__ float ffi_tanh(float a) { float y; asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(a)); return y; }
'''
(OUT / "softcap_state.cu").write_text('#include <cstdint>\n' + ap + '''struct FfiState { float v[4]; };
__device__ void ffi_score_init(FfiState* st, const void* additional_params, int b, int h) {
  const AdditionalParams& p = *static_cast<const AdditionalParams*>(additional_params);
  st->v[0] = (float)p.ffi_s0_cap;
  st->v[1] = 1.0f / st->v[0];
}
__device__ float ffi_score_mod(float score, int b, int h, int q, int kv, const FfiState* st, const void* additional_params) {
  return st->v[0] * ffi_tanh(score * st->v[1]);
}
''')
(OUT / "softcap_plain.cu").write_text('#include <cstdint>\n' + ap + '''
__device__ float ffi_score(float score, int b, int h, int q, int kv, const void* additional_params) {
  const float cap = (float)static_cast<const AdditionalParams*>(additional_params)->ffi_s0_cap;
  return cap * ffi_tanh(score / cap);
}
''')
