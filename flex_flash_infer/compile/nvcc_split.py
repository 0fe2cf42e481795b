"""nvcc with its host and device halves run at once: a launcher for FlashInfer's JIT builds.

nvcc compiles a .cu file in two chains that it runs one after the other: the host chain (the
preprocessor, then cudafe++, which parses the whole file for the host) and the device chain (the
preprocessor again, then cicc, which parses it again for the device, ptxas and fatbinary); a last
host compile joins them. For one of FlashInfer's Hopper kernel files (2026-12-06, 2 cores, nvcc
13.0) the host chain took 24 s and the device chain 42 s, 75-93 s one after the other and 52 s at
once. Its `--threads` runs chains of several architectures at once, never the two halves of one.

The two chains share one thing: the module id (a name for the file's registration symbols) that
cudafe++ writes at its end and cicc reads. Here it is written first, unique per output file, and
both read it; the rest is nvcc's own commands from `nvcc --dryrun`, run as nvcc would, in a private
directory. Anything unexpected in that plan, or a failed step, runs plain nvcc instead, so a compile
error reads as nvcc's own.

FlashInfer puts FLASHINFER_NVCC_LAUNCHER before nvcc in its build files: use() sets it to this
module when the caller has not set it (set but empty: nvcc alone).

    python flex_flash_infer/compile/nvcc_split.py NVCC ARGS...
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

LAUNCHER_VARIABLE = "FLASHINFER_NVCC_LAUNCHER"
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def use() -> None:
    """Make FlashInfer's builds from now on compile through this launcher, unless the caller
    chose a launcher (ccache, or an empty one: nvcc alone)."""
    if LAUNCHER_VARIABLE not in os.environ:
        # the file run by its path: `-m` would import the package (torch included) for every file
        os.environ[LAUNCHER_VARIABLE] = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"


def _split_dependency_flags(args: list[str]):
    """(args without nvcc's dependency generation, its depfile or None)."""
    out, depfile, i = [], None, 0
    while i < len(args):
        if args[i] == "--generate-dependencies-with-compile":
            i += 1
            continue
        if args[i] == "-MF" and i + 1 < len(args):
            depfile = args[i + 1]
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out, depfile


def _option(args: list[str], name: str):
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def plan(nvcc: str, args: list[str], work_dir: str):
    """(environment lines, host chain, device chain, final compile) from nvcc's dry run, or None
    when the plan is not the one-architecture, whole-program compile this splits."""
    args, depfile = _split_dependency_flags(args)
    output = _option(args, "-o")
    if "-c" not in args or output is None:
        return None
    run = subprocess.run([nvcc, *args, "--dryrun", "--keep", "--keep-dir", work_dir], capture_output=True,
                         text=True)
    if run.returncode != 0:
        return None
    lines = [line[3:] for line in run.stderr.splitlines() if line.startswith("#$ ")]
    env = [line for line in lines if _ASSIGNMENT.match(line)]
    steps = [line for line in lines if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line)]
    tools = [step.split()[0].strip('"') for step in steps]
    expected = ["gcc", "cudafe++", "gcc", "$CICC_PATH/cicc", "ptxas", "fatbinary", "gcc"]
    if tools != expected or steps[1].count("--gen_module_id_file") != 1:
        return None
    module_id = re.search(r'--module_id_file_name "([^"]+)"', steps[1])
    if module_id is None or module_id.group(1) not in steps[3] or " -E " not in f" {steps[0]} {steps[2]} ":
        return None
    digest = hashlib.sha1(f"{os.path.abspath(output)}\0{os.getpid()}".encode()).hexdigest()[:16]
    stem = re.sub(r"\W", "_", os.path.basename(output))
    with open(module_id.group(1), "w") as f:
        f.write(f"_{digest}_{stem}")
    host = [steps[0], steps[1].replace("--gen_module_id_file", "")]
    device_preprocess = steps[2]
    if depfile is not None:   # what ninja reads to know the headers: gcc writes it while preprocessing
        device_preprocess += f" -MD -MF {shlex.quote(depfile)} -MT {shlex.quote(output)}"
    device = [device_preprocess, *steps[3:6]]
    return env, host, device, steps[6]


def _run(env: list[str], commands: list[str]) -> int:
    script = "".join(f"export {line}\n" for line in env) + "\n".join(commands) + "\n"
    return subprocess.run(["bash", "-ec", script]).returncode


def compile_split(nvcc: str, args: list[str]) -> int | None:
    """Compile with the two chains at once; None when this compile is not one to split or a step
    failed (the caller runs nvcc alone)."""
    work_dir = tempfile.mkdtemp(prefix="ffi_nvcc_")
    try:
        planned = plan(nvcc, args, work_dir)
        if planned is None:
            return None
        env, host, device, final = planned
        codes = {}
        side = threading.Thread(target=lambda: codes.__setitem__("device", _run(env, device)))
        side.start()
        codes["host"] = _run(env, host)
        side.join()
        if codes["host"] or codes["device"] or _run(env, [final]):
            return None
        return 0
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python nvcc_split.py NVCC ARGS...", file=sys.stderr)
        return 2
    nvcc, args = argv[0], argv[1:]
    try:
        code = compile_split(nvcc, args)
    except OSError:
        code = None
    if code is not None:
        return code
    return subprocess.run([nvcc, *args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
