"""Host work of one FlexFlashInfer call of a bench case (flex_flash_infer_bench/masks.py), on the
CPU model of FlashInfer (tests/fake_flashinfer.py) with every kernel launch stubbed to return
preallocated outputs: what the GPU host spends around the kernels per call, which bounds the
bench's short rows (issue 22: replayed from a CUDA graph, per-head windows ran in half the time of
the call). Prints the route, the aten ops per call (on a GPU each compute op is a launch) and the
median host time; --json appends a row with the commit and date.

    PYTHONPATH=.:tests python scripts/host_per_call.py per_head_windows [--lse] [--json OUT.json]

Internal: it patches the library's launch objects, so it follows their names."""
import os, sys, time, statistics, cProfile, pstats, io, collections, argparse
import torch
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import fake_flashinfer
sys.modules["flashinfer"] = fake_flashinfer.module()
from _pytest.monkeypatch import MonkeyPatch
from flex_flash_infer.backends import backend_choice, flashinfer_backend, score_mod_kernels, column_merge, tile_kernels
from flex_flash_infer import paged, varlen, wrapper
for m in (flashinfer_backend, paged, varlen):
    m._is_hopper = lambda device: True
backend_choice.unsupported_reason = lambda *a: None
wrapper.choose_backend = lambda *a: "flashinfer"
mp = MonkeyPatch()
fake_flashinfer.register_band_variants(mp, score_mod_kernels)
fake_flashinfer.register_paged_variants(mp, tile_kernels)
from flex_flash_infer import FlexFlashInfer
from flex_flash_infer_bench.masks import case_masks, identity_score_mod

ap = argparse.ArgumentParser()
ap.add_argument("case")
ap.add_argument("--seq", type=int, default=2048)
ap.add_argument("--dim", type=int, default=64)
ap.add_argument("--lse", action="store_true")
ap.add_argument("--n", type=int, default=3000)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--profile", action="store_true")
ap.add_argument("--route-only", action="store_true")
ap.add_argument("--json", default="")
args = ap.parse_args()
S, HQ, HKV, D = args.seq, 32, 8, args.dim
score = None
from flex_flash_infer_bench.masks import score_mod_cases
if args.case == "identity_lambda+causal":
    mask, score = case_masks(S)["causal"][0], (lambda s, b, h, q, kv: s)
elif args.case in score_mod_cases():
    mname, score, _ = score_mod_cases()[args.case]
    mask = case_masks(S)[mname][0]
else:
    mask = case_masks(S)[args.case][0]
torch.manual_seed(0)
q = torch.randn(S, HQ, D, dtype=torch.bfloat16)
k = torch.randn(S, HKV, D, dtype=torch.bfloat16)
v = torch.randn(S, HKV, D, dtype=torch.bfloat16)
flex = FlexFlashInfer(device="cpu", backend="flashinfer")
flex.prepare(mask_fn=mask, seq_len_q=S, seq_len_kv=S, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D,
             dtype=torch.bfloat16, score_mod=score)
fp = flex._prepared.segments[0].plan
ap_ = fp.plan
print(f"case={args.case} S={S} D={D}: route={ap_.route} band_kernel={ap_.band_kernel} score_factor={ap_.score_factor} "
      f"head_major={ap_.head_major} bands={len(ap_.bands)} columns={ap_.columns is not None and (ap_.columns.counts is not None, ap_.columns.tiles is not None)}")
print("launches:", ap_.launches())
if args.route_only:
    sys.exit()

# --- stubs: every launch returns preallocated outputs
calls = collections.Counter()
bufs = {}
def buf(key, qshape, d, dtype):
    if key not in bufs:
        bufs[key] = (torch.empty(*qshape[:-1], d, dtype=dtype), torch.empty(qshape[:2], dtype=torch.float32))
    return bufs[key]
def ragged_run(self, q, k, v, *va, return_lse=False, out=None, lse=None):
    calls["ragged.run"] += 1
    o, l = buf(("r", id(self), q.shape), q.shape, v.shape[-1], q.dtype)
    o = out if out is not None else o
    l = lse if lse is not None else l
    return (o, l) if return_lse else o
def paged_run(self, q, kv, *va, return_lse=False):
    calls["paged.run"] += 1
    o, l = buf(("p", id(self), q.shape), q.shape, kv[1].shape[-1], q.dtype)
    return (o, l) if return_lse else o
def single(q, k, v, return_lse=False, **kw):
    calls["single"] += 1
    o, l = buf(("s", q.shape), q.shape, v.shape[-1], q.dtype)
    return (o, l) if return_lse else o
def merge(oa, la, ob, lb):
    calls["merge_state"] += 1
    return buf(("m", oa.shape), oa.shape, oa.shape[-1], oa.dtype)
def merge_cols(out, lse2, q, k, v, positions, counts, scale, q_len):
    calls["merge_columns"] += 1
fake_flashinfer.BatchPrefillWithRaggedKVCacheWrapper.run = ragged_run
fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper.run = paged_run
# bound at plan time: the instances' merge and single-prefill attributes
flashinfer_backend.merge_columns = merge_cols
for g in fp.groups + ([fp.columns] if fp.columns is not None else []):
    g.merge = merge
br = getattr(fp, "band_runner", None)
if br is not None and hasattr(br, "single"):
    br.single = single

def call():
    return flex(q, k, v, return_lse=args.lse)
for _ in range(200):
    call()

def median_us(fn, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts) / 1e3

class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.ops = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
def is_view(name):
    pk, _, ov = name.rpartition(".")
    ns, op = pk.split(".", 1)
    return getattr(getattr(getattr(torch.ops, ns), op), ov).is_view
calls.clear()
with Count() as c:
    call()
kinds = collections.Counter()
for o, n in c.ops.items():
    kind = "view" if is_view(o) else "alloc" if o.split(".")[1] in ("empty", "empty_strided", "empty_like") else "compute"
    kinds[kind] += n
print(f"return_lse={args.lse}: aten ops per call {sum(c.ops.values())} {dict(kinds)}; stubbed launches {dict(calls)}")
print("   " + ", ".join(f"{n} {o}{' (v)' if is_view(o) else ''}" for o, n in sorted(c.ops.items(), key=lambda x: -x[1])))
reps = [median_us(call, args.n) for _ in range(args.reps)]
print(f"host us per call: median of {args.reps} x {args.n}: {statistics.median(reps):.1f}  (runs {[round(r,1) for r in reps]})")
if args.json:
    import datetime, json, platform, subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    rows = json.load(open(args.json)) if os.path.exists(args.json) else []
    rows.append({"case": args.case, "seq": S, "head_dim": D, "heads": [HQ, HKV], "return_lse": args.lse,
                 "route": ap_.route, "host_us": round(statistics.median(reps), 2), "aten_ops": sum(c.ops.values()),
                 "commit": commit, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                 "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()})
    json.dump(rows, open(args.json, "w"), indent=1)
if args.profile:
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000): call()
    pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:7000])
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40); print(s.getvalue()[:10000])
