"""The command line: `python -m flex_flash_infer [check|demo]` (CPU: reference backend vs SDPA)."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from flex_flash_infer.tools import cli

REPO = pathlib.Path(__file__).resolve().parents[2]
ATTAMBA_CHECK = ["check", "--q-len", "200", "--kv-len", "300", "--num-qo-heads", "4", "--num-kv-heads", "2",
                 "--head-dim", "32", "--mask", "attamba", "--window-size", "64", "--chunk-size", "32"]
ROW = re.compile(r"^(\S+)\s+(reference|flashinfer)\s+(\S+)\s+(\S+)\s+rel_err (\S+)\s+max_abs (\S+)\s+(PASS|FAIL)$")


def run_module(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "flex_flash_infer", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def rows(text):
    return [m.groups() for m in map(ROW.match, text.splitlines()) if m]


def assert_passing_row(groups, mask):
    name, backend, device, dtype, rel, max_abs, verdict = groups
    assert name == mask and verdict == "PASS"
    assert float(rel) <= cli.TOLERANCE[cli.DTYPES[dtype]]
    if not torch.cuda.is_available():
        assert (backend, device, dtype) == ("reference", "cpu", "float32")


def test_check_attamba_subprocess():
    result = run_module(ATTAMBA_CHECK)
    assert result.returncode == 0, result.stderr
    found = rows(result.stdout)
    assert len(found) == 1, result.stdout
    assert_passing_row(found[0], "attamba")


def test_check_attamba_in_process(capsys):
    assert cli.main(ATTAMBA_CHECK) == 0
    found = rows(capsys.readouterr().out)
    assert len(found) == 1
    assert_passing_row(found[0], "attamba")


def test_default_demo_subprocess():
    result = run_module([])
    assert result.returncode == 0, result.stderr
    found = rows(result.stdout)
    assert [r[0] for r in found] == ["causal", "sliding_window", "attamba"], result.stdout
    for groups in found:
        assert_passing_row(groups, groups[0])
    assert result.stdout.count("PASS") == 3 and "FAIL" not in result.stdout


def test_demo_subcommand_in_process(capsys):
    assert cli.main(["demo"]) == 0
    found = rows(capsys.readouterr().out)
    assert [r[0] for r in found] == ["causal", "sliding_window", "attamba"]
    assert all(r[-1] == "PASS" for r in found)


def test_demo_on_a_gpu_prepares_its_checks_side_by_side(monkeypatch, capsys):
    """On a GPU the demo's three checks are prepared at once, each in a thread of its own (their
    first prepare() builds their kernels), before any check runs; each check then runs the
    FlexFlashInfer prepared for it."""
    import threading
    import time

    events, made = [], {}

    def prepared_check(*args):
        mask = args[5]
        events.append(("prepare", mask, threading.get_ident()))
        time.sleep(0.05)   # a build: the others start meanwhile
        made[mask] = object()
        return made[mask]

    def run_check(*args, flex=None):
        events.append(("run", args[5], flex is made[args[5]]))
        return 0.0, 0.0, True, "flashinfer"

    monkeypatch.setattr(cli, "device_error", lambda command, device: None)
    monkeypatch.setattr(cli, "prepared_check", prepared_check)
    monkeypatch.setattr(cli, "run_check", run_check)
    assert cli.main(["demo", "--device", "cuda"]) == 0
    prepares, runs = events[:3], events[3:]
    assert {e[0] for e in prepares} == {"prepare"} and len({e[2] for e in prepares}) == 3
    assert runs == [("run", m, True) for m in ("causal", "sliding_window", "attamba")]
    assert capsys.readouterr().out.count("PASS") == 3


@pytest.mark.parametrize("extra", [
    ["--q-len", "257", "--window-size", "50"],
    ["--q-len", "130", "--kv-len", "260", "--num-qo-heads", "6", "--num-kv-heads", "3", "--window-size", "7",
     "--dtype", "float32", "--device", "cpu"],
])
def test_check_sliding_window(capsys, extra):
    args = ["check", "--mask", "sliding_window", "--head-dim", "16", "--num-qo-heads", "2", *extra]
    assert cli.main(args) == 0
    found = rows(capsys.readouterr().out)
    assert len(found) == 1
    assert_passing_row(found[0], "sliding_window")


def test_check_mask_type_alias(capsys):
    assert cli.main(["check", "--mask-type", "causal", "--q-len", "100", "--num-qo-heads", "2",
                     "--head-dim", "16"]) == 0
    assert rows(capsys.readouterr().out)[0][0] == "causal"


def test_check_reports_fail_and_exit_1_when_output_is_wrong(capsys, monkeypatch):
    """The check really compares: a wrapper that perturbs its output makes it FAIL."""
    class Perturbed(cli.FlexFlashInfer):
        def __call__(self, q, k, v, return_lse=False):
            out = super().__call__(q, k, v, return_lse)
            return out * 1.01

    monkeypatch.setattr(cli, "FlexFlashInfer", Perturbed)
    assert cli.main(["check", "--mask", "causal", "--q-len", "100", "--num-qo-heads", "2", "--head-dim", "16"]) == 1
    found = rows(capsys.readouterr().out)
    assert found[0][-1] == "FAIL"



def test_check_fails_one_wrong_row_in_bfloat16(capsys, monkeypatch):
    """One zeroed query row per head among 1024 hides in the whole output's relative error (1.3e-2
    under bfloat16's 2e-2: it passed); each row is held to the tolerance."""
    class OneRowZeroed(cli.FlexFlashInfer):
        def __call__(self, q, k, v, return_lse=False):
            out = super().__call__(q, k, v, return_lse).clone()
            out[-1] = 0
            return out

    monkeypatch.setattr(cli, "FlexFlashInfer", OneRowZeroed)
    assert cli.main(["check", "--mask", "causal", "--q-len", "1024", "--num-qo-heads", "4", "--head-dim", "32",
                     "--dtype", "bfloat16"]) == 1
    assert rows(capsys.readouterr().out)[0][-1] == "FAIL"


