"""The nvcc launcher that runs a file's host and device chains at once (compile/nvcc_split.py):
its plan from nvcc's dry run, its fallbacks to nvcc alone, and, where nvcc is installed, a real
compile whose object matches nvcc's own."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from flex_flash_infer.compile import nvcc_split

NVCC = shutil.which("nvcc")


def test_use_leaves_a_launcher_the_caller_chose(monkeypatch):
    monkeypatch.setenv(nvcc_split.LAUNCHER_VARIABLE, "")
    nvcc_split.use()
    assert os.environ[nvcc_split.LAUNCHER_VARIABLE] == ""
    monkeypatch.delenv(nvcc_split.LAUNCHER_VARIABLE)
    nvcc_split.use()
    assert os.environ[nvcc_split.LAUNCHER_VARIABLE].endswith("nvcc_split.py")


def test_dependency_flags_are_taken_out():
    args, depfile = nvcc_split._split_dependency_flags(
        ["--generate-dependencies-with-compile", "-MF", "x.o.d", "-O3", "-c", "a.cu", "-o", "x.o"])
    assert args == ["-O3", "-c", "a.cu", "-o", "x.o"] and depfile == "x.o.d"


def _fake_nvcc(tmp_path, dry_run: str, exit_code: int = 0):
    """An nvcc that prints dry_run (on --dryrun) and otherwise records its arguments."""
    script = tmp_path / "nvcc"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        if "--dryrun" in sys.argv:
            sys.stderr.write({dry_run!r})
            sys.exit({exit_code})
        open({str(tmp_path / 'plain')!r}, "w").write(" ".join(sys.argv[1:]))
        """))
    script.chmod(0o755)
    return str(script)


def test_an_unexpected_plan_runs_nvcc_alone(tmp_path):
    """A dry run that is not the one-architecture whole-program plan (here: two architectures'
    cicc) is not split: nvcc runs alone with the caller's arguments."""
    nvcc = _fake_nvcc(tmp_path, "#$ PATH=/x\n#$ gcc -E a\n#$ cudafe++ --gen_module_id_file\n#$ gcc -E b\n"
                                "#$ \"$CICC_PATH/cicc\" x\n#$ \"$CICC_PATH/cicc\" y\n#$ ptxas\n#$ fatbinary\n#$ gcc -c\n")
    assert nvcc_split.main([nvcc, "-c", "a.cu", "-o", str(tmp_path / "a.o")]) == 0
    assert (tmp_path / "plain").read_text() == f"-c a.cu -o {tmp_path / 'a.o'}"


def test_a_failed_dry_run_or_no_output_runs_nvcc_alone(tmp_path):
    nvcc = _fake_nvcc(tmp_path, "nvcc fatal: bad option\n", exit_code=1)
    assert nvcc_split.main([nvcc, "-c", "a.cu", "-o", "a.o"]) == 0
    assert (tmp_path / "plain").exists()
    (tmp_path / "plain").unlink()
    assert nvcc_split.main([nvcc, "--version"]) == 0   # no -c / -o: nothing to split
    assert (tmp_path / "plain").read_text() == "--version"


KERNEL = """
#include <cstdio>
template <int N> __global__ void scale(float *x) { x[threadIdx.x] *= N; }
template __global__ void scale<3>(float *);
extern "C" void launch(float *x) { scale<3><<<1, 32>>>(x); }
"""


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_a_real_compile_matches_nvcc_alone(tmp_path):
    """Split and plain compiles of one file (with ninja's depfile) define and use the same symbols,
    but for the names made from the module id; the depfile names the source; a file that does not
    compile fails as under nvcc alone."""
    source = tmp_path / "k.cu"
    source.write_text(KERNEL)
    flags = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "--compiler-options=-fPIC"]
    plain = subprocess.run([NVCC, *flags, "-c", str(source), "-o", str(tmp_path / "plain.o")])
    assert plain.returncode == 0
    code = nvcc_split.compile_split(NVCC, ["--generate-dependencies-with-compile", "-MF", str(tmp_path / "split.o.d"),
                                           *flags, "-c", str(source), "-o", str(tmp_path / "split.o")])
    assert code == 0
    assert str(source) in (tmp_path / "split.o.d").read_text()

    def symbols(path):
        names = subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout.split("\n")
        return sorted(line.split()[-1] for line in names if line.strip() and "GLOBAL__" not in line)
    assert symbols(tmp_path / "split.o") == symbols(tmp_path / "plain.o")
    assert any("scale" in name for name in symbols(tmp_path / "split.o"))
    source.write_text(KERNEL + "\nthis is not C++;\n")
    assert nvcc_split.compile_split(NVCC, [*flags, "-c", str(source), "-o", str(tmp_path / "bad.o")]) is None
    assert nvcc_split.main([NVCC, *flags, "-c", str(source), "-o", str(tmp_path / "bad.o")]) != 0
