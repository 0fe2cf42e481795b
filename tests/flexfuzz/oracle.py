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

# (output, LSE) tolerances per input dtype. float32/float64: the CPU model computes in float64 and
# keeps LSE in float32, as FlashInfer does; half types: rounding the output alone costs 2**-9
# (bf16) relative, and the real kernels multiply P in that type.
TOLERANCE = {"float64": (1e-5, 1e-4), "float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 1e-2)}


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
        s = torch.as_tensor(score_mod(s, *grid(b_idx, Hq, q_pos, kv_pos, q.device))).to(torch.float64).expand(s.shape)
    return s.masked_fill(~seen, -math.inf)


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
