"""Benchmark: this library vs compiled torch FlexAttention, FlashInfer's native call and cuDNN SDPA.

Every implementation runs in this one process on the same inputs; each is checked against a
float32 reference on sampled query rows before it is timed. Times are medians of CUDA-event
timings after warm-up. TFLOP/s counts visible (q, kv) pairs only: 4 * pairs * head_dim * Hq / t.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import statistics
import time

import torch

from flex_flash_infer.masks.block_build import EMPTY, FULL, PARTIAL, tile_elements
from flex_flash_infer.core.mask_eval import INDEX_DTYPE, evaluate_mask_mod, mask_dependence
from flex_flash_infer.mods.document import document_ids_from_offsets
from flex_flash_infer.mods.registry import get_mask_fn
from flex_flash_infer.wrapper import FlexFlashInfer

from .profile import describe, graphed, profile_row
from .provenance import source_commit

SEED = 1234
COMMIT = source_commit()
CHECK_ROWS = 384
TOLERANCE = 2e-2


def random_tile_mask(seq_len: int, keep: float = 0.25, block: int = 128, seed: int = SEED):
    """25% of 128x128 tiles kept (the diagonal always), intersected with causal."""
    n = -(-seq_len // block)
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.rand(n, n, generator=gen) < keep
    tiles |= torch.eye(n, dtype=torch.bool)
    on_device = {}

    def random_tiles(b, h, q_idx, kv_idx):
        t = on_device.get(q_idx.device)
        if t is None:
            t = on_device.setdefault(q_idx.device, tiles.to(q_idx.device))
        return t[q_idx // block, kv_idx // block] & (q_idx >= kv_idx)

    return random_tiles


def per_head_window_mask(windows=(128, 256, 512, 1024)):
    """A causal window whose width depends on the query head (heads cycle through the widths)."""
    widths = torch.tensor(windows, dtype=INDEX_DTYPE)
    on_device = {}

    def per_head_windows(b, h, q_idx, kv_idx):
        w = on_device.get(q_idx.device)
        if w is None:
            w = on_device.setdefault(q_idx.device, widths.to(q_idx.device))
        return (kv_idx <= q_idx) & (q_idx - kv_idx < w[h % len(windows)])

    return per_head_windows


def _without_hint(mask_mod):
    """The same predicate as a user would write it: no lowering hint for the planner."""
    def users_own(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx)

    return users_own


def document_offsets(seq_len: int, seed: int = SEED):
    gen = torch.Generator().manual_seed(seed)
    offsets = [0]
    while offsets[-1] < seq_len:
        offsets.append(min(seq_len, offsets[-1] + int(torch.randint(256, 4097, (1,), generator=gen))))
    return offsets


# The speed issue's own cases (#3): its geometric-mean target is over these rows only.
ISSUE_CASES = ("full", "causal", "sliding_window", "attamba", "streaming", "prefix_lm", "document", "random_tiles")


def case_masks(seq_len: int, device="cpu"):
    """name -> (mask_mod, native FlashInfer kwargs or None, cuDNN SDPA is_causal or None). The
    tables a mask reads are made on device, as torch's flex_attention needs them (a compiled
    torch flex given a CPU table copies it inside its kernel's graph, or leaves its fused path)."""
    return {
        "full": (get_mask_fn("full"), {"causal": False}, False),
        "causal": (get_mask_fn("causal"), {"causal": True}, True),
        "sliding_window": (get_mask_fn("sliding_window", window_size=1024), {"causal": True, "window_left": 1023}, None),
        "attamba": (get_mask_fn("attamba", window_size=256, chunk_size=128), None, None),
        "attamba_no_hint": (_without_hint(get_mask_fn("attamba", window_size=256, chunk_size=128)), None, None),
        "streaming": (get_mask_fn("streaming", sink_size=4, window_size=1024), None, None),
        "prefix_lm": (get_mask_fn("prefix_lm", prefix_len=2048), None, None),
        # a prefix that ends inside a 128-row query tile (a prompt of any length)
        "prefix_lm_2000": (get_mask_fn("prefix_lm", prefix_len=2000), None, None),
        "document": (get_mask_fn("document", document_ids=document_ids_from_offsets(document_offsets(seq_len))
                                 .to(device)), None, None),
        "random_tiles": (random_tile_mask(seq_len), None, None),
        "per_head_windows": (per_head_window_mask(), None, None),
    }


