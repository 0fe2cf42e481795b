"""Compile FlashInfer's kernels ahead of first use (each new machine compiles them once:
1-2 minutes a module; FlashInfer caches them under ~/.cache/flashinfer afterwards)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
from ..core.hints import stated_hint

# score_mod_generic: the generic objects of the device-LTO score_mod module (no window), so a
# first score_mod on fa3 bands costs only its own link (backends/lto_score_mods.py)
KINDS = ("causal", "sliding_window", "tiles", "documents", "decode", "score_mod_generic")
# One fa3 variant module per score_mod structure (and per sliding-window flag): not in the default
# kinds. On fa3 these are the LTO modules (the generic objects, then each one's link) where the
# toolchain is here; score_mod_generic+window: the generic objects of windowed bands.
SCORE_MOD_KINDS = ("score_mod_generic", "score_mod_generic+window", "score_mod:softcap", "score_mod:alibi", "score_mod:rel_bias", "score_mod:temperature",
                   "score_mod:causal_decay", "score_mod:softcap+window")
# The fa2 band variant (GPUs before Hopper), as test_gpu's fa2 cases use it.
FA2_SCORE_MOD_KINDS = ("score_mod_fa2:rel_bias", "score_mod_fa2:softcap+window", "score_mod_fa2:alibi")
# The paged variants of tile_kernels: the GPU tests use these same structures, so after this
# warmup they compile nothing.
TILE_VARIANT_KINDS = ("tile_variants:softcap", "tile_variants:rel_bias", "tile_variants:alibi+columns")
# A score_mod and a per-head mask on a paged cache (paged_kernels.py), as test_gpu runs them:
# (mask, score_mod, queries per request) over requests of 17, 300 and 1000 keys in pages of 16.
PAGED_MOD_CASES = (("causal", "softcap", (1, 1, 1)), ("sliding_window", "softcap", (5, 40, 7)),
                   ("head_windows", None, (1, 1, 1)), ("head_windows", "alibi", (5, 40, 7)))
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def example_score_mod(name: str, num_heads: int, device="cuda"):
    """The library's score_mods with example parameters (the module depends on the structure only)."""
    from .. import mods

    return {"softcap": lambda: mods.generate_softcap_score_mod(5.0),
            "alibi": lambda: mods.generate_alibi_score_mod(num_heads=num_heads),
            "rel_bias": lambda: mods.generate_relative_position_bias_score_mod(torch.randn(num_heads, 65, device=device)),
            "temperature": lambda: mods.generate_temperature_score_mod(torch.rand(num_heads, device=device) + 0.5),
            "causal_decay": lambda: mods.generate_causal_decay_score_mod(0.01),
            "identity": lambda: _identity}[name]()


def _identity(score, b, h, q_idx, kv_idx):
    """A score_mod that changes nothing: its variant's code for scripts/sass_counts.py (a plan folds
    it into the scale and compiles nothing, planning/score_folding.py)."""
    return score


def compile_score_mod(kind: str, dtype: torch.dtype, head_dim: int, device="cuda") -> None:
    """Run a score_mod through its compiled fa3 variant once (softcap too, which runs FlashInfer's
    own soft cap on bands: the variant serves a user's own softcap and the tiles, so it runs here
    without the attribute that names its cap); score_mod_fa2:... builds the fa2 band variant of
    GPUs before Hopper (forced on this one)."""
    from ..backends import flashinfer_backend
    from ..api import flex_attention
    from ..block_mask import create_block_mask
    from ..mods.registry import get_mask_fn

    hopper = flashinfer_backend._is_hopper
    if kind.startswith("score_mod_fa2:"):   # fa2 forced for this one call, given back after it
        flashinfer_backend._is_hopper = lambda device: False
    try:
        name, _, window = kind.split(":", 1)[1].partition("+")
        mask = get_mask_fn("sliding_window", window_size=64) if window else get_mask_fn("causal")
        q = torch.randn(1, 4, 256, head_dim, device=device, dtype=dtype)
        bm = create_block_mask(mask, None, None, 256, 256, device=device)
        flex_attention(q, q, q, score_mod=without_soft_cap_hint(example_score_mod(name, 4, device=device)),
                       block_mask=bm, backend="flashinfer")
    finally:
        flashinfer_backend._is_hopper = hopper


