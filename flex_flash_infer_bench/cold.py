"""First use (issue 23): how long a user waits the first time, from an empty compile cache.

Each item runs in a fresh Python process whose FlashInfer JIT cache (FLASHINFER_WORKSPACE_BASE),
torch inductor cache and Triton cache are new empty folders, so nothing compiled by an earlier
item or run is reused; FlashInfer's prebuilt modules (its package's data/aot, what the
flashinfer-jit-cache wheel or scripts/prebuild_kernels.sh provide) are used when installed, and the
JSON counts them. Each item prints the seconds of its first call (or calls) as JSON on its last line;
the wall time of the whole process is kept beside it.

Items: the README's main job; the first call of each route (bands causal and window, key columns,
tiles, per-head bands, paged decode); a new score_mod; an edited score_mod (a second, never-seen
score_mod after a first one in the same process); a new mask on a route already built in the
same process (should compile nothing); `warmup`; torch flex's first call on Triton and on
FlashAttention-4. bf16, batch 1, 8 query / 2 KV heads, head_dim 128, 4096 tokens (paged: 8
requests of 4096 keys).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from .provenance import source_commit

SETUP = """
import json, time, torch
from flex_flash_infer import FlexFlashInfer, PagedFlexAttention, flex_attention, create_block_mask, get_mask_fn
dev, dt, S, H, HKV, D = "cuda", torch.bfloat16, 4096, 8, 2, 128
q = torch.randn(1, H, S, D, device=dev, dtype=dt)
k = torch.randn(1, HKV, S, D, device=dev, dtype=dt)
v = torch.randn(1, HKV, S, D, device=dev, dtype=dt)
def first(fn):
    t = time.time(); fn(); torch.cuda.synchronize(); return time.time() - t
def ours(mask_mod, score_mod=None, heads=None):
    bm = create_block_mask(mask_mod, None, heads, S, S, device=dev)
    return lambda: flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, backend="flashinfer")
table = torch.tensor([128, 256, 512, 1024], device=dev)
def per_head(b, h, qi, kv):
    return (qi >= kv) & (qi - kv < table[h % 4])
