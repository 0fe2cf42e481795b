"""The differential fuzzer's CI slice (tests/flexfuzz; issue 20): random mask_mod and score_mod
trees, shapes, doors and planner switches, through the CPU model of FlashInfer's kernels and the
reference backend, against a float64 dense oracle (and, for a share of the cases, torch's own
flex_attention). A fixed seed, whose first cases walk every planner route and door, and a fresh
seed printed for reproduction; each failure prints as Python source that reproduces it.
Longer campaigns and the GPU mode: scripts/fuzz.py."""
import os
import random

from flexfuzz import campaign

FIXED_SEED = 20
# Cases per test: 0.1 s each on an idle core, 0.5 s on a loaded one; FLEX_FUZZ_CASES scales the slice.
CASES = int(os.environ.get("FLEX_FUZZ_CASES", "150"))


def _verdict(summary, seed) -> str:
    return (f"fuzz seed {seed}: python scripts/fuzz.py --seed {seed} --cases {CASES} reruns this slice, "
            f"python scripts/fuzz.py --case SEED:INDEX one case\n" + summary.report())


def test_a_fixed_seed_reaches_every_route_and_finds_nothing():
    summary = campaign.run(seed=FIXED_SEED, cases=CASES, per_seed=CASES, torch_share=0.2)
    report = _verdict(summary, FIXED_SEED)
    print(report)
    assert not summary.invalid and not summary.generator_errors, report
    assert not summary.failures, report
    assert not summary.missing(), f"routes no case reached: {summary.missing()}\n{report}"


def test_a_fresh_seed_finds_nothing():
    seed = random.SystemRandom().randrange(1 << 31)
    print(f"fuzz seed {seed}")
    summary = campaign.run(seed=seed, cases=CASES, per_seed=CASES, torch_share=0.2)
    report = _verdict(summary, seed)
    print(report)
    assert not summary.invalid and not summary.generator_errors, report
    assert not summary.failures, report


def test_every_tunable_the_fuzzer_sets_exists():
    """A tunable renamed or deleted in the library would make the fuzzer's setting a silent no-op."""
    import importlib

    from flexfuzz.cases import SWITCHES

    for switch in SWITCHES:
        module, name = switch.rsplit(".", 1)
        assert hasattr(importlib.import_module(f"flex_flash_infer.{module}"), name), switch


def test_the_gpu_score_pool_can_be_narrowed_to_one_member():
    """scripts/gpu_fuzz.sh runs one process per pool member so that their compiles run side by
    side: a process narrowed to one member must never draw another (it would compile it too)."""
    import pytest

    from flexfuzz.cases import Profile, generate_case

    sources = {}
    for member in ("alibi", "gen1"):
        profile = Profile("gpu", 1.0, (128,), (member,))
        scored = [generate_case(31, i, profile, None, "cpu", []).mods for i in range(60)]
        scored = [s for s in scored if "score_mod = None" not in s]
        assert len(scored) >= 10, member
        sources[member] = scored
    assert all("alibi" in s for s in sources["alibi"])
    # the generated member's score_mod is the same function in every case (its tables differ)
    score_defs = {s[s.index("def score_mod"):] .split("\n\n")[0] for s in sources["gen1"] if "def score_mod" in s}
    assert len(score_defs) == 1 and not any("alibi" in s or "softcap" in s for s in sources["gen1"])
    with pytest.raises(ValueError, match="score_pool"):
        Profile("gpu", 1.0, (128,), ("nope",))


def _changed_cases(seed, count):
    from flexfuzz.cases import generate_case

    found, index = [], 0
    while len(found) < count:
        case = generate_case(seed, index)
        index += 1
        if case.changed:
            found.append(case)
    return found


def test_values_changed_between_calls_are_seen():
    """Cases whose captured numbers and float tables change after a first call (the seed API, and
    flex_attention's score_mod): the next call runs the new values or asks for prepare() again.
    The same cases with a memo that never re-traces (core/read_guard) must fail: the cases can
    tell a stale plan from a fresh one."""
    import pytest

    from flexfuzz.doors import run_case
    from flex_flash_infer.core import read_guard

    cases = _changed_cases(FIXED_SEED, 40)
    assert {c.door for c in cases} == {"flex", "seed"}
    results = [run_case(c) for c in cases]
    failed = [(c.name, r.problems) for c, r in zip(cases, results) if r.status == "fail"]
    assert not failed, failed
    assert sum(r.status == "pass" for r in results) >= 30
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(read_guard.ReadGuard, "holds", lambda self: True)
        stale = [run_case(c).status for c in cases]
    assert stale.count("fail") >= 5, stale
