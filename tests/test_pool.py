"""The cache of large output buffers (bncore.pool): outputs reuse freed memory, never memory still
in use; limits, empty_cache and the disabled mode hold; threads share it safely; the arrays it makes
are ordinary NumPy arrays and PyTorch tensors with the same values and layout as without it.

Every test lowers min_bytes to 0 (through the `pool` fixture) so that small arrays exercise the
cache; the fixture puts the settings back and empties the cache after the test."""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import bncore
from bncore import _core

NS = (64,)


@pytest.fixture
def pool():
    before = bncore.set_pool(enabled=True, min_bytes=0, max_bytes=256 * 2 ** 20, max_buffers=16)
    bncore.empty_cache()
    yield bncore.pool_stats
    bncore.set_pool(**before)
    bncore.empty_cache()


def _address(a):
    if hasattr(a, "data_ptr"):
        return a.data_ptr()
    return a.ctypes.data


def _x(rng, rows=32):
    return rng.normal(size=(rows, NS[0])).astype(np.float32)


def test_a_freed_output_is_reused(pool, rng):
    x = _x(rng)
    y = bncore.layer_norm(x, NS)
    address, hits = _address(y), pool()["hits"]
    assert pool()["live_buffers"] == 1
    del y
    assert pool()["held_buffers"] == 1 and pool()["live_buffers"] == 0
    y = bncore.layer_norm(x, NS)
    assert _address(y) == address
    assert pool()["hits"] == hits + 1


def test_live_outputs_are_independent(pool, rng):
    x = _x(rng)
    expected = bncore.layer_norm(x, NS, out=np.empty_like(x))
    ys = [bncore.layer_norm(x, NS) for _ in range(6)]
    spans = sorted((_address(y), _address(y) + y.nbytes) for y in ys)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "live buffers overlap"
    for i, y in enumerate(ys):
        assert isinstance(y, np.ndarray) and y.flags.writeable and y.base is not None
        np.testing.assert_array_equal(y, expected)
        y[...] = i
    for i, y in enumerate(ys):
        assert np.all(y == i)
    # a buffer freed while others live goes to the next output, and only that one
    del ys[2]
    z = bncore.layer_norm(x, NS)
    np.testing.assert_array_equal(z, expected)
    for i, y in zip([0, 1, 3, 4, 5], ys):
        assert np.all(y == i)


def test_strides_of_the_input_are_kept(pool, rng, torch):
    x = torch.from_numpy(rng.normal(size=(4, 8, 5, 6)).astype(np.float32)).contiguous(memory_format=torch.channels_last)
    y = bncore.batch_norm(x, training=True)
    assert y.stride() == x.stride() and pool()["live_buffers"] >= 1
    np.testing.assert_array_equal(y.numpy(), bncore.batch_norm(x, training=True, out=torch.empty_like(x)).numpy())
    # a layout that is not dense is the library's to lay out, as before
    xt = torch.from_numpy(rng.normal(size=(8, 4, 10)).astype(np.float32))[:, :, ::2]
    live = pool()["live_buffers"]
    yt = bncore.layer_norm(xt, (5,))
    assert pool()["live_buffers"] == live
    assert yt.shape == xt.shape


def test_held_memory_is_capped(pool, rng):
    x = _x(rng)
    one = bncore.layer_norm(x, NS)
    cap = pool()["live_bytes"]
    bncore.set_pool(max_bytes=2 * cap, max_buffers=16)
    ys = [bncore.layer_norm(x, NS) for _ in range(4)] + [one]
    del ys, one
    s = pool()
    assert s["held_buffers"] == 2 and s["held_bytes"] == 2 * cap
    bncore.set_pool(max_bytes=256 * 2 ** 20, max_buffers=3)
    ys = [bncore.layer_norm(x, NS) for _ in range(5)]
    del ys
    assert pool()["held_buffers"] == 3
    bncore.set_pool(max_buffers=1)  # lowering a limit evicts at once
    assert pool()["held_buffers"] == 1
    big = bncore.layer_norm(_x(rng, rows=4096), NS)  # larger than max_bytes: unmapped when freed
    bncore.set_pool(max_bytes=cap, max_buffers=16)
    del big
    assert pool()["held_bytes"] <= cap


def test_empty_cache_unmaps_only_what_is_held(pool, rng):
    x = _x(rng)
    keep = bncore.layer_norm(x, NS)
    ys = [bncore.layer_norm(x, NS) for _ in range(3)]
    del ys
    assert pool()["held_buffers"] == 3
    bncore.empty_cache()
    s = pool()
    assert s["held_buffers"] == 0 and s["held_bytes"] == 0 and s["live_buffers"] == 1
    keep[...] = 7  # still mapped
    assert np.all(keep == 7)


