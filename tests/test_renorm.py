"""Batch renormalization (Ioffe 2017) against the float64 reference of bncore.reference, its
backward by dot products, and its equivalences with batch norm."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import (batch_norm_backward_ref, batch_norm_ref, batch_renorm_backward_ref, batch_renorm_ref,
                              normalize_ref)
from layouts import LAYOUTS, nonzero_data, with_layout
from tolerances import assert_close

SHAPES = [((7, 3), 1), ((5, 4, 6), 1), ((3, 4, 5, 2), -1), ((2, 3, 2, 3, 4), 1), ((4, 5, 3), 2), ((6, 2, 33, 17), 1)]


def _setup(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = nonzero_data(rng, shape, np.float64, axis)
    w = rng.uniform(0.5, 1.5, size=c)
    b = rng.normal(size=c)
    # running statistics far enough from the batch's that some r and d are clipped, some not
    rm = rng.normal(size=c) * 1.5
    rv = rng.uniform(0.05, 6.0, size=c)
    return x.astype(dtype), w.astype(dtype), b.astype(dtype), rm.astype(dtype), rv.astype(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_forward_and_running_stats_match_reference(shape, axis, dtype, layout):
    x, w, b, rm, rv = _setup(shape, axis, dtype, seed=1)
    xl = with_layout(x, layout)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd, r, d = bncore.batch_renorm_forward(xl, rm1, rv1, w, b, training=True, momentum=0.3,
                                                        rmax=1.8, dmax=0.7, axis=axis)
    y_ref, m_ref, s_ref, r_ref, d_ref = batch_renorm_ref(x, rm, rv, w, b, 1e-5, 1.8, 0.7, axis)
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(mean, m_ref, dtype, err_msg="save_mean")
    assert_close(invstd, s_ref, dtype, err_msg="save_invstd")
    assert_close(r, r_ref, dtype, err_msg="r")
    assert_close(d, d_ref, dtype, err_msg="d")
    # some channels clipped and some not, so both branches of clip were exercised across the shapes
    assert r.shape == d.shape == (x.shape[axis],)
    # running statistics: exactly batch norm's update, from the statistics before the call
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    n = x.size // x.shape[axis]
    x64 = x.astype(np.float64)
    assert_close(rm1, 0.7 * rm + 0.3 * x64.mean(axis=axes), dtype, err_msg="running_mean")
    assert_close(rv1, 0.7 * rv + 0.3 * x64.var(axis=axes) * n / (n - 1), dtype, err_msg="running_var")


def test_some_factors_are_clipped_and_some_are_not():
    """The data of the tests above reach both sides of each clip (else the clip could be missing)."""
    x, w, b, rm, rv = _setup((6, 2, 33, 17), 1, np.float64, seed=1)
    clipped_r = clipped_d = free_r = free_d = 0
    for seed in range(6):
        x, w, b, rm, rv = _setup((8, 6, 5), 1, np.float64, seed)
        _, _, _, r, d = bncore.batch_renorm_forward(x, rm, rv, w, b, training=True, rmax=1.8, dmax=0.7)
        clipped_r += int(np.sum(np.isclose(r, 1.8) | np.isclose(r, 1 / 1.8)))
        clipped_d += int(np.sum(np.isclose(np.abs(d), 0.7)))
        free_r += int(np.sum((r < 1.79) & (r > 1 / 1.79)))
        free_d += int(np.sum(np.abs(d) < 0.69))
    assert min(clipped_r, clipped_d, free_r, free_d) > 0, (clipped_r, clipped_d, free_r, free_d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_backward_matches_reference(shape, axis, dtype):
    x, w, b, rm, rv = _setup(shape, axis, dtype, seed=2)
    dy = np.random.default_rng(3).normal(size=shape).astype(dtype)
    _, mean, invstd, r, d = bncore.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b, training=True, rmax=1.8,
                                                        dmax=0.7, axis=axis)
    dx, dw, db = bncore.batch_renorm_backward(dy, x, w, mean, invstd, r, d, axis=axis)
    dx_ref, dw_ref, db_ref = batch_renorm_backward_ref(dy, x, r, d, w, 1e-5, axis)
    assert_close(dx, dx_ref, dtype, "grad", err_msg="dx")
    assert_close(dw, dw_ref, dtype, "grad", scale=4, err_msg="dw")
    assert_close(db, db_ref, dtype, "grad", scale=4, err_msg="db")


def _dot(a, b):
    return float(np.sum(np.asarray(a) * np.asarray(b)))


@pytest.mark.parametrize("shape,axis", SHAPES[:5])
def test_backward_dot_product_with_r_and_d_held_constant(shape, axis):
    """<u, J v> by central differences of the forward with r, d frozen at the base point (batch norm
    with weight w*r and bias b + w*d: the paper's stop-gradient) equals <J^T u, v> of the backward."""
    rng = np.random.default_rng(5)
    x, w, b, rm, rv = _setup(shape, axis, np.float64, seed=4)
    c = shape[axis]
    vx, vw, vb, u = rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)
    _, mean, invstd, r, d = bncore.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b, training=True, rmax=1.8,
                                                        dmax=0.7, axis=axis)

    def f(t):
        wt, bt = w + t * vw, b + t * vb
        return bncore.batch_norm(x + t * vx, None, None, wt * r, bt + wt * d, training=True, axis=axis)

    h = 1e-5
    lhs = _dot(u, (f(h) - f(-h)) / (2 * h))
    dx, dw, db = bncore.batch_renorm_backward(u, x, w, mean, invstd, r, d, axis=axis)
    rhs = _dot(dx, vx) + _dot(dw, vw) + _dot(db, vb)
    scale = np.sqrt(_dot(u, u) * (_dot(vx, vx) + _dot(vw, vw) + _dot(vb, vb)))
    assert abs(lhs - rhs) <= 1e-7 * scale, (lhs, rhs)


