"""Per-channel tensors (weight, bias, running statistics) in any strides and dtypes: the C core reads
and writes them element by element through one stride when they are vectors and through the general
walk otherwise; both give the reference's numbers and write nothing outside their elements."""
import numpy as np
import pytest

import bncore
from bncore.reference import batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref, layer_norm_ref
from tolerances import TOLERANCES

C = 7


def strided_vector(values, dtype, how):
    """`values` as a vector of `dtype` laid out `how`, with a guard band of sentinels around it."""
    n = len(values)
    if how == "contiguous":
        store = np.full(n + 2, 99, dtype)
        store[1:-1] = values
        return store[1:-1], store
    if how == "stride3":
        store = np.full(3 * n + 2, 99, dtype)
        v = store[1:-1:3][:n]
        v[...] = values
        return v, store
    if how == "negative":
        store = np.full(n + 2, 99, dtype)
        v = store[-2:0:-1]
        v[...] = values
        return v, store
    raise AssertionError(how)


def sentinels_intact(store, view):
    mask = np.ones(store.shape, bool)
    offset = (view.__array_interface__["data"][0] - store.__array_interface__["data"][0]) // store.itemsize
    step = view.strides[0] // store.itemsize
    mask[offset + step * np.arange(len(view))] = False
    return bool(np.all(store[mask] == 99))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("how", ["contiguous", "stride3", "negative"])
def test_batch_norm_with_strided_per_channel_tensors(dtype, how):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, C, 5)) * 2 + 1
    w0, b0 = rng.standard_normal(C) + 1.5, rng.standard_normal(C)
    rm0, rv0 = rng.standard_normal(C), rng.random(C) + 0.5
    w, ws = strided_vector(w0, dtype, how)
    b, bs = strided_vector(b0, dtype, how)
    rm, rms = strided_vector(rm0, dtype, how)
    rv, rvs = strided_vector(rv0, dtype, how)
    y = bncore.batch_norm(x.astype(dtype), rm, rv, w, b, training=True, momentum=0.2)
    tol = TOLERANCES[np.dtype(dtype).name].value
    xq = x.astype(dtype).astype(np.float64)
    wq, bq = w.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(y.astype(np.float64), batch_norm_ref(xq, wq, bq)[0], rtol=tol.rtol, atol=tol.atol)
    ref_m, ref_v = batch_norm_running_ref(xq, rm0.astype(dtype).astype(np.float64),
                                          rv0.astype(dtype).astype(np.float64), 0.2)
    np.testing.assert_allclose(rm.astype(np.float64), ref_m, rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_allclose(rv.astype(np.float64), ref_v, rtol=tol.rtol, atol=tol.atol)
    for store, view in ((ws, w), (bs, b), (rms, rm), (rvs, rv)):
        assert sentinels_intact(store, view)
    # eval reads the running statistics through the same strides
    ye = bncore.batch_norm(x.astype(dtype), rm, rv, w, b, training=False)
    ref = batch_norm_ref(xq, wq, bq, running_mean=rm.astype(np.float64), running_var=rv.astype(np.float64))[0]
    np.testing.assert_allclose(ye.astype(np.float64), ref, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("how", ["contiguous", "stride3", "negative"])
def test_backward_reads_a_strided_weight(how):
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((6, C, 4)), rng.standard_normal((6, C, 4))
    w0 = rng.standard_normal(C) + 1.0
    w, ws = strided_vector(w0, np.float64, how)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, training=True)
    grads = bncore.batch_norm_backward(dy, x, w, mean, invstd, training=True)
    for got, want in zip(grads, batch_norm_backward_ref(dy, x, w0)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert sentinels_intact(ws, w)


def test_matrix_parameters_take_the_general_walk():
    """Layer norm over two axes: weight and bias are matrices (two dims of more than one element)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 4))
    w = (rng.standard_normal((4, 3)) + 1.0).T  # a transposed (3, 4): not contiguous
    b = rng.standard_normal((3, 8))[:, ::2]
    y = bncore.layer_norm(x, (3, 4), w, b)
    np.testing.assert_allclose(y, layer_norm_ref(x, 2, w, b)[0], rtol=1e-12, atol=1e-12)