"""

ITEMS = {
    "readme_main_job": None,   # python -m flex_flash_infer, timed as a whole process
    "bands_causal": "result = {'s': first(ours(get_mask_fn('causal')))}",
    "bands_window": "result = {'s': first(ours(get_mask_fn('sliding_window', window_size=1024)))}",
    "key_columns": "result = {'s': first(ours(get_mask_fn('streaming', sink_size=4, window_size=1024)))}",
    "tiles": ("g = torch.Generator(device=dev).manual_seed(0)\n"
              "keep = torch.rand(S // 128, S // 128, device=dev, generator=g) < 0.3\n"
              "result = {'s': first(ours(lambda b, h, qi, kv: keep[qi // 128, kv // 128] & (qi >= kv)))}"),
    "per_head_bands": "result = {'s': first(ours(per_head, heads=H))}",
    "paged_decode": ("R, page = 8, 16\n"
                     "pages = S // page\n"
                     "kc = torch.randn(R * pages, page, HKV, D, device=dev, dtype=dt); vc = torch.randn_like(kc)\n"
                     "tables = (torch.arange(R + 1, device=dev, dtype=torch.int32),\n"
                     "          torch.arange(R + 1, device=dev, dtype=torch.int32) * pages,\n"
                     "          torch.arange(R * pages, device=dev, dtype=torch.int32),\n"
                     "          torch.full((R,), page, device=dev, dtype=torch.int32))\n"
                     "attn = PagedFlexAttention(device=dev, backend='flashinfer')\n"
                     "def step():\n"
                     "    attn.plan(get_mask_fn('sliding_window', window_size=1024), *tables, H, HKV, D, page, dtype=dt)\n"
                     "    attn.run(torch.randn(R, H, D, device=dev, dtype=dt), (kc, vc))\n"
                     "result = {'s': first(step)}"),
    "new_score_mod": ("result = {'s': first(ours(get_mask_fn('causal'),"
                      " lambda s, b, h, qi, kv: s - 0.01 * (h + 1) * (qi - kv).abs()))}"),
    # what a researcher editing a score_mod waits: the process has run one score_mod (on fa3 that
    # built the device-LTO generic objects, or today's module without the toolchain), then the
    # first call of another one never seen (its own link only, with LTO)
    "edited_score_mod": ("first(ours(get_mask_fn('causal'), lambda s, b, h, qi, kv: s - 0.01 * (qi - kv).abs()))\n"
                         "result = {'s': first(ours(get_mask_fn('causal'),"
                         " lambda s, b, h, qi, kv: s + 0.02 * (h + 1) * ((qi - kv) % 7)))}"),
    "new_mask_on_built_route": ("first(ours(get_mask_fn('causal')))\n"
                                "result = {'s': first(ours(lambda b, h, qi, kv: (qi >= kv) & (qi - kv < 3000)))}"),
    "warmup": None,            # python -m flex_flash_infer warmup, timed as a whole process
    "torch_flex_triton": ("from torch.nn.attention.flex_attention import flex_attention as tf, create_block_mask as tcbm\n"
                          "bm = tcbm(lambda b, h, qi, kv: qi >= kv, None, None, S, S, device=dev)\n"
                          "f = torch.compile(tf, dynamic=False)\n"
                          "result = {'s': first(lambda: f(q, k, v, block_mask=bm, enable_gqa=True))}"),
    "torch_flex_fa4": ("import functools\n"
                       "from torch.nn.attention.flex_attention import flex_attention as tf, create_block_mask as tcbm\n"
                       "bm = tcbm(lambda b, h, qi, kv: qi >= kv, None, None, S, S, device=dev)\n"
                       "f = torch.compile(functools.partial(tf, kernel_options={'BACKEND': 'FLASH'}), dynamic=False)\n"
                       "result = {'s': first(lambda: f(q, k, v, block_mask=bm, enable_gqa=True))}"),
}


def item_command(name: str) -> list[str]:
    """The command of one item, run from the repository root."""
    if name == "readme_main_job":
        return [sys.executable, "-m", "flex_flash_infer"]
    if name == "warmup":
        return [sys.executable, "-m", "flex_flash_infer", "warmup"]
    body = SETUP + ITEMS[name] + "\nprint(json.dumps(result))\n"
    return [sys.executable, "-c", body]


def fresh_caches(root: str) -> dict:
    """Environment variables that point every compile cache at new empty folders under root."""
    paths = {"FLASHINFER_WORKSPACE_BASE": "flashinfer", "TORCHINDUCTOR_CACHE_DIR": "inductor",
             "TRITON_CACHE_DIR": "triton"}
    env = {}
    for var, sub in paths.items():
        env[var] = os.path.join(root, sub)
        os.makedirs(env[var])
    return env


def module_builds(flashinfer_root: str) -> dict:
    """{module: {"files": n, "work_s": summed compile seconds, "span_s": first start to last end}}
    of every module FlashInfer built under its fresh workspace (from each build folder's
    .ninja_log): where a first use's compile time went, module by module."""
    builds = {}
    # os.walk: FlashInfer builds under .cache/, which glob's ** passes over (a hidden folder)
    logs = sorted(os.path.join(folder, ".ninja_log") for folder, _, files in os.walk(flashinfer_root)
                  if ".ninja_log" in files)
    for log in logs:
        spans = []
        with open(log) as f:
            for line in f:
                fields = line.split("\t")
                if len(fields) >= 4 and not line.startswith("#"):
                    spans.append((int(fields[0]) / 1000, int(fields[1]) / 1000))
        if spans:
            folder = os.path.dirname(log)
            span = max(end for _, end in spans) - min(start for start, _ in spans)
            builds[os.path.basename(folder)] = {
                "files": len(spans), "work_s": round(sum(end - start for start, end in spans), 1),
                "span_s": round(span, 1)}
            # the log's times count from ninja's start; its last step writes the module's .so,
            # whose modification time places the build on the clock
            made = [os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".so")]
            if made:
                builds[os.path.basename(folder)].update(ended_at=max(made), started_at=max(made) - span)
    return builds


