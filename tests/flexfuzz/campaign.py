"""Many cases: counts per door and route, failures grouped by what went wrong, a JSON summary."""
from __future__ import annotations

import random
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

from .cases import TOUR, generate_case
from .doors import run_case

# Routes every CPU campaign must reach (a route no case takes is a route the fuzzer does not test),
CPU_ROUTES = ["bands", "bands/ragged", "bands/exact-window", "bands+columns", "bands+columns/exact-window",
              "bands+columns/exact-window+sinks",
              "bands-per-head", "bands-per-head/one-launch", "tiles", "tiles-causal", "tiles/gather",
              "tiles-causal/gather", "tiles-causal/gather/soft-cap",
              "tiles-per-head/head-major", "tiles/compiled", "bands/soft-cap", "bands/score-mod",
              "bands/score-mod-fa2", "bands/far-split", "paged-decode", "paged-decode/graph", "paged-prefill", "paged-prefill/compiled",
              "varlen-one-launch", "reference"]


@dataclass
class Summary:
    profile: str
    seeds: list = field(default_factory=list)
    cases: int = 0
    seconds: float = 0.0
    status: Counter = field(default_factory=Counter)
    routes: Counter = field(default_factory=Counter)           # "door route" -> cases
    route_errors: dict = field(default_factory=dict)           # route -> largest output error
    failures: dict = field(default_factory=dict)               # signature -> [Result, ...]
    refusals: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    invalid: list = field(default_factory=list)
    minimal: dict = field(default_factory=dict)                # signature -> (shrunk case, triage sentences)
    generator_errors: list = field(default_factory=list)

    def add(self, result) -> None:
        self.cases += 1
        self.status[result.status] += 1
        for route in set(result.routes):
            self.routes[f"{result.case.door} {route}"] += 1
            if result.status == "pass":
                self.route_errors[route] = max(self.route_errors.get(route, 0.0), result.error)
        if result.status == "fail":
            self.failures.setdefault(signature(result), []).append(result)
        elif result.status == "refused":
            self.refusals[_generic(result.problems[0])] += 1
        elif result.status == "invalid":
            self.invalid.append(result)
        for note in result.notes:
            self.notes[_generic(note)] += 1

    def reached(self) -> set:
        return {key.split(" ", 1)[1] for key in self.routes}

    def missing(self, wanted=None) -> list:
        wanted = wanted or CPU_ROUTES
        reached = {r.split(":", 1)[-1] for r in self.reached()}
        return [r for r in wanted if r not in reached]

    def report(self, sources: int = 1) -> str:
        lines = [f"{self.cases} cases in {self.seconds:.0f} s, seeds {self.seeds}: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(self.status.items()))]
        lines.append("cases per door and route (largest output error of a passing case):")
        for key, n in sorted(self.routes.items()):
            route = key.split(" ", 1)[1]
            err = self.route_errors.get(route)
            lines.append(f"  {n:6d}  {key}" + (f"   ({err:.2g})" if err is not None else ""))
        if self.refusals:
            lines.append("refused (an error that says why, not a wrong answer):")
            lines += [f"  {n:6d}  {text}" for text, n in self.refusals.most_common()]
        if self.notes:
            lines.append("notes:")
            lines += [f"  {n:6d}  {text}" for text, n in self.notes.most_common()]
        for result in self.invalid[:3]:
            lines.append(f"INVALID case {result.case.name} (a generator bug): {result.problems}")
        lines += [f"GENERATOR BUG: {text}" for text in self.generator_errors[:3]]
        for sig, results in self.failures.items():
            first = min(results, key=_size)
            lines.append("")
            lines.append(f"FAILURE x{len(results)} [{sig}]: cases " + " ".join(r.case.name for r in results[:12]))
            lines += ["  " + p for p in first.problems]
            case, notes = self.minimal.get(sig, (first.case, []))
            lines += [f"  {note}" for note in notes]
            lines.append(f"  routes {first.routes}; smallest case {first.case.name}"
                         + (", shrunk:" if case is not first.case else ":"))
            if sources:
                lines += ["    " + line for line in case.source().splitlines()]
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"profile": self.profile, "seeds": self.seeds, "cases": self.cases, "seconds": round(self.seconds, 1),
                "status": dict(self.status), "routes": dict(sorted(self.routes.items())),
                "route_max_error": {k: float(f"{v:.3g}") for k, v in sorted(self.route_errors.items())},
                "refusals": dict(self.refusals), "notes": dict(self.notes),
                "failures": [{"signature": sig, "count": len(rs), "cases": [r.case.name for r in rs],
                              "problems": min(rs, key=_size).problems,
                              "triage": self.minimal.get(sig, (None, []))[1],
                              "source": self.minimal.get(sig, (min(rs, key=_size).case,))[0].source()}
                             for sig, rs in self.failures.items()],
                "invalid": [{"case": r.case.name, "problems": r.problems, "source": r.case.source()}
                            for r in self.invalid],
                "generator_errors": self.generator_errors}