def time_interleaved(fns: dict, warmup: int = 5, rounds: int = 10, calls_per_round: int = 10):
    """(median ms per name, error per name) of fns timed in rounds that visit every fn in turn,
    each round starting one further along: a drift of the GPU's clocks during a case falls on
    every impl alike rather than on those timed last. A round is back-to-back calls between two
    CUDA events, so that host launch work overlaps the GPU as it does in a model (the same for
    every impl); an fn that raises is dropped and its error kept."""
    names, errors, times = list(fns), {}, {name: [] for name in fns}
    if not names:
        return {}, {}

    def guarded(name, action):
        try:
            action()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"

    for name in names:
        guarded(name, lambda: [fns[name]() for _ in range(warmup)])
    torch.cuda.synchronize()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in errors:
                continue

            def one_round():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls_per_round):
                    fns[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / calls_per_round)
            guarded(name, one_round)
    return {n: statistics.median(t) for n, t in times.items() if t and n not in errors}, errors


def check(row: dict, fn, error_of, tolerance: float = TOLERANCE) -> bool:
    """Run fn once (its first call, compile time for torch_flex) and check error_of(output), a
    relative error against the reference. Fills row's first_call_s and rel_err, or error: a peer
    that cannot run a case, or runs it wrong, is reported and not timed. True when it may be timed."""
    try:
        first_call = time.time()
        out = fn()
        torch.cuda.synchronize()
        row["first_call_s"] = time.time() - first_call
        err = error_of(out)
        row["rel_err"] = err
        if not math.isfinite(err) or err > tolerance:
            row["error"] = f"wrong result: rel_err {err:.3e}"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return "error" not in row


def check_and_time(rows_and_fns, error_of) -> None:
    """check() each (row, fn), then time the fns that passed together (time_interleaved); fills
    each row's first_call_s, rel_err and ms, or error."""
    checked = {i: fn for i, (row, fn) in enumerate(rows_and_fns) if check(row, fn, error_of)}
    times, errors = time_interleaved(checked)
    for i, (row, _) in enumerate(rows_and_fns):
        if i in errors:
            row["error"] = errors[i]
        elif i in times:
            row["ms"] = times[i]


def raising(error: Exception):
    """An impl that failed before it could run: timing it reports the error in its row."""
    def failed():
        raise error

    return failed


def fa4_missing() -> str | None:
    """None when torch FlexAttention can run on FlashAttention-4 here (kernel_options BACKEND
    "FLASH": flash-attn-4's CuTe DSL kernels, not shipped with torch), else why not."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:   # ImportError, or a CUTLASS DSL that fails to load its libraries
        return f"FlashAttention-4 not importable ({type(e).__name__}: {str(e)[:120]}); see ../shared/gpu/fetch-fa4.sh"
    return None


def count_visible_pairs(block_mask) -> float:
    """Exact count of visible pairs per query head (the mean over heads of a per-head mask):
    full tiles whole, partial tiles evaluated."""
    bq, bkv = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    heads = block_mask.states.shape[1]
    total = 0
    for h in range(heads):
        states = block_mask.states[0, h]
        rows_in_tile = torch.clamp(q_len - torch.arange(states.shape[0], device=states.device) * bq, max=bq)
        total += int(((states == FULL).sum(1) * rows_in_tile).sum()) * bkv  # tail rows past Q_LEN excluded
        tiles = (states == PARTIAL).nonzero()
        for p0 in range(0, tiles.shape[0], 1024):
            qt, kt = tiles[p0:p0 + 1024].unbind(1)
            total += int(tile_elements(block_mask.mask_mod, 0, h, qt, kt, bq, bkv, q_len, kv_len)[0].sum())
    return total / heads


def identity_score_mod(score, b, h, q_idx, kv_idx):
    """The score unchanged: a plan folds it into FlashInfer's scale (planning/score_folding.py), so
    the row shows what a user's identity or temperature score_mod costs: the plain kernels."""
    return score


