"""Context parallelism: one long sequence's attention across the ranks of a torch.distributed group.

Each rank holds a shard of q, k and v along the sequence (dim 2 of [B, H, S, D]) and the *global*
mask_mod (and score_mod); it gets its shard of the output (and LSE), as if flex_attention had run
on the whole sequence. Which global positions a rank holds is the load balancer's choice, in
torch's convention (torch.distributed.tensor.experimental's `_HeadTailLoadBalancer` and
`_PerDocumentHeadTailLoadBalancer` work as they are): `indices = balancer._generate_indices()`
[1 or B, S] rearranges the sequence, and rank r holds `indices[:, r * n:(r + 1) * n]`.

The keys reach every rank one of two ways, chosen by size (`kv_exchange`):
- "all_gather": one all-gather of k and v (about 4 KB a token at 8 KV heads x 128 x bf16), then
  each contiguous run of the rank's query positions attends the whole sequence with the mask
  shifted to its offset: the planner skips every empty tile, so a causal rank's work is its
  triangle. Differentiable: the gather's backward sums every rank's key gradients back; a learned
  tensor the score_mod reads gets this rank's queries' share only (all-reduce it, as a data-parallel
  gradient).
- "ring": the key shards travel round the ranks by point-to-point sends while each rank attends
  the shard it holds; pairs of runs with no visible tile are skipped; the parts are joined by
  log-sum-exp. Its memory is one shard, whatever the length. Forward only.
Each partial attention is this library's flex_attention, so it runs FlashInfer's kernels on a GPU
and the reference backend on the CPU (tests run it on gloo).
"""
from __future__ import annotations

import numbers

import torch

from .api import flex_attention
from .backends.autograd import captured_tensors
from .block_mask import create_block_mask
from .core.trace import current_reads
from .core.versions import KeptReads
from .mods.combinators import noop_mask

KV_EXCHANGES = ("auto", "all_gather", "ring")
# "auto" gathers the keys while they take at most this share of the device's free memory (CPU: of
# GATHER_BYTES_CPU); beyond it the ring keeps one shard
GATHER_SHARE = 0.25
GATHER_BYTES_CPU = 8 << 30


class HeadTailLoadBalancer:
    """Causal balance: the sequence in 2W chunks, rank r holding chunks r and 2W-1-r (torch's
    head-tail rule, the same indices as its `_HeadTailLoadBalancer`)."""

    def __init__(self, seq_len: int, world_size: int, device=None):
        if seq_len % (2 * world_size):
            raise ValueError(f"HeadTailLoadBalancer: seq_len ({seq_len}) must be a multiple of 2 * world_size "
                             f"({2 * world_size})")
        self.seq_len, self.world_size, self.device = seq_len, world_size, device

    def _generate_indices(self, restore: bool = False) -> torch.Tensor:
        chunk = self.seq_len // (2 * self.world_size)
        order = []
        for r in range(self.world_size):
            order += [torch.arange(r * chunk, (r + 1) * chunk),
                      torch.arange((2 * self.world_size - 1 - r) * chunk, (2 * self.world_size - r) * chunk)]
        indices = torch.cat(order).view(1, -1)
        indices = torch.argsort(indices, dim=1) if restore else indices
        return indices.to(self.device) if self.device is not None else indices


