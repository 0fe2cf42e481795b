"""Causal bands whose score_mod is a constant per head beyond a reach (a clamped relative-position
bias: score + table[h, clamp(q - kv, -M, M) + M] is score + table[h, 2M] wherever q - kv >= M).

Such a band splits in two: the keys within reach (a window band) run the compiled score_mod
variant, the keys beyond it run FlashInfer's plain causal kernel, whose log-sum-exp takes the
constant (a constant added to every score of a row shifts its lse and leaves its output alone),
and one merge_state joins them. Most keys then skip the per-score table lookup, which makes the
variant markedly slower than the plain causal kernel (docs/benchmarks.md).

A score_mod says so with a `constant_beyond` attribute (mods.hints.ConstantBeyond); a user's own score_mod
without it runs the compiled variant on every key. The hint is checked on sampled positions
when planned.
"""
from __future__ import annotations

import math
import torch

from ..core import nan_merge
from .bands import Band
from ..core.mask_eval import INDEX_DTYPE
from ..mods.hints import ConstantBeyond
from .ragged import planned_ragged
from ..core.hints import stated_hint

LOG2E = 1.0 / math.log(2.0)


def split_bands(bands, reach: int):
    """(near bands, far bands) of causal bands, or None when the split does not apply: a band that
    is not causal, or none with keys beyond reach. Near: the keys with q - kv < reach (a window);
    far: those with q - kv >= reach, a causal band of its own whose diagonal sits reach below."""
    if reach < 1 or not bands or not all(b.causal for b in bands):
        return None
    near, far = [], []
    for b in bands:
        # the band's keys satisfy kv <= q + delta; within reach: kv >= q - reach + 1
        near_window = b.delta + reach - 1
        if near_window < 0:   # every key beyond reach: the whole band is far (from its first row with a key)
            far.append(Band(max(b.q_start, b.kv_start - b.delta), b.q_end, b.kv_start, b.kv_end, True,
                            b.window_left))
            continue
        if 0 <= b.window_left <= near_window:
            near.append(b)   # every key within reach: the band stays whole
            continue
        q_start = max(b.q_start, b.kv_start + reach)   # first row with a key at kv <= q - reach
        if q_start >= b.q_end:
            near.append(b)
            continue
        near.append(Band(b.q_start, b.q_end, b.kv_start, b.kv_end, True, near_window))
        far_window = -1 if b.window_left < 0 else b.window_left - b.delta - reach
        far.append(Band(q_start, b.q_end, b.kv_start, b.q_end - reach, True, far_window))
    # far bands need rows with keys; the near launch, at least one band
    far = [b for b in far if b.q_start < b.q_end]
    return (near, far) if far and near else None


def hint_holds(score_mod, hint: ConstantBeyond, num_heads: int, samples: int = 256) -> bool:
    """The hint checked on random positions beyond reach (and random scores), on the CPU."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(hint.reach, hint.reach + (1 << 16), (samples,), generator=gen, dtype=INDEX_DTYPE)
    kv = q - hint.reach - torch.randint(0, 1 << 15, (samples,), generator=gen, dtype=INDEX_DTYPE)
    h = torch.randint(0, num_heads, (samples,), generator=gen, dtype=INDEX_DTYPE)
    b = torch.zeros(samples, dtype=INDEX_DTYPE)
    score = torch.randn(samples, generator=gen)
    values = hint.values(torch.device("cpu")).float()
    expected = score + (values[h] if values.numel() > 1 else values.reshape(()))
    try:
        got = score_mod(score, b, h, q, kv)
    except Exception:
        return False
    return got.shape == expected.shape and torch.allclose(got.float(), expected, rtol=1e-5, atol=1e-5)


class FarSplitBands:
    """run(q, k, v) -> base-2 (out, lse) of the split bands: the near bands through the compiled
    score_mod (near_runner, a ScoreModBands), then each far band through FlashInfer's plain
    kernel, merged in place into its rows.

    One far band without a window (causal attention, the common case) runs FlashInfer's batch
    ragged kernel, planned once and launched per batch entry, as flashinfer_backend runs such a
    band without a score_mod: faster in all than the far keys in the single call
    (docs/benchmarks.md). Other far bands (documents, windows) take the single-sequence call, which needs no plan
    per band."""

    def __init__(self, near_runner, far_bands, hint: ConstantBeyond, shape, dtype, scale, workspace,
                 hopper: bool = True):
        import flashinfer

        self.near = near_runner
        self.far_bands = far_bands
        self.shape = shape
        self.scale = scale
        self.single = flashinfer.single_prefill_with_kv_cache
        self.merge_in_place = flashinfer.merge_state_in_place
        self.ragged = None
        if len(far_bands) == 1 and far_bands[0].window_left < 0:
            band = far_bands[0]
            self.ragged = planned_ragged(workspace, "fa3" if hopper else "fa2",
                                         torch.tensor([0, band.q_end - band.q_start], dtype=torch.int32),
                                         torch.tensor([0, band.kv_end - band.kv_start], dtype=torch.int32),
                                         shape, dtype, causal=True, sm_scale=scale)
        self.hint, self.device = hint, torch.device(workspace.device)

    def _shift(self) -> torch.Tensor:
        """The far keys' lse shift, base 2, per head (a table may hold more heads than run), read
        at every call as the near keys' kernel reads the table (a learned bias stepped through
        .data moves no version counter)."""
        num_heads = self.shape[3]
        values = self.hint.values(self.device).detach().float().reshape(-1)
        return (values[:num_heads] if values.numel() > 1 else values.expand(num_heads)) * LOG2E

    def _far(self, q, k, v, band):
        if self.ragged is not None:
            return self.ragged.run(q, k, v, return_lse=True)
        return self.single(q, k, v, causal=True, window_left=band.window_left, sm_scale=self.scale, return_lse=True)

    def run(self, q, k, v, return_lse: bool = True):
        batch, q_len = self.shape[:2]
        shift = self._shift()
        out, lse = self.near.run(q, k, v)
        for b in range(batch):
            for band in self.far_bands:
                rows = slice(b * q_len + band.q_start, b * q_len + band.q_end)
                o, s = self._far(q[rows], k[b, band.kv_start:band.kv_end], v[b, band.kv_start:band.kv_end], band)
                nan_merge.merge_state_in_place(self.merge_in_place, out[rows], lse[rows], o, s.add_(shift))
        return (out, lse) if return_lse else out


def plan_split(score_mod, bands, num_heads: int):
    """(near bands, far bands, hint) when the score_mod carries a hint that holds and the bands
    split; else None (the compiled variant runs every key)."""
    hint = stated_hint(score_mod, "constant_beyond")
    if not isinstance(hint, ConstantBeyond):
        return None
    split = split_bands(bands, hint.reach)
    if split is None or not hint_holds(score_mod, hint, num_heads):
        return None
    return (*split, hint)