def around_builds(row: dict, start: float, end: float) -> None:
    """The seconds of a process before its first build began and after its last ended (imports,
    planning and the calls themselves), from the builds' clock times; kept out of the printed
    builds."""
    placed = [b for b in row.get("builds", {}).values() if "ended_at" in b]
    if placed:
        row["before_builds_s"] = round(min(b["started_at"] for b in placed) - start, 1)
        row["after_builds_s"] = round(end - max(b["ended_at"] for b in placed), 1)
    for b in placed:
        del b["started_at"], b["ended_at"]


def run_item(name: str, timeout_s: float = 1800, runner=subprocess.run) -> dict:
    """One item in a fresh process with fresh caches: {item, wall_s, first_call_s | error, builds}."""
    with tempfile.TemporaryDirectory(prefix="ffi-cold-") as root:
        env = {**os.environ, **fresh_caches(root)}
        start = time.time()
        try:
            done = runner(item_command(name), env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"item": name, "wall_s": time.time() - start, "error": f"over {timeout_s:.0f} s"}
        end = time.time()
        row = {"item": name, "wall_s": end - start}
        builds = module_builds(env["FLASHINFER_WORKSPACE_BASE"])
        if builds:
            row["builds"] = builds
            around_builds(row, start, end)
        if done.returncode != 0:
            row["error"] = (done.stderr or done.stdout).strip().splitlines()[-1][:300] if (done.stderr or done.stdout) \
                else f"exit {done.returncode}"
            return row
        if ITEMS.get(name) is not None:
            try:
                row["first_call_s"] = json.loads(done.stdout.strip().splitlines()[-1])["s"]
            except (ValueError, IndexError, KeyError):
                row["error"] = "no first-call time printed"
        return row


def prebuilt_modules() -> int:
    """FlashInfer modules installed prebuilt (its package's data/aot), 0 without FlashInfer."""
    try:
        import flashinfer
    except ImportError:
        return 0
    aot = os.path.join(os.path.dirname(flashinfer.__file__), "data", "aot")
    return sum(1 for _, _, files in os.walk(aot) for f in files if f.endswith(".so"))


def run_cold_benchmark(out_path: str | None = None, items=None, runner=subprocess.run) -> dict:
    names = list(items or ITEMS)
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        raise ValueError(f"unknown cold-start items {unknown}; known: {list(ITEMS)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for name in names:
        row = run_item(name, runner=runner)
        rows.append(row)
        if "error" in row:
            shown = row["error"]
        elif "first_call_s" in row:
            shown = f"first call {row['first_call_s']:.1f} s"
        else:
            shown = "the whole process"
        print(f"{name:26s} {row['wall_s']:8.1f} s  {shown}", flush=True)
        if "before_builds_s" in row:
            print(f"    {row['before_builds_s']:.1f} s before the first build, {row['after_builds_s']:.1f} s after the last",
                  flush=True)
        for module, build in row.get("builds", {}).items():
            print(f"    built {module[:60]}: {build['files']} files, {build['work_s']:.0f} s of compiling "
                  f"over {build['span_s']:.0f} s", flush=True)
    try:
        import flashinfer
        fi_version = flashinfer.__version__
    except ImportError:
        fi_version = None
    result = {"device": device, "torch": torch.__version__, "flashinfer": fi_version, "cpu_cores": os.cpu_count(),
              "prebuilt_flashinfer_modules": prebuilt_modules(), "date": datetime.date.today().isoformat(),
              "commit": source_commit(), "rows": rows}
    if out_path is None:
        os.makedirs(os.path.join("benchmarks", "results"), exist_ok=True)
        out_path = os.path.join("benchmarks", "results", device.replace(" ", "_") + "-cold.json")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_path}")
    return result