@pytest.mark.parametrize("given,expected", [(None, (2048, 8192)), (["8192", "32768"], (8192, 32768)), (["512"], (512,))])
def test_bench_cpu_runs_the_lengths_given(monkeypatch, given, expected):
    """bench --cpu takes --seq-lens as given (8192 32768 read as 'not given': it ran 2048 8192)."""
    import flex_flash_infer_bench.cpu as cpu_bench

    ran = []
    monkeypatch.setattr(cpu_bench, "run_cpu_benchmark", lambda out, seq_lens, cases: ran.append(seq_lens))
    assert cli.main(["bench", "--cpu"] + (["--seq-lens", *given] if given else [])) == 0
    assert ran == [expected]


def exit_code(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:    # argparse errors exit 2
        return e.code


def test_check_document_mask_is_refused_with_a_reason(capsys):
    assert exit_code(["check", "--mask", "document", "--q-len", "64"]) == 2
    assert "document" in capsys.readouterr().err


def test_check_unknown_mask_is_a_usage_error_listing_masks(capsys):
    assert exit_code(["check", "--mask", "sliding", "--q-len", "64"]) == 2
    err = capsys.readouterr().err
    assert "sliding_window" in err and "attamba" in err


def test_gpu_only_commands_refuse_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA message")
    assert cli.main(["bench"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_check_with_a_bad_parameter_says_which_and_exits_2(capsys):
    from flex_flash_infer.tools.cli import main as cli_main

    assert cli_main(["check", "--mask", "sliding_window", "--window-size", "0", "--q-len", "64"]) == 2
    assert "window_size" in capsys.readouterr().err
    assert cli_main(["check", "--num-qo-heads", "3", "--num-kv-heads", "2", "--q-len", "64"]) == 2
    assert "num_qo_heads (3) must be a multiple of num_kv_heads (2)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["check", "--q-len", "64", "--kv-len", "0"], "seq_len_kv must be a positive int, got 0"),   # not q_len's
    (["check", "--q-len", "64", "--num-kv-heads", "0"], "num_kv_heads must be a positive int, got 0"),
    (["check", "--device", "gpu", "--q-len", "64"], "--device must be cpu or cuda"),
    (["check", "--device", "meta", "--q-len", "64"], "--device must be cpu or cuda"),   # a traceback, exit 1
    (["bench", "--cpu", "--seq-lens", "128", "--decode"], "got --decode"),   # ran the mask timing
    (["bench", "--cpu", "--seq-lens", "128", "--head-dims", "128"], "got --head-dims"),   # ran head_dim 64
    (["show", "causal", "--seq-len", "64", "-o", "/nonexistent_dir/x.png"], "No such file or directory"),
    (["bench", "--cpu", "--seq-lens", "0"], "--seq-lens must be positive"),
])
def test_bad_arguments_exit_2_with_one_line_saying_which(capsys, argv, needle):
    """Each refused with exit code 2 and a line naming it, where a traceback came, or a 0 was
    silently replaced by the query side's value and the check passed."""
    if argv[0] == "show":
        pytest.importorskip("matplotlib")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cuda_asked_for_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA message")
    for argv in (["demo", "--device", "cuda"], ["check", "--device", "cuda", "--q-len", "64"]):
        assert cli.main(argv) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_the_package_reads_no_experiment_switch():
    """No FLEX_FLASH_INFER_* environment variable changes how a call runs: a user's choices are
    arguments (PagedFlexAttention's use_tensor_cores, backend=...)."""
    import pathlib

    package = pathlib.Path(__file__).resolve().parents[2] / "flex_flash_infer"
    assert not [path.name for path in package.rglob("*.py") if "FLEX_FLASH_INFER_" in path.read_text()]


def test_source_commit_names_the_checkout_or_the_stamp_file(tmp_path, monkeypatch):
    import subprocess

    from flex_flash_infer_bench import provenance

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(provenance.__file__).parent)
    if head.returncode == 0:   # a git checkout (CI's clean clone is one)
        assert provenance.source_commit().rstrip("+") == head.stdout.strip()
    real_run = subprocess.run

    def no_git(cmd, *args, **kwargs):   # as on the lent GPU machine, whose copy has no .git
        return real_run(["false"], *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "flex_flash_infer_bench" / "provenance.py"))
    assert provenance.source_commit() is None
    (tmp_path / "SOURCE_COMMIT").write_text("abc1234\n")
    assert provenance.source_commit() == "abc1234"


