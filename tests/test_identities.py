"""Identities between the variants (group norm with 1 group is layer norm over (C, *), with C groups
instance norm; RMS norm is normalize(rms=True); layer, instance and batch norm are normalize over
their axes). Each side of each identity is also checked against the float64 reference: two
results through the same engine could agree and both be wrong.
"""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import normalize_backward_bounds, normalize_backward_ref, normalize_ref
from cases import data, params, rms_default_eps, seed_of
from tolerances import assert_close, to_numpy64


def _variant_inputs(dtype, layout, shape=(3, 6, 5, 4)):
    rng = np.random.default_rng(seed_of("identities", dtype, layout))
    v = data(rng, shape)
    dyv = rng.normal(size=shape)
    if layout == "channels-last":
        torch = pytest.importorskip("torch", reason="torch is needed for this case")
        to = (lambda a: torch.from_numpy(a).to(getattr(torch, dtype)).contiguous(memory_format=torch.channels_last))
    elif dtype == "bfloat16":
        torch = pytest.importorskip("torch", reason="torch is needed for this case")
        to = (lambda a: torch.from_numpy(a).to(torch.bfloat16))
    elif layout == "reversed":
        to = (lambda a: np.ascontiguousarray(a.astype(dtype)[::-1, :, ::-1])[::-1, :, ::-1])
    else:
        to = (lambda a: a.astype(dtype))
    return to(v), to(dyv), rng


IDENTITY_MODES = [("float32", "contiguous"), ("float64", "contiguous"), ("float64", "reversed"),
                  ("float32", "channels-last"), ("float16", "contiguous"), ("bfloat16", "contiguous")]


def _same(a, b, dtype, kind="value", what=""):
    """Equal up to the dtype's rounding (the identities are exact in real arithmetic)."""
    assert_close(a, b, dtype, kind, err_msg=what)


def _stat_dtype(dtype):
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _as_reference(x, dy, reduce_axes, affine_axes, w=None, b=None, eps=1e-5, rms=False, **kw):
    """What the reference says for normalize over `reduce_axes` (weight over `affine_axes`):
    check(y, mean, rstd, dx, dw, db) asserts each given result against it."""
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    w64 = None if w is None else to_numpy64(w)
    b64 = None if b is None else to_numpy64(b)
    y_ref, m_ref, r_ref = normalize_ref(x64, reduce_axes, affine_axes, w64, b64, eps, rms)
    dx_ref, dw_ref, db_ref = normalize_backward_ref(dy64, x64, reduce_axes, affine_axes, w64, eps, rms)
    mag_dx, mag_dw, mag_db = normalize_backward_bounds(dy64, x64, reduce_axes, affine_axes, w64, eps, rms)
    dtype = kw.pop("dtype")
    sdt = _stat_dtype(dtype)

    def check(y=None, mean=None, rstd=None, dx=None, dw=None, db=None, what=""):
        if y is not None:
            assert_close(y, y_ref, dtype, err_msg=f"{what} output vs reference")
        if mean is not None:
            assert_close(to_numpy64(mean).reshape(np.shape(m_ref)), m_ref, sdt, magnitude=np.sqrt(np.mean(x64 ** 2)),
                         err_msg=f"{what} mean vs reference")
        if rstd is not None:
            assert_close(to_numpy64(rstd).reshape(np.shape(r_ref)), r_ref, sdt, err_msg=f"{what} rstd vs reference")
        if dx is not None:
            assert_close(dx, dx_ref, dtype, "grad", magnitude=mag_dx, err_msg=f"{what} grad_input vs reference")
        if dw is not None:
            assert_close(to_numpy64(dw).reshape(np.shape(dw_ref)), dw_ref, sdt, "grad", magnitude=mag_dw,
                         err_msg=f"{what} grad_weight vs reference")
        if db is not None:
            assert_close(to_numpy64(db).reshape(np.shape(db_ref)), db_ref, sdt, "grad", magnitude=mag_db,
                         err_msg=f"{what} grad_bias vs reference")
    return check


@pytest.mark.parametrize("mode", IDENTITY_MODES, ids=lambda m: "-".join(m))
def test_group_norm_with_one_group_is_layer_norm_over_chw(mode):
    dtype, layout = mode
    x, dy, _ = _variant_inputs(dtype, layout)
    yg, mg, rg = bncore.group_norm_forward(x, 1)
    yl, ml, rl = bncore.layer_norm_forward(x, tuple(x.shape[1:]))
    assert tuple(mg.shape) == (3, 1) and tuple(ml.shape) == (3,)
    _same(yg, yl, dtype, what="output")
    _same(to_numpy64(mg).reshape(3), ml, "float32" if dtype in ("float16", "bfloat16") else dtype, what="mean")
    _same(to_numpy64(rg).reshape(3), rl, "float32" if dtype in ("float16", "bfloat16") else dtype, what="rstd")
    dxg, _, _ = bncore.group_norm_backward(dy, x, 1, None, mg, rg)
    dxl, _, _ = bncore.layer_norm_backward(dy, x, tuple(x.shape[1:]), None, ml, rl)
    _same(dxg, dxl, dtype, "grad", "grad_input")
    check = _as_reference(x, dy, (1, 2, 3), (1, 2, 3), dtype=dtype)
    check(yg, mg, rg, dxg, what="group norm")
    check(yl, ml, rl, dxl, what="layer norm")


