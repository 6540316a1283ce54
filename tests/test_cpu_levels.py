"""Every CPU kernel level gives the same bits (docs/numerics.md, "Clones").

The library carries its row kernels three times on x86-64 (baseline SSE2, x86-64-v3, x86-64-v4,
each with vectors as wide as its registers) and picks one at load, by BNCORE_CPU_LEVEL or the CPU.
Each level runs in its own process (the choice is made once, at load) over forward and backward
cases of every variant and dtype that reach the lanes' paths: short rows in blocks, rows with a
tail after the 32 lanes, one piece, several pieces, channels-last rows and column reductions.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the worker builds bfloat16, float16 and channels-last tensors with torch")

WORKER = Path(__file__).with_name("cpu_level_worker.py")
LEVELS = ("baseline", "x86-64-v3", "x86-64-v4")


def _run(level: str) -> tuple[str, dict[str, str]]:
    env = dict(os.environ, BNCORE_CPU_LEVEL=level, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.splitlines()
    return first, dict(line.rsplit(": ", 1) for line in rest)


@pytest.fixture(scope="module")
def baseline() -> dict[str, str]:
    level, digests = _run("baseline")
    assert level == "baseline"
    return digests


def test_the_digests_see_the_data(baseline):
    # a digest per case, and the cases differ, so equal digests below mean equal outputs
    # dtypes x (layer and rms at 4 widths, 4 batch, 1 group), and float16 special values twice
    assert len(baseline) == 4 * (4 * 2 + 4 + 1) + 2
    assert len(set(baseline.values())) == len(baseline)


@pytest.mark.parametrize("level", LEVELS[1:])
def test_level_gives_the_baseline_bits(level, baseline):
    got_level, digests = _run(level)
    if got_level != level:
        pytest.skip(f"this CPU does not run {level} (the library fell back to {got_level})")
    differ = [name for name in baseline if digests.get(name) != baseline[name]]
    assert not differ, f"{level} differs from baseline in: {differ}"


def test_an_unknown_level_name_falls_back_to_the_default():
    level, _ = _run("pentium")
    default, _ = _run("")
    assert level == default
    # float32 at x86-64-v3 at most, the half types at the highest level the CPU runs
    assert default.split(" (")[0] in LEVELS[:2]