def score_mod_cases(device="cpu"):
    """name -> (mask name, score_mod, FlashInfer native kwargs or None): #4's score_mod rows, and
    identity+causal, a score_mod folded into the scale."""
    from flex_flash_infer.mods.alibi import alibi_slopes
    from flex_flash_infer.mods import (generate_alibi_score_mod, generate_relative_position_bias_score_mod,
                                       generate_softcap_score_mod)

    table = bias_table(device)
    # FlashInfer's own soft cap (fa3) and ALiBi (fa2 only) as the native rows: what the same
    # transform costs in FlashInfer's hand-written variants, beside our compiled ones
    return {"softcap+causal": ("causal", generate_softcap_score_mod(20.0), {"causal": True, "logits_soft_cap": 20.0}),
            "alibi+causal": ("causal", generate_alibi_score_mod(alibi_slopes(32).to(device)), {"causal": True,
                                                                                 "pos_encoding_mode": "ALIBI"}),
            "rel_bias+causal": ("causal", generate_relative_position_bias_score_mod(table), None),
            "identity+causal": ("causal", identity_score_mod, None),
            # the tiles route (full tiles in fa3, partial ones in fa2): tile_kernels' variants
            "softcap+random_tiles": ("random_tiles", generate_softcap_score_mod(20.0), None)}


def bias_table(device="cpu"):
    """The relative-position rows' table [32 heads, 257 distances] (on device, as for case_masks)."""
    return (torch.randn(32, 257, generator=torch.Generator().manual_seed(SEED)) * 0.5).to(device)


