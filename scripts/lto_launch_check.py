"""The first GPU run of lto_variants' per-score_mod modules, in one go:
does the module launch, is it right, how fast are its kernels, what does a new score_mod cost here.

  1. the generic objects (bf16, head_dim 128, no window, mask modes 0 and 1) from the carried pack
     (.ltopack/generic.tar.xz, scripts/lto_pack.py) when its manifest names the module this machine
     generates, else built here (timed); a carried libnvJitLink (.ltopack*/libnvJitLink.so.xz) is
     offered to lto_variants.nvjitlink_library beside this machine's own (the newest wins);
  2. per score_mod (softcap, a per-head relative-position bias; flex_flash_infer.mods): its .so
     from an empty per-score cache, timed by step, loaded by FlashInfer's loader (JitSpec.load);
  3. per case (ragged and paged prefill; 2 requests of 1000 and 3000 tokens, 8 query / 2 key
     heads, causal and not): FlashInfer's wrapper on that module, run with the generic arguments
     (lto_variants.run_arguments: unused table slots None), against the library's reference
     backend in float32, against today's module of the same score_mod in the same launch (its
     own jit_args), and against flex_attention(..., backend="flashinfer") per request (ragged);
  4. both modules' kernels timed in the same launches, interleaved rounds (triton's do_bench,
     else CUDA events), at the check shape and a long one (2 x 8192 tokens, 32 / 8 heads);
  5. with --time-generic-build: the generic objects built again here in a scratch folder (the
     once-per-(dtype, head_dim) cost on this host); if a case with the pack's objects failed, the
     cases are run again with these.

Every step is caught and recorded; an output off by more than --tol (relative L2) is "WRONG".
Prints a table, writes JSON (device, versions, commit, date, rows), exits 1 on any WRONG or error.

    python3 scripts/lto_launch_check.py [--out F] [--time-generic-build] [--rounds 5]
(the pipeline's lto-check stage: bash scripts/gpu_pipeline.sh start lto-check)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from flex_flash_infer.compile import lto_pack, lto_variants as L  # noqa: E402
import lto_timing  # noqa: E402
from flex_flash_infer.compile.codegen import POSITION_BOUND  # noqa: E402
from flex_flash_infer.core.trace import trace  # noqa: E402

DTYPE, HEAD_DIM = torch.bfloat16, 128
CHECK_SHAPE = {"lens": [1000, 3000], "hq": 8, "hkv": 2}
LONG_SHAPE = {"lens": [8192, 8192], "hq": 32, "hkv": 8}
PAGE_SIZE = 16
REACH = 64


def sh(cmd) -> str:
    try:
        return subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e!r})"


class Recorder:
    def __init__(self):
        self.errors, self.rows, self.steps = [], [], {}

    def guard(self, what: str, fn, *args, **kwargs):
        """fn's result, or None with the exception recorded under what."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc()
            print(f"!!! {what}: {e!r}\n{tb[-3000:]}", flush=True)
            self.errors.append({"what": what, "error": repr(e)[:4000], "traceback": tb[-6000:]})
            return None


# --- score_mods and inputs --------------------------------------------------------------------

def make_mod(name: str, hq: int, device="cuda"):
    from flex_flash_infer import mods
    from flex_flash_infer.tools.warmup import without_soft_cap_hint

    if name == "softcap":
        # without the hint that sends the library's softcap to FlashInfer's own soft cap: today's
        # compiled module of it then runs, as a user's own softcap would
        return without_soft_cap_hint(mods.generate_softcap_score_mod(30.0))
    g = torch.Generator().manual_seed(7)
    return mods.generate_relative_position_bias_score_mod(torch.randn(hq, 2 * REACH + 1, generator=g).to(device))