def test_disabled_outputs_are_the_library_s_own(pool, rng):
    x = _x(rng)
    y = bncore.layer_norm(x, NS)
    bncore.set_pool(enabled=False)
    assert pool()["held_buffers"] == 0
    s = pool()
    z = bncore.layer_norm(x, NS)
    assert z.base is None and z.flags.owndata  # numpy.empty's
    np.testing.assert_array_equal(z, y)
    del y  # made while enabled: unmapped now, not held
    after = pool()
    assert after["held_buffers"] == 0 and after["live_buffers"] == s["live_buffers"] - 1
    assert (after["hits"], after["misses"]) == (s["hits"], s["misses"])


def test_threads_share_the_cache(pool):
    bncore.set_pool(max_buffers=4)
    errors = []
    start = threading.Barrier(6)

    def work(k):
        try:
            start.wait()
            for i in range(150):
                a = _core.pool_array((100 + (i + k) % 4, 64), None, "float32", np.from_dlpack)
                b = _core.pool_array((100 + (i + k) % 4, 64), None, "float64", np.from_dlpack)
                a[...] = k
                b[...] = -k
                if not (np.all(a == k) and np.all(b == -k)):
                    errors.append(f"thread {k}: a buffer in use was changed by another thread")
                    return
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = pool()
    assert s["live_buffers"] == 0 and s["held_buffers"] <= 4 and s["hits"] > 0


def test_torch_outputs_are_ordinary_tensors(pool, torch, rng):
    x = torch.from_numpy(_x(rng))
    y = bncore.layer_norm(x, NS)
    assert type(y) is torch.Tensor and y.device.type == "cpu" and not y.requires_grad
    assert pool()["live_buffers"] == 1
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, NS), rtol=1e-5, atol=1e-5)
    assert torch.equal(pickle.loads(pickle.dumps(y)), y)
    assert torch.equal(copy.deepcopy(y), y)
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), y)
    assert np.shares_memory(y.numpy(), y.numpy()) and y.numpy().ctypes.data == y.data_ptr()
    assert y.untyped_storage().nbytes() >= y.numel() * 4
    z = y.requires_grad_()
    (z * 3).sum().backward()
    assert torch.equal(z.grad, torch.full_like(z, 3.0))
    y = y.detach()
    y.resize_(2, 8)  # shrinking keeps the storage: allowed, as for any tensor
    y.add_(1)
    assert y.shape == (2, 8) and torch.equal(y.clone().share_memory_(), y)


def test_torch_storage_cannot_grow(pool, torch, rng):
    """The one difference from torch.empty_like, stated in bncore.pool: memory from DLPack is not
    PyTorch's to reallocate (as for torch.from_numpy), so resize_ beyond the storage raises."""
    y = bncore.layer_norm(torch.from_numpy(_x(rng)), NS)
    with pytest.raises(RuntimeError, match="not resizable"):
        y.untyped_storage().resize_(y.untyped_storage().nbytes() * 4)


def test_pool_buffer_is_exported_once(pool):
    seen = []
    _core.pool_array((4, 4), None, "float32", lambda buf: seen.append(buf) or np.from_dlpack(buf))
    with pytest.raises(BufferError, match="already exported"):
        seen[0].__dlpack__()
    live = pool()["live_buffers"]
    _core.pool_array((4, 4), None, "float32", lambda buf: None)  # never exported: back to the cache
    assert pool()["live_buffers"] == live


def test_set_pool_checks_its_arguments(pool):
    with pytest.raises(ValueError, match="max_bytes"):
        bncore.set_pool(max_bytes=-1)
    with pytest.raises(ValueError, match="max_buffers"):
        bncore.set_pool(max_buffers=_core.POOL_MAX_BUFFERS + 1)
    with pytest.raises(ValueError, match="min_bytes"):
        bncore.set_pool(min_bytes=1.5)


@pytest.mark.parametrize(("env", "expected"), [({"BNCORE_POOL": "0"}, (False, 256 * 2 ** 20)),
                                                ({"BNCORE_POOL_MAX_BYTES": "8M"}, (True, 8 * 2 ** 20))])
def test_environment_sets_the_pool(env, expected):
    code = "import bncore; s = bncore.pool_stats(); print(s['enabled'], s['max_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert (out[0] == "True", int(out[1])) == expected


def test_unreadable_environment_warns_and_keeps_the_default():
    code = ("import warnings; warnings.simplefilter('always'); import bncore; "
            "print(bncore.pool_stats()['max_bytes'])")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BNCORE_POOL_MAX_BYTES": "lots"},
                         capture_output=True, text=True, check=True)
    assert int(run.stdout.split()[-1]) == 256 * 2 ** 20
    assert "BNCORE_POOL_MAX_BYTES" in run.stderr and "'lots'" in run.stderr
