"""FlashInfer path on CUDA against the float64 dense oracle (small) or the float32 reference (large).
Run on a Hopper machine: python -m pytest -m gpu tests/backends/test_gpu.py"""

import pytest
import torch

from dense_reference import dense_attention, dense_predicate, rel_err
from flex_flash_infer import FlexFlashInfer, create_block_mask, create_mask, flex_attention, get_mask_fn
from flex_flash_infer.backends import head_windows
from flex_flash_infer.backends.reference import reference_attention
from random_masks import random_mask_mod
from flex_flash_infer.tools.warmup import PAGED_MOD_CASES

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}
DTYPES = [torch.bfloat16, torch.float16]
# fp16 runs at head_dim 128 only: each (dtype, head_dim) is a set of modules to compile per machine.
DTYPE_HEAD_DIMS = [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 128)]
LIBRARY = [
    ("full", {}), ("causal", {}), ("sliding_window", {"window_size": 200}),
    ("attamba", {"window_size": 96, "chunk_size": 64}), ("streaming", {"sink_size": 4, "window_size": 150}),
    ("prefix_lm", {"prefix_len": 300}), ("chunked_causal", {"chunk_size": 192}),
    ("dilated_sliding_window", {"window_size": 180, "dilation": 3}),
]


def inputs(B, H, Hkv, L, S, D, dtype, gen):
    def r(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    return r(B, H, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D)


def on_cuda(mod):
    """The reference's score_fn for a score_mod whose captured tables live on the GPU."""
    return lambda s, b, h, qi, ki: mod(s.float().cuda(), b.cuda(), h.cuda(), qi.cuda(), ki.cuda()).cpu().double()


@pytest.fixture
def cuda_gen():
    seed = torch.seed() % (2**31)
    print(f"seed={seed}")
    return torch.Generator(device="cuda").manual_seed(seed)


def check(out, lse, q, k, v, dense, dtype, scale=None, score_fn=None):
    ref_out, ref_lse = dense_attention(q, k, v, dense, scale=scale, score_fn=score_fn)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    assert torch.allclose(lse.cpu().double()[seen], ref_lse[seen], atol=2e-2, rtol=1e-3)
    assert (out.cpu()[~seen.unsqueeze(-1).expand_as(out.cpu())] == 0).all()


@pytest.mark.parametrize("dtype,D", DTYPE_HEAD_DIMS)
@pytest.mark.parametrize("name,params", LIBRARY)
def test_library_masks(cuda_gen, dtype, D, name, params):
    B, H, Hkv, L, S = 1, 8, 2, 777, 777
    q, k, v = inputs(B, H, Hkv, L, S, D, dtype, cuda_gen)
    bm = create_block_mask(get_mask_fn(name, **params), None, None, L, S, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    check(out, lse, q, k, v, dense_predicate(name, L, S, **params), dtype)


@pytest.mark.parametrize("name,params,L,S", [("causal", {}, 777, 300), ("causal", {}, 300, 777), ("full", {}, 777, 300),
                                             ("sliding_window", {"window_size": 100}, 300, 777),
                                             ("prefix_lm", {"prefix_len": 200}, 777, 777)])
def test_library_band_hints_unequal_lengths(cuda_gen, name, params, L, S):
    """The bands library masks state (band_hint), unequal lengths: causal with more queries
    than keys is a causal band and a full one."""
    from flex_flash_infer.backends import flashinfer_backend

    B, H, Hkv, D, dtype = 1, 8, 2, 128, torch.bfloat16
    q, k, v = inputs(B, H, Hkv, L, S, D, dtype, cuda_gen)
    bm = create_block_mask(get_mask_fn(name, **params), None, None, L, S, device="cuda")
    plan = flashinfer_backend.FlashInferPlan(bm, 1, L, S, H, Hkv, D, dtype, D ** -0.5, "cuda")
    assert plan.route == "bands"
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    check(out, lse, q, k, v, dense_predicate(name, L, S, **params), dtype)


@pytest.mark.parametrize("name,params,L,S,cap", [("causal", {}, 777, 777, None), ("full", {}, 777, 300, None),
                                                 ("prefix_lm", {"prefix_len": 200}, 777, 777, None),
                                                 ("causal", {}, 777, 777, 20.0)])
def test_band_routes_on_the_native_copy(cuda_gen, monkeypatch, name, params, L, S, cap):
    """FlashInfer's fa3 kernels as native_copy's one-mode modules (as where FlashInfer's own module
    is not built): bf16 d128, against the reference, the launches asserted to be the copies."""
    from flex_flash_infer.compile import native_copy
    from flex_flash_infer.mods import generate_softcap_score_mod

    monkeypatch.setattr(native_copy, "flashinfer_has_its_own", lambda *key: False)
    made = []   # the copies' module names (FlashInfer's wrapper keeps no jit_args: asked of native_copy)
    real_args = native_copy.jit_args
    monkeypatch.setattr(native_copy, "jit_args", lambda *a: (lambda args: (made.append(args[0]), args)[1])(real_args(*a)))
    B, H, Hkv, D, dtype = 1, 8, 2, 128, torch.bfloat16
    q, k, v = inputs(B, H, Hkv, L, S, D, dtype, cuda_gen)
    bm = create_block_mask(get_mask_fn(name, **params), None, None, L, S, device="cuda")
    score = None if cap is None else generate_softcap_score_mod(cap)
    out, lse = flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=True, return_lse=True,
                              backend="flashinfer")
    assert made, "the launch ran on FlashInfer's own module, not the copy"
    score_fn = None if cap is None else (lambda s, *idx: cap * torch.tanh(s / cap))
    check(out, lse, q, k, v, dense_predicate(name, L, S, **params), dtype, score_fn=score_fn)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(333, 333), (200, 517), (517, 130)])
