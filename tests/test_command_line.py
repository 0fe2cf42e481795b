"""python -m flex_flash_infer: check and the default demo, as a user runs them."""
import os
import pathlib
import subprocess
import sys

from flex_flash_infer.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_check_subprocess_prints_pass():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "flex_flash_infer", "check", "--q-len", "200", "--kv-len", "300", "--num-qo-heads", "4",
         "--num-kv-heads", "2", "--head-dim", "32", "--mask", "attamba", "--window-size", "64", "--chunk-size", "32"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "attamba" in result.stdout and "PASS" in result.stdout


def test_check_in_process_and_demo(capsys):
    assert main(["check", "--q-len", "150", "--mask", "sliding_window", "--window-size", "40", "--head-dim", "16"]) == 0
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("PASS" in line for line in lines) == 4
    assert not any("FAIL" in line for line in lines)


def test_unknown_mask_is_an_error_that_lists_the_masks(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--mask", "nope"])
    assert exit_info.value.code == 2
    assert "sliding_window" in capsys.readouterr().err
