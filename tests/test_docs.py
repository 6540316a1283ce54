"""Every Python example in README.md and docs/ runs as written (signature listings are fenced as
text). An example that stops matching the code fails here."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _examples():
    for page in PAGES:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            yield pytest.param(block, id=f"{page.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", _examples())
def test_example_runs(code, tmp_path, monkeypatch):
    if "import keras" in code:
        monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
        pytest.importorskip("keras", reason="this example uses Keras (a test extra)")
    if "torch" in code:
        pytest.importorskip("torch", reason="this example uses PyTorch (a test extra)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "example", "exec"), {"__name__": "example"})
