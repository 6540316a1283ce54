"""Fused BN + ReLU and BN + add (+ ReLU): the epilogue of the apply step, its backward (dy masked by
the forward's output, the residual's gradient), against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import batch_norm_ref, fused_batch_norm_backward_ref, fused_batch_norm_ref
from layouts import LAYOUTS, nonzero_data, with_layout
from tolerances import assert_close

SHAPES = [((7, 3), 1), ((5, 4, 6), 1), ((3, 4, 5, 2), -1), ((2, 3, 2, 3, 4), 1), ((4, 5, 3), 2), ((6, 2, 33, 17), 1)]
MODES = [("relu", False), ("relu", True), (None, True)]


def _setup(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = nonzero_data(rng, shape, np.float64, axis)
    w, b = rng.uniform(0.5, 1.5, size=c), rng.normal(size=c) * 0.5
    res = rng.normal(size=shape)
    dy = rng.normal(size=shape)
    return tuple(a.astype(dtype) for a in (x, w, b, res, dy))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation,with_residual", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_forward_matches_reference(shape, axis, dtype, activation, with_residual, layout):
    x, w, b, res, _ = _setup(shape, axis, dtype, seed=1)
    r = with_layout(res, layout, np.random.default_rng(2)) if with_residual else None
    y, mean, invstd = bncore.batch_norm_forward(with_layout(x, layout), None, None, w, b, training=True, axis=axis,
                                                activation=activation, residual=r)
    y_ref, m_ref, s_ref = fused_batch_norm_ref(x, w, b, axis=axis, residual=res if with_residual else None,
                                               activation=activation)
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(mean, m_ref, dtype)
    assert_close(invstd, s_ref, dtype)
    if activation == "relu":
        assert np.all(y >= 0) and np.any(y == 0) and np.any(y > 0)


@pytest.mark.parametrize("activation,with_residual", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_backward_matches_reference(shape, axis, dtype, activation, with_residual):
    x, w, b, res, dy = _setup(shape, axis, dtype, seed=3)
    r = res if with_residual else None
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, w, b, training=True, axis=axis,
                                                activation=activation, residual=r)
    dx, dw, db, dres = bncore.batch_norm_backward(dy, x, w, mean, invstd, axis=axis, activation=activation,
                                                  output=y, residual=True)
    dx_ref, dw_ref, db_ref, g = fused_batch_norm_backward_ref(dy, x, y, w, axis=axis, activation=activation)
    assert_close(dx, dx_ref, dtype, "grad", err_msg="dx")
    assert_close(dw, dw_ref, dtype, "grad", scale=4, err_msg="dw")
    assert_close(db, db_ref, dtype, "grad", scale=4, err_msg="db")
    np.testing.assert_array_equal(dres, g.astype(dtype))  # the masked dy, bit for bit


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", SHAPES[:5])
def test_backward_dot_product(shape, axis, training):
    """<u, J v> by central differences of y = relu(bn(x) + residual) with respect to (x, weight, bias,
    residual) equals <J^T u, v> of the backward (data away from the ReLU's kink at the step used)."""
    rng = np.random.default_rng(4)
    x, w, b, res, _ = _setup(shape, axis, np.float64, seed=5)
    c = shape[axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    vx, vw, vb, vr, u = (rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape),
                         rng.normal(size=shape))

    def f(t):
        return bncore.batch_norm(x + t * vx, rm.copy(), rv.copy(), w + t * vw, b + t * vb, training=training,
                                 axis=axis, activation="relu", residual=res + t * vr)

    y, mean, invstd = bncore.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis,
                                                activation="relu", residual=res)
    h = 1e-6
    assert np.min(np.abs(bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis,
                                           residual=res))) > 1e-4  # no element near the kink
    lhs = float(np.sum(u * (f(h) - f(-h)) / (2 * h)))
    dx, dw, db, dres = bncore.batch_norm_backward(u, x, w, mean, invstd, training=training, axis=axis,
                                                  activation="relu", output=y, residual=True)
    rhs = float(np.sum(dx * vx) + np.sum(dw * vw) + np.sum(db * vb) + np.sum(dres * vr))
    scale = np.sqrt(np.sum(u * u) * (np.sum(vx * vx) + np.sum(vw * vw) + np.sum(vb * vb) + np.sum(vr * vr)))
    assert abs(lhs - rhs) <= 1e-6 * scale, (lhs, rhs)


