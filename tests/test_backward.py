"""Backward values against the float64 reference, and a dot-product (VJP) test for every variant.

The dot-product test: with J the Jacobian of the output with respect to (x, weight, bias), <u, J v>
from central differences of bncore's own forward in float64 equals <J^T u, v> from bncore's
backward, for every case of the table, in training and (where the variant has running
statistics) eval mode. It ties the backward to the forward without going through the reference.
"""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import batch_norm_backward_ref, normalize_backward_ref, normalize_ref
from cases import BN_CASES, CASES, DTYPES, bn_params, bncore_backward, bncore_forward, case_id, data, params, seed_of
from layouts import nonzero_data, with_layout
from tolerances import assert_close


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "reversed", "permuted"])
@pytest.mark.parametrize("case", BN_CASES, ids=case_id)
def test_backward_matches_reference(case, layout, dtype, training):
    shape, axis = case
    rng = np.random.default_rng(seed_of(6, shape, axis, layout))
    c = shape[axis]
    x = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    dy = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    w, b = bn_params(rng, c, dtype)
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
    w, _ = bn_params(rng, 5, np.float64)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, None, training=True)
    dx, _, _ = bncore.batch_norm_backward(dy, x, w, mean, invstd)
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0.0, atol=1e-12)


# ---------------------------------------------------------------- dot-product test of the backward, every variant


def _dot_product_check(shape, axis, training, seed):
    """<u, J v> by central differences of the forward equals <J^T u, v> from the backward,
    with J the Jacobian of y with respect to (x, weight, bias)."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = nonzero_data(rng, shape, np.float64, axis)
    w, b = bn_params(rng, c, np.float64)
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



def _vjp_modes(case):
    return [True, False] if case.has_running_stats else [True]


VJP = [(c, t) for c in CASES for t in _vjp_modes(c)]


@pytest.mark.parametrize("case,training", VJP, ids=[f"{c.name}-{'train' if t else 'eval'}" for c, t in VJP])
def test_backward_dot_product_every_variant(case, training):
    """<u, J v> by central differences of bncore's forward (float64) equals <J^T u, v> from its backward,
    J the Jacobian of y with respect to (x, weight, bias); then the x part alone, so that the parameter
    parts cannot mask an error in grad_input. Eval: the running statistics are constants."""
    rng = np.random.default_rng(seed_of("vjp", case.name, training))
    shape, pshape = case.shape, case.param_shape
    x = data(rng, shape, offset_axis=case.channel_axis)
    w, b = params(rng, pshape, np.float64, bias=case.has_bias)
    c = shape[case.channel_axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    vx, vw = rng.normal(size=shape), rng.normal(size=pshape)
    vb = None if b is None else rng.normal(size=pshape)
    u = rng.normal(size=shape)
    running = case.has_running_stats

    def f(t, vw, vb):
        stats = (rm.copy(), rv.copy()) if running else (None, None)  # copies: no update leaks into the probe
        return bncore_forward(case, x + t * vx, w + t * vw, None if b is None else b + t * vb, *stats,
                              use_input_stats=training)[0]

    h = 1e-5
    jv = (f(h, vw, vb) - f(-h, vw, vb)) / (2 * h)
    stats = (rm.copy(), rv.copy()) if running else (None, None)
    _, saved = bncore_forward(case, x, w, b, *stats, use_input_stats=training)
    dx, dw, db = bncore_backward(case, u, x, w, saved, use_input_stats=training)
    rhs = np.sum(dx * vx) + np.sum(dw * vw) + (0.0 if b is None else np.sum(db * vb))
    norm_v = np.sum(vx * vx) + np.sum(vw * vw) + (0.0 if b is None else np.sum(vb * vb))
    scale = np.sqrt(np.sum(u * u) * norm_v)
    # float64 central differences: truncation ~h^2 and rounding ~eps/h, both far below 1e-7
    assert abs(np.sum(u * jv) - rhs) <= 1e-7 * scale, (np.sum(u * jv), rhs, scale)
    zero = np.zeros(pshape)
    jv_x = (f(h, zero, zero) - f(-h, zero, zero)) / (2 * h)
    assert abs(np.sum(u * jv_x) - np.sum(dx * vx)) <= 1e-7 * scale


# ---------------------------------------------------------------- the reference itself


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

        # this iteration's values bound as defaults (f is only called within it)
        def f(t, x=x, vx=vx, w=w, vw=vw, b=b, reduce_axes=reduce_axes, affine_axes=affine_axes, rms=rms):
            return normalize_ref(x + t * vx, reduce_axes, affine_axes, w + t * vw, b, 1e-3, rms)[0]

        h = 1e-5
        lhs = np.sum(u * (f(h) - f(-h)) / (2 * h))
        dx, dw, _ = normalize_backward_ref(u, x, reduce_axes, affine_axes, w, 1e-3, rms)
        rhs = np.sum(dx * vx) + np.sum(dw * vw)
        assert abs(lhs - rhs) < 1e-7 * max(1.0, abs(lhs))
