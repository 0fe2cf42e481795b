"""Context-parallel prefill: parallel efficiency over one GPU, beside torch's own flex context
parallelism on the same GPUs (issue 24's benchmark). Run under torchrun, one process a GPU:

    torchrun --standalone --nproc-per-node 4 scripts/cp_bench.py --out cp-4.json [--seq-len 262144]
    torchrun --standalone --nproc-per-node 2 scripts/cp_bench.py --cpu --seq-len 2048   # the orchestration on gloo

Per mask: rank 0 times our flex_attention on the whole sequence alone (the 1-GPU time); then every
rank times its shard through ContextParallelFlexAttention (each exchange) and through torch's
_ContextParallel + compiled flex_attention with _create_cp_block_mask; a time is the slowest
rank's median. Every output is gathered and checked against the 1-GPU result first (bf16: 1e-2
relative). Efficiency = t(1 GPU) / (ranks x t(ranks)). Prints a table, writes JSON with the
device, ranks, versions, date and commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn  # noqa: E402
from flex_flash_infer.context_parallel import (ContextParallelFlexAttention, HeadTailLoadBalancer,  # noqa: E402
                                               PerDocumentLoadBalancer, shard_sequence, unshard_sequence)
from flex_flash_infer_bench.provenance import source_commit  # noqa: E402


def masks(seq_len: int):
    """name -> (mask_mod, load balancer)."""
    docs = [seq_len // 8] * 2 + [seq_len // 4] + [seq_len // 2]   # multiples of 2 * ranks for the balancer
    documents = get_mask_fn("document", offsets=[sum(docs[:i]) for i in range(len(docs) + 1)])
    tiles = torch.rand(seq_len // 128, seq_len // 128, generator=torch.Generator().manual_seed(5)) < 0.25
    tiles |= torch.eye(seq_len // 128, dtype=torch.bool)
    on_t = {}

    def random_tiles(b, h, q_idx, kv_idx):
        t = on_t.get(q_idx.device)
        if t is None:
            t = on_t.setdefault(q_idx.device, tiles.to(q_idx.device))
        return t[q_idx // 128, kv_idx // 128] & (q_idx >= kv_idx)
    return {"causal": (get_mask_fn("causal"), "head_tail", docs), "documents": (documents, "documents", docs),
            "random_tiles": (random_tiles, "head_tail", docs)}


def balancer(kind, seq_len, world, docs, device):
    return HeadTailLoadBalancer(seq_len, world) if kind == "head_tail" else PerDocumentLoadBalancer(docs, world)


def timed(fn, device, rounds: int):
    """Median seconds of fn over rounds, the slowest rank's (every rank runs it together)."""
    fn()
    times = []
    for _ in range(rounds):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    mine = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return mine.item()


def torch_cp(mask_mod, seq_len, heads, lb, mesh, device):
    """torch's flex context parallelism on the same shards: a callable, or raises saying why."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import (_ContextParallel,
                                                                                          _create_cp_block_mask)
    except ImportError:   # torch before the _context_parallel package
        from torch.distributed.tensor.experimental._attention import _ContextParallel, _create_cp_block_mask
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    compiled = torch.compile(torch_flex, dynamic=False)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, block_mask=None):
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

    module = parallelize_module(Attention(), mesh, _ContextParallel(seq_dim=2,
                                attention_type=_ContextParallel.AttentionType.FLEX))
    block_mask = _create_cp_block_mask(mask_mod, 1, heads, seq_len, seq_len, mesh, lb)
    return lambda q, k, v: module(q, k, v, block_mask=block_mask)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=262144)
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 8))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--masks", nargs="+", default=["causal", "documents", "random_tiles"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", action="store_true", help="gloo and the reference backend (checks the script)")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's own context parallelism")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpu:
        device, dtype, backend, tolerance = torch.device("cpu"), torch.float32, "reference", 1e-4
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dtype, backend, tolerance = torch.bfloat16, "flashinfer", 1e-2
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    L, (hq, hkv), d = args.seq_len, args.heads, args.head_dim
    rows = []
    for name in args.masks:
        mask_mod, lb_kind, docs = masks(L)[name]
        torch.manual_seed(0)
        q = torch.randn(1, hq, L, d, device=device, dtype=dtype)
        k = torch.randn(1, hkv, L, d, device=device, dtype=dtype)
        v = torch.randn(1, hkv, L, d, device=device, dtype=dtype)
        row = {"mask": name, "seq_len": L, "ranks": world, "heads": [hq, hkv], "head_dim": d}
        bm = create_block_mask(mask_mod, None, None, L, L, device=device)
        single = None
        if rank == 0:
            run = lambda: flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend=backend)  # noqa: E731
            single = run()
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            row["one_gpu_s"] = statistics.median(times)
        dist.barrier()
        lb = balancer(lb_kind, L, world, docs, device)
        row["load_balancer"] = type(lb).__name__
        shards = [shard_sequence(t, rank, world, lb) for t in (q, k, v)]
        impls = {}
        for exchange in ("all_gather", "ring"):
            attention = ContextParallelFlexAttention(mask_mod, L, load_balancer=lb, kv_exchange=exchange,
                                                     enable_gqa=True, backend=backend)
            impls[f"ours_{exchange}"] = (lambda a: lambda: a(*shards))(attention)
        if not args.no_torch:
            try:
                peer = torch_cp(mask_mod, L, hq, lb, mesh, device)
                impls["torch_cp"] = lambda: peer(*shards)
            except Exception as e:   # its row says why
                row["torch_cp_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for impl, fn in impls.items():
            try:
                with torch.no_grad():
                    out = fn()
                    whole = unshard_sequence(out, load_balancer=lb)
                ok = torch.tensor([1.0])
                if rank == 0:
                    err = ((whole.float() - single.float()).norm() / single.float().norm()).item()
                    row[f"{impl}_rel_err"] = err
                    ok = torch.tensor([1.0 if err < tolerance else 0.0])
                dist.broadcast(ok, 0)
                if ok.item() == 0:
                    row[f"{impl}_error"] = "output differs from the 1-GPU result"
                    continue
                with torch.no_grad():
                    row[f"{impl}_s"] = timed(fn, device, args.rounds)
                if rank == 0 and "one_gpu_s" in row:
                    row[f"{impl}_efficiency"] = row["one_gpu_s"] / (world * row[f"{impl}_s"])
            except Exception as e:
                row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        import flex_flash_infer
        result = {"what": "context-parallel prefill against one GPU and torch's context parallelism",
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "ranks": world, "torch": torch.__version__, "flex_flash_infer": flex_flash_infer.__version__,
                  "date": datetime.date.today().isoformat(), "commit": source_commit(), "rows": rows}
        try:
            import flashinfer
            result["flashinfer"] = flashinfer.__version__
        except ImportError:
            pass
        print(f"{'mask':14s} {'1 GPU s':>9s} " + " ".join(f"{i:>22s}" for i in ("ours_all_gather", "ours_ring",
                                                                                 "torch_cp")))
        for r in rows:
            cells = []
            for i in ("ours_all_gather", "ours_ring", "torch_cp"):
                s = r.get(f"{i}_s")
                failed = f"{i}_error" in r or (i == "torch_cp" and "torch_cp_error" in r)
                cells.append(f"{s:9.4f} s ({r.get(f'{i}_efficiency', 0):4.0%})" if s else "failed" if failed else "-")
            print(f"{r['mask']:14s} {r.get('one_gpu_s', 0):9.4f} " + " ".join(f"{c:>22s}" for c in cells))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