def test_fused_equals_unfused_bit_for_bit_in_float32():
    """The add and the ReLU happen on the compute-type value before it is stored: for float32 (compute
    type float32) that is exactly bn(x) stored, plus the residual, then max(., 0)."""
    x, w, b, res, _ = _setup((8, 16, 9, 9), 1, np.float32, seed=6)
    bn = bncore.batch_norm(x, None, None, w, b, training=True)
    np.testing.assert_array_equal(bncore.batch_norm(x, None, None, w, b, training=True, activation="relu"),
                                  np.maximum(bn, 0))
    np.testing.assert_array_equal(bncore.batch_norm(x, None, None, w, b, training=True, residual=res), bn + res)
    np.testing.assert_array_equal(
        bncore.batch_norm(x, None, None, w, b, training=True, residual=res, activation="relu"),
        np.maximum(bn + res, 0))


def test_eval_mode_and_channels_last_torch():
    torch = pytest.importorskip("torch")
    x, w, b, res, dy = _setup((4, 6, 5, 5), 1, np.float32, seed=7)
    rm, rv = np.linspace(-1, 1, 6).astype(np.float32), np.linspace(0.5, 2, 6).astype(np.float32)
    tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    tr = torch.from_numpy(res)
    y = bncore.batch_norm(tx, torch.from_numpy(rm), torch.from_numpy(rv), torch.from_numpy(w), torch.from_numpy(b),
                          training=False, activation="relu", residual=tr)
    assert isinstance(y, torch.Tensor)
    y_ref = fused_batch_norm_ref(x, w, b, residual=res, activation="relu", running_mean=rm, running_var=rv)[0]
    assert_close(y, y_ref, np.float32)


def test_nan_propagates_through_the_relu():
    x, w, b, res, _ = _setup((4, 3, 5), 1, np.float64, seed=8)
    res[1, 2, 3] = np.nan
    y = bncore.batch_norm(x, None, None, w, b, training=True, activation="relu", residual=res)
    assert np.isnan(y[1, 2, 3]) and np.sum(np.isnan(y)) == 1


def test_without_activation_the_residual_gradient_is_dy():
    x, w, b, res, dy = _setup((5, 4, 6), 1, np.float32, seed=9)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, b, training=True, residual=res)
    dx, dw, db, dres = bncore.batch_norm_backward(dy, x, w, mean, invstd, residual=True)
    np.testing.assert_array_equal(dres, dy)
    plain = bncore.batch_norm_backward(dy, x, w, mean, invstd)
    for g, e in zip((dx, dw, db), plain):
        np.testing.assert_array_equal(g, e)


def test_half_dtypes():
    torch = pytest.importorskip("torch")
    x, w, b, res, dy = _setup((4, 3, 8, 8), 1, np.float32, seed=10)
    for dt, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        tx, tres, tdy = (torch.from_numpy(a).to(dt) for a in (x, res, dy))
        y, mean, invstd = bncore.batch_norm_forward(tx, None, None, torch.from_numpy(w), torch.from_numpy(b),
                                                    training=True, activation="relu", residual=tres)
        y_ref = fused_batch_norm_ref(tx.double().numpy(), w, b, residual=tres.double().numpy(), activation="relu")[0]
        assert_close(y, y_ref, name)
        dx, _, _, dres = bncore.batch_norm_backward(tdy, tx, torch.from_numpy(w), mean, invstd, activation="relu",
                                                    output=y, residual=True)
        g = torch.where(y > 0, tdy, torch.zeros_like(tdy))
        assert torch.equal(dres, g)
        dx_ref = fused_batch_norm_backward_ref(tdy.double().numpy(), tx.double().numpy(), y.double().numpy(), w,
                                               activation="relu")[0]
        assert_close(dx, dx_ref, name, "grad", scale=2)


def test_plain_batch_norm_is_unchanged_by_the_epilogue_code():
    x, w, b, _, _ = _setup((6, 2, 33, 17), 1, np.float64, seed=11)
    assert_close(bncore.batch_norm(x, None, None, w, b, training=True), batch_norm_ref(x, w, b)[0], np.float64)


def test_ghost_batches_with_residual_and_relu():
    """The epilogue composes with virtual batches (the residual is split with x by the plan)."""
    from bncore.reference import ghost_batch_norm_ref

    x, w, b, res, dy = _setup((8, 3, 4, 5), 1, np.float64, seed=12)
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, w, b, training=True, virtual_batch_size=2,
                                                activation="relu", residual=res)
    assert_close(y, np.maximum(ghost_batch_norm_ref(x, 2, w, b)[0] + res, 0), np.float64)
    dx, _, _, dres = bncore.batch_norm_backward(dy, x, w, mean, invstd, virtual_batch_size=2, activation="relu",
                                                output=y, residual=True)
    g = np.where(y > 0, dy, 0.0)
    np.testing.assert_array_equal(dres, g)
    dx_ref = np.concatenate([bncore.batch_norm_backward(g[i:i + 2], x[i:i + 2], w, mean[i // 2], invstd[i // 2])[0]
                             for i in range(0, 8, 2)])
    assert_close(dx, dx_ref, np.float64, "grad")
