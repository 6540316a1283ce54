"""The distributed bench case runs (2 processes, the framework-free shared-memory all-reduce) and
reports the bytes of its two collectives."""
from __future__ import annotations

import pytest

from bncore import sync_bench


@pytest.mark.mpi
def test_sync_bench_runs_on_two_processes():
    result = sync_bench.run(world=2, backend="shm", repeats=1, timeout=120.0)
    channels = sync_bench.SHAPE[1]
    assert result["buffer_bytes_per_step"] == 8 * (2 * (2 * channels + 1) + 2 * channels + 2)
    assert result["ring_bytes_sent_per_rank"] == result["buffer_bytes_per_step"]  # 2 (W - 1) / W = 1 at W = 2
    assert result["local_s"] > 0 and result["sync_s"] > 0 and result["ratio"] > 0
    assert "x local" in sync_bench.report(result)