def test_random_masks_per_batch_and_head_odd_lengths(cuda_gen, dtype, L, S):
    """Every head in one launch set."""
    B, H, Hkv, D = 2, 4, 2, 128
    gen = torch.Generator().manual_seed(torch.seed() % (2**31))
    mod, dense = random_mask_mod(B, H, L, S, gen)
    dense_cuda = dense.cuda()

    def on_gpu(b, h, q, kv):
        return dense_cuda[b, h, q, kv]

    q, k, v = inputs(B, H, Hkv, L, S, D, dtype, cuda_gen)
    bm = create_block_mask(on_gpu, B, H, L, S, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    assert next(iter(bm._plans.values())).head_major
    check(out, lse, q, k, v, dense, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L", [(1, 777), (2, 300)])
def test_per_head_windows_as_bands_per_head(cuda_gen, dtype, B, L):
    """The bands-per-head route: heads with equal windows share one native band launch."""
    H, Hkv, D = 8, 2, 128
    widths = torch.tensor([32, 100, 250, 0])   # 0: plain causal

    def per_head_windows(b, h, q, kv):
        w = widths.to(q.device)[h % 4]
        return (kv <= q) & ((q - kv < w) | (w == 0))

    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(per_head_windows, None, H, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    assert next(iter(bm._plans.values())).route == "bands-per-head"
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    dense = torch.stack([(ki <= qi) & ((qi - ki < int(widths[h % 4])) | (int(widths[h % 4]) == 0)) for h in range(H)])
    check(out, lse, q, k, v, dense[None], dtype)


def test_per_head_windows_called_on_any_stream_and_replayed(cuda_gen, monkeypatch):
    """bands-per-head (a launch per set of heads with equal windows, writing in place on Hopper;
    the path where FlashInfer's headers do not take the one-launch patches): called on a stream of
    the caller's own, with and without LSE (each output checked: a set still running when the
    caller reads the output would show), and captured into a CUDA graph and replayed on new inputs."""
    monkeypatch.setattr(head_windows, "available", lambda device, dtype, head_dim, sinks=False: False)
    H, Hkv, L, D, dtype = 16, 4, 1000, 128, torch.bfloat16
    widths = torch.tensor([64, 128, 300, 700])

    def per_head_windows(b, h, q, kv):
        return (kv <= q) & (q - kv < widths.to(q.device)[h % 4])

    flex = FlexFlashInfer(device="cuda", backend="flashinfer").prepare(
        mask_fn=per_head_windows, seq_len_q=L, seq_len_kv=L, num_qo_heads=H, num_kv_heads=Hkv, head_dim=D, dtype=dtype)
    plan = flex._prepared.segments[0].plan
    assert plan.head_band_runs is not None and all(in_place for _, _, in_place, _ in plan.head_band_runs)
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    dense = torch.stack([(ki <= qi) & (qi - ki < int(widths[h % 4])) for h in range(H)])[None]

    def nhd(x):
        return x[0].transpose(0, 1).contiguous()

    def bhld(x):
        return x.transpose(0, 1).unsqueeze(0)

    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        for n in range(6):
            q, k, v = inputs(1, H, Hkv, L, L, D, dtype, cuda_gen)
            if n % 2:
                out, lse = flex(nhd(q), nhd(k), nhd(v), return_lse=True)
                check(bhld(out), lse.transpose(0, 1).unsqueeze(0), q, k, v, dense, dtype)
            else:
                ref, _ = dense_attention(q, k, v, dense)
                assert rel_err(bhld(flex(nhd(q), nhd(k), nhd(v))), ref) < TOL[dtype]
    torch.cuda.synchronize()

    static = [nhd(x) for x in inputs(1, H, Hkv, L, L, D, dtype, cuda_gen)]
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        flex(*static, return_lse=True)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = flex(*static, return_lse=True)
    for _ in range(2):
        q, k, v = inputs(1, H, Hkv, L, L, D, dtype, cuda_gen)
        for dst, src in zip(static, (q, k, v)):
            dst.copy_(nhd(src))
        graph.replay()
        torch.cuda.synchronize()
        check(bhld(g_out), g_lse.transpose(0, 1).unsqueeze(0), q, k, v, dense, dtype)


def _record_ragged_plans(monkeypatch) -> list:
    """The causal flag of every FlashInfer ragged plan() made from here on (in the test's process)."""
    import functools

    import flashinfer

    planned = []
    real_plan = flashinfer.BatchPrefillWithRaggedKVCacheWrapper.plan

    @functools.wraps(real_plan)   # the library reads what the real plan() does (ragged._plan_alone_sets_the_mask)
    def recording_plan(self, *args, **kwargs):
        planned.append(kwargs.get("causal"))
        return real_plan(self, *args, **kwargs)

    monkeypatch.setattr(flashinfer.BatchPrefillWithRaggedKVCacheWrapper, "plan", recording_plan)
    return planned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,Hq,Hkv,D", [(1, 1000, 32, 8, 128), (2, 600, 24, 6, 64)])
@pytest.mark.parametrize("widths", [[1, 64, 129, 0, 300, 1000], [1, 64, 129, 7, 300, 255]])
def test_per_head_windows_in_one_launch(cuda_gen, monkeypatch, dtype, B, L, Hq, Hkv, D, widths):
    """Every head one causal window of its own width (0: none): one launch of the kernel built
    against the patched headers (backends/head_windows.py), planned as not causal where the widest
    window is under half the keys (the second widths) and run causal, checked with its LSE against
    the dense reference; then called through FlexFlashInfer and replayed from a CUDA graph on new
    inputs."""
    planned = _record_ragged_plans(monkeypatch)
    widths = torch.tensor(widths)

    def per_head_windows(b, h, q, kv):
        w = widths.to(q.device)[h % 6]
        return (kv <= q) & ((q - kv < w) | (w == 0))

    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    dense = torch.stack([(ki <= qi) & ((qi - ki < int(widths[h % 6])) | (int(widths[h % 6]) == 0))
                         for h in range(Hq)])[None]
    q, k, v = inputs(B, Hq, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(per_head_windows, None, Hq, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    plan = next(iter(bm._plans.values()))
    assert plan.head_windows is not None and plan.head_band_runs is None
    if planned:   # a wrapper planned here, not one shared from an earlier test's plan
        assert planned == [2 * int(widths.max()) > L or bool((widths == 0).any())]
    check(out, lse, q, k, v, dense, dtype)

    flex = FlexFlashInfer(device="cuda", backend="flashinfer").prepare(
        mask_fn=per_head_windows, seq_len_q=L, seq_len_kv=L, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
        dtype=dtype)
    assert flex._prepared.segments[0].plan.head_windows is not None

    def nhd(x):
        return x[0].transpose(0, 1).contiguous()

    static = [nhd(x) for x in inputs(1, Hq, Hkv, L, L, D, dtype, cuda_gen)]
    flex(*static, return_lse=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = flex(*static, return_lse=True)
    q, k, v = inputs(1, Hq, Hkv, L, L, D, dtype, cuda_gen)
    for dst, src in zip(static, (q, k, v)):
        dst.copy_(nhd(src))
    graph.replay()
    torch.cuda.synchronize()
    check(g_out.transpose(0, 1).unsqueeze(0), g_lse.transpose(0, 1).unsqueeze(0), q, k, v, dense, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_table_but_head_dependent_mask_mod(cuda_gen, dtype):
    """H=None tables with a mask_mod that reads h: partial tiles must still use each head's mask."""
    B, H, Hkv, L, S, D = 1, 4, 4, 400, 400, 128

    def per_head(b, h, q, kv):
        return (q >= kv) & ((q - kv) % (h + 2) == 0)

    q, k, v = inputs(B, H, Hkv, L, S, D, dtype, cuda_gen)
    bm = create_block_mask(per_head, None, None, L, S, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="flashinfer")
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    dense = torch.stack([(qi >= ki) & ((qi - ki) % (h + 2) == 0) for h in range(H)])[None]
    check(out, lse, q, k, v, dense, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_wrapper_and_custom_scale(cuda_gen, dtype):
    L, H, D = 1024, 8, 128
    flex = FlexFlashInfer(device="cuda")
    flex.prepare(mask_fn=lambda q, kv: (q >= kv) & (q - kv <= 256), seq_len_q=L, seq_len_kv=L, num_qo_heads=H,
                 num_kv_heads=H, head_dim=D, block_size_row=128, block_size_col=128, dtype=dtype, scale=0.2)
    assert flex.active_backend == "flashinfer"
    q, k, v = (x[0].transpose(0, 1) for x in inputs(1, H, H, L, L, D, dtype, cuda_gen))
    out, lse = flex(q, k, v, return_lse=True)
    dense = dense_predicate("sliding_window", L, L, window_size=257)
    check(out.transpose(0, 1)[None], lse.transpose(0, 1)[None], q.transpose(0, 1)[None], k.transpose(0, 1)[None],
          v.transpose(0, 1)[None], dense, dtype, scale=0.2)


def test_causal_32k_matches_reference(cuda_gen):
    L, H, Hkv, D, dtype = 32768, 4, 1, 128, torch.bfloat16
    flex = FlexFlashInfer(device="cuda")
    flex.prepare(mask_fn=get_mask_fn("causal"), seq_len_q=L, seq_len_kv=L, num_qo_heads=H, num_kv_heads=Hkv,
                 head_dim=D, dtype=dtype)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in inputs(1, H, Hkv, L, L, D, dtype, cuda_gen))
    out = flex(q, k, v)
    ref, _ = reference_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                 v.transpose(0, 1)[None].float(), flex.block_mask)
    err = ((out.float() - ref[0].transpose(0, 1)).norm() / ref.norm()).item()
    print(f"causal 32768 rel err {err:.2e}")
    assert not torch.isnan(out).any() and err < 2e-2


def test_block_mask_build_at_131072_tokens():
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for name, params in (("causal", {}), ("attamba", {"window_size": 256, "chunk_size": 128})):
        bm = create_block_mask(get_mask_fn(name, **params), None, None, 131072, 131072, device="cuda")
        n = 1024
        states = bm.states[0, 0].cpu()
        assert (states.diagonal() == 1).all()
        assert (torch.triu(states, 1) == 0).all()
        # attamba (window 256 = two tiles): only the tile left of the diagonal is whole
        expected_full = n - 1 if name == "attamba" else n * (n - 1) // 2
        assert int((states == 2).sum()) == expected_full
    peak = torch.cuda.max_memory_allocated() - before
    print(f"131072 block-mask build: peak extra GPU memory {peak / 2**20:.0f} MiB")
    assert peak < 2 * 2**30


def test_backend_flashinfer_rejects_what_it_cannot_run(cuda_gen):
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.float32, cuda_gen)
    with pytest.raises(ValueError, match="dtype"):
        flex_attention(q, k, v, backend="flashinfer")
    q, k, v = inputs(1, 2, 2, 64, 64, 96, torch.bfloat16, cuda_gen)
    with pytest.raises(ValueError, match="head_dim"):
        flex_attention(q, k, v, backend="flashinfer")
    with pytest.warns(UserWarning, match="reference"):
        out = flex_attention(q, k, v)
    assert out.shape == q.shape


@pytest.mark.parametrize("S", [777, 2048])
@pytest.mark.parametrize("name,params", [("attamba", {"window_size": 96, "chunk_size": 64}),
                                         ("streaming", {"sink_size": 4, "window_size": 150})])
@pytest.mark.parametrize("hint", [True, False], ids=["library_mask", "users_own_mask"])
def test_window_band_plus_key_columns_route(cuda_gen, S, name, params, hint):
    """A window band plus key columns (chunk ends or sinks): attamba's attended and merged in one
    Triton kernel (column_merge), streaming's sinks in the window kernel's own launch where its
    sinks' module serves (Hopper); a hand-written copy of the mask (no hint) is found from the mask
    itself."""
    B, H, Hkv, D, dtype = 2, 8, 2, 128, torch.bfloat16
    q, k, v = inputs(B, H, Hkv, S, S, D, dtype, cuda_gen)
    library = get_mask_fn(name, **params)

    def users_own(b, h, q_idx, kv_idx):
        return library(b, h, q_idx, kv_idx)

    bm = create_block_mask(library if hint else users_own, None, None, S, S, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    plan = next(iter(bm._plans.values()))
    in_launch = (name == "streaming" and torch.cuda.get_device_capability(q.device)[0] == 9
                 and head_windows.available(q.device, dtype, D, sinks=True))
    assert plan.route == "bands+columns" and plan.sinks_in_launch == in_launch
    assert (plan.column_counts is None) == in_launch   # else merged by the Triton kernel
    check(out, lse, q, k, v, dense_predicate(name, S, S, **params), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,M", [(128, 4), (64, 64), (128, 300)])
def test_column_merge_kernel_matches_its_torch_reference(cuda_gen, dtype, D, M):
    """The Triton kernel alone on random prefix counts (rows with none among them), GQA, two
    sequences of an odd length; 300 columns take ten column blocks."""
    from flex_flash_infer.backends.column_merge import merge_columns, merge_columns_reference

    B, L, S, Hq, Hkv = 2, 333, 1000, 8, 2
    q = torch.randn(B * L, Hq, D, generator=cuda_gen, device="cuda").to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=cuda_gen, device="cuda").to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=cuda_gen, device="cuda").to(dtype)
    positions = torch.sort(torch.randperm(S, generator=cuda_gen, device="cuda")[:M]).values
    counts = torch.randint(0, M + 1, (L,), generator=cuda_gen, device="cuda", dtype=torch.int32)
    counts[:7] = 0
    out = torch.randn(B * L, Hq, D, generator=cuda_gen, device="cuda").to(dtype)
    lse = torch.randn(B * L, Hq, generator=cuda_gen, device="cuda") * 4
    ref_out, ref_lse = out.float(), lse.clone()
    merge_columns_reference(ref_out, ref_lse, q.float(), k.float(), v.float(), positions, counts, D ** -0.5, L)
    got_out, got_lse = out.clone(), lse.clone()
    merge_columns(got_out, got_lse, q, k, v, positions, counts, D ** -0.5, L)
    assert not got_out.isnan().any() and not got_lse.isnan().any()
    assert torch.equal(got_out.view(B, L, Hq, D)[:, :7], out.view(B, L, Hq, D)[:, :7])
    assert rel_err(got_out.float(), ref_out) < TOL[dtype]
    assert (got_lse - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1024, 1000])
def test_tile_sparse_causal_runs_as_one_causal_launch(cuda_gen, dtype, L):
    """Random kept tiles intersected with causal: full tiles + the causal diagonal tile, one fa3 launch."""
    from flex_flash_infer_bench.masks import random_tile_mask

    B, H, Hkv, D = 2, 8, 2, 128
    mod = random_tile_mask(L, keep=0.3, block=128, seed=int(torch.randint(1 << 30, (1,), generator=cuda_gen, device="cuda")))
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(mod, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    assert next(iter(bm._plans.values())).route == "tiles-causal"
    dense = create_mask(mod, None, None, L, L, device="cuda").cpu()
    check(out, lse, q, k, v, dense, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,name", [(1, "document"), (2, "document"), (3, "causal"), (2, "prefix_lm")])
def test_band_routes_ragged_and_per_batch(cuda_gen, dtype, B, name):
    """Packed documents and batched single bands run as one ragged launch; stacked bands with
    B > 1 run band by band. Each must equal the dense oracle."""
    L, H, Hkv, D = 1500, 8, 2, 128
    params = {"document": {"offsets": [0, 300, 301, 900, 1500]}, "causal": {}, "prefix_lm": {"prefix_len": 256}}[name]
    mod = get_mask_fn(name, **params)
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(mod, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    assert next(iter(bm._plans.values())).route == "bands"
    ids = {"document_ids": mod.document_ids.numpy()} if name == "document" else params
    check(out, lse, q, k, v, dense_predicate(name, L, L, **ids), dtype)
    out_only = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="flashinfer")
    assert torch.allclose(out_only.float(), out.float(), atol=2e-3, rtol=0)


def test_packed_varlen_batch_in_the_wrapper(cuda_gen):
    """One ragged launch for the packed batch."""
    lens = [300, 1, 1000, 129]
    cu = [0, 300, 301, 1301, 1430]
    H, Hkv, D, dtype = 8, 2, 128, torch.bfloat16
    flex = FlexFlashInfer(device="cuda")
    flex.prepare(mask_fn=get_mask_fn("sliding_window", window_size=100), num_qo_heads=H, num_kv_heads=Hkv,
                 head_dim=D, dtype=dtype, cu_seqlens_q=cu, cu_seqlens_kv=cu)
    assert flex.active_backend == "flashinfer"
    assert flex._prepared.ragged is not None
    q = torch.randn(cu[-1], H, D, device="cuda", dtype=dtype, generator=cuda_gen)
    k = torch.randn(cu[-1], Hkv, D, device="cuda", dtype=dtype, generator=cuda_gen)
    v = torch.randn(cu[-1], Hkv, D, device="cuda", dtype=dtype, generator=cuda_gen)
    out, lse = flex(q, k, v, return_lse=True)
    for i, n in enumerate(lens):
        rows = slice(cu[i], cu[i + 1])
        check(out[rows].transpose(0, 1)[None], lse[rows].transpose(0, 1)[None], q[rows].transpose(0, 1)[None],
              k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None],
              dense_predicate("sliding_window", n, n, window_size=100), dtype)


SCORE_MOD_MASKS = {"causal": {}, "sliding_window": {"window_size": 200}, "document": {"offsets": [0, 300, 777]},
                   "prefix_lm": {"prefix_len": 128}}
# Each (score_mod, dtype, sliding-window flag) is its own compiled module (warmup kinds score_mod:*):
# every mod in bf16 on three masks; the sliding-window and fp16 builds with softcap.
SCORE_MOD_CASES = ([(torch.bfloat16, mask, mod) for mod in ("softcap", "alibi", "rel_bias", "temperature", "causal_decay")
                    for mask in ("causal", "document", "prefix_lm")]
                   + [(torch.bfloat16, "sliding_window", "softcap"), (torch.float16, "causal", "softcap")])


FA2_SCORE_MOD_CASES = [(torch.bfloat16, "causal", "rel_bias"), (torch.bfloat16, "sliding_window", "softcap"),
                       (torch.bfloat16, "document", "alibi")]


@pytest.mark.parametrize("dtype,name,mod_name", FA2_SCORE_MOD_CASES)
def test_score_mod_compiled_into_the_fa2_kernel(cuda_gen, monkeypatch, dtype, name, mod_name):
    """The band variant GPUs before Hopper run (fa2), forced on this one."""
    from flex_flash_infer.backends import flashinfer_backend

    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: False)
    test_score_mod_compiled_into_the_kernel(cuda_gen, monkeypatch, dtype, name, mod_name)


@pytest.mark.parametrize("dtype,name,mod_name", SCORE_MOD_CASES)
def test_score_mod_compiled_into_the_kernel(cuda_gen, monkeypatch, dtype, name, mod_name):
    """The traced score_mod in a fa3 variant (the default on CUDA since this passed); the library
    softcap too, as a user's own softcap (without the attribute that sends the library's to
    FlashInfer's own soft cap on bands, native_soft_cap.py)."""
    from flex_flash_infer.tools.warmup import example_score_mod, without_soft_cap_hint

    B, H, Hkv, L, D = 2, 8, 2, 777, 128
    params = SCORE_MOD_MASKS[name]
    mod = without_soft_cap_hint(example_score_mod(mod_name, H))
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    mask_mod = get_mask_fn(name, **params)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True, return_lse=True,
                              backend="flashinfer")
    ids = {"document_ids": mask_mod.document_ids.numpy()} if name == "document" else params
    ref_out, ref_lse = dense_attention(q, k, v, dense_predicate(name, L, L, **ids),
                                       score_fn=on_cuda(mod))
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.allclose(lse.cpu().double()[seen], ref_lse[seen], atol=3e-2, rtol=1e-3)


def test_score_mod_bands_with_and_without_a_window_mixed_on_hopper(cuda_gen):
    """A compiled score_mod over documents shorter and longer than a sliding window: bands with and
    without a window in one module built with its window on (fa3 takes the window from the module:
    a band without one must not be launched with window_left -1, which hid every key). Against
    the reference, every row seen."""
    from flex_flash_infer import and_masks
    from flex_flash_infer.mods import generate_softcap_score_mod

    B, H, Hkv, L, D, dtype = 1, 8, 2, 1000, 128, torch.bfloat16
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    mask = and_masks(get_mask_fn("document", offsets=[0, 40, 100, 700, 1000]), get_mask_fn("sliding_window", window_size=64))
    own = generate_softcap_score_mod(20.0)

    def mod(score, b, h, q_idx, kv_idx):   # a user's own: the compiled variant, not FlashInfer's soft cap
        return own(score, b, h, q_idx, kv_idx)

    bm = create_block_mask(mask, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True, return_lse=True,
                              backend="flashinfer")
    dense = create_mask(mask, None, None, L, L, device="cpu")[0, 0]
    check(out, lse, q, k, v, dense, dtype, score_fn=lambda s, *idx: 20.0 * torch.tanh(s / 20.0))


@pytest.mark.parametrize("mask_name", ["causal", "full"])
@pytest.mark.parametrize("mod_name", ["softcap", "rel_bias"])
def test_lto_score_mod_module_on_hopper(cuda_gen, monkeypatch, mask_name, mod_name):
    """A compiled score_mod on fa3 bands through flex_attention
    runs the device-LTO module (backends/lto_score_mods.py): the generic objects (built here if
    the warm-up did not), the score_mod's own link, FlashInfer's ragged wrapper on the loaded
    module with the generic arguments; against the float32 reference. softcap: a user's own (a
    number in a float slot); rel_bias: a captured per-head table (a tensor slot, its strides and
    sizes in int slots), without the reach hint so every key runs the variant (no fa2 split)."""
    import warnings

    from flex_flash_infer.backends import flashinfer_backend, lto_score_mods, score_mod_kernels
    from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_softcap_score_mod

    assert flashinfer_backend._is_hopper(torch.device("cuda")), "the LTO module is fa3's: run on Hopper"
    reason = lto_score_mods.toolchain_missing()
    assert reason is None, f"the device-LTO toolchain is missing here: {reason}"
    B, H, Hkv, L, D, dtype = 2, 8, 2, 1000, 128, torch.bfloat16
    if mod_name == "softcap":
        own = generate_softcap_score_mod(20.0)
    else:
        own = generate_relative_position_bias_score_mod(torch.randn(H, 257, generator=torch.Generator().manual_seed(1)).cuda())

    def mod(score, b, h, q_idx, kv_idx):   # no hint attributes: the compiled variant on every key
        return own(score, b, h, q_idx, kv_idx)

    modules, launches = [], []
    real_module, real_planned = lto_score_mods.lto_module, score_mod_kernels.planned_ragged

    def recording_module(*args):
        modules.append(real_module(*args))
        return modules[-1]

    def recording_planned(*args, **kwargs):
        launches.append((kwargs.get("jit_args"), kwargs.get("module")))
        return real_planned(*args, **kwargs)

    monkeypatch.setattr(lto_score_mods, "lto_module", recording_module)
    monkeypatch.setattr(score_mod_kernels, "planned_ragged", recording_planned)
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(get_mask_fn(mask_name), None, None, L, L, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a fallback to today's module is said as one
        out, lse = flex_attention(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True, return_lse=True,
                                  backend="flashinfer")
    torch.cuda.synchronize()
    assert len(modules) == 1 and modules[0] is not None, "the bands did not run the LTO module"
    lto = modules[0]
    assert lto.jit_args[11] == "FlexScoreModLto" and lto_score_mods._LOADED[lto.name] is lto
    assert launches and all(a is lto.jit_args and m is lto.loaded for a, m in launches)
    ref, ref_lse = reference_attention(q.float(), k.float(), v.float(), bm, score_mod=mod)
    err = rel_err(out, ref)
    print(f"lto {mod_name} {mask_name}: rel err {err:.2e}, max abs {(out.float() - ref).abs().max().item():.2e}")
    assert err < 1e-2
    seen = torch.isfinite(ref_lse)
    assert torch.allclose(lse.float()[seen], ref_lse[seen], atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("name,params,table_shape", [("causal", {}, (8, 129)), ("sliding_window", {"window_size": 300}, (8, 257)),
                                                      ("causal", {}, "t5")])
def test_relative_position_bias_split_at_its_reach(cuda_gen, name, params, table_shape):
    """Keys beyond the table's reach on FlashInfer's plain kernel with the table's last entry added
    to the lse, the rest in the compiled variant (far_bias.py), against the float64 reference.
    Tables per head, as the bench's: the variants prebuilt for it serve (a table shared by the heads
    is another module, 2 minutes to compile on the GPU machine; its split runs on the CPU model)."""
    from flex_flash_infer.planning import far_bias
    from flex_flash_infer.mods import generate_relative_position_bias_score_mod, generate_t5_relative_bias_score_mod

    B, H, Hkv, L, D, dtype = 1, 8, 2, 1000, 128, torch.bfloat16   # batches: test_score_mod_compiled_into_the_kernel
    if table_shape == "t5":   # T5's 32 buckets up to 128 apart: runs as a per-head table of 257 distances
        mod = generate_t5_relative_bias_score_mod(torch.randn(H, 32, generator=torch.Generator().manual_seed(1)).cuda())
    else:
        mod = generate_relative_position_bias_score_mod(
            torch.randn(*table_shape, generator=torch.Generator().manual_seed(1)).cuda())
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=get_mask_fn(name, **params), seq_len_q=L, seq_len_kv=L, num_qo_heads=H, num_kv_heads=Hkv,
                 head_dim=D, dtype=dtype, score_mod=mod)
    assert isinstance(flex._prepared.segments[0].plan.band_runner, far_bias.FarSplitBands)
    out = flex(*(x[0].transpose(0, 1).contiguous() for x in (q, k, v))).transpose(0, 1)[None]
    ref_out, _ = dense_attention(q, k, v, dense_predicate(name, L, L, **params),
                                 score_fn=on_cuda(mod))
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("name,params", [("causal", {}), ("document", {"offsets": [0, 100, 333, 1000]})])
def test_relative_position_bias_near_keys_on_fa2(cuda_gen, name, params):
    """The keys within reach in the fa2 variant, the rest on fa3's plain ragged kernel, merged;
    against the float64 reference, GQA and an odd length."""
    from flex_flash_infer.planning import far_bias
    from flex_flash_infer.backends import score_mod_kernels
    from flex_flash_infer.mods import generate_relative_position_bias_score_mod

    B, H, Hkv, L, D, dtype = 1, 8, 2, 777, 128, torch.bfloat16
    # 257 distances, as the bench's table: the same module (the reach is in the code, the heads are not)
    mod = generate_relative_position_bias_score_mod(torch.randn(H, 257, generator=torch.Generator().manual_seed(1)).cuda())
    mask = get_mask_fn(name, **params)
    ids = {"document_ids": mask.document_ids.numpy()} if name == "document" else params
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask, seq_len_q=L, seq_len_kv=L, num_qo_heads=H, num_kv_heads=Hkv, head_dim=D, dtype=dtype,
                 score_mod=mod)
    runner = flex._prepared.segments[0].plan.band_runner
    assert isinstance(runner, far_bias.FarSplitBands) and isinstance(runner.near, score_mod_kernels.ScoreModBands)
    assert runner.near.hopper is False
    out = flex(*(x[0].transpose(0, 1).contiguous() for x in (q, k, v))).transpose(0, 1)[None]
    ref_out, _ = dense_attention(q, k, v, dense_predicate(name, L, L, **ids),
                                 score_fn=on_cuda(mod))
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("name,params", [("causal", {}), ("document", {"offsets": [0, 100, 333, 1000]}),
                                         ("prefix_lm", {"prefix_len": 200})])
def test_library_softcap_runs_flashinfers_own_soft_cap(cuda_gen, name, params):
    """The library softcap on bands as FlashInfer's logits soft cap (native_soft_cap.py): its ragged
    kernel for causal attention and packed documents, its single call for each band of a prefix-LM
    mask (bands with different flags); against the float64 reference."""
    from flex_flash_infer.backends import flashinfer_backend
    from flex_flash_infer.mods import generate_softcap_score_mod

    B, H, Hkv, L, D, dtype = 1, 8, 2, 1000, 128, torch.bfloat16
    mod, mask = generate_softcap_score_mod(20.0), get_mask_fn(name, **params)
    ids = {"document_ids": mask.document_ids.numpy()} if name == "document" else params
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, cuda_gen)
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mask, seq_len_q=L, seq_len_kv=L, num_qo_heads=H, num_kv_heads=Hkv,
                 head_dim=D, dtype=dtype, score_mod=mod)
    runner = flex._prepared.segments[0].plan.band_runner
    assert isinstance(runner, flashinfer_backend._BandRunner) and runner.soft_cap == 20.0
    assert (runner.ragged is not None) == (name != "prefix_lm")
    out = flex(*(x[0].transpose(0, 1).contiguous() for x in (q, k, v))).transpose(0, 1)[None]
    ref_out, _ = dense_attention(q, k, v, dense_predicate(name, L, L, **ids), score_fn=mod)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref_out) < TOL[dtype]


