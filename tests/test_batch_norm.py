"""Batch norm against the float64 reference (tests/reference.py).

Shapes 2-D to 5-D, channel axes 1, -1 and others, every stride pattern NumPy
and PyTorch make (slices, transposes, negative strides, channels-last),
training and eval, running-statistic updates, empty batches, large-mean data,
a dot-product check of the backward and hypothesis-drawn problems.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bncore
from bncore.reference import (all_but, batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref,
                       normalize_backward_ref, normalize_ref)
from tolerances import assert_close, to_numpy64

# ---------------------------------------------------------------- data


def nonzero_data(rng, shape, dtype=np.float64, axis=1):
    """O(1) data, non-zero mean, different per channel: 1.5 * N(0, 1) + channel offset."""
    x = 1.5 * rng.normal(size=shape)
    if len(shape) and x.size:
        offsets = rng.uniform(-2.0, 2.0, size=shape[axis])
        view = [1] * len(shape)
        view[axis] = shape[axis]
        x = x + offsets.reshape(view)
    return x.astype(dtype)


def with_layout(x, layout, rng=None):
    """`x`'s values in a new array of the same logical shape but another memory layout."""
    if layout == "contiguous":
        return np.ascontiguousarray(x)
    if layout == "sliced":  # every other element of a bigger buffer, with an offset
        big = np.zeros(tuple(2 * s + 1 for s in x.shape), x.dtype)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in x.shape)]
        view[...] = x
        assert not view.flags.c_contiguous or x.size <= 1
        return view
    if layout == "transposed":  # Fortran order: a transposed view of a C array
        t = np.ascontiguousarray(x.T).T
        assert t.flags.f_contiguous
        return t
    if layout == "reversed":  # negative strides on the first and last axes
        r = np.ascontiguousarray(x[::-1, ..., ::-1])[::-1, ..., ::-1]
        assert r.strides[0] < 0 or x.shape[0] <= 1
        return r
    if layout == "permuted":  # a random axis permutation of a C array
        perm = (rng or np.random.default_rng(0)).permutation(x.ndim)
        p = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
        return p
    raise ValueError(layout)


def seed_of(*args) -> int:
    """A seed that depends on the test case only (str hashes change between processes)."""
    return zlib.crc32(repr(args).encode())


LAYOUTS = ["contiguous", "sliced", "transposed", "reversed", "permuted"]

# (shape, axis): 2-D to 5-D, channel axis 1, -1 and others
CASES = [
    ((16, 3), 1),
    ((16, 3), -1),
    ((5, 7), 0),
    ((4, 3, 9), 1),
    ((4, 9, 3), -1),
    ((3, 4, 5), 2),
    ((4, 3, 5, 6), 1),
    ((4, 5, 6, 3), -1),
    ((2, 5, 3, 4), 2),
    ((3, 4, 5, 2), 0),
    ((2, 3, 3, 4, 5), 1),
    ((2, 3, 4, 5, 3), -1),
    ((2, 3, 4, 5, 3), 3),
]

DTYPES = [np.float32, np.float64]


def case_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


def params(rng, c, dtype):
    w = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1.0, 1.0], size=c)
    b = rng.normal(size=c)
    return w.astype(dtype), b.astype(dtype)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_training_forward_matches_reference(case, layout, dtype):
    shape, axis = case
    rng = np.random.default_rng(seed_of(shape, axis, layout))
    c = shape[axis]
    x = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    x_before = x.copy()
    w, b = params(rng, c, dtype)
    rm0 = rng.normal(size=c).astype(dtype)
    rv0 = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3, axis=axis)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x, w, b, eps=1e-3, axis=axis)
    assert type(y) is np.ndarray and y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == (c,) and invstd.shape == (c,)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, rstd_ref, dtype)
    rm_ref, rv_ref = batch_norm_running_ref(x, rm0, rv0, 0.2, axis=axis)
    assert_close(rm, rm_ref, dtype)
    assert_close(rv, rv_ref, dtype)
    # the input is not touched
    assert x.tobytes() == x_before.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eval_forward_matches_reference(case, layout, dtype):
    shape, axis = case
    rng = np.random.default_rng(seed_of(1, shape, axis, layout))
    c = shape[axis]
    x = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    w, b = params(rng, c, dtype)
    rm = rng.normal(size=c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=False, momentum=0.5, axis=axis)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x, w, b, axis=axis, running_mean=rm0, running_var=rv0)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, dtype)  # the statistics actually used: the running ones
    assert_close(invstd, rstd_ref, dtype)
    # eval never writes the running statistics
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_forward_without_affine_or_running_stats(case, dtype):
    shape, axis = case
    rng = np.random.default_rng(2)
    x = nonzero_data(rng, shape, dtype, axis)
    y = bncore.batch_norm(x, training=True, axis=axis)
    y_ref, _, _ = batch_norm_ref(x, axis=axis)
    assert_close(y, y_ref, dtype)
    # normalized: zero mean, unit (biased) variance per channel, up to eps
    red = all_but(x.ndim, axis)
    np.testing.assert_allclose(np.mean(to_numpy64(y), axis=red), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.var(to_numpy64(y), axis=red), 1.0, rtol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "reversed"])
