"""Results are bitwise identical for any thread count, and concurrent calls are safe."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import bncore


@pytest.fixture
def restore_threads():
    yield
    bncore.set_num_threads(0)


def _bytes(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a).tobytes()


def _run_all(x, dy, w, b, axis, training):
    """Forward (with a running-statistics update in training) and backward; every result as bytes."""
    c = x.shape[axis]
    lib = type(x).__module__.split(".")[0]
    if lib == "torch":
        import torch

        rm = torch.linspace(-1, 1, c, dtype=x.dtype)
        rv = torch.linspace(0.5, 2, c, dtype=x.dtype)
    else:
        rm = np.linspace(-1, 1, c).astype(x.dtype)
        rv = np.linspace(0.5, 2, c).astype(x.dtype)
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=training, momentum=0.1, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(dy, x, w, mean, invstd, training=training, axis=axis)
    return {k: _bytes(v) for k, v in dict(y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv, dx=dx,
                                          dw=dw, db=db).items()}


def _problem(layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if layout == "nchw":
        shape, axis = (32, 16, 16, 16), 1
    elif layout == "nhwc-axis-1":
        shape, axis = (32, 16, 16, 16), -1
    elif layout == "2d":
        shape, axis = (8192, 16), 1
    else:
        shape, axis = (32, 16, 16, 16), 1
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[axis]
    w = rng.uniform(0.5, 1.5, size=c).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    if layout == "channels-last":
        torch = pytest.importorskip("torch", reason="torch is needed for channels-last tensors")
        x, dy, w, b = (torch.from_numpy(a) for a in (x, dy, w, b))
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, dy, w, b, axis


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "nhwc-axis-1", "2d"])
def test_one_thread_and_two_threads_give_the_same_bits(layout, dtype, training, restore_threads):
    x, dy, w, b, axis = _problem(layout, dtype)
    numel = x.numel() if hasattr(x, "numel") else x.size
    assert numel >= 100_000  # big enough for the kernels to split the work
    bncore.set_num_threads(1)
    assert bncore.get_num_threads() == 1
    one = _run_all(x, dy, w, b, axis, training)
    bncore.set_num_threads(2)
    assert bncore.get_num_threads() == 2
    two = _run_all(x, dy, w, b, axis, training)
    for k in one:
        assert one[k] == two[k], f"{k} differs between 1 and 2 threads"
    # and repeatable at a given count
    assert _run_all(x, dy, w, b, axis, training) == two


def test_set_num_threads_zero_restores_the_default(restore_threads):
    bncore.set_num_threads(0)
    default = bncore.get_num_threads()
    assert default >= 1
    bncore.set_num_threads(1)
    assert bncore.get_num_threads() == 1
    bncore.set_num_threads(-3)
    assert bncore.get_num_threads() == default


def test_concurrent_calls_from_python_threads(restore_threads):
    """Calls release the GIL and may run at once on different tensors: each gives what it gives alone."""
    bncore.set_num_threads(1)
    problems = [_problem("nchw", np.float32, seed) for seed in range(4)]
    alone = [_run_all(x, dy, w, b, axis, True) for x, dy, w, b, axis in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda p: _run_all(p[0], p[1], p[2], p[3], p[4], True), problems * 2))
    assert together == alone * 2
