"""Fixtures shared by the test files: a seeded generator, a thread count that is put back, and
PyTorch (skipping, with the reason, where it is not installed).

The helper modules (cases, layouts, strategies, tolerances) sit beside the tests and are imported
by name (pytest puts this directory on sys.path)."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from cases import seed_of


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's own id: reproducible, and different per case."""
    return np.random.default_rng(seed_of(request.node.nodeid))


@pytest.fixture
def restore_threads():
    """Lets a test set bncore's thread count; the default (0: OpenMP's own) is restored after it."""
    yield bncore.set_num_threads
    bncore.set_num_threads(0)


@pytest.fixture
def torch():
    """torch, or a skip that says why."""
    return pytest.importorskip("torch", reason="torch is not installed: the PyTorch cases are not run")