def fa4_score_mods(device="cpu"):
    """name -> the case's score_mod as a user of torch flex on FlashAttention-4 writes it, where
    the library's form does not compile there: torch 2.11's CuTe DSL lowering has no `minimum`
    (a clamp), so the relative-position bias clamps its distance with where. The same values:
    the FA4 row is checked against the reference like every row."""
    table = bias_table(device)
    reach = table.shape[-1] // 2

    def relative_position_bias_by_where(score, b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx + reach
        distance = torch.where(distance > 2 * reach, 2 * reach, distance)
        return score + table[h, torch.where(distance < 0, 0, distance)]

    return {"rel_bias+causal": relative_position_bias_by_where}


def reference_rows(q, k, v, mask_mod, rows, score_mod=None):
    """float32 attention for the given query rows; q [S, Hq, D], k/v [S, Hkv, D] -> [rows, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    qs = q[rows].float().transpose(0, 1)                         # [Hq, r, D]
    ks = k.float().repeat_interleave(g, 1).transpose(0, 1)       # [Hq, S, D]
    vs = v.float().repeat_interleave(g, 1).transpose(0, 1)
    s = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
    zero = torch.zeros(1, 1, 1, dtype=INDEX_DTYPE, device=q.device)
    kv = torch.arange(k.shape[0], device=q.device, dtype=INDEX_DTYPE).view(1, 1, -1)
    heads = torch.arange(q.shape[1], device=q.device, dtype=INDEX_DTYPE).view(-1, 1, 1)
    if score_mod is not None:
        s = score_mod(s, zero, heads, rows.to(INDEX_DTYPE).view(1, -1, 1), kv)
    m = evaluate_mask_mod(mask_mod, zero, heads, rows.to(INDEX_DTYPE).view(1, -1, 1), kv)  # [Hq, rows, S]
    s = s.masked_fill(~m, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return (p @ vs).transpose(0, 1)


def rel_error(out_rows, ref):
    return ((out_rows.float() - ref).norm() / ref.norm()).item()


def bench_case(name, seq_len, head_dim, mask_mod, native_kwargs, sdpa_causal, heads_q=32, heads_kv=8,
               dtype=torch.bfloat16, with_flex=True, score_mod=None, device="cuda", profile=False,
               fa4_score_mod=None):
    """The rows of one case. device is "cuda" but for the CPU tests of this orchestration, which
    run it on the CPU model of FlashInfer's kernels. profile: every timed row also gets its host
    time, GPU kernels (profile.py), and our call replayed from a CUDA graph is timed beside.
    fa4_score_mod: the score_mod as FA4 flex takes it (fa4_score_mods), else score_mod."""
    import flashinfer
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask  # eager: built once
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    dev = device
    gen = torch.Generator(device=dev).manual_seed(SEED)
    q = torch.randn(seq_len, heads_q, head_dim, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(seq_len, heads_kv, head_dim, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(seq_len, heads_kv, head_dim, device=dev, dtype=dtype, generator=gen)
    rows = torch.sort(torch.randperm(seq_len, device=dev, generator=gen)[:CHECK_ROWS]).values
    ref = reference_rows(q, k, v, mask_mod, rows, score_mod)

    flex = FlexFlashInfer(device=dev, backend="flashinfer")   # never a silent fallback to the reference
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    flex.prepare(mask_fn=mask_mod, seq_len_q=seq_len, seq_len_kv=seq_len, num_qo_heads=heads_q,
                 num_kv_heads=heads_kv, head_dim=head_dim, dtype=dtype, score_mod=score_mod)  # compiles / warms
    start.record()
    flex.prepare(mask_fn=mask_mod, seq_len_q=seq_len, seq_len_kv=seq_len, num_qo_heads=heads_q,
                 num_kv_heads=heads_kv, head_dim=head_dim, dtype=dtype, score_mod=score_mod)
    end.record()
    end.synchronize()
    prepare_ms = start.elapsed_time(end)
    pairs = count_visible_pairs(flex.block_mask)
    plan = flex._prepared.segments[0].plan
    route = plan.route if plan is not None else "reference"

    impls = {"flex_flash_infer": lambda: flex(q, k, v)}
    if profile:   # the same call without its host work: tells a host-bound route from a slow kernel
        impls["ours_cuda_graph"] = graphed(impls["flex_flash_infer"])
    per_head = mask_dependence(mask_mod, 1, heads_q, 4, 4, dev)[1]
    if native_kwargs is not None:
        impls["flashinfer_native"] = lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, **native_kwargs)
    if name == "causal":
        # FlashInfer's batch ragged kernel on the same one sequence: the kernel the compiled
        # score_mod variants run in, so the score_mod rows can be told apart from its own cost
        ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev),
                                                                 "NHD", backend="fa3")
        indptr = torch.tensor([0, seq_len], dtype=torch.int32, device=dev)
        ragged.plan(indptr, indptr, heads_q, heads_kv, head_dim, causal=True, q_data_type=dtype, kv_data_type=dtype)
        impls["flashinfer_ragged_native"] = lambda: ragged.run(q, k, v)
    if with_flex:
        build = time.time()
        if per_head and seq_len > 8192:
            # torch's eager build holds a dense [heads, S, S] mask (34 GB at 32768 tokens, 32 heads);
            # a torch user there builds it compiled, in chunks. The peers take this library's tiles
            # as torch's BlockMask instead: the same tiles (bench --plan compares them), so the same
            # kernel work
            tbm = flex.block_mask.to_torch()
        else:
            tbm = torch_create_block_mask(mask_mod, None, heads_q if per_head else None, seq_len, seq_len, device=dev)
        torch.cuda.synchronize()
        print(f"    torch create_block_mask (eager): {time.time() - build:.1f} s", flush=True)
        # static shapes, as a process compiling for this one shape gets: left automatic, dynamo
        # recompiles the cases after the first with dynamic sizes (one kernel reused across cases,
        # and "ShapeAsConstantBuffer" lowering errors with a captured table, seen on the H200)
        compiled = torch.compile(torch_flex_attention, dynamic=False)
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        impls["torch_flex"] = lambda: compiled(qh, kh, vh, score_mod=score_mod, block_mask=tbm,
                                               enable_gqa=True)[0].transpose(0, 1)
        # the same call on FlashAttention-4's kernels, as a Hopper user who installed flash-attn-4
        # runs it: one compile per mask, static shapes, torch's own block mask
        missing = fa4_missing()
        if missing:
            impls["torch_flex_fa4"] = raising(RuntimeError(missing))
        else:
            fa4 = torch.compile(functools.partial(torch_flex_attention, kernel_options={"BACKEND": "FLASH"}),
                                dynamic=False)
            impls["torch_flex_fa4"] = lambda: fa4(qh, kh, vh, score_mod=fa4_score_mod or score_mod, block_mask=tbm,
                                                  enable_gqa=True)[0].transpose(0, 1)
    if sdpa_causal is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = heads_q // heads_kv
        qh = q.transpose(0, 1).unsqueeze(0).contiguous()
        kh = k.repeat_interleave(g, 1).transpose(0, 1).unsqueeze(0).contiguous()
        vh = v.repeat_interleave(g, 1).transpose(0, 1).unsqueeze(0).contiguous()

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=sdpa_causal)[0].transpose(0, 1)

        impls["sdpa_cudnn"] = sdpa

    results = [{"case": name, "seq_len": seq_len, "heads_q": heads_q, "heads_kv": heads_kv, "head_dim": head_dim,
                "dtype": str(dtype).replace("torch.", ""), "impl": impl, "commit": COMMIT} for impl in impls]
    # every impl checked first (torch flex compiles there), then all timed together
    check_and_time([(row, impls[row["impl"]]) for row in results], lambda out: rel_error(out[rows], ref))
    for row in results:
        impl, fn = row["impl"], impls[row["impl"]]
        if "ms" in row:
            row["tflops"] = 4 * pairs * head_dim * heads_q / (row["ms"] * 1e-3) / 1e12
            if profile:
                profile_row(row, fn)
        if impl == "flex_flash_infer":
            row["route"] = route
            row["prepare_ms"] = prepare_ms
            states = flex.block_mask.states[0]  # every head of a per-head mask
            row["tiles_nonempty"], row["tiles_total"] = int((states != EMPTY).sum()), states.numel()
    return results


def print_table(rows):
    by_case = {}
    for r in rows:
        by_case.setdefault((r["case"], r["seq_len"], r["head_dim"]), {})[r["impl"]] = r
    header = (f"{'case':16s} {'S':>6s} {'D':>4s} {'ours ms':>8s} {'TFLOP/s':>8s} {'fa4 ms':>8s} {'x fa4':>6s} "
              f"{'flex ms':>8s} {'x flex':>7s} {'native':>8s} {'x nat':>6s} {'cudnn':>7s} route")
    print(header)
    print("-" * len(header))
    for (case, s, d), impls in by_case.items():
        ours = impls.get("flex_flash_infer", {})
        def ms(impl):
            return impls.get(impl, {}).get("ms")

        def fmt(x, w=8, p=3):
            return f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}s}"

        o = ours.get("ms")
        ratio_flex = ms("torch_flex") / o if o and ms("torch_flex") else None
        ratio_fa4 = ms("torch_flex_fa4") / o if o and ms("torch_flex_fa4") else None
        ratio_nat = ms("flashinfer_native") / o if o and ms("flashinfer_native") else None
        print(f"{case:16s} {s:6d} {d:4d} {fmt(o)} {fmt(ours.get('tflops'), 8, 0)} {fmt(ms('torch_flex_fa4'))} "
              f"{fmt(ratio_fa4, 6, 2)} {fmt(ms('torch_flex'))} "
              f"{fmt(ratio_flex, 7, 2)} {fmt(ms('flashinfer_native'))} {fmt(ratio_nat, 6, 2)} {fmt(ms('sdpa_cudnn'), 7)} "
              f"{ours.get('route', '')} {ours.get('error', '')}")
        for impl, r in impls.items():
            if "error" in r and impl != "flex_flash_infer":
                print(f"    {impl}: {r['error']}")
            elif impl not in SPEC_IMPLS:
                print(f"    {impl}: {r['ms']:.3f} ms, rel_err {r['rel_err']:.2e}")
            if describe(r):
                print(f"      {impl}: {describe(r)}")


def run_benchmark(seq_lens=(8192, 32768), cases=None, out_path=None, with_flex=True, profile=False,
                  head_dims=(128, 64)):
    import torch._dynamo

    # One compiled flex_attention per mask_mod: lift dynamo's recompile limit (default 8), past
    # which torch silently falls back to the unfused eager path; for this run only.
    with torch._dynamo.config.patch(cache_size_limit=256, accumulated_cache_size_limit=4096):
        return _run_benchmark(seq_lens, cases, out_path, with_flex, profile, head_dims)


def _run_benchmark(seq_lens, cases, out_path, with_flex, profile, head_dims):
    import flashinfer

    device = torch.cuda.get_device_name()
    if out_path is None:
        os.makedirs("benchmarks/results", exist_ok=True)
        out_path = os.path.join("benchmarks", "results", device.replace(" ", "_") + ".json")
    earlier, notes = [], {}
    if os.path.exists(out_path):  # merge with earlier partial runs on the same device
        old = json.load(open(out_path))
        if old.get("device") == device:
            earlier = old["rows"] + old.get("other_rows", [])
            notes = {k: v for k, v in old.items() if k not in RESULT_FIELDS + OLD_FIELDS}
    rows, result, failed = [], None, []
    for seq_len in seq_lens:
        masks = case_masks(seq_len, "cuda")
        for name, (mod, native, sdpa) in masks.items():
            if cases and name not in cases:
                continue
            for d in head_dims:
                t0 = time.time()
                new = case_or_report(failed, f"{name} {seq_len} d{d}", bench_case, name, seq_len, d, mod, native,
                                      sdpa, with_flex=with_flex, profile=profile)
                rows.extend(new)
                print_table(new)
                print(f"    ({time.time() - t0:.0f} s for this case)", flush=True)
                torch.cuda.empty_cache()
                # saved after every case, so that a run cut short keeps what it measured
                result = _save(out_path, device, flashinfer.__version__, earlier, rows, notes)
        fa4_forms = fa4_score_mods("cuda")
        for name, (mask_name, score_mod, native) in score_mod_cases("cuda").items():
            if (cases and name not in cases) or 128 not in head_dims:
                continue
            t0 = time.time()
            new = case_or_report(failed, f"{name} {seq_len}", bench_case, name, seq_len, 128, masks[mask_name][0],
                                  native, None, with_flex=with_flex, score_mod=score_mod, profile=profile,
                                  fa4_score_mod=fa4_forms.get(name))
            rows.extend(new)
            print_table(new)
            print(f"    ({time.time() - t0:.0f} s for this case)", flush=True)
            result = _save(out_path, device, flashinfer.__version__, earlier, rows, notes)
    print()
    print_table(rows)
    for what in failed:
        print(f"FAILED case (no rows written; earlier rows kept): {what}")
    print(f"wrote {out_path}")
    return result


def case_or_report(failed: list, what: str, case, *args, **kwargs) -> list:
    """A case's rows; a case that raises (a kernel that fails to build, say) is printed with its
    error and the run goes on to the next case."""
    try:
        return case(*args, **kwargs)
    except Exception as e:
        import traceback

        traceback.print_exc()
        failed.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
        print(f"    FAILED {failed[-1]}", flush=True)
        return []


# the speed issue's file: "rows" hold its four implementations; the library's alternative routes
# and extra peers timed beside them go to "other_rows"
SPEC_IMPLS = ("flex_flash_infer", "torch_flex", "torch_flex_fa4", "flashinfer_native", "sdpa_cudnn")
RESULT_FIELDS = ("device", "torch", "flashinfer", "date", "rows", "other_rows")
# written by earlier versions, dropped when a file is rewritten
OLD_FIELDS = ("switches",)


def _save(out_path, device, flashinfer_version, earlier, rows, notes=None):
    """Write the merged results: this run's rows replace earlier ones of the same case and impl;
    top-level keys the file had besides the result fields (a note on the runs) are kept."""
    keep = {(r["case"], r["seq_len"], r["head_dim"], r["impl"]) for r in rows}
    merged = [r for r in earlier if (r["case"], r["seq_len"], r["head_dim"], r["impl"]) not in keep] + rows
    result = {**(notes or {}), "device": device, "torch": torch.__version__, "flashinfer": flashinfer_version,
              "date": datetime.date.today().isoformat(),
              "rows": [r for r in merged if r["impl"] in SPEC_IMPLS],
              "other_rows": [r for r in merged if r["impl"] not in SPEC_IMPLS]}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def markdown_table(result: dict) -> str:
    """The benchmark JSON as a Markdown table: one line per case, times in ms."""
    cases = {}
    for r in result["rows"]:
        cases.setdefault((r["case"], r["seq_len"], r["head_dim"]), {})[r["impl"]] = r
    order = list(case_masks(1)) + list(score_mod_cases())

    def key(item):
        (case, s, d) = item[0]
        return (s, order.index(case) if case in order else 99, -d)

    lines = [f"{result['device']}, torch {result['torch']}, flashinfer {result['flashinfer']}, {result['date']}; "
             "bf16, batch 1, 32 query / 8 KV heads. ms = median; TFLOP/s counts visible pairs only; "
             "tile estimate = the full mask's time x the share of non-empty 128x128 tiles (its whole-tile "
             "work alone), and ours / estimate should stay under 1.20.", "",
             "| case | S | D | route | ours ms | TFLOP/s | FA4 flex ms | vs FA4 | Triton flex ms | vs Triton "
             "| FlashInfer native ms | vs native | cuDNN ms | ours / tile estimate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    speedups, fa4_speedups, score_costs = [], [], []
    for (case, s, d), impls in sorted(cases.items(), key=key):
        ours = impls.get("flex_flash_infer", {})

        def ms(impl):
            r = impls.get(impl, {})
            return r.get("ms")

        def cell(x, fmt="{:.3f}"):
            return fmt.format(x) if x is not None else "-"

        o = ours.get("ms")
        flex, fa4, native = ms("torch_flex"), ms("torch_flex_fa4"), ms("flashinfer_native")
        full_ms = cases.get(("full", s, d), {}).get("flex_flash_infer", {}).get("ms")
        estimate = (full_ms * ours["tiles_nonempty"] / ours["tiles_total"]
                    if full_ms and "tiles_nonempty" in ours else None)
        note = ours.get("error", "")
        for peer in ("torch_flex", "torch_flex_fa4"):
            if "error" in impls.get(peer, {}):
                note += f" {peer}: " + impls[peer]["error"][:60]
        lines.append(
            f"| {case} | {s} | {d} | {ours.get('route', '-')} | {cell(o)} | {cell(ours.get('tflops'), '{:.0f}')} | "
            f"{cell(fa4)} | {cell(fa4 / o if o and fa4 else None, '{:.2f}x')} | "
            f"{cell(flex)} | {cell(flex / o if o and flex else None, '{:.2f}x')} | {cell(native)} | "
            f"{cell(native / o if o and native else None, '{:.2f}x')} | {cell(ms('sdpa_cudnn'))} | "
            f"{cell(o / estimate if o and estimate else None, '{:.2f}')} |" + (f" {note}" if note else ""))
        label = f"{case} {s}" + (f" d{d}" if d != 128 else "")
        if o and flex and case in ISSUE_CASES:
            speedups.append((label, flex / o))
        if o and fa4:
            fa4_speedups.append((label, fa4 / o))
        plain_row = cases.get((case.split("+")[-1], s, d), {}).get("flex_flash_infer", {})
        plain = plain_row.get("ms")
        if "+" in case and o and plain:
            # rows of another commit came from another run (process, and maybe timing method)
            other_run = plain_row.get("commit") != ours.get("commit")
            score_costs.append(f"{case} {s} {o / plain:.2f}x" + (" (plain row from another run)" if other_run else ""))
    if speedups:
        geomean = math.exp(sum(math.log(x) for _, x in speedups) / len(speedups))
        under = [f"{name} ({x:.2f}x)" for name, x in speedups if x < 1.25]
        lines += ["", f"The speed issue's mask cases ({', '.join(ISSUE_CASES)}): geometric mean speed-up over torch "
                      f"flex {geomean:.2f}x over {len(speedups)} rows; under 1.25x: {', '.join(under) or 'none'}."]
    if fa4_speedups:
        geomean = math.exp(sum(math.log(x) for _, x in fa4_speedups) / len(fa4_speedups))
        under = [f"{name} ({x:.2f}x)" for name, x in fa4_speedups if x < 1.0]
        lines += ["", f"Against torch flex on FlashAttention-4: geometric mean speed-up {geomean:.2f}x over "
                      f"{len(fa4_speedups)} rows; slower than it: {', '.join(under) or 'none'}."]
    if score_costs:
        lines += ["", "score_mod rows, our time over the same mask without a score_mod: " + ", ".join(score_costs) + "."]
    return "\n".join(lines)