class PerDocumentLoadBalancer:
    """Packed documents under a document-causal mask: each document in 2W chunks, rank r holding
    chunks r and 2W-1-r of every document (so each rank's share of every document's triangle is
    the same). doc_lengths: one list per batch entry, or one list for all; each a multiple of 2W."""

    def __init__(self, doc_lengths, world_size: int, device=None):
        if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
            raise ValueError(f"world_size: a positive int, got {world_size!r}")
        rows = torch.as_tensor(doc_lengths).tolist() if isinstance(doc_lengths, torch.Tensor) else list(doc_lengths)
        rows = [rows] if rows and not isinstance(rows[0], (list, tuple)) else [list(row) for row in rows]
        if not rows or not all(rows) or any(not isinstance(n, numbers.Integral) or n <= 0 or n % (2 * world_size)
                                            for row in rows for n in row) or len({sum(row) for row in rows}) != 1:
            raise ValueError(f"doc_lengths: positive lengths, each a multiple of 2 * world_size ({2 * world_size}), "
                             f"the same total for every batch entry, got {doc_lengths!r}")
        self.rows, self.world_size, self.device = [[int(n) for n in row] for row in rows], int(world_size), device

    def _generate_indices(self, restore: bool = False) -> torch.Tensor:
        out = []
        for row in self.rows:
            starts = [sum(row[:i]) for i in range(len(row))]
            order = []
            for r in range(self.world_size):
                for start, length in zip(starts, row):
                    chunk = length // (2 * self.world_size)
                    order += [torch.arange(start + r * chunk, start + (r + 1) * chunk),
                              torch.arange(start + (2 * self.world_size - 1 - r) * chunk,
                                           start + (2 * self.world_size - r) * chunk)]
            out.append(torch.cat(order))
        indices = torch.stack(out)
        indices = torch.argsort(indices, dim=1) if restore else indices
        return indices.to(self.device) if self.device is not None else indices


def _group_of(group):
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh or None (the default group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised (dist.init_process_group)")
    if group is not None and hasattr(group, "get_group"):
        if getattr(group, "ndim", 1) != 1:
            raise ValueError(f"group: a 1-D DeviceMesh of the context-parallel ranks, got {group.ndim} dimensions")
        return group.get_group()
    return group if group is not None else dist.group.WORLD


def _indices(load_balancer, seq_len: int, world_size: int) -> torch.Tensor:
    """[1 or B, seq_len] int64 rearranging the sequence (rank r holds the r-th slice of it)."""
    if load_balancer is None:
        return torch.arange(seq_len).view(1, -1)
    if isinstance(load_balancer, str) and load_balancer == "head_tail":
        load_balancer = HeadTailLoadBalancer(seq_len, world_size)
    if not hasattr(load_balancer, "_generate_indices"):
        raise TypeError("load_balancer: None, 'head_tail', or a balancer with _generate_indices() (torch's or "
                        f"HeadTailLoadBalancer), got {type(load_balancer).__name__}")
    indices = load_balancer._generate_indices(restore=False)
    if indices is None:
        return torch.arange(seq_len).view(1, -1)
    indices = torch.as_tensor(indices).cpu().long()
    indices = indices.view(1, -1) if indices.dim() == 1 else indices
    if indices.shape[-1] != seq_len or not torch.equal(torch.sort(indices, dim=1).values,
                                                        torch.arange(seq_len).expand_as(indices)):
        raise ValueError(f"load_balancer: its indices must be a permutation of the {seq_len} positions, "
                         f"got shape {tuple(indices.shape)}")
    return indices


def shard_sequence(tensor: torch.Tensor, rank: int, world_size: int, load_balancer=None, seq_dim: int = 2):
    """This rank's shard of a whole-sequence tensor ([B, H, S, D] by default): the positions the
    load balancer gives rank `rank`, in the balancer's order. A per-batch balancer ([B, S]
    indices) takes each batch entry's own positions."""
    seq_dim = seq_dim % tensor.dim()
    seq_len = tensor.shape[seq_dim]
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_sequence: rank must be in 0..{world_size - 1} (world_size {world_size}), got {rank}")
    if seq_len % world_size:
        raise ValueError(f"shard_sequence: the sequence ({seq_len}) must split evenly over {world_size} ranks")
    n = seq_len // world_size
    indices = _indices(load_balancer, seq_len, world_size)[:, rank * n:(rank + 1) * n].to(tensor.device)
    return _take(tensor, indices, seq_dim)


def _take(tensor, indices, seq_dim: int):
    """tensor's positions indices [1, n] along seq_dim, or each batch entry's own row of [B, n]."""
    if indices.shape[0] == 1:
        return tensor.index_select(seq_dim, indices[0])
    if seq_dim == 0 or indices.shape[0] != tensor.shape[0]:
        raise ValueError(f"load_balancer: its indices have {indices.shape[0]} rows, one per batch entry along dim 0, "
                         f"for a tensor of shape {tuple(tensor.shape)} (sequence dim {seq_dim})")
    return torch.stack([t.index_select(seq_dim - 1, i) for t, i in zip(tensor.unbind(0), indices)])


def unshard_sequence(shard: torch.Tensor, group=None, load_balancer=None, seq_dim: int = 2):
    """The whole sequence back on every rank from each rank's shard (an all-gather, then the
    balancer's order undone)."""
    import torch.distributed as dist

    group = _group_of(group)
    world = dist.get_world_size(group)
    seq_dim = seq_dim % shard.dim()
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    whole = torch.cat(parts, seq_dim)
    restore = torch.argsort(_indices(load_balancer, whole.shape[seq_dim], world), dim=1).to(whole.device)
    return _take(whole, restore, seq_dim)


class _GatherKeys(torch.autograd.Function):
    """All-gather along the sequence; the backward sums every rank's gradient of the gathered
    tensor and keeps this rank's slice (reduce-scatter where the backend has it)."""

    @staticmethod
    def forward(ctx, tensor, group, seq_dim):
        import torch.distributed as dist

        ctx.group, ctx.seq_dim = group, seq_dim
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, seq_dim)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        group, rank = ctx.group, dist.get_rank(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(dist.get_world_size(group), ctx.seq_dim)]
        if dist.get_backend(group) == dist.Backend.NCCL:
            mine = torch.empty_like(parts[rank])
            dist.reduce_scatter(mine, parts, group=group)
            return mine, None, None
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)   # gloo has no reduce-scatter
        return total.chunk(dist.get_world_size(group), ctx.seq_dim)[rank].contiguous(), None, None


