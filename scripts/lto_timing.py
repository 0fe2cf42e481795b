"""Timed builds of lto_variants' modules, shared by the LTO scripts (lto_compile_cost.py,
lto_pack.py, lto_launch_check.py): the generic objects, whose times are kept beside them (a later
run that finds them built still reports what building them took), and one score_mod's module from
an empty per-score cache, step by step."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time


def generic_build_times(module, jobs: int) -> dict:
    """Build the generic objects that are missing (timed, recorded in their build folder), and
    return the recorded times, with this_run saying whether this call built them."""
    record = module.build_dir / "lto_generic_build_times.json"
    if module.compile_jobs():
        per_file = {}
        start = time.perf_counter()
        module.build(jobs, per_file)
        times = {"wall": round(time.perf_counter() - start, 2), "jobs": jobs, "per_file": per_file,
                 "date": datetime.datetime.now().isoformat(timespec="seconds"), "load": os.getloadavg()}
        record.write_text(json.dumps(times, indent=1))
        return {**times, "this_run": True}
    return {**(json.loads(record.read_text()) if record.exists() else {}), "this_run": False}


def score_mod_build(module, graph, position_bound, jobs: int):
    """(key, cubins, .so path, seconds by step) of the score_mod's module built from nothing: its
    score file, the nvJitLink links (each file's too), then the registrations and the .so."""
    key = module.score_key(graph, position_bound)
    shutil.rmtree(module.score_dir(key), ignore_errors=True)
    module.library_path(key).unlink(missing_ok=True)
    steps, links = {}, {}
    start = time.perf_counter()
    compiled, obj = module.compile_score(graph, position_bound)
    assert compiled == key
    steps["score file -dc (s)"] = round(time.perf_counter() - start, 2)
    mark = time.perf_counter()
    cubins = module.link_kernels(key, obj, jobs, links)
    steps[f"nvJitLink links, {len(cubins)} files, {jobs} at a time (s)"] = round(time.perf_counter() - mark, 2)
    steps["per link (s)"] = links
    mark = time.perf_counter()
    so = module.link_library(key, cubins)
    steps["fatbinary + stubs + .so (s)"] = round(time.perf_counter() - mark, 2)
    steps["build total (s)"] = round(time.perf_counter() - start, 2)
    return key, cubins, so, steps