def test_bench_cpu_runs_without_a_gpu_and_writes_checked_rows(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert cli.main(["bench", "--cpu", "--seq-lens", "200", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["mask"] for r in result["rows"]] == ["causal", "sliding_window"]
    for row in result["rows"]:
        assert row["seq_len"] == 200 and row["ours_ms"] > 0 and row["torch_eager_ms"] > 0
        assert max(row["max_error_vs_float64"].values()) < 1e-4
    assert result["cores"] >= 1 and "torch" in result and "sliding window" in capsys.readouterr().out


def test_bench_cpu_takes_its_cases_and_refuses_others(tmp_path, capsys):
    """--cases was ignored by bench --cpu: attamba asked for, causal and the window timed."""
    out = tmp_path / "cpu.json"
    assert cli.main(["bench", "--cpu", "--seq-lens", "200", "--cases", "sliding_window", "--out", str(out)]) == 0
    assert [r["mask"] for r in json.loads(out.read_text())["rows"]] == ["sliding_window"]
    assert cli.main(["bench", "--cpu", "--seq-lens", "200", "--cases", "causal", "attamba"]) == 2
    assert "bench --cpu times causal and sliding_window; --cases got attamba" in capsys.readouterr().err


def test_the_seed_test_command_refuses_a_bad_device_with_exit_2():
    """test_flex_flash.py calls check without main()'s checks: a RuntimeError traceback, exit 1 (FAIL)."""
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[2] / "test_flex_flash.py"
    done = subprocess.run([sys.executable, str(script), "--device", "foo", "--q_len", "64"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--device must be cpu or cuda" in done.stderr and "Traceback" not in done.stderr


def test_info_says_score_mods_run_on_flashinfer(capsys, monkeypatch):
    """Where FlashInfer runs, info said the auto backend needed "no score_mod" (they compile into its kernels)."""
    from flex_flash_infer.backends import flashinfer_backend

    monkeypatch.setattr(flashinfer_backend, "unsupported_reason", lambda *a: None)   # as on a GPU with flashinfer
    assert cli.main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("backend 'auto'"))
    assert "no score_mod" not in line and "score_mod compiled into its kernels" in line