def _from_block_mask(block_mask, seq_len, B, H):
    """(mask_mod, seq_len, B, H) of a global BlockMask (ours or torch's). Each rank plans its own
    runs from the mask_mod, so the tables must be the mask_mod's: tables given directly
    (from_kv_blocks) or a mask_mod set anew are refused, not silently replaced by the mask_mod."""
    from .block_mask import BlockMask

    ours = block_mask if isinstance(block_mask, BlockMask) else BlockMask.from_torch(block_mask)
    q_len, kv_len = ours.seq_lengths
    if q_len != kv_len or (seq_len is not None and seq_len != q_len):
        raise ValueError(f"mask_mod: a global BlockMask of the whole sequence ({seq_len} x {seq_len} tokens), "
                         f"got one of {q_len} x {kv_len}")
    batches, heads = ours.shape[:2]   # (a lazy mask's shape builds no tables)
    if not ours.tables_match_mask_mod:
        rebuilt = create_block_mask(ours.mask_mod, batches, heads, q_len, kv_len, device=ours.states.device,
                                    BLOCK_SIZE=ours.BLOCK_SIZE)
        if not torch.equal(rebuilt.states, ours.states):
            raise ValueError("mask_mod: this BlockMask's tables are not its mask_mod's (built from tables with "
                             "from_kv_blocks, or its mask_mod replaced); every rank plans from the mask_mod, so "
                             "pass a BlockMask from create_block_mask, or the mask_mod itself")
    return (ours.mask_mod, q_len, B if B is not None else (batches if batches > 1 else None),
            H if H is not None else (heads if heads > 1 else None))


def _runs(positions: list) -> list:
    """(local start, local end, global start) of each maximal run of consecutive positions."""
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append((start, i, positions[start]))
            start = i
    return runs


def _shifted_mask(mask_mod, b0, q0, kv0):
    if mask_mod is None:
        return None

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b + b0, h, q_idx + q0, kv_idx + kv0)
    shifted.__name__ = getattr(mask_mod, "__name__", "mask_mod")
    return shifted


def _shifted_score(score_mod, b0, q0, kv0):
    if score_mod is None:
        return None

    def shifted(score, b, h, q_idx, kv_idx):
        return score_mod(score, b + b0, h, q_idx + q0, kv_idx + kv0)
    return shifted


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Two attentions of the same queries over disjoint keys joined by log-sum-exp (natural log,
    [B, H, L] and [B, H, L, D], float32 or float64): a row that saw nothing in one part takes the
    other; NaN in either part stays NaN; a part with LSE +inf (a score_mod gave +inf) keeps the
    row's LSE +inf, as one attention over all the keys has it (its output is NaN either way)."""
    top = torch.maximum(lse_a, lse_b)
    infinite = top == float("inf")
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    out = (out_a * wa.unsqueeze(-1) + out_b * wb.unsqueeze(-1)) / torch.where(total > 0, total, 1).unsqueeze(-1)
    return out, torch.where(infinite, top.new_tensor(float("inf")), top + torch.log(total))