def make_inputs(shape, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    total = sum(shape["lens"])
    q = torch.randn(total, shape["hq"], HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    k = torch.randn(total, shape["hkv"], HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    v = torch.randn(total, shape["hkv"], HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    indptr = torch.tensor([0] + list(torch.tensor(shape["lens"]).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, indptr


def paged_layout(k, v, indptr, page_size=PAGE_SIZE):
    """k, v [total, Hkv, D] as pages [num_pages, page_size, Hkv, D] (each request's pages in
    order), with FlashInfer's page tables (host int32)."""
    lens = indptr.diff().tolist()
    pages = [(n + page_size - 1) // page_size for n in lens]
    kp = k.new_zeros(sum(pages), page_size, *k.shape[1:])
    vp = torch.zeros_like(kp)
    p = 0
    for (s, n, m) in zip(indptr[:-1].tolist(), lens, pages):
        flat_k, flat_v = kp[p:p + m].view(-1, *k.shape[1:]), vp[p:p + m].view(-1, *k.shape[1:])
        flat_k[:n], flat_v[:n] = k[s:s + n], v[s:s + n]
        p += m
    page_indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    indices = torch.arange(sum(pages), dtype=torch.int32)
    last = torch.tensor([n - page_size * (m - 1) for n, m in zip(lens, pages)], dtype=torch.int32)
    return kp, vp, page_indptr, indices, last


def reference(q, k, v, indptr, mod, causal):
    """The library's reference backend in float32, request by request: [total, Hq, D] float32."""
    from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn

    outs = []
    for s, e in zip(indptr[:-1].tolist(), indptr[1:].tolist()):
        qr, kr, vr = (x[s:e].transpose(0, 1)[None].float() for x in (q, k, v))
        n = e - s
        bm = create_block_mask(get_mask_fn("causal"), None, None, n, n, device=q.device) if causal else None
        outs.append(flex_attention(qr, kr, vr, score_mod=mod, block_mask=bm, enable_gqa=True,
                                   backend="reference")[0].transpose(0, 1))
    return torch.cat(outs)


def flex_today(q, k, v, indptr, mod, causal):
    """flex_attention(..., backend="flashinfer") request by request (today's route and module)."""
    from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn

    outs = []
    for s, e in zip(indptr[:-1].tolist(), indptr[1:].tolist()):
        qr, kr, vr = (x[s:e].transpose(0, 1)[None].contiguous() for x in (q, k, v))
        n = e - s
        bm = create_block_mask(get_mask_fn("causal"), None, None, n, n, device=q.device) if causal else None
        outs.append(flex_attention(qr, kr, vr, score_mod=mod, block_mask=bm, enable_gqa=True,
                                   backend="flashinfer")[0].transpose(0, 1))
    return torch.cat(outs)


def compare(out, ref) -> dict:
    out, ref = out.double(), ref.double()
    diff = (out - ref)
    return {"rel_l2": float(diff.norm() / ref.norm().clamp_min(1e-30)), "max_abs": float(diff.abs().max()),
            "nan": bool(torch.isnan(out).any()), "bitwise_equal": bool(torch.equal(out, ref))}


# --- the two modules behind FlashInfer's wrappers ---------------------------------------------

def today_jit_args(graph):
    from flex_flash_infer.compile.variant import fa3_score_mod_variant

    spec = fa3_score_mod_variant(graph, POSITION_BOUND)
    # the name ScoreModBands gives it, so a prebuilt one (.aotpack) or the warm-up's is found
    uri = f"ffi_{hashlib.sha256(spec.decl.encode()).hexdigest()[:16]}_{str(DTYPE).split('.')[-1]}_d{HEAD_DIM}_noswa"
    return spec.jit_args(uri, DTYPE, HEAD_DIM, torch.int32, False)


def lto_jit_args(name: str):
    return L.generic_spec().jit_args(name, DTYPE, HEAD_DIM, torch.int32, False)


def make_wrapper(kind: str, workspace, jit_args, loaded=None):
    """FlashInfer's ragged or paged prefill wrapper on fa3 with a custom module: today's, built
    (or found) by FlashInfer from jit_args; or `loaded` (the LTO .so, already loaded), handed to
    the wrapper in place of FlashInfer's build, with jit_args naming its arguments."""
    import flashinfer
    import flashinfer.prefill as prefill

    cls = (flashinfer.BatchPrefillWithRaggedKVCacheWrapper if kind == "ragged"
           else flashinfer.BatchPrefillWithPagedKVCacheWrapper)
    if loaded is None:
        return cls(workspace, "NHD", backend="fa3", jit_args=jit_args)
    original = prefill.get_customize_batch_prefill_module
    prefill.get_customize_batch_prefill_module = lambda *a, **k: loaded
    try:
        return cls(workspace, "NHD", backend="fa3", jit_args=jit_args)
    finally:
        prefill.get_customize_batch_prefill_module = original


def planned(kind, wrapper, shape, indptr, causal, pages=None):
    common = dict(causal=causal, q_data_type=DTYPE, kv_data_type=DTYPE, o_data_type=DTYPE, disable_split_kv=True)
    if kind == "ragged":
        wrapper.plan(indptr, indptr, shape["hq"], shape["hkv"], HEAD_DIM, **common)
    else:
        _, _, page_indptr, indices, last = pages
        wrapper.plan(indptr, page_indptr, indices, last, shape["hq"], shape["hkv"], HEAD_DIM, PAGE_SIZE, **common)
    return wrapper


class Launch:
    """One planned launch of one module: call() runs it on the case's inputs."""

    def __init__(self, kind, wrapper, q, kv, tables, extra):
        self.kind, self.wrapper, self.q, self.kv, self.tables, self.extra = kind, wrapper, q, kv, tables, extra

    def __call__(self):
        if self.kind == "ragged":
            return self.wrapper.run(self.q, *self.kv, *self.tables, *self.extra)
        return self.wrapper.run(self.q, self.kv, *self.tables, *self.extra)


def request_tables(indptr, device="cuda"):
    n = indptr.numel() - 1
    zeros = torch.zeros(n, dtype=torch.int32, device=device)
    return [zeros, zeros.clone(), torch.arange(n, dtype=torch.int32, device=device)]


def launches(kind, shape, inputs, graph, mod, causal, lto, today_args, workspace):
    """{"lto": Launch, "today": Launch} for one case (lto: (jit_args, loaded module) or None)."""
    from flex_flash_infer.compile.variant import graph_values

    q, k, v, indptr = inputs
    scale = HEAD_DIM ** -0.5
    tensors, values = graph_values(graph, q.device)
    tables = request_tables(indptr)
    pages = paged_layout(k, v, indptr) if kind == "paged" else None
    kv = (k, v) if kind == "ragged" else (pages[0], pages[1])
    out = {}
    if lto is not None:
        w = planned(kind, make_wrapper(kind, workspace, lto[0], lto[1]), shape, indptr, causal, pages)
        out["lto"] = Launch(kind, w, q, kv, tables, L.run_arguments(graph, list(tensors), values, scale))
    if today_args is not None:
        w = planned(kind, make_wrapper(kind, workspace, today_args), shape, indptr, causal, pages)
        out["today"] = Launch(kind, w, q, kv, tables, [*tensors, float(scale), *values])
    return out


def bench(fns: dict, rounds: int) -> dict:
    """Median ms of each fn over interleaved rounds (order alternating), with triton's do_bench
    when present (its own warm-up, L2 flush, median), else CUDA events over 20 calls."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None

    def events(fn):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(do_bench(fns[n], warmup=25, rep=100, return_mode="median") if do_bench else events(fns[n]))
    return {n: {"median_ms": round(statistics.median(t), 4), "rounds_ms": [round(x, 4) for x in t],
                "timer": "triton.do_bench median" if do_bench else "cuda events / 20"} for n, t in times.items()}


# --- the LTO module ---------------------------------------------------------------------------

def lto_module_for(module, graph, rec: Recorder, label: str, jobs: int):
    """Build the score_mod's .so from an empty per-score cache (timed by step) and load it with
    FlashInfer's loader; (jit_args, loaded module, info) or None."""
    key, cubins, so, info = lto_timing.score_mod_build(module, graph, POSITION_BOUND, jobs)
    s3 = time.perf_counter()
    loaded = module.spec.load(so)   # FlashInfer's loader: tvm_ffi.load_module (+ its adapter)
    info["load (s)"] = round(time.perf_counter() - s3, 3)
    info.update(key=key, so=str(so), so_bytes=so.stat().st_size, nvjitlink=L.nvjitlink_library())
    tool = shutil.which("cuobjdump")
    if tool:
        info["registers"] = {c.stem: [int(r) for r in re.findall(r"REG:(\d+)", sh([tool, "-res-usage", str(c)]))]
                             for c in cubins}
    # a name of its own for FlashInfer's custom-op registration (flashinfer::{name}_ragged_run)
    name = f"{module.name}_{key}" + ("" if label == "lto" else f"_{label.replace('-', '_')}")
    return lto_jit_args(name), loaded, info


def run_cases(rec, label, lto_by_mod, today_by_mod, graphs, mods_by_name, workspace, args):
    """Every (score_mod, route, causal) case at the check shape; a row each."""
    rows = []
    inputs = make_inputs(CHECK_SHAPE)
    for name in graphs:
        for kind in ("ragged", "paged"):
            for causal in (False, True):
                case = f"{name} {kind} {'causal' if causal else 'full'}"
                row = {"case": case, "module": label, "score_mod": name, "route": kind, "causal": causal,
                       "shape": CHECK_SHAPE}

                def one():
                    lto = lto_by_mod.get(name)
                    runs = launches(kind, CHECK_SHAPE, inputs, graphs[name], mods_by_name[name], causal,
                                    lto[:2] if lto else None, today_by_mod.get(name), workspace)
                    ref = reference(*inputs, mods_by_name[name], causal)
                    outs = {}
                    for which, launch in runs.items():
                        o = rec.guard(f"{label}: {case}: {which} run", launch)
                        torch.cuda.synchronize()
                        if o is not None:
                            outs[which] = o
                            row[f"{which} vs reference"] = compare(o, ref)
                    if "lto" in outs and "today" in outs:
                        row["lto vs today"] = compare(outs["lto"], outs["today"])
                    if kind == "ragged" and "lto" in outs and args.flex:
                        f = rec.guard(f"{label}: {case}: flex_attention flashinfer", flex_today, *inputs,
                                      mods_by_name[name], causal)
                        if f is not None:
                            row["lto vs flex_attention(flashinfer)"] = compare(outs["lto"], f)
                    if "lto" in runs and "today" in runs and args.rounds:
                        row["kernel ms"] = bench({w: runs[w] for w in ("lto", "today") if w in outs}, args.rounds)
                    verdict(row, args.tol, "lto" in runs)

                rec.guard(f"{label}: {case}", one)
                row.setdefault("verdict", "ERROR")
                rows.append(row)
                print(table_line(row), flush=True)
    return rows


def verdict(row, tol, has_lto):
    bad = [k for k, v in row.items() if k.endswith(("vs reference", "vs today", "(flashinfer)"))
           and (v["nan"] or not v["rel_l2"] <= tol)]
    if bad:
        row["verdict"] = "WRONG: " + ", ".join(bad)
    elif has_lto and "lto vs reference" not in row:
        row["verdict"] = "ERROR: the LTO module did not run"
    else:
        row["verdict"] = "ok"


def table_line(row) -> str:
    def rel(k):
        return f"{row[k]['rel_l2']:.2e}" if k in row else "-"
    ms = row.get("kernel ms", {})
    t = " / ".join(f"{ms[w]['median_ms']:.4f}" if w in ms else "-" for w in ("lto", "today"))
    return (f"| {row['case']:<24} | {row['module']:<9} | {rel('lto vs reference'):>9} | {rel('today vs reference'):>9} | "
            f"{rel('lto vs today'):>9} | {rel('lto vs flex_attention(flashinfer)'):>9} | {t:>17} | {row.get('verdict', '?')} |")


HEADER = ("| case                     | module    | lto~ref   | today~ref | lto~today | lto~flex  | kernel ms lto/today | verdict |\n"
          "|---|---|---|---|---|---|---|---|")


def long_timings(rec, lto_by_mod, today_by_mod, workspace, rounds):
    rows = []
    inputs = make_inputs(LONG_SHAPE, seed=1)
    for name in lto_by_mod:
        if name not in today_by_mod:
            continue
        mod = make_mod(name, LONG_SHAPE["hq"])
        graph = trace(mod, "score_mod")
        for causal in (False, True):
            def one():
                runs = launches("ragged", LONG_SHAPE, inputs, graph, mod, causal, lto_by_mod[name][:2],
                                today_by_mod[name], workspace)
                outs = {w: runs[w]() for w in runs}
                row = {"case": f"{name} ragged {'causal' if causal else 'full'} long", "shape": LONG_SHAPE,
                       "lto vs today": compare(outs["lto"], outs["today"]), "kernel ms": bench(runs, rounds)}
                ms = row["kernel ms"]
                row["lto / today"] = round(ms["lto"]["median_ms"] / ms["today"]["median_ms"], 4)
                rows.append(row)
                print(f"{row['case']}: lto {ms['lto']['median_ms']:.4f} ms, today {ms['today']['median_ms']:.4f} ms, "
                      f"ratio {row['lto / today']}, lto~today {row['lto vs today']['rel_l2']:.2e}", flush=True)
            rec.guard(f"long timing {name} {causal}", one)
    return rows


# --- main -------------------------------------------------------------------------------------

def pack_dirs():
    return sorted(p for p in ROOT.glob(".ltopack*") if p.is_dir())


def setup_nvjitlink(rec, work: pathlib.Path) -> dict:
    info = {"own": None, "carried": None}
    env = os.environ.pop("FFI_NVJITLINK", None)
    info["own"] = rec.guard("nvjitlink (this machine's)", L.nvjitlink_library)
    for d in pack_dirs():
        lib = rec.guard(f"unpack nvjitlink from {d}", lto_pack.unpack_library, d, work / "nvjitlink")
        if lib is not None:
            os.environ["FFI_NVJITLINK"] = str(lib)
            info["carried"] = str(lib)
            break
    else:
        if env:
            os.environ["FFI_NVJITLINK"] = env
    for k in ("own", "carried"):
        if info[k]:
            info[f"{k} version"] = L._nvjitlink_version(info[k])
    info["chosen"] = rec.guard("nvjitlink (chosen)", L.nvjitlink_library)
    return info


def generic(rec, args, jobs):
    """The GenericModule with its objects in place: from the pack, else built here (timed)."""
    module = L.GenericModule(DTYPE, HEAD_DIM, use_sliding_window=False)
    info = {"name": module.name, "nvcc": ".".join(L._nvcc_version(module.nvcc)), "source": None}
    pack = ROOT / ".ltopack"
    if args.generic in ("auto", "pack") and (pack / lto_pack.PACK_NAME).exists():
        manifest = rec.guard("unpack the generic objects", lto_pack.unpack, pack, module.name,
                             lto_pack.module_files(module), overwrite=True, sources_tag=module.sources_tag)
        if manifest is not None:
            meta = manifest["meta"]
            info.update(source="pack", pack_nvcc=meta.get("nvcc"), pack_commit=meta.get("commit"),
                        pack_built_on=meta.get("built_on"), pack_build_times=meta.get("build_times"))
            if meta.get("nvcc") != info["nvcc"]:
                print(f"note: the pack's objects are from nvcc {meta.get('nvcc')}, this machine's is {info['nvcc']}",
                      flush=True)
        elif args.generic == "pack":
            raise SystemExit("no usable pack (--generic pack)")
    if info["source"] is None:
        per_file = {}
        start = time.perf_counter()
        module.build(jobs, per_file)
        info.update(source="built here", build_wall_s=round(time.perf_counter() - start, 2), jobs=jobs,
                    per_file_s=per_file)
    return module, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "lto-check.json"))
    parser.add_argument("--generic", choices=("auto", "pack", "build"), default="auto")
    parser.add_argument("--time-generic-build", action="store_true",
                        help="after the checks, build the generic objects again here (scratch folder), timed")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--no-long", dest="long", action="store_false", help="skip the long timing shape")
    parser.add_argument("--no-flex", dest="flex", action="store_false",
                        help="skip flex_attention(backend='flashinfer') (it may compile other modules)")
    parser.add_argument("--tol", type=float, default=1e-2, help="relative L2 error allowed (bf16)")
    parser.add_argument("--mods", nargs="+", default=["softcap", "rel_bias"])
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    work = pathlib.Path(os.environ.get("LTO_CHECK_WORK", "/tmp/lto-check"))
    work.mkdir(parents=True, exist_ok=True)
    rec = Recorder()
    import flashinfer

    result = {
        "what": "EXPERIMENT issue 23: lto_variants' per-score_mod module launched on a GPU (scripts/lto_launch_check.py)",
        "device": torch.cuda.get_device_name(), "host": platform.node(), "cores": os.cpu_count(), "jobs": jobs,
        "torch": torch.__version__, "cuda": torch.version.cuda, "flashinfer": flashinfer.__version__,
        "nvcc": sh("nvcc --version | tail -n 2"), "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
        "commit": (ROOT / "SOURCE_COMMIT").read_text().strip() if (ROOT / "SOURCE_COMMIT").exists()
        else sh(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "tol_rel_l2": args.tol,
        "check_shape": CHECK_SHAPE, "long_shape": LONG_SHAPE, "page_size": PAGE_SIZE,
    }
    out = pathlib.Path(args.out)

    def save():
        result.update(errors=rec.errors, steps=rec.steps, rows=rec.rows)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    result["nvjitlink"] = setup_nvjitlink(rec, work)
    gen = rec.guard("generic objects", generic, rec, args, jobs)
    module = None
    if gen is not None:
        module, result["generic"] = gen
        print("generic:", json.dumps(result["generic"], default=str), flush=True)
    save()

    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    mods_by_name = {n: make_mod(n, CHECK_SHAPE["hq"]) for n in args.mods}
    graphs = {n: trace(m, "score_mod") for n, m in mods_by_name.items()}

    def lto_modules(mod_obj, label):
        by_mod = {}
        for n, g in graphs.items():
            built = rec.guard(f"{label}: build + load {n}", lto_module_for, mod_obj, g, rec, label, jobs)
            if built is not None:
                by_mod[n] = built
                rec.steps[f"{label}: new score_mod {n}"] = built[2]
                print(f"{label} {n}: {json.dumps(built[2], default=str)}", flush=True)
        return by_mod

    lto_by_mod = lto_modules(module, "lto") if module is not None else {}
    save()

    # today's module of each score_mod: found prebuilt (.aotpack, an earlier warm-up) or built now
    today_by_mod = {}
    for n, g in graphs.items():
        def today(g=g, n=n):
            jit_args = today_jit_args(g)
            aot = getattr(__import__("flashinfer.jit.env", fromlist=["x"]), "FLASHINFER_AOT_DIR", None)
            prebuilt = bool(aot and list(pathlib.Path(aot).glob(f"{jit_args[0]}*/*.so")))
            start = time.perf_counter()
            make_wrapper("ragged", workspace, jit_args)   # FlashInfer builds or loads it
            rec.steps[f"today's module {n}"] = {"uri": jit_args[0], "prebuilt (aot)": prebuilt,
                                                "first wrapper (s)": round(time.perf_counter() - start, 2)}
            print(f"today {n}:", rec.steps[f"today's module {n}"], flush=True)
            return jit_args
        r = rec.guard(f"today's module {n}", today)
        if r is not None:
            today_by_mod[n] = r
    save()

    print(HEADER, flush=True)
    rec.rows += run_cases(rec, "lto", lto_by_mod, today_by_mod, graphs, mods_by_name, workspace, args)
    save()
    if args.long and args.rounds:
        result["long"] = long_timings(rec, lto_by_mod, today_by_mod, workspace, args.rounds)
        save()

    if args.time_generic_build and module is not None:
        fresh = copy.copy(module)
        fresh.build_dir = work / "fresh" / module.name
        shutil.rmtree(fresh.build_dir.parent, ignore_errors=True)
        fresh.build_dir.mkdir(parents=True)
        per_file = {}
        start = time.perf_counter()
        errors_before = len(rec.errors)
        rec.guard("generic objects built here (scratch)", fresh.build, jobs, per_file)
        if len(rec.errors) == errors_before:
            rec.steps["generic objects built here"] = {"wall (s)": round(time.perf_counter() - start, 2),
                                                       "jobs": jobs, "per file (s)": per_file}
            print("generic objects built here:", rec.steps["generic objects built here"], flush=True)
            failed = [r for r in rec.rows if r["module"] == "lto" and r.get("verdict") != "ok"]
            if failed and result.get("generic", {}).get("source") == "pack":
                print(f"{len(failed)} case(s) failed with the pack's objects: again with these", flush=True)
                local = lto_modules(fresh, "lto-local")
                print(HEADER, flush=True)
                rec.rows += run_cases(rec, "lto-local", local, today_by_mod, graphs, mods_by_name, workspace,
                                      argparse.Namespace(**{**vars(args), "rounds": min(args.rounds, 2), "flex": False}))
        save()

    wrong = [r for r in rec.rows if r.get("verdict", "").startswith("WRONG")]
    print("\n" + HEADER)
    for r in rec.rows:
        print(table_line(r))
    for n, s in rec.steps.items():
        print(f"{n}: {json.dumps(s, default=str)}")
    print(f"\n{len(rec.rows)} cases, {len(wrong)} WRONG, {len(rec.errors)} errors; wrote {out}")
    if wrong:
        print("!!! WRONG OUTPUTS: " + "; ".join(f"{r['case']} ({r['module']}): {r['verdict']}" for r in wrong))
    save()
    return 1 if wrong or rec.errors else 0


if __name__ == "__main__":
    sys.exit(main())
