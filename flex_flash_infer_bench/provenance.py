"""The git commit of the package's checkout, recorded in every benchmark row."""
from __future__ import annotations


def source_commit() -> str | None:
    """The git commit of the package's checkout (short hash, '+' when it has uncommitted changes),
    so that benchmark rows name the code that produced them. A copy without .git (the lent GPU
    machine's) reads the file SOURCE_COMMIT at the root instead (git-ignored; write it with
    `git rev-parse --short HEAD > SOURCE_COMMIT` and carry it); None when neither is there."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = root / "SOURCE_COMMIT"
    return stamp.read_text().strip() or None if stamp.is_file() else None
