"""DLPack: the caller's array type comes back, nothing is copied, capsules are read once."""
from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

import bncore
from bncore.reference import batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref
from tolerances import assert_close


def data(seed, shape=(6, 3, 4, 5), dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2 + 0.5).astype(dtype)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_numpy_in_numpy_out(dtype):
    x = data(0, dtype=dtype)
    w = np.linspace(0.5, 1.5, 3).astype(dtype)
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, w, None, training=True)
    for a in (y, mean, invstd):
        assert type(a) is np.ndarray and a.dtype == dtype
    assert y.shape == x.shape
    assert_close(y, batch_norm_ref(x, w)[0], dtype)
    dx, dw, db = bncore.batch_norm_backward(x, x, w, mean, invstd)
    for a in (dx, dw, db):
        assert type(a) is np.ndarray and a.dtype == dtype
    assert_close(dx, batch_norm_backward_ref(x, x, w)[0], dtype, "grad")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("fmt", ["contiguous_format", "channels_last"])
def test_torch_in_torch_out(fmt, dtype):
    torch = pytest.importorskip("torch", reason="torch is needed for torch round trips")
    x = torch.from_numpy(data(1)).to(getattr(torch, dtype)).contiguous(memory_format=getattr(torch, fmt))
    w = torch.linspace(0.5, 1.5, 3, dtype=x.dtype)
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, w, None, training=True)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.device == x.device and y.shape == x.shape
    assert y.is_contiguous(memory_format=getattr(torch, fmt))
    if fmt == "channels_last":
        assert y.stride() == x.stride()
    stat_dtype = torch.float32 if dtype in ("float16", "bfloat16") else x.dtype
    assert isinstance(mean, torch.Tensor) and mean.dtype == stat_dtype and invstd.dtype == stat_dtype
    assert_close(y, batch_norm_ref(x.double().numpy(), w.double().numpy())[0], dtype)
    dx, dw, db = bncore.batch_norm_backward(y, x, w, mean, invstd)
    assert isinstance(dx, torch.Tensor) and dx.dtype == x.dtype and dx.device == x.device
    assert dx.is_contiguous(memory_format=getattr(torch, fmt))
    assert isinstance(dw, torch.Tensor) and dw.dtype == w.dtype


def test_torch_requires_grad_input_is_accepted():
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    x = torch.from_numpy(data(2)).requires_grad_()
    y = bncore.batch_norm_forward(x, training=True)[0]  # read through DLPack, detached
    assert isinstance(y, torch.Tensor) and not y.requires_grad  # the *_forward functions record no autograd
    assert_close(y, batch_norm_ref(data(2))[0], "float64")
    y = bncore.batch_norm(x, training=True)  # the plain function goes through bncore's torch op: differentiable
    assert y.requires_grad
    assert_close(y.detach(), batch_norm_ref(data(2))[0], "float64")


def test_jax_in_jax_out():
    jax = pytest.importorskip("jax", reason="jax is not installed: JAX round trips are not tested")
    import jax.numpy as jnp

    xn = data(3, dtype=np.float32)
    x = jnp.asarray(xn)
    w = jnp.asarray(np.linspace(0.5, 1.5, 3, dtype=np.float32))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)  # the running statistics: writable NumPy
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, None, training=True)
    for a in (y, mean, invstd):
        assert isinstance(a, jax.Array)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert y.devices() == x.devices()
    assert_close(np.asarray(y), batch_norm_ref(xn, np.asarray(w))[0], "float32")
    rm_ref, rv_ref = batch_norm_running_ref(xn, np.zeros(3), np.ones(3), 0.1)
    assert_close(rm, rm_ref, "float32")
    assert_close(rv, rv_ref, "float32")
    dy = jnp.asarray(data(4, dtype=np.float32))
    dx, dw, db = bncore.batch_norm_backward(dy, x, w, mean, invstd)
    assert isinstance(dx, jax.Array) and isinstance(dw, jax.Array)
    dx_ref, dw_ref, _ = batch_norm_backward_ref(np.asarray(dy), xn, np.asarray(w))
    assert_close(np.asarray(dx), dx_ref, "float32", "grad")
    assert_close(np.asarray(dw), dw_ref, "float32", "grad")
    # the results are ordinary JAX arrays: JAX can compute with them
    assert float(jnp.sum(y * 0)) == 0.0


def test_jax_eval_mode():
    pytest.importorskip("jax", reason="jax is not installed: JAX round trips are not tested")
    import jax.numpy as jnp

    xn = data(5, dtype=np.float32)
    rm = jnp.asarray(np.array([0.1, -0.2, 0.3], np.float32))  # read-only is fine when only read
    rv = jnp.asarray(np.array([1.5, 0.7, 2.0], np.float32))
    y = bncore.batch_norm(jnp.asarray(xn), rm, rv, training=False)
    assert_close(np.asarray(y), batch_norm_ref(xn, running_mean=np.asarray(rm), running_var=np.asarray(rv))[0],
                 "float32")


# ---------------------------------------------------------------- zero copy


def test_numpy_running_stats_updated_in_place():
    x = data(6)
    buf = np.full(8, 7.0)
    rm = buf[1:7:2]  # a strided view into a bigger buffer
    rv = np.ones(3)
    rm_id, rv_id, rm_ptr, rv_ptr = id(rm), id(rv), rm.ctypes.data, rv.ctypes.data
    expect_rm, expect_rv = batch_norm_running_ref(x, rm.copy(), rv.copy(), 0.1)
    bncore.batch_norm(x, rm, rv, training=True, momentum=0.1)
    assert id(rm) == rm_id and id(rv) == rv_id
    assert rm.ctypes.data == rm_ptr and rv.ctypes.data == rv_ptr
    assert_close(rm, expect_rm, "float64")
    assert_close(rv, expect_rv, "float64")
    # the update went through to the buffer, and only to the view's elements
    assert_close(buf[1:7:2], expect_rm, "float64")
    assert buf[0] == 7.0 and buf[2] == 7.0 and buf[4] == 7.0 and buf[6] == 7.0 and buf[7] == 7.0


