"""Names for the way a plan runs: FlashInferPlan.route refined by the launches it made (the band
runner's kind, compiled variants on tiles, the merge kernel of key columns), and the same for
the seed API's segments and a paged plan. Read with getattr defaults: the planner's internals
change, and a renamed attribute must not break the fuzzer, only blur a count."""
from __future__ import annotations


def plan_route(plan) -> str:
    route = getattr(plan, "route", "?")
    if getattr(plan, "bands", None):
        runner = getattr(plan, "band_runner", None)
        kind = type(runner).__name__
        if kind == "ScoreModBands":
            route += "/score-mod" + ("" if getattr(runner, "hopper", True) else "-fa2")
        elif kind == "FarSplitBands":
            route += "/far-split"
        elif kind == "HeadWindowRunner":   # a plain window on the exact-start kernel (head_windows.py)
            route += "/exact-window" + ("+sinks" if getattr(runner, "sink_len", 0) else "")
        elif getattr(runner, "soft_cap", None):
            route += "/soft-cap"
        elif getattr(runner, "ragged", None) is not None:
            route += "/ragged"
        if getattr(plan, "column_counts", None) is not None:
            route += "/merge-kernel"
    if getattr(plan, "head_windows", None) is not None:   # every head one causal window: one launch
        route += "/one-launch"
    groups = getattr(plan, "groups", None) or []
    gathers = [g.full for g in groups if type(getattr(g, "full", None)).__name__ == "TileGatherLaunch"]
    if gathers:   # whole tiles on the TMA kernel gathering each request's tiles (tile_gather.py)
        route += "/gather" + ("/soft-cap" if any(getattr(f, "soft_cap", 0) for f in gathers) else "")
    if any(getattr(g, "full_args", None) or getattr(g, "partial_args", None) for g in groups):
        route += "/compiled"
    if getattr(plan, "head_major", False):
        route += "/head-major"
    return route


def varlen_routes(flex) -> list:
    """The seed API: 'varlen-one-launch', or each sequence's plan ('reference' off FlashInfer)."""
    prepared = flex._prepared
    if getattr(prepared, "ragged", None) is not None:
        return ["varlen-one-launch"]
    if prepared.backend != "flashinfer":
        return ["reference"]
    segments = prepared.segments
    prefix = "varlen:" if len(segments) > 1 else ""
    return [prefix + (plan_route(s.plan) if s.plan is not None else "no-keys") for s in segments]


def paged_route(paged) -> str:
    planned = paged._planned
    if planned.get("launches") is None:
        return "paged-reference"
    plan = planned["plan"]
    route = "paged-decode" if plan.decode else "paged-prefill"
    if planned.get("variants") is not None:
        route += "/compiled"
    if plan.full is None and plan.partial is None:
        route += "/empty"
    return route