PAGED_MASKS = [("causal", {}), ("sliding_window", {"window_size": 40}), ("sliding_window", {"window_size": 64}),
               ("streaming", {"sink_size": 3, "window_size": 33}), ("attamba", {"window_size": 24, "chunk_size": 16}),
               ("prefix_lm", {"prefix_len": 50}), ("dilated_sliding_window", {"window_size": 60, "dilation": 3}),
               ("full", {})]


@pytest.mark.parametrize("qo_lens", [[1, 1, 1, 1], [5, 40, 7, 1]], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("name,params", PAGED_MASKS)
def test_paged_cache_masks_match_the_reference(cuda_gen, name, params, qo_lens):
    """Decode and chunked prefill over a shuffled page table, bf16, GQA, against the float32
    reference path (itself checked against a float64 oracle on CPU in test_paged.py)."""
    from flex_flash_infer import PagedFlexAttention

    kv_lens, page, H, Hkv, D, dtype = [1, 17, 300, 1000], 16, 8, 2, 128, torch.bfloat16
    qo_lens = [min(a, b) for a, b in zip(qo_lens, kv_lens)]
    pages = [-(-n // page) for n in kv_lens]
    indptr = torch.tensor([0] + pages).cumsum(0).cuda()
    indices = torch.randperm(sum(pages) + 5, device="cuda", generator=cuda_gen)[:sum(pages)]
    last = torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)]).cuda()
    qo_indptr = torch.tensor([0] + qo_lens).cumsum(0).cuda()
    k = torch.randn(sum(pages) + 5, page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype)
    v = torch.randn(sum(pages) + 5, page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype)
    q = torch.randn(int(qo_indptr[-1]), H, D, device="cuda", generator=cuda_gen).to(dtype)
    mod = get_mask_fn(name, **params)
    runs = {}
    for backend in ("flashinfer", "reference"):
        paged = PagedFlexAttention(device="cuda", backend=backend)
        paged.plan(mod, qo_indptr, indptr, indices, last, H, Hkv, D, page, dtype=dtype)
        runs[backend] = paged.run(q, (k, v), return_lse=True)
    (out, lse), (ref, ref_lse) = runs["flashinfer"], runs["reference"]
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse[seen], ref_lse[seen], atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("window_size", [40, 1024])
def test_a_window_decode_step_of_many_requests_hands_the_kernel_every_page(cuda_gen, window_size):
    """Requests enough to fill the GPU unsplit on FlashInfer's tensor-core decode: the plan lists
    every page (the kernel starts each request at its window) and the result is the reference's."""
    from flex_flash_infer import PagedFlexAttention
    from flex_flash_infer.paged import requests_filling_the_gpu

    page, H, Hkv, D, dtype = 16, 16, 4, 128, torch.bfloat16
    R = requests_filling_the_gpu(torch.device("cuda"), Hkv) + 3
    kv_lens = torch.randint(1, 2500, (R,), device="cuda", generator=cuda_gen).tolist()
    pages = [-(-n // page) for n in kv_lens]
    indptr = torch.tensor([0] + pages).cumsum(0).cuda()
    indices = torch.randperm(sum(pages) + 5, device="cuda", generator=cuda_gen)[:sum(pages)]
    last = torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)]).cuda()
    qo_indptr = torch.arange(R + 1, device="cuda")
    k, v = (torch.randn(sum(pages) + 5, page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype) for _ in range(2))
    q = torch.randn(R, H, D, device="cuda", generator=cuda_gen).to(dtype)
    mod = get_mask_fn("sliding_window", window_size=window_size)
    runs = {}
    for backend in ("flashinfer", "reference"):
        paged = PagedFlexAttention(device="cuda", backend=backend)
        paged.plan(mod, qo_indptr, indptr, indices, last, H, Hkv, D, page, dtype=dtype)
        runs[backend] = paged.run(q, (k, v), return_lse=True)
        if backend == "flashinfer":
            spec = paged._planned["plan"].full
            assert spec.window_left == window_size - 1 and spec.kv_indptr.tolist() == indptr.tolist()
    (out, lse), (ref, ref_lse) = runs["flashinfer"], runs["reference"]
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.allclose(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("check_page_ids", [True, False])
@pytest.mark.parametrize("name,params", [("causal", {}), ("sliding_window", {"window_size": 40}),
                                         ("streaming", {"sink_size": 4, "window_size": 40})])
def test_paged_plans_ahead_of_a_busy_gpu_keep_each_steps_schedule(cuda_gen, name, params, check_page_ids):
    """Steps of two shapes in turn, each planned while the GPU still sleeps on the work before it
    (with the per-request tables on the host and check_page_ids=False, plan() never waits for the
    GPU): each step's output equals the same step planned alone. FlashInfer's plan() writes each
    wrapper's schedule into one page-locked buffer and queues its copy; planned again before that
    copy ran, a step would read the next step's schedule (docs/design.md, section 4)."""
    from flex_flash_infer import PagedFlexAttention

    page, H, Hkv, D, dtype = 16, 8, 2, 128, torch.bfloat16
    num_pages = 2048
    k, v = (torch.randn(num_pages, page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype) for _ in range(2))
    ids = torch.randperm(num_pages, device="cuda", generator=cuda_gen).to(torch.int32)

    def step(requests, pages_each, last):
        indptr = torch.arange(requests + 1, dtype=torch.int32)
        tables = (indptr, indptr * pages_each, ids[:requests * pages_each].clone(),
                  torch.full((requests,), last, dtype=torch.int32))
        q = torch.randn(requests, H, D, device="cuda", generator=cuda_gen).to(dtype)
        return tables, q

    steps = [step(4, 256, 16), step(64, 9, 5)]
    mod = get_mask_fn(name, **params)
    alone = []
    for tables, q in steps:
        paged = PagedFlexAttention(device="cuda", backend="flashinfer")
        paged.plan(mod, *tables, H, Hkv, D, page, dtype=dtype)
        alone.append(paged.run(q, (k, v)).clone())
        reference = PagedFlexAttention(device="cuda", backend="reference")
        reference.plan(mod, *tables, H, Hkv, D, page, dtype=torch.float32)
        assert rel_err(alone[-1], reference.run(q.float(), (k.float(), v.float()))) < TOL[dtype]
    paged = PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=check_page_ids)
    outs = []
    for _ in range(6):
        torch.cuda._sleep(20_000_000)   # the GPU busy while the host plans ahead
        for tables, q in steps:
            paged.plan(mod, *tables, H, Hkv, D, page, dtype=dtype)
            outs.append(paged.run(q, (k, v)))
    torch.cuda.synchronize()
    for i, out in enumerate(outs):   # a step that read the other step's schedule is far off, not 1e-3
        assert rel_err(out, alone[i % 2]) < 1e-3, (i, rel_err(out, alone[i % 2]))


