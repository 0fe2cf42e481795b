"""A plan flex_attention keeps for a score_mod (issue 23: no planning per call) must give what a
new plan would: the expression changed with the same numbers (a global function swapped, a flag
read by the mod), a table written where no version counter moves (through .data, through memory
shared with numpy) on every kind of kernel copy (a bf16 table, a strided view, the far keys'
shift of the relative-position split), a signed zero; optimizer steps keep forward and gradients."""
import numpy as np
import torch

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn

L = 256


def _qkv(rng, dtype=torch.float32):
    return [torch.randn(1, 2, L, 16, generator=rng, dtype=dtype) for _ in range(3)]


def _check(q, k, v, score_mod, bm):
    got = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="flashinfer")
    want = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="reference")
    err = (got - want).abs().max().item()
    assert err < 1e-5, err


def _causal():
    return create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu")


ACT = torch.tanh


def test_global_function_swapped(flashinfer_on_cpu, rng):
    global ACT
    q, k, v = _qkv(rng)
    bm = _causal()

    def score_mod(score, b, h, q_idx, kv_idx):
        return ACT(score) * 4.0

    try:
        ACT = torch.tanh
        _check(q, k, v, score_mod, bm)
        ACT = torch.sigmoid           # same numbers, same tensors, another expression
        _check(q, k, v, score_mod, bm)
    finally:
        ACT = torch.tanh


def test_closure_bool_flag(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    cfg = {"soft": True}

    def score_mod(score, b, h, q_idx, kv_idx):
        return 5.0 * torch.tanh(score / 5.0) if cfg["soft"] else score * 5.0 / 5.0

    _check(q, k, v, score_mod, bm)
    cfg["soft"] = False
    _check(q, k, v, score_mod, bm)


def test_mul_swapped_for_add(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    cfg = {"op": "mul"}

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * 0.5 if cfg["op"] == "mul" else score + 0.5

    _check(q, k, v, score_mod, bm)      # folded into the scale
    cfg["op"] = "add"
    _check(q, k, v, score_mod, bm)


def test_0d_learned_temperature_written_through_data(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    temp = torch.tensor(1.0, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * temp + kv_idx * 0.0

    with torch.no_grad():
        _check(q, k, v, score_mod, bm)
    temp.data -= 0.7                      # a hand-written SGD step
    with torch.no_grad():
        _check(q, k, v, score_mod, bm)


def test_bf16_bias_table_written_through_data(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    bias = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h].float() * (kv_idx % 5)

    with torch.no_grad():
        _check(q, k, v, score_mod, bm)
    bias.data += torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    with torch.no_grad():
        _check(q, k, v, score_mod, bm)


def test_numpy_backed_half_table(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    arr = np.zeros(2, dtype=np.float16)
    bias = torch.from_numpy(arr)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h].float() * (kv_idx % 5)

    _check(q, k, v, score_mod, bm)
    arr[:] = [1.0, -2.0]
    _check(q, k, v, score_mod, bm)


def test_relative_bias_far_split_shift_written_through_data(flashinfer_on_cpu, rng):
    from flex_flash_infer.mods.relative_position_bias import generate_relative_position_bias_score_mod
    q, k, v = _qkv(rng)
    bm = _causal()
    table = torch.zeros(2, 9, requires_grad=True)
    sm = generate_relative_position_bias_score_mod(table)
    with torch.no_grad():
        _check(q, k, v, sm, bm)
    table.data += torch.randn(2, 9, generator=rng) * 3
    with torch.no_grad():
        _check(q, k, v, sm, bm)


def test_strided_f32_table_written_through_data(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    full = torch.zeros(2, 3, requires_grad=True)
    bias = full[:, 0]                     # a strided view: the kernel gets a copy

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx % 5)

    with torch.no_grad():
        _check(q, k, v, score_mod, bm)
    full.data[:, 0] += torch.tensor([1.0, -2.0])
    with torch.no_grad():
        _check(q, k, v, score_mod, bm)


def test_closure_signed_zero(flashinfer_on_cpu, rng):
    q, k, v = _qkv(rng)
    bm = _causal()
    c = 0.0

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (kv_idx + 1) / c

    def run():
        got = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="flashinfer")
        want = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend="reference")
        return got, want
    g0, w0 = run()
    assert torch.equal(g0.isnan(), w0.isnan())
    c = -0.0                              # 0.0 == -0.0, but (kv + 1) / c is -inf, not +inf
    g1, w1 = run()
    assert torch.equal(g1.isnan(), w1.isnan())


def test_optimizer_steps_bf16_and_relbias(flashinfer_on_cpu, rng):
    from flex_flash_infer.mods.relative_position_bias import generate_relative_position_bias_score_mod
    q, k, v = _qkv(rng)
    q.requires_grad_(True)
    bm = _causal()
    table = torch.zeros(2, 9, requires_grad=True)
    sm = generate_relative_position_bias_score_mod(table)
    opt = torch.optim.SGD([table], lr=0.1)   # (at lr 10 the table reaches 8000 and the float32 reference itself drifts)

    def close(a, b):   # float32 through two summation orders: relative to the values' size
        return (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())

    for _ in range(3):
        out = flex_attention(q, k, v, score_mod=sm, block_mask=bm, backend="flashinfer")
        ref = flex_attention(q, k, v, score_mod=sm, block_mask=bm, backend="reference")
        assert close(out, ref)
        g = torch.autograd.grad(out.square().sum(), [q, table])
        gr = torch.autograd.grad(ref.square().sum(), [q, table])
        assert all(close(a, b) for a, b in zip(g, gr))
        table.grad = g[1]
        opt.step()


def _untraceable_documents(starts):
    """A document mask through torch.bucketize, which the tracer cannot read: its tensors are unknown."""
    def documents(b, h, q_idx, kv_idx):
        return ((torch.bucketize(q_idx, starts, right=True) == torch.bucketize(kv_idx, starts, right=True))
                & (q_idx >= kv_idx))
    return documents


def test_an_untraceable_masks_rewritten_table_is_not_run_from_a_kept_plan(flashinfer_on_cpu, rng):
    """flex_attention kept the plan of a mask it could not trace and ran its partial tiles on the
    old documents after the table was rewritten in place (2.3 off the reference)."""
    starts = torch.tensor([0, 100])
    mask = _untraceable_documents(starts)
    q, k, v = _qkv(rng)
    bm = create_block_mask(mask, None, None, L, L, device="cpu", BLOCK_SIZE=64)
    _check(q, k, v, None, bm)
    starts.copy_(torch.tensor([0, 110]))       # inside a tile that was partial already
    _check(q, k, v, None, bm)


def test_an_untraceable_mask_fn_rewritten_after_prepare_raises(flashinfer_on_cpu, rng):
    """FlexFlashInfer's plan of a mask it could not trace ran the old documents (2.4 off): what the
    mask reaches is watched instead, and a change asks for prepare() again."""
    import pytest

    from flex_flash_infer import FlexFlashInfer

    starts = torch.tensor([0, 100])
    flex = FlexFlashInfer(device="cpu", backend="flashinfer").prepare(
        mask_fn=_untraceable_documents(starts), seq_len_q=L, seq_len_kv=L, num_qo_heads=2, num_kv_heads=2,
        head_dim=16, dtype=torch.float32)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in _qkv(rng))
    flex(q, k, v)
    starts.copy_(torch.tensor([0, 110]))
    with pytest.raises(ValueError, match=r"call prepare\(\) again"):
        flex(q, k, v)