def _size(result) -> int:
    c = result.case
    return c.B * c.Hq * max(c.L, 1) * max(c.S, 1) + len(c.mods) * 100


def _generic(text: str) -> str:
    """A message with its numbers and positions blanked, to group equal problems."""
    text = re.sub(r"\(\d[^)]*\)", "(...)", text)
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", text)[:200]


def signature(result) -> str:
    """What went wrong, in a form equal across cases with the same cause: the first problem's kind
    (and where an exception came from), the door, the route."""
    first = result.problems[0]
    if first.startswith("raised"):
        kind = _generic(first.split(":")[0] + " " + (result.problems[1] if len(result.problems) > 1 else ""))
    else:
        kind = first.split(":")[0] + ": " + ("NaN" if "NaN" in first else "-inf" if "inf" in first
                                             else "error" if "max error" in first else _generic(first.split(":", 1)[1]))
    return f"{result.case.door} {'/'.join(sorted(set(result.routes))) or '?'} | {kind}"


def run(seed: int | None = None, cases: int | None = None, minutes: float | None = None, profile: str = "cpu",
        dtypes=None, device: str = "cpu", per_seed: int = 200, torch_share: float = 0.25, progress=None,
        avoid=(), checkpoint=None, simulated: bool = False) -> Summary:
    """Cases (seed, 0), (seed, 1), ... then the next seed after per_seed cases, until `cases` ran
    or `minutes` passed. progress(result) is called after each case, checkpoint(summary) too (the
    summary so far, for a campaign that may be killed before it ends). simulated: the CPU profile's
    cases on a simulated CUDA device (simulated.py): device "cuda", FlashInfer's CPU model, and
    every host/device mix raising as on a GPU (torch's flex_attention is not run beside them)."""
    if simulated:
        from .simulated import simulated as simulation

        with simulation():
            return run(seed, cases, minutes, profile, dtypes, "cuda", per_seed, 0.0, progress, avoid, checkpoint)
    seed = random.SystemRandom().randrange(1 << 31) if seed is None else seed
    summary = Summary(getattr(profile, "name", profile), seeds=[seed])
    start = time.perf_counter()
    index = 0
    picker = random.Random(seed)
    while True:
        if cases is not None and summary.cases >= cases:
            break
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            break
        if index >= max(per_seed, len(TOUR)):
            seed, index = seed + 1, 0
            summary.seeds.append(seed)
        try:
            case = generate_case(seed, index, profile, dtypes, device, avoid)
        except Exception as e:   # a generator bug: counted, and the campaign goes on
            summary.status["invalid"] += 1
            summary.generator_errors.append(f"case {seed}:{index} not generated: {type(e).__name__}: {e}")
            summary.cases += 1
            index += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_case(case, torch_check=picker.random() < torch_share)
        summary.add(result)
        if progress:
            progress(result)
        if checkpoint:
            summary.seconds = time.perf_counter() - start
            checkpoint(summary)
        index += 1
    summary.seconds = time.perf_counter() - start
    return summary


def minimize(summary: Summary) -> None:
    """Shrink and triage the smallest case of each kind of failure (a few runs each)."""
    from .triage import shrink, triage

    for sig, results in summary.failures.items():
        first = min(results, key=_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case = shrink(first.case, first)
            summary.minimal[sig] = (case, triage(case))