def test_backward_dot_product_where_every_factor_is_clipped():
    """Where every r and d sits at its bound, they are locally constant for real: the finite
    differences of batch_renorm itself must match the backward."""
    rng = np.random.default_rng(6)
    shape, c = (6, 3, 4, 5), 3
    x = nonzero_data(rng, shape) * 3.0
    rm = x.mean(axis=(0, 2, 3)) + 5.0  # the batch mean far below: d = -dmax
    rv = np.full(c, 0.01)              # the batch spread far above: r = rmax
    w, b = rng.uniform(0.5, 1.5, size=c), rng.normal(size=c)
    vx, vw, vb, u = rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)
    _, mean, invstd, r, d = bncore.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b, training=True, rmax=2.0,
                                                        dmax=0.5)
    np.testing.assert_array_equal(r, 2.0)
    np.testing.assert_array_equal(d, -0.5)

    def f(t):
        return bncore.batch_renorm(x + t * vx, rm.copy(), rv.copy(), w + t * vw, b + t * vb, training=True,
                                   rmax=2.0, dmax=0.5)

    h = 1e-5
    lhs = _dot(u, (f(h) - f(-h)) / (2 * h))
    dx, dw, db = bncore.batch_renorm_backward(u, x, w, mean, invstd, r, d)
    rhs = _dot(dx, vx) + _dot(dw, vw) + _dot(db, vb)
    scale = np.sqrt(_dot(u, u) * (_dot(vx, vx) + _dot(vw, vw) + _dot(vb, vb)))
    assert abs(lhs - rhs) <= 1e-7 * scale, (lhs, rhs)


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_rmax_1_dmax_0_is_batch_norm_bit_for_bit(shape, axis):
    x, w, b, rm, rv = _setup(shape, axis, np.float32, seed=7)
    dy = np.random.default_rng(8).normal(size=shape).astype(np.float32)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, mean, invstd, r, d = bncore.batch_renorm_forward(x, rm1, rv1, w, b, training=True, rmax=1.0, dmax=0.0,
                                                        axis=axis)
    y_bn, mean_bn, invstd_bn = bncore.batch_norm_forward(x, rm2, rv2, w, b, training=True, axis=axis)
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(d, 0.0)
    for got, want in ((y, y_bn), (mean, mean_bn), (invstd, invstd_bn), (rm1, rm2), (rv1, rv2)):
        np.testing.assert_array_equal(got, want)
    grads = bncore.batch_renorm_backward(dy, x, w, mean, invstd, r, d, axis=axis)
    grads_bn = bncore.batch_norm_backward(dy, x, w, mean_bn, invstd_bn, axis=axis)
    for got, want in zip(grads, grads_bn):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_unclipped_renorm_normalizes_by_the_moving_statistics(shape, axis):
    """With huge bounds r = sigma_B / sigma and d = (mu_B - mu) / sigma unclipped, and the forward is
    (x - mu) / sigma * w + b: normalization by the running statistics (batch norm's eval)."""
    x, w, b, rm, rv = _setup(shape, axis, np.float64, seed=9)
    y = bncore.batch_renorm(x, rm.copy(), rv.copy(), w, b, training=True, rmax=1e30, dmax=1e30, axis=axis)
    y_moving, _, _ = normalize_ref(x, tuple(i for i in range(x.ndim) if i != axis % x.ndim), (axis,), w, b,
                                   running_mean=rm, running_var=rv)
    assert_close(y, y_moving, np.float64)
    y_inf = bncore.batch_renorm(x, rm.copy(), rv.copy(), w, b, training=True, rmax=float("inf"),
                                dmax=float("inf"), axis=axis)
    assert_close(y_inf, y_moving, np.float64)