def test_tree_speculative_decoding_example_on_the_gpu():
    import runpy
    import pathlib

    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[2] / "examples" / "tree_speculative_decoding.py"))


def test_paged_decode_example_with_cuda_graphs_on_the_gpu():
    """The decode loop example: its local and global layers replay CUDA graphs captured at the
    first step (use_cuda_graph=True), each step checked against dense float32 attention."""
    import runpy
    import pathlib

    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[2] / "examples" /
                       "paged_decode_softcap_and_head_windows.py"))


@pytest.mark.parametrize("kernel", ["cuda_core_decode", "tensor_core_decode"])
@pytest.mark.parametrize("name,params", [("causal", {}), ("sliding_window", {"window_size": 40})])
def test_paged_run_replays_in_a_cuda_graph(cuda_gen, name, params, kernel):
    """plan() on the host, then run() captured once and replayed: the replay equals an eager run
    on new query values written into the captured input, with each decode kernel (tensor cores
    are the default for this GQA group of 4); the eager run matches the reference."""
    from flex_flash_infer import PagedFlexAttention

    kv_lens, page, H, Hkv, D, dtype = [17, 300, 1000], 16, 8, 2, 128, torch.bfloat16
    pages = [-(-n // page) for n in kv_lens]
    indptr = torch.tensor([0] + pages).cumsum(0).cuda()
    indices = torch.randperm(sum(pages), device="cuda", generator=cuda_gen)
    last = torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)]).cuda()
    k = torch.randn(sum(pages), page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype)
    v = torch.randn(sum(pages), page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype)
    q = torch.randn(3, H, D, device="cuda", generator=cuda_gen).to(dtype)
    paged = PagedFlexAttention(device="cuda", use_tensor_cores=kernel == "tensor_core_decode")
    paged.plan(get_mask_fn(name, **params), torch.arange(4).cuda(), indptr, indices, last, H, Hkv, D, page, dtype=dtype)
    paged.run(q, (k, v))                                   # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = paged.run(q, (k, v))
    q.copy_(torch.randn(3, H, D, device="cuda", generator=cuda_gen).to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager = paged.run(q, (k, v))
    assert torch.equal(captured, eager)
    reference = PagedFlexAttention(device="cuda", backend="reference")
    reference.plan(get_mask_fn(name, **params), torch.arange(4).cuda(), indptr, indices, last, H, Hkv, D, page,
                   dtype=dtype)
    ref = reference.run(q, (k, v))
    assert not torch.isnan(eager).any() and rel_err(eager, ref) < TOL[dtype]


@pytest.mark.parametrize("kernel", ["cuda_core_decode", "tensor_core_decode"])
@pytest.mark.parametrize("name", ["causal", "sliding_window", "softcap", "streaming", "negative_scale"])
@pytest.mark.parametrize("tables_on", ["cpu", "cuda"])
def test_a_cuda_graph_captured_once_replays_every_later_decode_step(cuda_gen, name, kernel, tables_on):
    """PagedFlexAttention(use_cuda_graph=True): run() captured after the first plan, then 40 decode
    steps, each one token longer (requests cross pages and take shuffled new ones), each planned
    from the caller's tables (on the host or the GPU) and replayed with new queries; every replay
    against the float32 reference of its step, with the LSE. Streaming's sinks run as a bit-mask
    launch beside the window's decode launch, merged in the graph."""
    from flex_flash_infer import PagedFlexAttention
    from flex_flash_infer.mods import generate_softcap_score_mod

    page, H, Hkv, D, dtype, num_pages = 16, 8, 2, 128, torch.bfloat16, 160
    mask = {"sliding_window": lambda: get_mask_fn("sliding_window", window_size=70),
            "streaming": lambda: get_mask_fn("streaming", sink_size=4, window_size=70)}.get(
                name, lambda: get_mask_fn("causal"))()
    score_mod = {"softcap": lambda: generate_softcap_score_mod(20.0),   # negative: run() negates the query
                 "negative_scale": lambda: (lambda score, b, h, q, kv: score * -0.5)}.get(name, lambda: None)()
    lens = [15, 300, 1000]
    pool = torch.randperm(num_pages, device="cuda", generator=cuda_gen).tolist()
    pages = [[pool.pop() for _ in range(-(-n // page))] for n in lens]
    k = torch.randn(num_pages, page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype)
    v = torch.randn(num_pages, page, Hkv, D, device="cuda", generator=cuda_gen).to(dtype)

    def tables():
        counts = [len(p) for p in pages]
        host = (torch.arange(len(lens) + 1, dtype=torch.int32), torch.tensor([0] + counts).cumsum(0).to(torch.int32),
                torch.tensor([i for p in pages for i in p], dtype=torch.int32),
                torch.tensor([n - (len(p) - 1) * page for n, p in zip(lens, pages)], dtype=torch.int32))
        return tuple(t.to(tables_on) for t in host)

    def reference(q):
        ref = PagedFlexAttention(device="cuda", backend="reference")
        ref.plan(mask, *tables(), H, Hkv, D, page, dtype=torch.float32, score_mod=score_mod)
        return ref.run(q.float(), (k.float(), v.float()), return_lse=True)

    ours = PagedFlexAttention(device="cuda", use_tensor_cores=kernel == "tensor_core_decode", use_cuda_graph=True,
                              max_num_pages=num_pages)
    ours.plan(mask, *tables(), H, Hkv, D, page, dtype=dtype, score_mod=score_mod)
    q = torch.randn(len(lens), H, D, device="cuda", generator=cuda_gen).to(dtype)
    ours.run(q, (k, v), return_lse=True)   # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ours.run(q, (k, v), return_lse=True)
    for step in range(40):
        for r, n in enumerate(lens):
            if n % page == 0:
                pages[r].append(pool.pop())
            lens[r] = n + 1
        ours.plan(mask, *tables(), H, Hkv, D, page, dtype=dtype, score_mod=score_mod)
        q.copy_(torch.randn(len(lens), H, D, device="cuda", generator=cuda_gen).to(dtype))
        graph.replay()
        ref_out, ref_lse = reference(q)
        assert not torch.isnan(out).any() and rel_err(out, ref_out) < TOL[dtype], step
        assert torch.allclose(lse, ref_lse, atol=2e-2, rtol=1e-3), step


@pytest.mark.parametrize("mask_name,mod_name,qo_lens", PAGED_MOD_CASES)
def test_paged_cache_mods_compiled_into_the_kernels(cuda_gen, mask_name, mod_name, qo_lens):
    """A score_mod (fa3 whole pages, fa2 partial pages with bits) and a per-head mask (evaluated
    in the fa2 kernel) on a shuffled page table, bf16, GQA: against the float32 reference path,
    and replayed in a CUDA graph (warmup kind paged_mods builds these modules)."""
    from flex_flash_infer import PagedFlexAttention
    from flex_flash_infer.tools.warmup import paged_mod_case, paged_mod_inputs

    dtype = torch.bfloat16
    mask_mod, score_mod = paged_mod_case(mask_name, mod_name, 8, "cuda")
    tables, q, (k, v) = paged_mod_inputs(qo_lens, dtype, 128, "cuda", generator=cuda_gen)
    runs = {}
    for backend in ("flashinfer", "reference"):
        runs[backend] = PagedFlexAttention(device="cuda", backend=backend).plan(mask_mod, *tables, dtype=dtype,
                                                                               score_mod=score_mod)
    ours = runs["flashinfer"]
    ours.run(q, (k, v))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ours.run(q, (k, v))
    graph.replay()
    torch.cuda.synchronize()
    out, lse = ours.run(q, (k, v), return_lse=True)
    ref, ref_lse = runs["reference"].run(q, (k, v), return_lse=True)
    assert torch.equal(captured, out)
    assert not torch.isnan(out).any() and rel_err(out, ref) < TOL[dtype]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse[seen], ref_lse[seen], atol=2e-2, rtol=1e-3)


TILE_VARIANT_CASES = ["tile_variants:softcap", "tile_variants:rel_bias", "tile_variants:alibi+columns"]


@pytest.mark.parametrize("kind", TILE_VARIANT_CASES)
def test_tile_route_variants_compiled_into_the_kernel(cuda_gen, kind):
    """score_mod on the tiles and key-column routes (tile_kernels.py): odd lengths, GQA, batch 2."""
    from flex_flash_infer.tools.warmup import run_tile_variant

    B, H, Hkv, L, D = 2, 8, 2, 777, 128
    S = L if kind.endswith("columns") else 901   # key columns are found for square masks
    dtype = torch.bfloat16
    q, k, v = inputs(B, H, Hkv, L, S, D, dtype, cuda_gen)
    (out, lse), mask_mod, score_mod = run_tile_variant(kind, q, k, v, return_lse=True)
    dense = create_mask(mask_mod, 1, 1, L, S, device="cuda").cpu()
    score_fn = None if score_mod is None else (
        lambda s, b, h, qi, ki: score_mod(s.float().cuda(), b.cuda(), h.cuda(), qi.cuda(), ki.cuda()).cpu().double())
    check(out, lse, q, k, v, dense, dtype, score_fn=score_fn)


def test_return_aux_lse_on_flashinfer_and_max_scores_from_the_reference(cuda_gen):
    """return_aux=AuxRequest(lse=True) runs on FlashInfer and gives the lse return_lse gives;
    asking for max_scores too falls back to the reference with a warning, whose lse agrees."""
    import warnings

    from flex_flash_infer import AuxRequest
    from flex_flash_infer.core import notices

    q, k, v = inputs(1, 8, 2, 500, 500, 128, torch.bfloat16, cuda_gen)
    bm = create_block_mask(get_mask_fn("sliding_window", window_size=100), None, None, 500, 500, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    out_aux, aux = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_aux=AuxRequest(lse=True))
    assert torch.equal(out, out_aux) and torch.equal(lse, aux.lse) and aux.max_scores is None
    notices._warned.clear()   # the fallback warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, both = flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                 return_aux=AuxRequest(lse=True, max_scores=True))
    assert any("max_scores" in str(w.message) for w in caught)
    assert torch.allclose(both.lse, lse, atol=2e-2) and both.max_scores.shape == (1, 8, 500)
    assert torch.isfinite(both.max_scores).all()


@pytest.mark.parametrize("Hq,Hkv", [(32, 8), (24, 6)])
def test_per_head_windows_replay_in_a_cuda_graph(cuda_gen, Hq, Hkv, monkeypatch):
    """bands-per-head captured in a CUDA graph, where its head groups run side by side on streams
    (the groups' path: one-launch patches refused here): the replay on new inputs written into the
    captured ones equals an eager call, which matches the reference. 32/8 heads with a window by
    h % 4: each group's key heads evenly spaced (views); 24/6 with a window by h % 6: a group's key
    heads 0, 1, 3, 4 are gathered before the fork."""
    monkeypatch.setattr(head_windows, "available", lambda device, dtype, head_dim, sinks=False: False)
    L, D, dtype = 1024, 128, torch.bfloat16
    widths = torch.tensor([64, 128, 256, 512] if Hq == 32 else [64, 128, 256, 512, 96, 1024], device="cuda")

    def mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < widths[h % widths.numel()])

    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=mod, seq_len_q=L, seq_len_kv=L, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, dtype=dtype)
    assert flex._prepared.segments[0].plan.route == "bands-per-head"
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in inputs(1, Hq, Hkv, L, L, D, dtype, cuda_gen))
    flex(q, k, v)                            # warm-up (plans and compiles) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flex(q, k, v)
    assert flex._prepared.segments[0].plan._capture_streams is not None   # the groups ran on streams
    with_lse = torch.cuda.CUDAGraph()    # the LSE's interleaved slots written on the side streams too
    flex(q, k, v, return_lse=True)
    torch.cuda.synchronize()
    with torch.cuda.graph(with_lse):
        captured_lse = flex(q, k, v, return_lse=True)
    for x in (q, k, v):
        x.copy_(torch.randn(x.shape, device="cuda", generator=cuda_gen).to(dtype))
    graph.replay()
    with_lse.replay()
    torch.cuda.synchronize()
    eager = flex(q, k, v)
    eager_lse = flex(q, k, v, return_lse=True)
    assert torch.equal(captured, eager)
    assert torch.equal(captured_lse[0], eager_lse[0]) and torch.equal(captured_lse[1], eager_lse[1])
    bm = create_block_mask(mod, None, Hq, L, L, device="cuda")
    ref = flex_attention(*(x.float().transpose(0, 1)[None] for x in (q, k, v)), block_mask=bm, enable_gqa=True,
                         backend="reference")[0].transpose(0, 1)
    assert not torch.isnan(eager).any() and rel_err(eager.float(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128)])
