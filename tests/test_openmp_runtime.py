"""bncore and PyTorch share one OpenMP runtime, whichever is imported first.

Both link GNU OpenMP by its soname, libgomp.so.1 (PyTorch's wheel bundles a copy under that name),
so the dynamic loader maps the first one loaded and resolves the other library to it: one pool of
threads, and no second pool spinning on the same cores after each parallel region. A packaging
step that renamed bncore's copy (auditwheel's vendoring) would break that; this test says so."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHECK = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
from bncore.bench.report import openmp_runtimes
print(json.dumps(openmp_runtimes()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("order", [("torch", "bncore"), ("bncore", "torch")])
def test_one_openmp_runtime_with_torch(order, torch):
    out = subprocess.run([sys.executable, "-c", CHECK, *order], capture_output=True, text=True, check=True).stdout
    runtimes = json.loads(out.strip().splitlines()[-1])
    import bncore

    with open(bncore.get_library(), "rb") as f:
        if b"libgomp.so.1" not in f.read():
            pytest.skip("this bncore is not linked against GNU OpenMP (libgomp.so.1)")
    assert len(runtimes) == 1, f"imported {' then '.join(order)}: {runtimes}"