def test_output_into_another_layout(layout):
    rng = np.random.default_rng(3)
    x = nonzero_data(rng, (4, 3, 5, 6))
    w, b = params(rng, 3, np.float64)
    out = with_layout(np.zeros_like(x), layout)
    got = bncore.batch_norm(x, None, None, w, b, training=True, out=out)
    assert got is out
    assert_close(out, batch_norm_ref(x, w, b)[0], np.float64)


# ---------------------------------------------------------------- torch layouts


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 3, 4, 5, 3)], ids=lambda s: f"{len(s)}d")
def test_channels_last_torch_matches_reference(shape, dtype):
    torch = pytest.importorskip("torch", reason="torch is needed for channels-last tensors")
    rng = np.random.default_rng(4)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    xn = nonzero_data(rng, shape, dtype)
    x = torch.from_numpy(xn).to(memory_format=fmt)
    assert x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
    w, b = params(rng, shape[1], dtype)
    rm, rv = torch.zeros(shape[1], dtype=x.dtype), torch.ones(shape[1], dtype=x.dtype)
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, torch.from_numpy(w), torch.from_numpy(b),
                                                training=True, momentum=0.1)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(xn, w, b)
    assert isinstance(y, torch.Tensor) and y.is_contiguous(memory_format=fmt)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, rstd_ref, dtype)
    rm_ref, rv_ref = batch_norm_running_ref(xn, np.zeros(shape[1]), np.ones(shape[1]), 0.1)
    assert_close(rm, rm_ref, dtype)
    assert_close(rv, rv_ref, dtype)
    dy = torch.from_numpy(nonzero_data(rng, shape, dtype)).to(memory_format=fmt)
    dx, dw, db = bncore.batch_norm_backward(dy, x, torch.from_numpy(w), mean, invstd)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy.numpy(), xn, w)
    assert isinstance(dx, torch.Tensor) and dx.is_contiguous(memory_format=fmt)
    assert_close(dx, dx_ref, dtype, "grad")
    assert_close(dw, dw_ref, dtype, "grad")
    assert_close(db, db_ref, dtype, "grad")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_match_reference(dtype):
    torch = pytest.importorskip("torch", reason="torch is needed for bfloat16 tensors")
    rng = np.random.default_rng(5)
    xn = nonzero_data(rng, (8, 3, 4, 4))
    x = torch.from_numpy(xn).to(getattr(torch, dtype))
    x64 = x.double().numpy()
    w, b = params(rng, 3, np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, torch.from_numpy(w), torch.from_numpy(b),
                                                training=True)
    assert y.dtype == x.dtype and mean.dtype == torch.float32 and invstd.dtype == torch.float32
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x64, w, b)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, "float32", scale=10)  # saved statistics are float32
    assert_close(invstd, rstd_ref, "float32", scale=10)
    dy = torch.from_numpy(rng.normal(size=x.shape)).to(x.dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, torch.from_numpy(w), mean, invstd)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy.double().numpy(), x64, w)
    assert dx.dtype == x.dtype
    assert_close(dx, dx_ref, dtype, "grad")
    # the sums are float32 (the weight's dtype) over the exact half values
    assert_close(dw, dw_ref, "float32", "grad", scale=10)
    assert_close(db, db_ref, "float32", "grad", scale=10)


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "reversed", "permuted"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(case, layout, dtype, training):
    shape, axis = case
    rng = np.random.default_rng(seed_of(6, shape, axis, layout))
    c = shape[axis]
    x = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    dy = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    w, b = params(rng, c, dtype)
    rm = rng.normal(size=c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    stats = {} if training else {"running_mean": rm.copy(), "running_var": rv.copy()}
    _, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=training, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(dy, x, w, mean, invstd, training=training, axis=axis)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy, x, w, axis=axis, **stats)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.shape == (c,) and db.shape == (c,)
    assert_close(dx, dx_ref, dtype, "grad")
    assert_close(dw, dw_ref, dtype, "grad")
    assert_close(db, db_ref, dtype, "grad")