@pytest.mark.parametrize("B,L,window", [(1, 1000, 1), (1, 1000, 64), (2, 777, 129), (1, 2000, 1024), (2, 600, 500)])
def test_plain_windows_on_the_exact_start_kernel(cuda_gen, monkeypatch, dtype, D, B, L, window):
    """A plain causal window over the whole sequence runs on the head-window kernel (its window
    starting at the first visible key tile), planned as not causal where the window is under half
    the keys and run causal (planning/ragged.py): out and LSE against the dense reference, every
    query row checked."""
    Hq, Hkv = 8, 2
    planned = _record_ragged_plans(monkeypatch)
    mask_mod = get_mask_fn("sliding_window", window_size=window)
    q, k, v = inputs(B, Hq, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    plan = next(iter(bm._plans.values()))
    assert isinstance(plan.band_runner, head_windows.HeadWindowRunner) and plan.band_runner.wrapper._causal
    if planned:   # a wrapper planned here, not one shared from an earlier test's plan
        assert planned == [2 * window > L]   # planned causal only where the window is over half the keys
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    check(out, lse, q, k, v, ((ki <= qi) & (qi - ki < window))[None, None], dtype)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128)])
@pytest.mark.parametrize("B,L,sinks,window", [(1, 1000, 4, 100), (2, 777, 4, 1), (1, 2000, 200, 300), (1, 600, 130, 64)])
def test_streaming_sinks_in_the_window_launch(cuda_gen, dtype, D, B, L, sinks, window):
    """Streaming's sinks run inside the window kernel's one launch (patched_headers: after the
    window's first key tile the loads and the steps go on to the sink tiles): sinks within a key
    tile and wider than one, a window of one key; out and LSE against the dense reference."""
    Hq, Hkv = 8, 2
    q, k, v = inputs(B, Hq, Hkv, L, L, D, dtype, cuda_gen)
    bm = create_block_mask(get_mask_fn("streaming", sink_size=sinks, window_size=window), None, None, L, L,
                           device="cuda")
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    plan = next(iter(bm._plans.values()))
    assert plan.sinks_in_launch and plan.band_runner.sink_len == sinks and not plan.has_columns
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    check(out, lse, q, k, v, ((ki <= qi) & ((qi - ki < window) | (ki < sinks)))[None, None], dtype)