def test_torch_running_stats_updated_in_place():
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    x = torch.from_numpy(data(7)).float()
    rm = torch.zeros(3)
    big = torch.ones(3, 2)
    rv = big[:, 0]  # non-contiguous
    rm_ptr, rv_ptr = rm.data_ptr(), rv.data_ptr()
    expect_rm, expect_rv = batch_norm_running_ref(x.numpy(), np.zeros(3), np.ones(3), 0.2)
    same_rm, same_rv = rm, rv
    bncore.batch_norm(x, rm, rv, training=True, momentum=0.2)
    assert rm is same_rm and rv is same_rv
    assert rm.data_ptr() == rm_ptr and rv.data_ptr() == rv_ptr
    assert_close(rm, expect_rm, "float32")
    assert_close(big[:, 0], expect_rv, "float32")
    assert torch.equal(big[:, 1], torch.ones(3))


def test_out_written_in_place_and_returned():
    x = data(8)
    out = np.empty_like(x)
    ptr = out.ctypes.data
    got = bncore.batch_norm(x, training=True, out=out)
    assert got is out and out.ctypes.data == ptr
    assert_close(out, batch_norm_ref(x)[0], "float64")
    # batch_norm_forward too
    out2 = np.zeros_like(x)
    y, _, _ = bncore.batch_norm_forward(x, training=True, out=out2)
    assert y is out2


def test_out_torch_written_in_place_and_returned():
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    x = torch.from_numpy(data(9))
    out = torch.empty_like(x).contiguous(memory_format=torch.channels_last)
    ptr = out.data_ptr()
    got = bncore.batch_norm(x, training=True, out=out)
    assert got is out and out.data_ptr() == ptr
    assert_close(out, batch_norm_ref(x.numpy())[0], "float64")


def test_out_is_input_in_place():
    x = data(10)
    x0 = x.copy()
    w = np.array([0.5, 1.0, -2.0])
    got = bncore.batch_norm(x, None, None, w, None, training=True, out=x)
    assert got is x
    assert_close(x, batch_norm_ref(x0, w)[0], "float64")


def test_out_is_input_in_place_strided_and_torch():
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    base = data(11, shape=(6, 3, 4, 10))
    x = base[..., ::-2]  # negative strides, non-contiguous
    x0 = x.copy()
    bncore.batch_norm(x, training=True, out=x)
    assert_close(x, batch_norm_ref(x0)[0], "float64")
    t = torch.from_numpy(data(12)).contiguous(memory_format=torch.channels_last)
    t0 = t.clone()
    got = bncore.batch_norm(t, training=True, out=t)
    assert got is t
    assert_close(t, batch_norm_ref(t0.numpy())[0], "float64")


# ---------------------------------------------------------------- raw capsules


def test_capsule_accepted_once_then_refused_as_consumed():
    x = data(13)
    cap = x.__dlpack__()
    y = bncore.batch_norm(cap, training=True)
    assert_close(y, batch_norm_ref(x)[0], "float64")
    with pytest.raises(ValueError, match="consumed") as info:
        bncore.batch_norm(cap, training=True)
    assert "input" in str(info.value)


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
@pytest.mark.parametrize("producer", ["numpy", "torch"])
def test_versioned_and_unversioned_capsules(producer, versioned):
    xn = data(14)
    if producer == "torch":
        torch = pytest.importorskip("torch", reason="torch is needed for torch capsules")
        x = torch.from_numpy(xn)
    else:
        x = xn
    cap = x.__dlpack__(max_version=(1, 1)) if versioned else x.__dlpack__()
    assert repr(cap).startswith('<capsule object "dltensor_versioned"' if versioned else '<capsule object "dltensor"')
    y = bncore.batch_norm(cap, training=True)
    assert_close(y, batch_norm_ref(xn)[0], "float64")


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_capsule_running_stats_are_updated_in_the_producers_memory(versioned):
    x = data(15)
    rm, rv = np.zeros(3), np.ones(3)
    expect_rm, expect_rv = batch_norm_running_ref(x, rm, rv, 0.5)
    kw = {"max_version": (1, 1)} if versioned else {}
    bncore.batch_norm(x, rm.__dlpack__(**kw), rv.__dlpack__(**kw), training=True, momentum=0.5)
    assert_close(rm, expect_rm, "float64")
    assert_close(rv, expect_rv, "float64")


def test_imported_tensors_are_released():
    """Every import hands its tensor back: the producers' reference counts return to where they were,
    after a successful call and after a failing one."""
    x = data(16)
    rm, rv = np.zeros(3), np.ones(3)
    w = np.ones(3)
    out = np.empty_like(x)
    before = [sys.getrefcount(a) for a in (x, rm, rv, w, out)]
    for _ in range(3):
        bncore.batch_norm(x, rm, rv, w, None, training=True, out=out)
    gc.collect()
    assert [sys.getrefcount(a) for a in (x, rm, rv, w, out)] == before
    with pytest.raises(ValueError):
        bncore.batch_norm(x, rm, rv, np.ones(4), None, training=True, out=out)
    with pytest.raises(ValueError):  # a C-side failure: y has the wrong shape
        bncore.batch_norm(x, rm, rv, w, None, training=True, out=np.empty((6, 3, 4, 4)))
    gc.collect()
    assert [sys.getrefcount(a) for a in (x, rm, rv, w, out)] == before