def without_soft_cap_hint(score_mod):
    """score_mod as a plain function: a library softcap then runs its compiled variant, not
    FlashInfer's own soft cap (native_soft_cap.py reads the hint from the attribute)."""
    if stated_hint(score_mod, "logits_soft_cap") is None:
        return score_mod

    def plain(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx, kv_idx)

    return plain


def tiles_with_partials(num_tiles: int, seed: int = 0, block: int = 128, device="cuda"):
    """Random kept tiles (the diagonal always) of a causal mask plus every 7th key: full tiles below
    the diagonal, partial ones on it and above it; no band structure, so the tiles route."""
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(num_tiles, num_tiles, generator=gen) < 0.5) | torch.eye(num_tiles, dtype=torch.bool)
    keep = keep.to(device)

    def tiles_with_partials(b, h, q_idx, kv_idx):
        return keep[q_idx // block, kv_idx // block] & ((q_idx >= kv_idx) | (kv_idx % 7 == 0))

    return tiles_with_partials


def tile_variant_case(kind: str, num_heads: int, q_len: int, kv_len: int, device="cuda"):
    """(mask_mod, score_mod) of a tile_variants kind: the tiles route (full and partial tiles) or,
    with '+columns', attamba's key columns."""
    from ..mods.registry import get_mask_fn

    name, _, extra = kind.partition(":")[2].partition("+")
    mask_mod = (get_mask_fn("attamba", window_size=64, chunk_size=32) if extra == "columns"
                else tiles_with_partials(-(-max(q_len, kv_len) // 128), device=device))
    return mask_mod, example_score_mod(name, num_heads, device=device)


def run_tile_variant(kind: str, q, k, v, return_lse=False):
    """flex_attention on CUDA on the route a tile_variants kind names; returns (flex_attention's
    result, mask_mod, score_mod)."""
    from ..api import flex_attention
    from ..block_mask import create_block_mask

    L, S = q.shape[2], k.shape[2]
    mask_mod, score_mod = tile_variant_case(kind, q.shape[1], L, S, device=q.device)
    bm = create_block_mask(mask_mod, None, None, L, S, device=q.device)
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=return_lse,
                         backend="flashinfer")
    return out, mask_mod, score_mod


def paged_mod_case(mask_name: str, mod_name, num_heads: int, device):
    """(mask_mod, score_mod or None) of a PAGED_MOD_CASES entry: head_windows gives each query
    head its own causal window (16, 64, 256, 4096 keys, repeated over the heads)."""
    from ..mods.registry import get_mask_fn

    score_mod = example_score_mod(mod_name, num_heads, device=device) if mod_name else None
    if mask_name != "head_windows":
        return get_mask_fn(mask_name, **({"window_size": 40} if mask_name == "sliding_window" else {})), score_mod
    return head_window_mask((16, 64, 256, 4096), num_heads, device), score_mod


def head_window_mask(windows, num_heads: int, device):
    """A causal window whose width depends on the query head (heads cycle through the widths)."""
    widths = torch.tensor(windows, device=device).repeat(-(-num_heads // len(windows)))[:num_heads]

    def head_windows(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < widths[h])

    return head_windows


def paged_mod_inputs(qo_lens, dtype, head_dim: int, device, generator=None, heads=(8, 2)):
    """A shuffled page table (requests of 17, 300 and 1000 keys, pages of 16) with its cache and
    queries: (plan's table arguments, q, (k_cache, v_cache))."""
    kv_lens, page = [17, 300, 1000], 16
    hq, hkv = heads
    pages = [-(-n // page) for n in kv_lens]
    indptr = torch.tensor([0] + pages).cumsum(0).to(device)
    indices = torch.randperm(sum(pages), generator=generator, device=device)
    last = torch.tensor([n - (p - 1) * page for n, p in zip(kv_lens, pages)]).to(device)
    qo_indptr = torch.tensor([0, *qo_lens]).cumsum(0).to(device)
    k = torch.randn(sum(pages), page, hkv, head_dim, generator=generator, device=device).to(dtype)
    v = torch.randn(sum(pages), page, hkv, head_dim, generator=generator, device=device).to(dtype)
    q = torch.randn(sum(qo_lens), hq, head_dim, generator=generator, device=device).to(dtype)
    return (qo_indptr, indptr, indices, last, hq, hkv, head_dim, page), q, (k, v)


def run_paged_mods(dtype, head_dim: int, device="cuda", run: bool = True) -> None:
    """Plan (its variants compile) and run every PAGED_MOD_CASES entry on the FlashInfer backend;
    run=False plans only (the prebuild script records what planning asks FlashInfer for)."""
    from ..paged import PagedFlexAttention

    for mask_name, mod_name, qo_lens in PAGED_MOD_CASES:
        mask_mod, score_mod = paged_mod_case(mask_name, mod_name, 8, device)
        tables, q, cache = paged_mod_inputs(qo_lens, dtype, head_dim, device)
        paged = PagedFlexAttention(device=device, backend="flashinfer")
        paged.plan(mask_mod, *tables, dtype=dtype, score_mod=score_mod)
        if run:
            paged.run(q, cache)


def _sinks_and_window(b, h, q_idx, kv_idx):
    """No lowering hint, full and partial tiles at 512 tokens: the generic tiles route."""
    return (q_idx >= kv_idx) & ((kv_idx < 128) | (q_idx - kv_idx < 100))


def build_generic_objects(dtype: torch.dtype, head_dim: int, window: bool = False) -> bool:
    """The device-LTO generic objects of (dtype, head_dim, window flag); False, said, where the
    toolchain is missing (a score_mod then builds today's module: nothing to build ahead here)."""
    from ..backends import lto_score_mods
    from ..backends.flashinfer_backend import _is_hopper

    if not _is_hopper(torch.device("cuda")):   # the LTO modules are fa3's: other GPUs run the fa2 variants
        print("score_mod_generic: not built, not a Hopper GPU (score_mods run fa2 variants here)", flush=True)
        return False
    reason = lto_score_mods.toolchain_missing()
    if reason is not None:
        print(f"score_mod_generic: not built, the device-LTO toolchain is missing ({reason}); "
              f"each score_mod builds its own module", flush=True)
        return False
    lto_score_mods.build_generic(dtype, head_dim, window)
    return True


def compile_one(kind: str, dtype: torch.dtype, head_dim: int) -> None:
    """Run one tiny problem whose route needs the module(s) of this kind."""
    from ..mods.registry import get_mask_fn
    from ..wrapper import FlexFlashInfer

    if kind.startswith("score_mod_generic"):
        build_generic_objects(dtype, head_dim, window=kind.endswith("+window"))
        return None
    if kind.startswith(("score_mod:", "score_mod_fa2:")):
        compile_score_mod(kind, dtype, head_dim)
        torch.cuda.synchronize()
        return None
    if kind.startswith("tile_variants:"):
        q = torch.randn(1, 4, 600, head_dim, device="cuda", dtype=dtype)
        run_tile_variant(kind, q, q[:, :2], q[:, :2])
        torch.cuda.synchronize()
        return None
    if kind == "paged_mods":  # a score_mod and per-head masks on a paged cache
        run_paged_mods(dtype, head_dim)
        torch.cuda.synchronize()
        return None
    if kind == "native_score":  # FlashInfer's own soft cap and ALiBi (bench's native score_mod rows)
        import flashinfer

        from ..backends.flashinfer_backend import _is_hopper as is_hopper, default_workspace

        q = torch.randn(256, 4, head_dim, device="cuda", dtype=dtype)
        flashinfer.single_prefill_with_kv_cache(q, q, q, causal=True, logits_soft_cap=20.0)
        ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(default_workspace(q.device), "NHD",
                                                                 backend="fa3" if is_hopper(q.device) else "fa2")
        indptr = torch.tensor([0, 256], dtype=torch.int32)
        ragged.plan(indptr, indptr, 4, 4, head_dim, causal=True, logits_soft_cap=20.0, q_data_type=dtype)
        ragged.run(q, q, q)   # the library softcap on bands (native_soft_cap.py)
        flashinfer.single_prefill_with_kv_cache(q, q, q, causal=True, pos_encoding_mode="ALIBI")
        torch.cuda.synchronize()
        return None
    if kind == "bands_per_head":  # per-head windows as bands (bench --cases per_head_windows)
        flex = FlexFlashInfer(device="cuda")
        flex.prepare(mask_fn=head_window_mask((16, 64, 128, 300), 8, "cuda"), seq_len_q=512, seq_len_kv=512,
                     num_qo_heads=8, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
        q = torch.randn(512, 8, head_dim, device="cuda", dtype=dtype)
        flex(q, q[:, :2], q[:, :2])
        torch.cuda.synchronize()
        return None
    if kind == "decode":  # paged decode kernel + the masked partial-page launch
        from ..paged import PagedFlexAttention

        paged = PagedFlexAttention(device="cuda")
        paged.plan(get_mask_fn("sliding_window", window_size=40), [0, 1], [0, 4], [0, 1, 2, 3], [16], 4, 4,
                   head_dim, 16, dtype=dtype)
        cache = torch.randn(4, 16, 4, head_dim, device="cuda", dtype=dtype)
        paged.run(torch.randn(1, 4, head_dim, device="cuda", dtype=dtype), (cache, cache))
        torch.cuda.synchronize()
        return None

    masks = {
        "causal": get_mask_fn("causal"),                           # native single prefill
        "sliding_window": get_mask_fn("sliding_window", window_size=64),  # its sliding-window build
        "tiles": _sinks_and_window,   # whole tiles (Hopper: the tile-gather module) + masked fa2 + merge
        "documents": get_mask_fn("document", offsets=[0, 100, 512]),       # ragged prefill
    }
    flex = FlexFlashInfer(device="cuda")
    flex.prepare(mask_fn=masks[kind], seq_len_q=512, seq_len_kv=512, num_qo_heads=4, num_kv_heads=4,
                 head_dim=head_dim, dtype=dtype)
    q = torch.randn(512, 4, head_dim, device="cuda", dtype=dtype)
    flex(q, q, q)
    torch.cuda.synchronize()


def warmup(dtypes=("bf16",), head_dims=(128,), kinds=KINDS, parallel: bool = True) -> int:
    jobs = [(k, d, h) for d in dtypes for h in head_dims for k in kinds]
    cache = os.path.join(os.environ.get("FLASHINFER_WORKSPACE_BASE", os.path.expanduser("~")), ".cache", "flashinfer")
    print(f"compiling {len(jobs)} FlashInfer kernel sets; cached afterwards in {cache}", flush=True)
    start = time.time()
    procs = []
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 4) // min(len(jobs), 4))))
    for kind, dtype, head_dim in jobs:
        cmd = [sys.executable, "-c",
               f"import torch; from flex_flash_infer.tools.warmup import compile_one; "
               f"compile_one({kind!r}, torch.{str(DTYPE_NAMES[dtype]).split('.')[-1]}, {head_dim})"]
        if parallel:
            procs.append(((kind, dtype, head_dim), subprocess.Popen(cmd, env=env)))
        else:
            procs.append(((kind, dtype, head_dim), subprocess.run(cmd, env=env)))
    failed = 0
    for n, (job, p) in enumerate(procs, 1):
        rc = p.wait() if parallel else p.returncode
        failed += rc != 0
        bar = "#" * round(20 * n / len(procs))
        print(f"[{bar:<20s}] {n}/{len(procs)} {'ok' if rc == 0 else 'FAILED'} {job} ({time.time() - start:.0f} s)",
              flush=True)
    return 1 if failed else 0