def _random_tiles(L, density, causal, gen, heads=1):
    """Random key tiles of 128 (each query tile sees its diagonal tile): causal inside them, or not
    causal with random tiles of every other key besides (partial tiles, merged after the gather)."""
    n = -(-L // 128)
    tiles = (torch.rand(heads, n, n, generator=gen, device="cuda") < density) | torch.eye(n, dtype=torch.bool,
                                                                                           device="cuda")
    halves = torch.rand(heads, n, n, generator=gen, device="cuda") < 0.3

    if heads == 1:   # one map, read without h (a mask reading h takes a per-head route)
        tiles, halves = tiles[0].clone(), halves[0].clone()

        def tile_of(table, h, q_idx, kv_idx):
            return table[q_idx // 128, kv_idx // 128]
    else:
        def tile_of(table, h, q_idx, kv_idx):
            return table[h % heads, q_idx // 128, kv_idx // 128]

    def causal_tiles(b, h, q_idx, kv_idx):
        return tile_of(tiles, h, q_idx, kv_idx) & (q_idx >= kv_idx)

    def tiles_and_halves(b, h, q_idx, kv_idx):
        return tile_of(tiles, h, q_idx, kv_idx) | (tile_of(halves, h, q_idx, kv_idx) & ((q_idx + kv_idx) % 2 == 0))

    mask_mod = causal_tiles if causal else tiles_and_halves
    return mask_mod


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128)])
@pytest.mark.parametrize("B,L,causal,heads,block", [(1, 2048, True, 1, 128), (2, 1000, True, 1, 128),
                                                    (1, 1536, False, 1, 128), (2, 1000, False, 1, 128),
                                                    (1, 1000, False, 3, 128), (1, 1000, False, 1, (256, 128))])
