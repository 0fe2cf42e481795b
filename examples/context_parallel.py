"""A long prompt's attention split across processes along the sequence (context parallelism).

    torchrun --nproc-per-node 4 examples/context_parallel.py    # one GPU a process, NCCL
    python examples/context_parallel.py                         # two gloo processes on the CPU

Each rank holds a head-tail shard of q, k and v (rank r: chunks r and 2W-1-r, which balances a
causal mask's work), passes the global mask_mod, and gets its shard of the output; the example
checks the gathered result against one process's flex_attention on the whole sequence.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.context_parallel import (ContextParallelFlexAttention, HeadTailLoadBalancer, shard_sequence,
                                               unshard_sequence)


def main(rank: int, world: int):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    seq_len = 32768 if cuda else 1024
    torch.manual_seed(0)   # every rank draws the same whole sequence, then keeps its shard
    q, k, v = (torch.randn(1, heads, seq_len, 128, device=device, dtype=dtype) for heads in (32, 8, 8))

    causal = get_mask_fn("causal")
    balancer = HeadTailLoadBalancer(seq_len, world)
    attention = ContextParallelFlexAttention(causal, seq_len, load_balancer=balancer, enable_gqa=True)
    out = attention(*(shard_sequence(t, rank, world, balancer) for t in (q, k, v)))
    whole = unshard_sequence(out, load_balancer=balancer)

    expected = flex_attention(q, k, v, block_mask=create_block_mask(causal, None, None, seq_len, seq_len,
                                                                    device=device), enable_gqa=True)
    error = ((whole.float() - expected.float()).norm() / expected.float().norm()).item()
    if rank == 0:
        print(f"{world} ranks, {seq_len} tokens, causal: relative error {error:.2e} against one process")
    assert error < (1e-2 if cuda else 1e-5), error


def spawned(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        main(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:   # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        main(dist.get_rank(), dist.get_world_size())
        dist.destroy_process_group()
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(spawned, args=(2, os.path.join(tmp, "init")), nprocs=2, start_method="spawn")
