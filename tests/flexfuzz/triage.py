"""Make a failing case small and say what it depends on.

shrink(): greedy, while the case keeps failing with the same signature: one batch entry, fewer
heads, shorter sequences, no NaN, no gradient, default switches. The mods' tables keep their
sizes (they cover every position of the smaller problem too), so the mods stay valid.
triage(): the same case on the reference backend, without its score_mod, without its mask, on
fa2 instead of Hopper's paths: which of these still fail points at the part that is wrong.
"""
from __future__ import annotations

import dataclasses

from .campaign import signature
from .doors import build_mods, run_case


def _fails_same(case, sig: str) -> bool:
    try:
        result = run_case(case)
    except Exception:
        return False
    return result.status == "fail" and signature(result).split(" | ")[1] == sig


def shrink(case, result, budget: int = 24):
    """A smaller case with the same kind of failure (or the case itself)."""
    if case.door not in ("flex", "decode", "seed"):
        return case
    sig = signature(result).split(" | ")[1]
    tries = []

    def candidates(c):
        yield dict(nan="") if c.nan else None
        yield dict(grad=False) if c.grad else None
        yield dict(switches={}) if c.switches else None
        yield dict(B=1) if c.B > 1 and c.door != "seed" else None
        yield dict(Hq=c.Hq // c.Hkv, Hkv=1) if c.Hkv > 1 else None
        yield dict(Hq=1) if c.Hkv == 1 and c.Hq > 1 else None
        for n in (c.L // 2, c.L - 1):
            if 1 <= n < c.L and (c.door != "decode" or c.decode_pos + c.decode_rows <= n):
                yield dict(L=n)
        for n in (c.S // 2, c.S - 1):
            if 1 <= n < c.S:
                yield dict(S=n)

    current = case
    changed = True
    while changed and len(tries) < budget:
        changed = False
        for change in candidates(current):
            if change is None or len(tries) >= budget:
                continue
            trial = dataclasses.replace(current, **change)
            tries.append(change)
            if _fails_same(trial, sig):
                current, changed = trial, True
                break
    return current


def triage(case) -> list:
    """Sentences: how the case fares with one part changed."""
    mask_mod, score_mod = build_mods(case)
    variants = []
    if case.backend == "flashinfer":
        variants.append(("on the reference backend", dataclasses.replace(case, backend="reference"), None))
        if case.hopper:
            variants.append(("on fa2 (not Hopper)", dataclasses.replace(case, hopper=False), None))
    if score_mod is not None:
        variants.append(("without the score_mod", case, lambda: (build_mods(case)[0], None)))
    if mask_mod is not None and case.door != "paged":
        variants.append(("without the mask", case, lambda: (None, build_mods(case)[1])))
    lines = []
    for what, variant, build in variants:
        try:
            result = run_case(variant, build)
            verdict = {"pass": "passes"}.get(result.status, result.status)
            if result.problems:
                verdict += f" ({result.problems[0][:120]})"
        except Exception as e:   # the variant may not apply (the decode idiom needs a mask, say)
            verdict = f"does not run ({type(e).__name__})"
        lines.append(f"{what}: {verdict}")
    return lines