class ContextParallelFlexAttention:
    """flex_attention over a sequence sharded across `group` (a ProcessGroup or a 1-D DeviceMesh).

    mask_mod, score_mod: the global mods (positions are global); mask_mod may be the global
    BlockMask instead (its mask_mod, length, B and H are taken). B, H: as create_block_mask's
    (None: the mask does not depend on it). seq_len: the global length; every rank holds
    seq_len / world_size positions of q, k and v. load_balancer: None (rank r holds the r-th
    contiguous slice), "head_tail", or a balancer object (see the module's note).
    kv_exchange: "auto", "all_gather" or "ring" (module note). backend: the local calls' backend.
    Call with this rank's shards [B, Hq, n, D], [B, Hkv, n, D], [B, Hkv, n, Dv]; returns this
    rank's output shard (and its LSE with return_lse), in the shards' order. The block masks of
    each (query run, key run) are built on the first call and reused. As in any collective code,
    every rank makes the same calls: the same arguments, and a gradient wanted on all or none.
    """

    def __init__(self, mask_mod=None, seq_len: int | None = None, B=None, H=None, score_mod=None, group=None,
                 load_balancer=None, kv_exchange: str = "auto", scale=None, enable_gqa: bool = False,
                 backend: str = "auto", block_size=128):
        import torch.distributed as dist

        if hasattr(mask_mod, "mask_mod") and hasattr(mask_mod, "seq_lengths"):   # a global BlockMask (ours or torch's)
            mask_mod, seq_len, B, H = _from_block_mask(mask_mod, seq_len, B, H)
        if kv_exchange not in KV_EXCHANGES:
            raise ValueError(f"kv_exchange: one of {KV_EXCHANGES}, got {kv_exchange!r}")
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len: the global sequence length, a positive int, got {seq_len!r}")
        self.group = _group_of(group)
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if seq_len % self.world:
            raise ValueError(f"seq_len ({seq_len}) must split evenly over the {self.world} ranks")
        self.mask_mod = noop_mask if mask_mod is None else mask_mod
        self.score_mod, self.seq_len, self.B, self.H = score_mod, seq_len, B, H
        self.kv_exchange, self.scale, self.enable_gqa, self.backend = kv_exchange, scale, enable_gqa, backend
        self.block_size = block_size
        self.shard_len = seq_len // self.world
        self.indices = _indices(load_balancer, seq_len, self.world)
        self._masks = {}
        self._mask_state = self._kept_reads()

    def _kept_reads(self) -> "KeptReads | None":
        """What the block masks are built from, or None for a mask_mod that does not trace."""
        state = current_reads(self.mask_mod, "mask_mod")
        return KeptReads(state) if state is not None else None

    def positions(self, rank: int, batch: int = 0) -> list:
        row = self.indices[batch if self.indices.shape[0] > 1 else 0]
        return row[rank * self.shard_len:(rank + 1) * self.shard_len].tolist()

    def __call__(self, query, key, value, return_lse: bool = False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 4 or t.shape[2] != self.shard_len:
                raise ValueError(f"{name}: this rank's shard [B, H, {self.shard_len}, D] of the {self.seq_len}-token "
                                 f"sequence over {self.world} ranks, got shape {tuple(t.shape)}")
        kept = self._mask_state
        if kept is None or not (kept.complete and kept.holds(current_reads(self.mask_mod, "mask_mod"))):
            # the block masks (which tiles are full, which key shards the ring skips) came from the
            # values the mask reads: a number changed or a tensor written or re-bound since (on
            # the CPU also through .data, numpy or an inference tensor; CPU tables too large to
            # keep a copy of at every call), they are built again; for a mask_mod that does not
            # trace (torch.bucketize), whose reads are unknown, at every call
            self._masks.clear()
            self._mask_state = self._kept_reads()
        needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (query, key, value))
                                                  or bool(captured_tensors(self.score_mod)))
        exchange = self._exchange(key, value, needs_grad)
        if exchange == "ring" and needs_grad:
            raise NotImplementedError("kv_exchange='ring' is forward only: for gradients use kv_exchange='all_gather' "
                                      "(differentiable), or run under torch.no_grad()")
        per_batch = self.indices.shape[0] > 1
        if per_batch and self.indices.shape[0] != query.shape[0]:
            raise ValueError(f"load_balancer: its indices have {self.indices.shape[0]} rows for a batch of "
                             f"{query.shape[0]}")
        batches = [(b, slice(b, b + 1)) for b in range(query.shape[0])] if per_batch else [(0, slice(None))]
        if exchange == "all_gather":
            # k and v in one gather: one collective, and one backward whose order cannot differ by rank
            kv_all = _GatherKeys.apply(torch.cat([key, value.to(key.dtype)], -1), self.group, 2)
            k_all, v_all = kv_all[..., :key.shape[-1]], kv_all[..., key.shape[-1]:].to(value.dtype)
            results = [self._against_all(query[rows], k_all[rows], v_all[rows], b, per_batch) for b, rows in batches]
        else:
            results = self._ring(query, key, value, batches, per_batch)
        out = torch.cat([o for o, _ in results], 0) if per_batch else results[0][0]
        lse = torch.cat([s for _, s in results], 0) if per_batch else results[0][1]
        return (out, lse) if return_lse else out

    def _exchange(self, key, value, needs_grad: bool) -> str:
        """The exchange this call takes: "auto" gathers when a gradient is wanted (the ring has no
        backward) or when the gathered keys fit on every rank (agreed by all of them: ranks that
        chose differently would wait on each other's collectives)."""
        import torch.distributed as dist

        if self.kv_exchange != "auto":
            return self.kv_exchange
        if needs_grad:
            return "all_gather"
        gathered = (key.numel() * key.element_size() + value.numel() * value.element_size()) * self.world
        if key.device.type == "cuda":
            budget = torch.cuda.mem_get_info(key.device)[0] * GATHER_SHARE
        else:
            budget = GATHER_BYTES_CPU
        too_big = torch.tensor([float(gathered > budget)], device=key.device)
        dist.all_reduce(too_big, op=dist.ReduceOp.MAX, group=self.group)
        return "ring" if too_big.item() else "all_gather"

    def _block_mask(self, b: int, q_run, kv_run, per_batch: bool, device):
        """(block mask, whether any tile of it is visible) of query positions q_run = (start,
        length) against key positions kv_run."""
        key = (b, q_run, kv_run, str(device))
        if key not in self._masks:
            (q0, lq), (k0, lk) = q_run, kv_run
            batch = 1 if per_batch else self.B
            bm = create_block_mask(_shifted_mask(self.mask_mod, b if per_batch else 0, q0, k0), batch, self.H, lq, lk,
                                   device=device, BLOCK_SIZE=self.block_size)
            self._masks[key] = (bm, bool((bm.states != 0).any()))
        return self._masks[key]

    def _call(self, q, k, v, bm, b0, q0, k0):
        return flex_attention(q, k, v, score_mod=_shifted_score(self.score_mod, b0, q0, k0), block_mask=bm,
                              scale=self.scale, enable_gqa=self.enable_gqa, return_lse=True, backend=self.backend)

    def _empty(self, q, v):
        """The ring's running output and LSE: float32, float64 for float64 inputs (its precision kept)."""
        shape, dtype = (*q.shape[:3], v.shape[-1]), torch.promote_types(torch.float32, q.dtype)
        return (torch.zeros(shape, dtype=dtype, device=q.device),
                torch.full(q.shape[:3], float("-inf"), dtype=dtype, device=q.device))

    def _against_all(self, q, k_all, v_all, b, per_batch):
        """This rank's queries against the gathered keys, put back in global order."""
        order = torch.tensor(sum((self.positions(r, b) for r in range(self.world)), []), device=k_all.device)
        restore = torch.argsort(order)
        k_glob, v_glob = k_all.index_select(2, restore), v_all.index_select(2, restore)
        outs, lses = [], []
        for i0, i1, g0 in _runs(self.positions(self.rank, b)):
            # a run that sees nothing still goes through flex_attention: zeros, LSE -inf, and
            # outputs that keep the inputs' graph
            bm, _ = self._block_mask(b, (g0, i1 - i0), (0, self.seq_len), per_batch, q.device)
            out, lse = self._call(q[:, :, i0:i1], k_glob, v_glob, bm, b if per_batch else 0, g0, 0)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def _ring(self, query, key, value, batches, per_batch):
        """Each step attends the key shard held now while the next one travels (send to rank + 1,
        receive from rank - 1); the parts are joined by log-sum-exp."""
        import torch.distributed as dist

        acc = {b: self._empty(query[rows], value) for b, rows in batches}
        current = (key.contiguous(), value.contiguous())
        # P2POp names its peers by their global rank, whatever the group
        send_to = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        receive_from = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        for step in range(self.world):
            source = (self.rank - step) % self.world
            pending = None
            if step + 1 < self.world:
                incoming = (torch.empty_like(current[0]), torch.empty_like(current[1]))
                ops = [dist.P2POp(dist.isend, current[0], send_to, self.group),
                       dist.P2POp(dist.isend, current[1], send_to, self.group),
                       dist.P2POp(dist.irecv, incoming[0], receive_from, self.group),
                       dist.P2POp(dist.irecv, incoming[1], receive_from, self.group)]
                pending = (dist.batch_isend_irecv(ops), incoming)
            try:
                for b, rows in batches:
                    q = query[rows]
                    k, v = current[0][rows], current[1][rows]
                    out, lse = acc[b]
                    for i0, i1, g0 in _runs(self.positions(self.rank, b)):
                        for j0, j1, h0 in _runs(self.positions(source, b)):
                            bm, visible = self._block_mask(b, (g0, i1 - i0), (h0, j1 - j0), per_batch, q.device)
                            if not visible:
                                continue   # nothing of these keys is visible to these queries
                            o, s = self._call(q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], bm,
                                              b if per_batch else 0, g0, h0)
                            out[:, :, i0:i1], lse[:, :, i0:i1] = merge_partials(out[:, :, i0:i1], lse[:, :, i0:i1],
                                                                                o.to(out.dtype), s.to(lse.dtype))
            finally:
                # the posted sends and receives complete even when this step's attention raised:
                # left pending, they unmatch the group's next point-to-point exchange (a hang)
                if pending is not None:
                    for work in pending[0]:
                        work.wait()
            if pending is not None:
                current = pending[1]
        # the LSE as flex_attention gives it (float32), whatever the running precision
        return [(acc[b][0].to(query.dtype), acc[b][1].to(torch.float32)) for b, _ in batches]


def context_parallel_flex_attention(query, key, value, mask_mod=None, seq_len: int | None = None, *, B=None, H=None,
                                    score_mod=None, group=None, load_balancer=None, kv_exchange: str = "auto",
                                    scale=None, enable_gqa: bool = False, return_lse: bool = False,
                                    backend: str = "auto"):
    """One call of ContextParallelFlexAttention (which keeps its block masks for the next call:
    hold one when calling repeatedly). seq_len defaults to the shard length times the ranks."""
    import torch.distributed as dist

    if seq_len is None:
        seq_len = query.shape[2] * dist.get_world_size(_group_of(group))
    attention = ContextParallelFlexAttention(mask_mod, seq_len, B=B, H=H, score_mod=score_mod, group=group,
                                             load_balancer=load_balancer, kv_exchange=kv_exchange, scale=scale,
                                             enable_gqa=enable_gqa, backend=backend)
    return attention(query, key, value, return_lse=return_lse)


__all__ = ["ContextParallelFlexAttention", "HeadTailLoadBalancer", "PerDocumentLoadBalancer",
           "context_parallel_flex_attention", "merge_partials", "shard_sequence", "unshard_sequence"]