def test_backward_without_weight():
    rng = np.random.default_rng(7)
    x = nonzero_data(rng, (6, 4, 5))
    dy = rng.normal(size=x.shape)
    _, mean, invstd = bncore.batch_norm_forward(x, training=True)
    dx, dw, db = bncore.batch_norm_backward(dy, x, None, mean, invstd)
    assert dw is None and db is None
    assert_close(dx, batch_norm_backward_ref(dy, x)[0], np.float64, "grad")


def test_training_gradient_sums_to_zero_per_channel():
    """Batch statistics make the output invariant to a per-channel shift of x: dx sums to 0 per channel."""
    rng = np.random.default_rng(8)
    x = nonzero_data(rng, (8, 5, 7))
    dy = rng.normal(size=x.shape)
    w, _ = params(rng, 5, np.float64)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, None, training=True)
    dx, _, _ = bncore.batch_norm_backward(dy, x, w, mean, invstd)
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0.0, atol=1e-12)


# ---------------------------------------------------------------- running statistics


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_running_statistics_over_steps(momentum, dtype):
    rng = np.random.default_rng(9)
    c = 4
    rm = np.zeros(c, dtype)
    rv = np.ones(c, dtype)
    rm_ref, rv_ref = np.zeros(c), np.ones(c)
    for step in range(5):
        n = 3 + step  # the unbiased correction n / (n - 1) changes with the batch size
        x = nonzero_data(rng, (n, c, 2), dtype)
        bncore.batch_norm(x, rm, rv, training=True, momentum=momentum)
        rm_ref, rv_ref = batch_norm_running_ref(x, rm_ref, rv_ref, momentum)
        assert rm.dtype == dtype and rv.dtype == dtype
        assert_close(rm, rm_ref, dtype, err_msg=f"step {step}")
        assert_close(rv, rv_ref, dtype, err_msg=f"step {step}")


def test_running_var_is_unbiased():
    """momentum 1: running_var is exactly the batch's unbiased variance, running_mean the batch mean."""
    x = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [7.0, 70.0]])
    rm, rv = np.zeros(2), np.ones(2)
    bncore.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(rv, x.var(axis=0, ddof=1), rtol=1e-14)
    # while the normalization itself uses the biased variance
    _, _, invstd = bncore.batch_norm_forward(x, training=True, eps=0.0)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x.var(axis=0)), rtol=1e-14)


def test_running_stats_float64_with_float32_input():
    """Running statistics may have their own float dtype."""
    rng = np.random.default_rng(10)
    x = nonzero_data(rng, (16, 3, 4), np.float32)
    rm, rv = np.zeros(3), np.ones(3)
    bncore.batch_norm(x, rm, rv, training=True, momentum=0.5)
    rm_ref, rv_ref = batch_norm_running_ref(x, np.zeros(3), np.ones(3), 0.5)
    assert_close(rm, rm_ref, np.float32)
    assert_close(rv, rv_ref, np.float32)


# ---------------------------------------------------------------- empty batches


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4), 1), ((0, 4, 5, 3), -1), ((2, 3, 0, 4), 1),
                                        ((0, 2, 3, 4, 5), 1)])
def test_zero_size_batch(shape, axis, training):
    rng = np.random.default_rng(11)
    c = shape[axis]
    x = np.zeros(shape)
    w, b = params(rng, c, np.float64)
    rm = rng.normal(size=c)
    rv = rng.uniform(0.5, 2.0, size=c)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
    assert y.shape == shape and y.size == 0 and y.dtype == x.dtype
    assert mean.shape == (c,) and invstd.shape == (c,)
    # no element, no statistic: the running statistics are untouched, bit for bit
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()
    dx, dw, db = bncore.batch_norm_backward(x, x, w, mean, invstd, training=training, axis=axis)
    assert dx.shape == shape
    np.testing.assert_array_equal(dw, np.zeros(c))  # an empty sum
    np.testing.assert_array_equal(db, np.zeros(c))