def test_eval_is_batch_norm_eval():
    x, w, b, rm, rv = _setup((5, 4, 6), 1, np.float32, seed=10)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd, r, d = bncore.batch_renorm_forward(x, rm1, rv1, w, b, training=False)
    assert r is None and d is None
    np.testing.assert_array_equal(y, bncore.batch_norm(x, rm, rv, w, b, training=False))
    np.testing.assert_array_equal(rm1, rm)
    np.testing.assert_array_equal(rv1, rv)
    dy = np.ones_like(x)
    got = bncore.batch_renorm_backward(dy, x, w, mean, invstd, None, None, training=False)
    want = bncore.batch_norm_backward(dy, x, w, mean, invstd, training=False)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


def test_without_weight_and_bias():
    x, _, _, rm, rv = _setup((5, 4, 6), 1, np.float64, seed=11)
    y, mean, invstd, r, d = bncore.batch_renorm_forward(x, rm.copy(), rv.copy(), training=True, rmax=1.5, dmax=0.3)
    assert_close(y, batch_renorm_ref(x, rm, rv, None, None, 1e-5, 1.5, 0.3)[0], np.float64)
    dy = np.random.default_rng(12).normal(size=x.shape)
    dx, dw, db = bncore.batch_renorm_backward(dy, x, None, mean, invstd, r, d)
    assert dw is None and db is None
    assert_close(dx, batch_renorm_backward_ref(dy, x, r, d)[0], np.float64, "grad")