def test_tiles_gathered_on_the_tma_kernel(cuda_gen, dtype, D, B, L, causal, heads, block):
    """The tiles route's whole tiles run on FlashInfer's ragged kernel reading each request's key
    tiles from a table (tile_gather.py): the causal diagonal in the same launch, whole tiles beside
    partial ones (merged after), a last key tile shorter than 128, two batch entries, a mask per head
    (head-major), query tiles of 256 (requests longer than the kernel's 128-row tiles: the host's
    schedule must cut them as the kernel does); out and LSE against the dense reference."""
    from flex_flash_infer.backends import tile_gather

    Hq, Hkv = 6, 2
    q, k, v = inputs(B, Hq, Hkv, L, L, D, dtype, cuda_gen)
    mask_mod = _random_tiles(L, 0.3, causal, cuda_gen, heads)
    bm = create_block_mask(mask_mod, None, Hq if heads > 1 else None, L, L, device="cuda", BLOCK_SIZE=block)
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="flashinfer")
    plan = next(iter(bm._plans.values()))
    assert plan.route == ("tiles-per-head" if heads > 1 else "tiles-causal" if causal else "tiles")
    assert isinstance(plan.groups[0].full, tile_gather.TileGatherLaunch)
    qi, ki = torch.arange(L, device="cuda").view(-1, 1), torch.arange(L, device="cuda").view(1, -1)
    dense = torch.stack([mask_mod(0, torch.tensor(h, device="cuda"), qi, ki) for h in range(Hq)])[None].cpu()
    check(out, lse, q, k, v, dense, dtype)


