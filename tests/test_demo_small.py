"""`python -m bncore demo --small-batch`: it runs, prints one row per normalization with a cell per
batch size, and its pieces do what the table says (the renorm warm-up, ghost batch norm only above
its virtual batch)."""
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo trains on scikit-learn's bundled digits")

from bncore import demo_small  # noqa: E402


def test_quick_run_prints_the_table(tmp_path):
    plot = tmp_path / "small.png"
    proc = subprocess.run([sys.executable, "-m", "bncore", "demo", "--small-batch", "--quick", "--plot", str(plot)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\w+)\s+\|(.*)\|\s+([\d.]+) s$", line)
        if m and m.group(1) in demo_small.NORMS:
            rows[m.group(1)] = [float(v) for v in re.findall(r"([\d.]+) ±", m.group(2))]
    assert set(rows) == set(demo_small.NORMS), proc.stdout
    for kind, cells in rows.items():
        assert len(cells) == len(demo_small.BATCH_SIZES), (kind, cells)
        assert all(0.0 <= c <= 100.0 for c in cells), (kind, cells)
    # one epoch already learns digits far above chance (10%) with a batch-independent norm
    assert min(rows["layernorm"]) > 50.0, rows
    assert plot.exists() or "matplotlib" not in sys.modules


def test_renorm_warm_up_starts_as_batch_norm_and_reaches_its_bounds():
    steps = 1000
    assert demo_small.schedule(0, steps) == (1.0, 0.0)
    rmax, dmax = demo_small.schedule(steps // 4, steps)
    assert 1.0 < rmax < demo_small.RMAX and 0.0 < dmax <= demo_small.DMAX
    assert demo_small.schedule(steps, steps) == (demo_small.RMAX, demo_small.DMAX)


def test_ghost_uses_virtual_batches_only_above_their_size():
    small = demo_small.make_norm("ghost", 4, demo_small.GHOST_BATCH, 10)
    large = demo_small.make_norm("ghost", 4, 4 * demo_small.GHOST_BATCH, 10)
    assert small.virtual_batch_size is None
    assert large.virtual_batch_size == demo_small.GHOST_BATCH
