"""A new mask compiles nothing (issue 23): every mask, the library's or a user's, on every route
and door, runs on FlashInfer's own modules, and those are a small fixed set per dtype and
head_dim: batch prefill (fa3 / fa2) and single prefill, each with and without a sliding window,
and decode with and without one; on fa3, where FlashInfer's batch prefill module is not built,
its kernels as native_copy's one-mode modules (the CPU model answers "not built"). Only a score_mod compiles a variant (jit_args), and a per-head
mask on the paged cache (it runs compiled into the kernels there; on flex_attention per-head masks
take FlashInfer's own masked kernel). Each FlashInfer entry point the library calls is recorded,
on the CPU model, with the flags that name its module."""
import random
import sys

import pytest
import torch

from random_masks import per_head_starts, random_mask_mod, striped_causal
from flex_flash_infer import PagedFlexAttention, create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.compile import native_copy
from flex_flash_infer.compile.lean_modules import kept_modes
from flex_flash_infer.tools.warmup import example_score_mod

# the modules a mask may use: FlashInfer's own kernels, named as its JIT names them (kind, backend,
# sliding window) -- all of them in `python -m flex_flash_infer warmup`'s default list
MASK_MODULES = {("batch_prefill", "fa3", False), ("batch_prefill", "fa3", True), ("batch_prefill", "fa2", False),
                ("batch_prefill", "fa2", True), ("single_prefill", "fa3", False), ("single_prefill", "fa3", True),
                ("decode", None, False), ("decode", None, True)} | {
    ("batch_prefill_one_mode", "fa3", window, mode) for window in (False, True) for mode in (0, 1)}


@pytest.fixture
def recorded(flashinfer_on_cpu, monkeypatch):
    """(module key, jit_args or None) of every FlashInfer wrapper plan and single-prefill call."""
    calls = []
    fi = sys.modules["flashinfer"]

    def wrap_plan(cls, kind, window_arg):
        real_plan = cls.plan

        def plan(self, *args, **kwargs):
            window = kwargs.get(window_arg, -1)
            backend = None if kind == "decode" else self.backend
            jit_args = getattr(self, "jit_args", None)
            key = (kind, backend, window is not None and window >= 0)
            if native_copy.is_native_copy(jit_args):   # FlashInfer's kernels, a module per mask mode
                key, jit_args = (f"{kind}_one_mode", backend, key[2], *kept_modes(backend, jit_args[0])), None
            calls.append((key, jit_args))
            return real_plan(self, *args, **kwargs)
        monkeypatch.setattr(cls, "plan", plan)

    for cls in (fi.BatchPrefillWithRaggedKVCacheWrapper, fi.BatchPrefillWithPagedKVCacheWrapper):
        real_init = cls.__init__

        def init(self, workspace, layout="NHD", backend="auto", jit_args=None, _real=real_init, **kw):
            _real(self, workspace, layout, backend, jit_args, **kw)
            self.backend, self.jit_args = backend, jit_args
        monkeypatch.setattr(cls, "__init__", init)
        wrap_plan(cls, "batch_prefill", "window_left")
    wrap_plan(fi.BatchDecodeWithPagedKVCacheWrapper, "decode", "window_left")
    real_single = fi.single_prefill_with_kv_cache

    def single(q, k, v, causal=False, window_left=-1, *args, **kwargs):
        calls.append((("single_prefill", "fa3", window_left >= 0), None))
        return real_single(q, k, v, causal, window_left, *args, **kwargs)
    monkeypatch.setattr(fi, "single_prefill_with_kv_cache", single)
    return calls


def _masks(L):
    r = random.Random(7)
    w = r.randint(20, 200)
    return {
        "causal": get_mask_fn("causal"), "full": get_mask_fn("full"),
        "sliding_window": get_mask_fn("sliding_window", window_size=w),
        "streaming": get_mask_fn("streaming", sink_size=4, window_size=w),
        "attamba": get_mask_fn("attamba", window_size=64, chunk_size=32),
        "prefix_lm": get_mask_fn("prefix_lm", prefix_len=r.randint(1, L - 1)),
        "document": get_mask_fn("document", offsets=[0, L // 3, L]),
        "dilated": get_mask_fn("dilated_sliding_window", window_size=60, dilation=3),
        "chunked": get_mask_fn("chunked_causal", chunk_size=50),
        "users_window": lambda b, h, q, kv: (q >= kv) & (q - kv < w),
        "users_shifted": lambda b, h, q, kv: kv <= q + 17,
        "striped": striped_causal,
        "per_head_random": random_mask_mod(1, 4, L, L, torch.Generator().manual_seed(3))[0],
        "per_head": lambda b, h, q, kv: (q >= kv) & (q - kv < 32 * (h + 1)),
        "per_head_starts": per_head_starts,
    }


@pytest.mark.parametrize("name", list(_masks(300)))
def test_a_mask_runs_on_flashinfers_own_modules(recorded, name):
    L, Hq, Hkv, D = 300, 4, 2, 16
    mod = _masks(L)[name]
    q = torch.randn(1, Hq, L, D, dtype=torch.float64)
    k, v = torch.randn(1, Hkv, L, D, dtype=torch.float64), torch.randn(1, Hkv, L, D, dtype=torch.float64)
    per_head = name.startswith("per_head")
    bm = create_block_mask(mod, None, Hq if per_head else None, L, L, device="cpu", BLOCK_SIZE=64)
    flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="flashinfer")
    if not per_head:   # the paged cache: a decode step and a chunk of prefill
        kv_lens, qo_lens, page = [90, 300], [1, 40], 16
        pages = [-(-n // page) for n in kv_lens]
        paged = PagedFlexAttention(device="cpu", backend="flashinfer")
        paged.plan(mod, torch.tensor([0, qo_lens[0], sum(qo_lens)]), torch.tensor([0, pages[0], sum(pages)]),
                   torch.arange(sum(pages)), torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)]),
                   num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, page_size=page, dtype=torch.float64)
    assert recorded, "no FlashInfer call recorded"
    assert all(jit is None for _, jit in recorded), f"{name} compiled a variant: a mask must compile nothing"
    assert {key for key, _ in recorded} <= MASK_MODULES, {key for key, _ in recorded} - MASK_MODULES


def test_a_score_mod_is_what_compiles(recorded):
    """The check above can fail: a score_mod's variant shows as jit_args."""
    L, Hq, Hkv, D = 128, 4, 2, 16
    q = torch.randn(1, Hq, L, D, dtype=torch.float64)
    k, v = torch.randn(1, Hkv, L, D, dtype=torch.float64), torch.randn(1, Hkv, L, D, dtype=torch.float64)
    bm = create_block_mask(get_mask_fn("causal"), None, None, L, L, device="cpu", BLOCK_SIZE=64)
    flex_attention(q, k, v, score_mod=example_score_mod("alibi", Hq, device="cpu"), block_mask=bm, enable_gqa=True,
                   backend="flashinfer")
    assert any(jit is not None for _, jit in recorded)