@pytest.mark.parametrize("B,L", [(1, 2048), (2, 1000)])
def test_a_soft_cap_on_gathered_tiles(cuda_gen, B, L):
    """The library's soft cap over the causal diagonal's one launch runs as the soft-capped
    gather module's own (FlashInfer's logits soft cap): out and LSE against the dense reference."""
    from flex_flash_infer.backends import tile_gather
    from flex_flash_infer.mods.softcap import generate_softcap_score_mod

    dtype, D, Hq, Hkv = torch.bfloat16, 128, 6, 2
    q, k, v = inputs(B, Hq, Hkv, L, L, D, dtype, cuda_gen)
    mask_mod = _random_tiles(L, 0.3, True, cuda_gen)
    softcap = generate_softcap_score_mod(20.0)
    bm = create_block_mask(mask_mod, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True, return_lse=True,
                              backend="flashinfer")
    plan = next(iter(bm._plans.values()))
    group = plan.groups[0]
    assert plan.route == "tiles-causal" and plan.plan.soft_cap == 20.0
    assert isinstance(group.full, tile_gather.TileGatherLaunch) and group.full.soft_cap == 20.0
    assert group.variants is None
    qi, ki = torch.arange(L, device="cuda").view(-1, 1), torch.arange(L, device="cuda").view(1, -1)
    dense = mask_mod(0, torch.tensor(0, device="cuda"), qi, ki)[None, None].cpu()
    check(out, lse, q, k, v, dense, dtype, score_fn=lambda s, *idx: softcap(s, *idx))