def test_renormalized_output_is_batch_norm_rescaled_per_channel():
    """An identity from the formula: y = bn(x) * r + d (no affine), channel by channel."""
    x, _, _, rm, rv = _setup((9, 3, 7), 1, np.float64, seed=13)
    y, _, _, r, d = bncore.batch_renorm_forward(x, rm.copy(), rv.copy(), training=True, rmax=1.3, dmax=0.2)
    bn = batch_norm_ref(x)[0]
    assert_close(y, bn * r.reshape(1, 3, 1) + d.reshape(1, 3, 1), np.float64)
    assert np.all(batch_norm_backward_ref(np.ones_like(x), x)[2] == x.size // 3)


def test_layer_renorm_uses_its_state_and_backward():
    rng = np.random.default_rng(14)
    layer = bncore.BatchNorm(3, renorm=True, rmax=1.5, dmax=0.5, dtype="float64")
    layer.running_mean = rng.normal(size=3)
    layer.running_var = rng.uniform(0.2, 3.0, size=3)
    rm0, rv0 = layer.running_mean.copy(), layer.running_var.copy()
    layer.weight[:] = rng.uniform(0.5, 1.5, size=3)
    x = nonzero_data(rng, (6, 3, 4))
    y = layer(x)
    y_ref, _, _, r, d = batch_renorm_ref(x, rm0, rv0, layer.weight, layer.bias, 1e-5, 1.5, 0.5)
    assert_close(y, y_ref, np.float64)
    assert int(layer.num_batches_tracked) == 1
    assert_close(layer.running_mean, 0.9 * rm0 + 0.1 * x.mean(axis=(0, 2)), np.float64)
    dy = rng.normal(size=x.shape)
    dx = layer.backward(dy)
    dx_ref, dw_ref, db_ref = batch_renorm_backward_ref(dy, x, r, d, layer.weight)
    assert_close(dx, dx_ref, np.float64, "grad")
    assert_close(layer.weight_grad, dw_ref, np.float64, "grad")
    assert_close(layer.bias_grad, db_ref, np.float64, "grad")
    # eval: plain batch norm with the running statistics
    layer.eval()
    assert_close(layer(x), batch_norm_ref(x, layer.weight, layer.bias, running_mean=layer.running_mean,
                                          running_var=layer.running_var)[0], np.float64)
    with pytest.raises(ValueError, match="track_running_stats"):
        bncore.BatchNorm(3, renorm=True, track_running_stats=False)
    with pytest.raises(ValueError, match="rmax"):
        bncore.BatchNorm(3, renorm=True, rmax=0.5)


def test_renorm_schedule_warms_up_from_batch_norm():
    assert bncore.renorm_schedule(0) == (1.0, 0.0)
    assert bncore.renorm_schedule(5000) == (1.0, 0.0)
    r, d = bncore.renorm_schedule(5000 + 20000)
    assert r == pytest.approx(2.0) and d == pytest.approx(4.0)
    assert bncore.renorm_schedule(10**6) == (3.0, 5.0)
    assert bncore.renorm_schedule(10, rmax=2.0, dmax=1.0, start=0, rmax_steps=20, dmax_steps=10) == (1.5, 1.0)
    steps = [bncore.renorm_schedule(s, start=0, rmax_steps=7, dmax_steps=3) for s in range(12)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="step"):
        bncore.renorm_schedule(-1)
    with pytest.raises(ValueError, match="rmax"):
        bncore.renorm_schedule(3, rmax=0.9)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_inputs(half):
    torch = pytest.importorskip("torch")
    x, w, b, rm, rv = _setup((6, 3, 8, 8), 1, np.float32, seed=15)
    tx = torch.from_numpy(x).to(getattr(torch, half)).contiguous(memory_format=torch.channels_last)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y, mean, invstd, r, d = bncore.batch_renorm_forward(tx, trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                                                        training=True, rmax=1.8, dmax=0.7)
    assert r.dtype == torch.float32
    x64 = tx.double().numpy()
    y_ref, _, _, r_ref, d_ref = batch_renorm_ref(x64, rm, rv, w, b, 1e-5, 1.8, 0.7)
    assert_close(y, y_ref, half)
    assert_close(r, r_ref, "float32", scale=10)
    assert_close(d, d_ref, "float32", scale=10)
    dy = torch.from_numpy(np.random.default_rng(16).normal(size=x.shape)).to(tx.dtype)
    dx, dw, db = bncore.batch_renorm_backward(dy, tx, torch.from_numpy(w), mean, invstd, r, d)
    dx_ref, dw_ref, db_ref = batch_renorm_backward_ref(dy.double().numpy(), x64, r.double().numpy(),
                                                       d.double().numpy(), w)
    assert_close(dx, dx_ref, half, "grad", scale=2)
    assert_close(dw, dw_ref, "float32", "grad", scale=100)
