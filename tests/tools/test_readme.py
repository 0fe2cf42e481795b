"""The README's Python examples run as written (on CPU here), so they cannot rot."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["output"].shape == (1024, 8, 64)
    assert torch.isfinite(namespace["out"]).all()
    assert namespace["lse"].shape == (2, 8, 1000)
