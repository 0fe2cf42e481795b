"""The oracles and the comparison.

dense(): float64 attention on the whole [B, H, L, S] grid, the mods evaluated by plain torch on
int64 index tensors (torch's eager semantics, narrow casts wrapping as torch wraps them); a row
that sees no key gives output 0 and LSE -inf; NaN propagates from whatever the row sees. It
is differentiable (the grad oracle). torch_flex(): torch's own flex_attention (eager on the CPU)
with torch's create_block_mask, run to check that oracle's conventions against torch's.

compare(): NaN must sit exactly where the oracle has NaN; -inf LSE exactly where the oracle's is;
elsewhere |got - want| <= tol * (1 + |want|) element by element (a norm would hide one wrong row).
"""
from __future__ import annotations

import math

import torch

# (output, LSE) tolerances per input dtype. float32/float64: the CPU model keeps LSE in float32 and
# runs compiled score_mods in float32, as FlashInfer does, and the paged reference computes in
# float32 (float64 inputs get no tighter bound); half types: rounding the output alone costs 2**-9
# (bf16) relative, and the real kernels multiply P in that type.
TOLERANCE = {"float64": (1e-4, 1e-4), "float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 1e-2)}
# A score s computed in float32 is off by up to |s| * 2**-24 per rounding, and the output moves
# with the score: past |s| ~ 100 that, not TOLERANCE, bounds what float32 arithmetic can promise.
FLOAT32_ERROR_PER_SCORE = 20 * 2.0 ** -24


class Largest:
    """The largest finite |score| the oracle met inside `with Largest() as m:` (m.value)."""
    active: list = []

    def __enter__(self):
        self.value = 0.0
        Largest.active.append(self)
        return self

    def __exit__(self, *exc):
        Largest.active.remove(self)


def _note_magnitude(s: torch.Tensor) -> None:
    if Largest.active and s.numel():
        finite = s.detach()[torch.isfinite(s.detach())]
        if finite.numel():
            for m in Largest.active:
                m.value = max(m.value, float(finite.abs().max()))


def tolerance(dtype: str, largest_score: float) -> tuple:
    out, lse = TOLERANCE[dtype]
    if dtype in ("float32", "float64"):
        slack = FLOAT32_ERROR_PER_SCORE * largest_score
        return max(out, slack), max(lse, slack)
    return out, lse


def grid(b_idx, heads: int, q_pos, kv_pos, device):
    """int64 index tensors [B,1,1,1], [1,H,1,1], [1,1,L,1], [1,1,1,S]."""
    as_long = lambda x: torch.as_tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return (as_long(b_idx).view(-1, 1, 1, 1), torch.arange(heads, device=device).view(1, -1, 1, 1),
            as_long(q_pos).view(1, 1, -1, 1), as_long(kv_pos).view(1, 1, 1, -1))


def visible(mask_mod, b_idx, heads, q_pos, kv_pos, device) -> torch.Tensor:
    """The mask as bool [B, H, L, S] (everything visible for mask_mod None)."""
    b, h, q, kv = grid(b_idx, heads, q_pos, kv_pos, device)
    shape = (b.shape[0], heads, q.shape[2], kv.shape[3])
    if mask_mod is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    out = torch.as_tensor(mask_mod(b, h, q, kv), device=device)
    if out.dtype != torch.bool:
        raise TypeError(f"the generated mask_mod returned {out.dtype}")
    return out.expand(shape)


def scores(q, k, mask_mod, score_mod, scale, b_idx, q_pos, kv_pos):
    """float64 [B, Hq, L, S]: scaled scores after the score_mod, -inf where the mask hides them."""
    Hq = q.shape[1]
    kd = k.double().repeat_interleave(Hq // k.shape[1], 1)
    s = torch.einsum("bhld,bhsd->bhls", q.double(), kd) * scale
    seen = visible(mask_mod, b_idx, Hq, q_pos, kv_pos, q.device)
    if score_mod is not None:
        # device=: a score_mod returning a Python number gives a host tensor, which the mask on
        # q's device cannot fill on a GPU
        s = torch.as_tensor(score_mod(s, *grid(b_idx, Hq, q_pos, kv_pos, q.device)), device=q.device).to(
            torch.float64).expand(s.shape)
    s = s.masked_fill(~seen, -math.inf)
    _note_magnitude(s)
    return s


def dense(q, k, v, mask_mod, score_mod, scale, b_idx, q_pos, kv_pos):
    """(out [B, Hq, L, Ev], lse [B, Hq, L]) in float64; q [B, Hq, L, E], k/v [B, Hkv, S, *]."""
    vd = v.double().repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = scores(q, k, mask_mod, score_mod, scale, b_idx, q_pos, kv_pos)
    # rows with nothing to attend: lse -inf, output 0, and no NaN in the gradient through them
    dead = torch.isneginf(s).all(-1, keepdim=True).detach()
    s = torch.where(dead, 0.0, s)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(dead, 0.0, torch.exp(s - lse))
    out = torch.einsum("bhls,bhsd->bhld", p, vd)
    return out, torch.where(dead, -math.inf, lse).squeeze(-1)


def max_scores(q, k, mask_mod, score_mod, scale, b_idx, q_pos, kv_pos):
    """Each row's largest visible score after the score_mod (-inf for a row that sees nothing)."""
    s = scores(q, k, mask_mod, score_mod, scale, b_idx, q_pos, kv_pos)
    return s.amax(-1) if s.shape[-1] else s.new_full(s.shape[:-1], -math.inf)


def torch_flex(q, k, v, mask_mod, score_mod, scale, b_idx_count: int, q_len: int, kv_len: int):
    """torch's flex_attention in eager mode: (out, natural-log lse)."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_mask = None if mask_mod is None else create_block_mask(mask_mod, b_idx_count, q.shape[1], q_len, kv_len,
                                                                      device=q.device)
        out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    return out, lse


def tile_problems(states: torch.Tensor, seen: torch.Tensor, block) -> list:
    """A block mask's tile states against the dense mask [B, H, L, S]: a full tile must hold no
    hidden pair (else the kernels skip the mask there), an empty one no visible pair (else they skip
    keys). A partial tile that is in fact full or empty only costs time. B or H of 1 broadcast."""
    from flex_flash_infer.masks.block_build import EMPTY, FULL

    bq, bk = block
    B, H, L, S = seen.shape
    nq, nk = states.shape[-2:]
    pad = torch.zeros(B, H, nq * bq, nk * bk, dtype=torch.bool, device=seen.device)
    pad[:, :, :L, :S] = seen
    tiles = pad.view(B, H, nq, bq, nk, bk)
    any_seen = tiles.any(5).any(3)
    rows = torch.zeros(nq * bq, dtype=torch.bool, device=seen.device)
    rows[:L] = True
    hidden = (~tiles & rows.view(1, 1, nq, bq, 1, 1)).any(5).any(3)   # padded keys count as hidden
    if S % bk:
        hidden[..., -1] = True
    states = states.to(seen.device).expand(B, H, nq, nk)
    problems = []
    if (bad := (states == FULL) & hidden).any():
        problems.append(f"tiles: FULL tiles with hidden pairs, at [b, h, q tile, kv tile] {_where(bad)}")
    if (bad := (states == EMPTY) & any_seen).any():
        problems.append(f"tiles: EMPTY tiles with visible pairs, at {_where(bad)}")
    return problems


def _where(mask: torch.Tensor, limit: int = 3) -> str:
    idx = mask.nonzero()[:limit].tolist()
    return ", ".join(str(tuple(i)) for i in idx) + (" ..." if int(mask.sum()) > limit else "")


def compare(what: str, got, want, tol: float, lse: bool = False) -> list:
    """Problems of got against want (both [B, H, L(, D)]), as sentences; [] when they agree."""
    if got is None:
        return [f"{what}: missing"]
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return [f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"]
    problems = []
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    if not torch.equal(nan_got, nan_want):
        extra, lost = nan_got & ~nan_want, nan_want & ~nan_got
        if extra.any():
            problems.append(f"{what}: NaN where the oracle has a number, at [b, h, row(, d)] {_where(extra)}")
        if lost.any():
            problems.append(f"{what}: a number where the oracle has NaN, at {_where(lost)}")
    both = ~(nan_got | nan_want)
    if lse:
        inf_got, inf_want = torch.isneginf(got) & both, torch.isneginf(want) & both
        if not torch.equal(inf_got, inf_want):
            if (inf_got & ~inf_want).any():
                problems.append(f"{what}: -inf for rows that see keys, at {_where(inf_got & ~inf_want)}")
            if (inf_want & ~inf_got).any():
                problems.append(f"{what}: finite for rows that see no key, at {_where(inf_want & ~inf_got)} "
                                f"(got {got[inf_want & ~inf_got][:3].tolist()})")
        pos_got, pos_want = torch.isposinf(got) & both, torch.isposinf(want) & both
        if not torch.equal(pos_got, pos_want):   # a +inf score gives +inf, as torch: only there
            problems.append(f"{what}: +inf where the oracle has {'a number' if (pos_got & ~pos_want).any() else '+inf'}"
                            f", at {_where(pos_got ^ pos_want)}")
        both &= torch.isfinite(got) & torch.isfinite(want)
    err = torch.where(both, (got - want).abs(), 0.0)
    allowed = tol * (1 + want.abs())
    bad = both & (err > allowed)
    if bad.any():
        worst = torch.where(bad, err, 0.0).argmax()
        at = tuple(int(i) for i in torch.unravel_index(worst, err.shape))
        rows = bad.reshape(-1, bad.shape[-1]).any(-1).sum() if not lse else bad.sum()
        problems.append(f"{what}: max error {float(err.reshape(-1)[worst]):.3g} at {at} (got {float(got[at]):.6g}, "
                        f"want {float(want[at]):.6g}, tol {tol:g}); {int(rows)} bad rows")
    return problems


def max_error(got, want) -> float:
    """The largest |got - want| / (1 + |want|) over entries where both are finite (for summaries)."""
    if got is None:
        return float("nan")
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    ok = torch.isfinite(got) & torch.isfinite(want)
    if not ok.any():
        return 0.0
    return float(((got - want).abs() / (1 + want.abs()))[ok].max())
