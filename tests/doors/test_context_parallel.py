"""Context parallelism on the CPU: several gloo processes, each holding a shard of the sequence,
against flex_attention on the whole sequence in one process (float32, the reference backend)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flex_flash_infer import create_block_mask, flex_attention, get_mask_fn
from flex_flash_infer.context_parallel import (ContextParallelFlexAttention, HeadTailLoadBalancer,
                                               PerDocumentLoadBalancer, merge_partials, shard_sequence,
                                               unshard_sequence)

L, HQ, HKV, D = 512, 4, 2, 16


def random_tiles_mask(seed):
    tiles = torch.rand(L // 64, L // 64, generator=torch.Generator().manual_seed(seed)) < 0.3
    tiles |= torch.eye(L // 64, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        return tiles[q_idx // 64, kv_idx // 64] & (q_idx >= kv_idx)
    return mask_mod


def alibi(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * 0.01 * (q_idx - kv_idx).abs()


def cases():
    """(name, mask_mod, score_mod, load balancer factory)."""
    head_tail = lambda world: HeadTailLoadBalancer(L, world)   # noqa: E731
    docs = [104, 56, 200, 152]   # torch's per-document balancer wants each a multiple of 2 * world
    documents = get_mask_fn("document", offsets=[0, 104, 160, 360, 512])
    return [
        ("causal", get_mask_fn("causal"), None, head_tail),
        ("users_causal", lambda b, h, q, kv: q >= kv, None, head_tail),
        ("window", get_mask_fn("sliding_window", window_size=96), None, None),
        ("documents", documents, None, lambda world: _per_document(docs, world)),
        ("documents_ours", documents, None, lambda world: PerDocumentLoadBalancer(docs, world)),
        ("random_tiles", random_tiles_mask(7), None, head_tail),
        ("alibi_causal", get_mask_fn("causal"), alibi, head_tail),
        ("per_head", lambda b, h, q, kv: (q >= kv) & (q - kv < 32 * (h + 1)), None, head_tail),
    ]


def _per_document(docs, world):
    try:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _PerDocumentHeadTailLoadBalancer)
    except ImportError:
        return HeadTailLoadBalancer(L, world)
    return _PerDocumentHeadTailLoadBalancer([docs], world, "cpu")


def _whole(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, HQ, L, D, generator=g), torch.randn(2, HKV, L, D, generator=g),
            torch.randn(2, HKV, L, D, generator=g))


def _expected(mask_mod, score_mod, q, k, v):
    bm = create_block_mask(mask_mod, None, HQ, L, L, device="cpu", BLOCK_SIZE=64)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, return_lse=True,
                          backend="reference")


def _worker(rank, world, init_file, errors):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        for name, mask_mod, score_mod, balancer in cases():
            q, k, v = _whole(11)
            out, lse = _expected(mask_mod, score_mod, q, k, v)
            lb = balancer(world) if balancer else None
            for exchange in ("all_gather", "ring"):
                cp = ContextParallelFlexAttention(mask_mod, L, H=HQ, score_mod=score_mod, load_balancer=lb,
                                                  kv_exchange=exchange, enable_gqa=True, backend="reference",
                                                  block_size=64)
                shards = [shard_sequence(t, rank, world, lb) for t in (q, k, v)]
                got, got_lse = cp(*shards, return_lse=True)
                whole = unshard_sequence(got, load_balancer=lb)
                whole_lse = unshard_sequence(got_lse.unsqueeze(-1), load_balancer=lb).squeeze(-1)
                err = (whole - out).abs().max().item()
                lse_ok = torch.allclose(whole_lse, lse, atol=1e-5, rtol=1e-5)
                if not err < 1e-5 or not lse_ok:
                    errors.put(f"{name} {exchange} world {world}: max error {err}, lse equal {lse_ok}")
        # gradients through the all-gather: every rank's shards' grads are the whole call's
        mask_mod = get_mask_fn("causal")
        q, k, v = _whole(12)
        lb = HeadTailLoadBalancer(L, world)
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=64)
        ref = flex_attention(*whole, block_mask=bm, enable_gqa=True, backend="reference")
        ref.backward(torch.ones_like(ref))
        shards = [shard_sequence(t, rank, world, lb).requires_grad_() for t in (q, k, v)]
        cp = ContextParallelFlexAttention(mask_mod, L, load_balancer=lb, kv_exchange="all_gather", enable_gqa=True,
                                          backend="reference", block_size=64)
        out = cp(*shards)
        if out.grad_fn is None:
            errors.put("all_gather: the output has no grad_fn")
        out.backward(torch.ones_like(out))
        for name, shard, full in zip("qkv", shards, whole):
            expected = shard_sequence(full.grad, rank, world, lb)
            err = (shard.grad - expected).abs().max().item()
            if not err < 1e-4:
                errors.put(f"gradient of {name}: max error {err}")
        ring = ContextParallelFlexAttention(mask_mod, L, load_balancer=lb, kv_exchange="ring", enable_gqa=True,
                                            backend="reference", block_size=64)
        try:
            ring(*shards)
            errors.put("ring with inputs requiring grad did not refuse")
        except NotImplementedError as e:
            if "all_gather" not in str(e):
                errors.put(f"ring refusal does not name the alternative: {e}")
        # the ring skips key shards nothing sees: under causal with contiguous shards rank 0
        # never attends another rank's keys
        plain = ContextParallelFlexAttention(mask_mod, L, kv_exchange="ring", enable_gqa=True, backend="reference",
                                             block_size=64)
        with torch.no_grad():
            plain(*[shard_sequence(t, rank, world) for t in (q, k, v)])
        visible = [key for key, (_, seen) in plain._masks.items() if seen]
        if len(visible) != rank + 1:
            errors.put(f"rank {rank}: attended {len(visible)} key shards under causal, expected {rank + 1}")
        # a group of part of the ranks (a DeviceMesh's dimension): the ring names its peers right
        if world == 4:
            halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            mine = halves[rank // 2]
            q, k, v = _whole(13)
            bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=64)
            expected = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="reference")
            lb = HeadTailLoadBalancer(L, 2)
            for exchange in ("ring", "all_gather", "auto"):
                part = ContextParallelFlexAttention(mask_mod, L, group=mine, load_balancer=lb, kv_exchange=exchange,
                                                    enable_gqa=True, backend="reference", block_size=64)
                with torch.no_grad():
                    got = part(*(shard_sequence(t, rank % 2, 2, lb) for t in (q, k, v)))
                whole = unshard_sequence(got, group=mine, load_balancer=lb)
                err = (whole - expected).abs().max().item()
                if not err < 1e-5:
                    errors.put(f"subgroup {exchange}: max error {err}")
        # no mask: every key visible, and a score_mod alone
        q, k, v = _whole(14)
        expected = flex_attention(q, k, v, score_mod=alibi, enable_gqa=True, backend="reference")
        for exchange in ("ring", "all_gather"):
            full = ContextParallelFlexAttention(None, L, score_mod=alibi, kv_exchange=exchange, enable_gqa=True,
                                                backend="reference", block_size=64)
            with torch.no_grad():
                got = unshard_sequence(full(*(shard_sequence(t, rank, world) for t in (q, k, v))))
            err = (got - expected).abs().max().item()
            if not err < 1e-5:
                errors.put(f"no mask, {exchange}: max error {err}")
    except Exception:   # reported to the test, which names the rank
        import traceback
        errors.put(f"rank {rank}: {traceback.format_exc()[-1500:]}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_shards_across_gloo_ranks_give_the_whole_sequence_result(world, tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), errors), nprocs=world, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


def test_head_tail_indices_match_torchs():
    ours = HeadTailLoadBalancer(48, 3)._generate_indices()
    assert sorted(ours[0].tolist()) == list(range(48))
    assert ours[0, :16].tolist() == list(range(8)) + list(range(40, 48))   # rank 0: the first and last chunks
    try:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
    except ImportError:
        pytest.skip("this torch has no _HeadTailLoadBalancer")
    assert torch.equal(ours, _HeadTailLoadBalancer(48, 3, "cpu")._generate_indices())
    assert torch.equal(HeadTailLoadBalancer(48, 3)._generate_indices(restore=True),
                       _HeadTailLoadBalancer(48, 3, "cpu")._generate_indices(restore=True))


def test_per_document_balance_gives_each_rank_its_head_and_tail_of_every_document():
    docs, world = [8, 16, 24], 2
    indices = PerDocumentLoadBalancer(docs, world)._generate_indices()
    assert indices.shape == (1, 48) and sorted(indices[0].tolist()) == list(range(48))
    rank0 = indices[0, :24].tolist()
    assert rank0 == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 42, 43, 44, 45, 46, 47]
    restore = PerDocumentLoadBalancer(docs, world)._generate_indices(restore=True)
    assert torch.equal(indices[0][restore[0]], torch.arange(48))
    with pytest.raises(ValueError, match="multiple of 2 \\* world_size"):
        PerDocumentLoadBalancer([8, 10], 2)
    assert PerDocumentLoadBalancer(torch.tensor([8, 16, 24]), 2).rows == [[8, 16, 24]]
    for bad in ([[]], [], [8.0, 8]):
        with pytest.raises(ValueError, match="doc_lengths"):
            PerDocumentLoadBalancer(bad, 2)
    with pytest.raises(ValueError, match="world_size"):
        PerDocumentLoadBalancer([8], 0)


def test_merging_two_halves_is_attention_over_both():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    whole, lse = flex_attention(q, k, v, return_lse=True, backend="reference")
    a = flex_attention(q, k[:, :, :15], v[:, :, :15], return_lse=True, backend="reference")
    b = flex_attention(q, k[:, :, 15:], v[:, :, 15:], return_lse=True, backend="reference")
    out, merged = merge_partials(a[0], a[1], b[0], b[1])
    assert torch.allclose(out, whole, atol=1e-6) and torch.allclose(merged, lse, atol=1e-6)
    empty = torch.full_like(lse, float("-inf"))
    out2, lse2 = merge_partials(torch.zeros_like(whole), empty, whole, lse)
    assert torch.equal(out2, whole) and torch.equal(lse2, lse)
    out3, lse3 = merge_partials(torch.zeros_like(whole), empty, torch.zeros_like(whole), empty)
    assert torch.equal(out3, torch.zeros_like(whole)) and bool((lse3 == float("-inf")).all())
    nan_lse = lse.clone()
    nan_lse[0, 0, 3] = float("nan")
    out4, lse4 = merge_partials(whole, nan_lse, whole, lse)
    assert torch.isnan(lse4[0, 0, 3]) and bool(torch.isnan(out4[0, 0, 3]).all())
    # a part whose score_mod gave +inf: the row's LSE stays +inf (one attention over all keys has
    # it so), in either order and beside an empty part
    inf_lse = lse.clone()
    inf_lse[0, 1, 5] = float("inf")
    for merged in (merge_partials(whole, inf_lse, whole, lse)[1], merge_partials(whole, lse, whole, inf_lse)[1],
                   merge_partials(whole, inf_lse, torch.zeros_like(whole), empty)[1]):
        assert merged[0, 1, 5] == float("inf") and bool(torch.isfinite(merged[0, 0]).all())


def test_bad_arguments_name_what_was_expected(tmp_path):
    with pytest.raises(RuntimeError, match="init_process_group"):
        ContextParallelFlexAttention(get_mask_fn("causal"), 64)
    with pytest.raises(ValueError, match="seq_len"):
        HeadTailLoadBalancer(50, 4)
    with pytest.raises(ValueError, match="split evenly"):
        shard_sequence(torch.zeros(1, 1, 10, 4), 0, 3)
    for rank in (2, 5, -1):   # an empty shard would have come back
        with pytest.raises(ValueError, match=r"rank must be in 0\.\.1"):
            shard_sequence(torch.zeros(1, 1, 8, 4), rank, 2)
    x = torch.randn(2, 8, 8, 4)   # heads == sequence length: a wrong dimension would not raise

    class PerBatch:
        def _generate_indices(self, restore=False):
            return torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    for dim in (2, -2):
        got = shard_sequence(x, 1, 2, PerBatch(), seq_dim=dim)
        rows = PerBatch()._generate_indices()[:, 4:]
        assert torch.equal(got, torch.stack([x[b][:, rows[b]] for b in range(2)]))
    with pytest.raises(ValueError, match="one per batch entry"):
        shard_sequence(torch.randn(3, 8, 8, 4), 0, 2, PerBatch())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="kv_exchange"):
            ContextParallelFlexAttention(get_mask_fn("causal"), 64, kv_exchange="ring_all")
        with pytest.raises(ValueError, match="seq_len"):
            ContextParallelFlexAttention(get_mask_fn("causal"), None)
        with pytest.raises(TypeError, match="load_balancer"):
            ContextParallelFlexAttention(get_mask_fn("causal"), 64, load_balancer=3)
        cp = ContextParallelFlexAttention(get_mask_fn("causal"), 64, backend="reference")
        with pytest.raises(ValueError, match=r"shard \[B, H, 64, D\]"):
            cp(torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 32, 8))
        q = torch.randn(1, 2, 64, 8)
        out = cp(q, q, q)   # a world of one is plain flex_attention
        bm = create_block_mask(get_mask_fn("causal"), None, None, 64, 64, device="cpu")
        assert torch.allclose(out, flex_attention(q, q, q, block_mask=bm, backend="reference"), atol=1e-6)
        # the global BlockMask in place of its mask_mod, ours or torch's
        per_head = create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv < 8 * (h + 1)), None, 2, 64, 64,
                                     device="cpu")
        expected = flex_attention(q, q, q, block_mask=per_head, backend="reference")
        for mask in (per_head, per_head.to_torch()):
            cp = ContextParallelFlexAttention(mask, backend="reference")
            assert cp.H == 2 and cp.seq_len == 64
            assert torch.allclose(cp(q, q, q), expected, atol=1e-6)
        with pytest.raises(ValueError, match="global BlockMask"):
            ContextParallelFlexAttention(per_head, 128)
        from flex_flash_infer import BlockMask
        tables_only = BlockMask.from_kv_blocks(torch.tensor([[[1, 1]]]), torch.tensor([[[[0, 1], [1, 0]]]]),
                                               BLOCK_SIZE=32, seq_lengths=(64, 64))   # block-diagonal, no mask_mod
        with pytest.raises(ValueError, match="not its mask_mod"):
            ContextParallelFlexAttention(tables_only, backend="reference")
    finally:
        dist.destroy_process_group()



def _state_worker(rank, world, init_file, errors):
    """A tensor the mask reads rewritten between calls (the block masks were built from it), and a
    ring call that raised part way followed by a good one on the same object."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        docs = torch.zeros(L, dtype=torch.long)
        docs[256:] = 1

        def documents(b, h, q_idx, kv_idx):
            return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

        q, k, v = _whole(15)
        for exchange in ("all_gather", "ring"):
            docs.zero_()
            docs[256:] = 1
            cp = ContextParallelFlexAttention(documents, L, kv_exchange=exchange, enable_gqa=True,
                                              backend="reference", block_size=64)
            with torch.no_grad():
                cp(*(shard_sequence(t, rank, world) for t in (q, k, v)))
                docs.zero_()
                docs[64:] = 1                       # the next batch's documents, same buffer
                got = unshard_sequence(cp(*(shard_sequence(t, rank, world) for t in (q, k, v))))
            want, _ = _expected(documents, None, q, k, v)
            err = (got - want).abs().max().item()
            if not err < 1e-5:
                errors.put(f"{exchange}: a rewritten mask tensor ran the old documents: max error {err}")
        # the same with a mask the tracer cannot read (torch.bucketize): its reads are unknown, so
        # its block masks were kept for good (1.7 off after the rewrite)
        starts = torch.tensor([0, 256])

        def bucketed(b, h, q_idx, kv_idx):
            return ((torch.bucketize(q_idx, starts, right=True) == torch.bucketize(kv_idx, starts, right=True))
                    & (q_idx >= kv_idx))

        for exchange in ("all_gather", "ring"):
            starts.copy_(torch.tensor([0, 256]))
            cp = ContextParallelFlexAttention(bucketed, L, kv_exchange=exchange, enable_gqa=True,
                                              backend="reference", block_size=64)
            with torch.no_grad():
                cp(*(shard_sequence(t, rank, world) for t in (q, k, v)))
                starts.copy_(torch.tensor([0, 64]))
                got = unshard_sequence(cp(*(shard_sequence(t, rank, world) for t in (q, k, v))))
            want, _ = _expected(bucketed, None, q, k, v)
            err = (got - want).abs().max().item()
            if not err < 1e-5:
                errors.put(f"{exchange}: an untraceable mask's rewritten tensor ran the old documents: max error {err}")
        tables = {"bias": torch.zeros(3)}

        def biased(score, b, h, q_idx, kv_idx):
            return score + tables["bias"][q_idx]    # 3 entries: IndexError on every rank at the first step

        shards = [shard_sequence(t, rank, world) for t in (q, k, v)]
        with torch.no_grad():
            ContextParallelFlexAttention(get_mask_fn("causal"), L, kv_exchange="ring", enable_gqa=True,
                                         backend="reference", block_size=64)(*shards)
            ring = ContextParallelFlexAttention(get_mask_fn("causal"), L, score_mod=biased, kv_exchange="ring",
                                                enable_gqa=True, backend="reference", block_size=64)
            try:
                ring(*shards)
                errors.put("a score_mod reading past its table did not raise")
            except IndexError:
                pass
            tables["bias"] = torch.zeros(L)         # fixed; the same object called again
            got = unshard_sequence(ring(*shards))
        want, _ = _expected(get_mask_fn("causal"), None, q, k, v)
        if not (got - want).abs().max().item() < 1e-5:
            errors.put("ring after a failed call: wrong result")
    except Exception:
        import traceback
        errors.put(f"rank {rank}: {traceback.format_exc()[-1500:]}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_rewritten_mask_tensors_and_a_ring_call_after_a_failed_one(tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = mp.start_processes(_state_worker, args=(2, str(tmp_path / "init"), errors), nprocs=2,
                               start_method="spawn", join=False)
    for p in procs.processes:
        p.join(180)                                 # a hang (unmatched sends) fails instead of blocking CI
    alive = [p for p in procs.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks hung"
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


def test_the_ring_keeps_float64(tmp_path):
    """The ring's running output and LSE were float32 whatever the inputs: float64 came back
    float32-accurate (9e-8 off), the all-gather exact; "auto" picks one by size."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one'}", rank=0, world_size=1)
    try:
        q, k, v = (t.double() for t in _whole(15))
        expected, expected_lse = _expected(get_mask_fn("causal"), None, q, k, v)
        for exchange in ("ring", "all_gather"):
            cp = ContextParallelFlexAttention(get_mask_fn("causal"), L, H=HQ, kv_exchange=exchange, enable_gqa=True,
                                              backend="reference", block_size=64)
            with torch.no_grad():
                out, lse = cp(q, k, v, return_lse=True)
            assert out.dtype == torch.float64 and lse.dtype == expected_lse.dtype
            assert (out - expected).abs().max().item() < 1e-12, exchange
            assert torch.allclose(lse, expected_lse, atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()