def test_zero_size_batch_torch():
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    x = torch.zeros(0, 3, 4, 4).to(memory_format=torch.channels_last)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = bncore.batch_norm(x, rm, rv, training=True)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ---------------------------------------------------------------- adversarial: large mean


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape,axis", [((64, 3, 8, 8), 1), ((4096, 4), 1), ((4, 6, 6, 5), -1),
                                        ((2, 3, 4, 5, 6), 1)])
def test_large_mean_stays_accurate(shape, axis, dtype):
    """1e4 + N(0, 1): a one-pass E[x^2] - E[x]^2 loses every digit of the variance in float32
    (and half of them in float64); bncore must stay close to the float64 reference."""
    rng = np.random.default_rng(12)
    c = shape[axis]
    x = (1e4 + rng.normal(size=shape)).astype(dtype)
    w, b = params(rng, c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=True, momentum=1.0, axis=axis)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x, w, b, axis=axis)
    rm_ref, rv_ref = batch_norm_running_ref(x, np.zeros(c), np.ones(c), 1.0, axis=axis)
    eps = np.finfo(dtype).eps
    # the mean: float32 data leave room for a float64 accumulation (an error of a rounding or two);
    # float64 sums of n values lose ~log2(n) ulps (pairwise) or more (blocked / sequential)
    mean_ulps = 4 if dtype == np.float32 else 64
    np.testing.assert_allclose(mean, mean_ref, rtol=mean_ulps * eps)
    np.testing.assert_allclose(rm, rm_ref, rtol=mean_ulps * eps)
    # the variance: a stable algorithm (two-pass, Welford/Chan) loses at most ~eps * |mean| / std
    # relative in its accumulation dtype; float32 inputs leave room for a float64 accumulation
    # (a few float32 ulps), float64 ones do not (kappa = 1e4 here). A one-pass E[x^2] - E[x]^2
    # is off by ~eps * kappa^2: all digits in float32, 1e-8 in float64.
    var_rtol = 64 * eps if dtype == np.float32 else 16 * eps * 1e4
    np.testing.assert_allclose(invstd, rstd_ref, rtol=var_rtol)
    np.testing.assert_allclose(rv, rv_ref, rtol=var_rtol)
    assert np.all(np.abs(rv_ref - 1) < 0.3)  # the data really has variance ~1
    # the output: x - mean is formed from the mean rounded to the input dtype or worse, so the
    # mean's error (in ulps of 1e4) times rstd * |w| is the best a dtype-preserving kernel does
    atol = (mean_ulps + 4) * eps * 1e4 * np.max(rstd_ref) * np.max(np.abs(w))
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=atol)
    # backward from the saved (input-dtype) mean: xhat is off by the mean's error times rstd, so
    # dx by the same bound as y, dweight = sum(dy * xhat) by that times |sum(dy)| (plus roundings)
    dy = rng.normal(size=shape).astype(dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, w, mean, invstd, axis=axis)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy, x, w, axis=axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=atol)
    n = x.size / c
    dw_atol = (mean_ulps + 4) * eps * 1e4 * np.max(rstd_ref) * (np.max(np.abs(db_ref)) + np.sqrt(n))
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=dw_atol)
    assert_close(db, db_ref, dtype, "grad")


# ---------------------------------------------------------------- dot-product test of the backward