@pytest.mark.parametrize("mode", IDENTITY_MODES, ids=lambda m: "-".join(m))
def test_group_norm_with_c_groups_is_instance_norm(mode):
    dtype, layout = mode
    x, dy, rng = _variant_inputs(dtype, layout)
    pdtype = "float32" if dtype in ("float16", "bfloat16") else dtype
    w, b = params(rng, (6,), pdtype)
    if not isinstance(x, np.ndarray):
        torch = pytest.importorskip("torch", reason="torch is needed for this case")
        w, b = torch.from_numpy(w), torch.from_numpy(b)
    yg, mg, rg = bncore.group_norm_forward(x, 6, w, b)
    yi, mi, ri = bncore.instance_norm_forward(x, None, None, w, b)
    assert tuple(mg.shape) == tuple(mi.shape) == (3, 6)
    _same(yg, yi, dtype, what="output")
    _same(mg, mi, pdtype, what="mean")
    _same(rg, ri, pdtype, what="rstd")
    dxg, dwg, dbg = bncore.group_norm_backward(dy, x, 6, w, mg, rg)
    dxi, dwi, dbi = bncore.instance_norm_backward(dy, x, w, mi, ri)
    _same(dxg, dxi, dtype, "grad", "grad_input")
    _same(dwg, dwi, pdtype, "grad", "grad_weight")
    _same(dbg, dbi, pdtype, "grad", "grad_bias")
    check = _as_reference(x, dy, (2, 3), (1,), w, b, dtype=dtype)
    check(yg, mg, rg, dxg, dwg, dbg, what="group norm")
    check(yi, mi, ri, dxi, dwi, dbi, what="instance norm")


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("mode", IDENTITY_MODES, ids=lambda m: "-".join(m))
def test_rms_norm_is_normalize_rms(mode, eps):
    dtype, layout = mode
    x, dy, rng = _variant_inputs(dtype, layout)
    pdtype = "float32" if dtype in ("float16", "bfloat16") else dtype
    w, _ = params(rng, (5, 4), pdtype, bias=False)
    if not isinstance(x, np.ndarray):
        torch = pytest.importorskip("torch", reason="torch is needed for this case")
        w = torch.from_numpy(w)
    y1, r1 = bncore.rms_norm_forward(x, (5, 4), w, eps)
    eps2 = rms_default_eps(dtype) if eps is None else eps
    y2, m2, r2 = bncore.normalize_forward(x, (2, 3), w, eps=eps2, rms=True)
    _same(y1, y2, dtype, what="output")
    _same(r1, r2, pdtype, what="rstd")
    np.testing.assert_array_equal(to_numpy64(m2), 0.0)  # RMS norm centers nothing
    dx1, dw1, db1 = bncore.rms_norm_backward(dy, x, (5, 4), w, r1)
    dx2, dw2, db2 = bncore.normalize_backward(dy, x, (-2, -1), w, None, r2, rms=True)
    assert db1 is None and db2 is None
    _same(dx1, dx2, dtype, "grad", "grad_input")
    _same(dw1, dw2, pdtype, "grad", "grad_weight")
    check = _as_reference(x, dy, (2, 3), (2, 3), w, None, eps2, rms=True, dtype=dtype)
    check(y1, None, r1, dx1, dw1, what="rms_norm")
    check(y2, None, r2, dx2, dw2, what="normalize(rms=True)")


def test_layer_norm_is_normalize_over_trailing_axes_and_instance_is_spatial():
    rng = np.random.default_rng(31)
    x = data(rng, (3, 4, 5, 6))
    w, b = params(rng, (5, 6), np.float64)
    y_ref = lambda red, aff, w, b: normalize_ref(x, red, aff, w, b)[0]  # noqa: E731
    pairs = [(bncore.layer_norm(x, (5, 6), w, b), bncore.normalize(x, (2, 3), w, b), y_ref((2, 3), (2, 3), w, b))]
    wc, bc = params(rng, (4,), np.float64)
    pairs.append((bncore.instance_norm(x, None, None, wc, bc), bncore.normalize(x, (2, 3), wc, bc, affine_axes=(1,)),
                  y_ref((2, 3), (1,), wc, bc)))
    # batch norm too: every axis but the channels
    pairs.append((bncore.batch_norm(x, None, None, wc, bc, training=True),
                  bncore.normalize(x, (0, 2, 3), wc, bc, affine_axes=(1,)), y_ref((0, 2, 3), (1,), wc, bc)))
    for i, (named, general, ref) in enumerate(pairs):
        _same(named, general, "float64", what=f"pair {i}")
        assert_close(named, ref, "float64", err_msg=f"pair {i}: the named variant vs reference")
        assert_close(general, ref, "float64", err_msg=f"pair {i}: normalize vs reference")
