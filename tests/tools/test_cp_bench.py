"""scripts/cp_bench.py (the multi-GPU context-parallel benchmark) runs its orchestration on two gloo
processes here, so that it still works when a multi-GPU machine is lent: every implementation's
output is checked against the one-process result before it is timed."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cp_bench_runs_on_gloo_and_checks_every_output(tmp_path):
    out = tmp_path / "cp.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "scripts" / "cp_bench.py"), "--cpu", "--seq-len", "1024", "--heads", "2", "1",
                           "--head-dim", "16", "--rounds", "1", "--no-torch", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and result["device"] == "cpu" and {r["mask"] for r in result["rows"]} == {
        "causal", "documents", "random_tiles"}
    for row in result["rows"]:
        for impl in ("ours_all_gather", "ours_ring"):
            assert f"{impl}_error" not in row, row
            assert row[f"{impl}_rel_err"] < 1e-4 and row[f"{impl}_s"] > 0, row