def _dot_product_check(shape, axis, training, seed):
    """<u, J v> by central differences of the forward equals <J^T u, v> from the backward,
    with J the Jacobian of y with respect to (x, weight, bias)."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = nonzero_data(rng, shape, np.float64, axis)
    w, b = params(rng, c, np.float64)
    rm = rng.normal(size=c)
    rv = rng.uniform(0.5, 2.0, size=c)
    vx, vw, vb = rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c)
    u = rng.normal(size=shape)

    def f(t):
        # the running statistics are copies: training updates must not leak into the probe
        return bncore.batch_norm(x + t * vx, rm.copy(), rv.copy(), w + t * vw, b + t * vb, training=training,
                                 axis=axis)

    h = 1e-5
    jv = (f(h) - f(-h)) / (2 * h)
    lhs = np.sum(u * jv)
    _, mean, invstd = bncore.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(u, x, w, mean, invstd, training=training, axis=axis)
    rhs = np.sum(dx * vx) + np.sum(dw * vw) + np.sum(db * vb)
    scale = np.sqrt(np.sum(u * u) * (np.sum(vx * vx) + np.sum(vw * vw) + np.sum(vb * vb)))
    assert abs(lhs - rhs) <= 1e-7 * scale, (lhs, rhs, scale)
    # and the x part alone (the weight/bias parts must not mask an error in dx)
    vw[:] = 0
    vb[:] = 0
    jv = (f(h) - f(-h)) / (2 * h)
    assert abs(np.sum(u * jv) - np.sum(dx * vx)) <= 1e-7 * scale


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((7, 3), 1), ((5, 4, 6), 1), ((3, 4, 5, 2), -1), ((2, 3, 2, 3, 4), 1),
                                        ((4, 5, 3), 0)])
def test_backward_dot_product(shape, axis, training):
    _dot_product_check(shape, axis, training, seed=13)


# ---------------------------------------------------------------- generic reference: self-checks


def test_reference_backward_is_the_gradient_of_the_reference_forward():
    """The reference backward is checked against finite differences of the reference forward, for a
    batch-norm and a non-batch-norm axis pattern (weight on a subset of axes), so that the
    references the whole suite leans on are right."""
    rng = np.random.default_rng(14)
    for reduce_axes, affine_axes, rms in [((0, 2), (1,), False), ((2, 3), (1, 3), False), ((1, 2, 3), (3,), True)]:
        x = rng.normal(size=(3, 4, 2, 5)) + 0.5
        pshape = tuple(x.shape[d] for d in affine_axes)
        w = rng.normal(size=pshape)
        b = rng.normal(size=pshape)
        u, vx, vw = rng.normal(size=x.shape), rng.normal(size=x.shape), rng.normal(size=pshape)

        def f(t):
            return normalize_ref(x + t * vx, reduce_axes, affine_axes, w + t * vw, b, 1e-3, rms)[0]

        h = 1e-5
        lhs = np.sum(u * (f(h) - f(-h)) / (2 * h))
        dx, dw, _ = normalize_backward_ref(u, x, reduce_axes, affine_axes, w, 1e-3, rms)
        rhs = np.sum(dx * vx) + np.sum(dw * vw)
        assert abs(lhs - rhs) < 1e-7 * max(1.0, abs(lhs))


# ---------------------------------------------------------------- hypothesis


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    perm = draw(st.permutations(range(ndim)))
    steps = draw(st.lists(st.sampled_from([1, 2, -1, -2]), min_size=ndim, max_size=ndim))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    training = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axis, tuple(perm), tuple(steps), dtype, training, seed


def strided(rng, shape, perm, steps, dtype):
    """An array of logical shape `shape` whose memory has axis order `perm` and steps `steps` (negative:
    reversed) in a larger buffer."""
    phys = [shape[p] * abs(s) for p, s in zip(perm, steps)]
    base = rng.normal(size=phys).astype(dtype)
    view = base[tuple(slice(None, None, s) for s in steps)]
    view = view[tuple(slice(0, shape[p]) for p in perm)]
    out = view.transpose(np.argsort(perm))
    assert out.shape == shape
    return out


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_matches_reference(problem):
    shape, axis, perm, steps, dtype, training, seed = problem
    c = shape[axis]
    per_channel = int(np.prod(shape)) // c
    rng = np.random.default_rng(seed)
    x = strided(rng, shape, perm, steps, dtype)
    x += np.asarray(rng.normal(size=1) * 3, dtype)  # a non-zero mean
    dy = strided(rng, shape, perm[::-1], steps, dtype)
    w, b = params(rng, c, dtype)
    rm0 = rng.normal(size=c).astype(dtype)
    rv0 = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    if training and per_channel == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bncore.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
        assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()
        return
    stats = {} if training else {"running_mean": rm0, "running_var": rv0}
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=training, momentum=0.25, axis=axis)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x, w, b, axis=axis, **stats)
    # tiny groups (2 values) can have a variance near 0: scale by the conditioning rstd
    cond = max(1.0, float(np.max(rstd_ref)))
    assert_close(y, y_ref, dtype, scale=cond)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, rstd_ref, dtype, scale=cond)
    if training:
        rm_ref, rv_ref = batch_norm_running_ref(x, rm0, rv0, 0.25, axis=axis)
        assert_close(rm, rm_ref, dtype)
        assert_close(rv, rv_ref, dtype)
    else:
        assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()
    dx, dw, db = bncore.batch_norm_backward(dy, x, w, mean, invstd, training=training, axis=axis)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy, x, w, axis=axis, **stats)
    assert_close(dx, dx_ref, dtype, "grad", scale=cond ** 2)
    assert_close(dw, dw_ref, dtype, "grad", scale=cond * per_channel)
    assert_close(db, db_ref, dtype, "grad", scale=per_channel)
