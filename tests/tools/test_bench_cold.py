"""The cold-start benchmark's orchestration (flex_flash_infer_bench/cold.py): every item in a fresh
process with fresh compile caches, its first-call time read back, failures kept as rows. The
processes are stubbed (the items need a GPU); one real snippet is compiled to catch a typo."""
import json
import os
import subprocess
import types

import pytest

from flex_flash_infer_bench import cold


def test_each_item_gets_fresh_empty_caches_and_its_time_back(tmp_path):
    seen = []

    def runner(cmd, env, capture_output, text, timeout):
        seen.append({var: env[var] for var in ("FLASHINFER_WORKSPACE_BASE", "TORCHINDUCTOR_CACHE_DIR",
                                               "TRITON_CACHE_DIR")})
        assert all(os.path.isdir(p) and not os.listdir(p) for p in seen[-1].values())
        if cmd[1:3] == ["-m", "flex_flash_infer"]:
            return types.SimpleNamespace(returncode=0, stdout="ok\n", stderr="")
        if "lambda s, b, h, qi, kv" in cmd[2]:
            return types.SimpleNamespace(returncode=1, stdout="", stderr="Traceback\nRuntimeError: no GPU\n")
        return types.SimpleNamespace(returncode=0, stdout='noise\n{"s": 12.5}\n', stderr="")

    out = tmp_path / "cold.json"
    result = cold.run_cold_benchmark(str(out), ["readme_main_job", "bands_causal", "new_score_mod"], runner=runner)
    assert json.loads(out.read_text()) == result
    rows = {r["item"]: r for r in result["rows"]}
    assert rows["bands_causal"]["first_call_s"] == 12.5 and "error" not in rows["bands_causal"]
    assert "first_call_s" not in rows["readme_main_job"] and rows["readme_main_job"]["wall_s"] >= 0
    assert rows["new_score_mod"]["error"] == "RuntimeError: no GPU"
    assert len({tuple(s.values()) for s in seen}) == 3          # a new set of folders per item
    assert {"device", "torch", "flashinfer", "cpu_cores", "prebuilt_flashinfer_modules", "date", "commit"} <= set(result)


def test_a_hung_item_is_a_row_not_a_crash():
    def runner(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    row = cold.run_item("bands_causal", timeout_s=5, runner=runner)
    assert row["error"] == "over 5 s"


def test_unknown_items_are_named():
    with pytest.raises(ValueError, match="unknown cold-start items \\['causal'\\]"):
        cold.run_cold_benchmark(None, ["causal"])


@pytest.mark.parametrize("name", [n for n, body in cold.ITEMS.items() if body is not None])
def test_every_snippet_compiles(name):
    compile(cold.item_command(name)[2], name, "exec")


def test_the_modules_an_item_built_are_kept_with_their_compile_times(tmp_path):
    """Each module FlashInfer built under the item's fresh workspace: its files, the compile seconds
    they summed and the span from the first start to the last end (from its .ninja_log, in ms)."""
    def runner(cmd, env, **kw):
        for module, lines in (("mod_a", ["0\t60000\t1\ta.o\th", "0\t70000\t1\tb.o\th", "70000\t130000\t1\tc.o\th"]),
                              ("mod_b", ["5000\t15000\t1\tx.o\th"])):
            folder = os.path.join(env["FLASHINFER_WORKSPACE_BASE"], ".cache", "flashinfer", "90a", "cached_ops", module)
            os.makedirs(folder)
            with open(os.path.join(folder, ".ninja_log"), "w") as f:
                f.write("# ninja log v5\n" + "\n".join(lines) + "\n")
        return types.SimpleNamespace(returncode=0, stdout="ok\n", stderr="")

    row = cold.run_item("readme_main_job", runner=runner)
    assert row["builds"] == {"mod_a": {"files": 3, "work_s": 190.0, "span_s": 130.0},
                             "mod_b": {"files": 1, "work_s": 10.0, "span_s": 10.0}}


def test_the_seconds_before_and_after_the_builds_come_from_their_modules_clock(tmp_path):
    """A module's .so, written by its last step, places its build on the clock: the seconds of the
    process before the earliest build began and after the latest ended are kept with the row."""
    import time

    def runner(cmd, env, **kw):
        now = time.time()
        for module, span_ms, done_ago in (("mod_a", 60000, 3.0), ("mod_b", 20000, 30.0)):
            folder = os.path.join(env["FLASHINFER_WORKSPACE_BASE"], ".cache", "flashinfer", "90a", "cached_ops", module)
            os.makedirs(folder)
            with open(os.path.join(folder, ".ninja_log"), "w") as f:
                f.write(f"# ninja log v5\n0\t{span_ms}\t1\t{module}.so\th\n")
            so = os.path.join(folder, f"{module}.so")
            open(so, "w").close()
            os.utime(so, (now - done_ago, now - done_ago))
        return types.SimpleNamespace(returncode=0, stdout="ok\n", stderr="")

    row = cold.run_item("readme_main_job", runner=runner)
    # mod_a began 63 s before the (instant) stub returned, mod_b 50 s: the earliest start is mod_a's
    assert row["before_builds_s"] == pytest.approx(-63.0, abs=0.5)
    assert row["after_builds_s"] == pytest.approx(3.0, abs=0.5)
    assert row["builds"] == {"mod_a": {"files": 1, "work_s": 60.0, "span_s": 60.0},
                             "mod_b": {"files": 1, "work_s": 20.0, "span_s": 20.0}}


def test_edited_score_mod_times_a_second_unseen_score_mod():
    """edited_score_mod: one score_mod called first (untimed, it builds the generic part), then the
    first call of a different one timed, in the same process."""
    body = cold.ITEMS["edited_score_mod"]
    first_line, timed = body.split("\n")
    assert first_line.startswith("first(ours(") and "result = {'s': first(ours(" in timed
    mod = lambda line: line[line.index("lambda"):]   # noqa: E731
    assert mod(first_line) != mod(timed)
