"""Adversarial data against the float64 reference: a large mean with a small spread (where a
one-pass or uncorrected algorithm loses its digits), constant groups (variance 0), half data near
its largest value (where squares overflow). Every variant, every layout the engine treats apart:
NCHW batch norm, channels-last columns, layer rows of several pieces, group and instance norm.
"""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import (batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref, normalize_backward_ref,
                              normalize_ref)
from cases import (DTYPES, VARIANT_CASES, Case, bn_params, bncore_backward, bncore_forward, data, params,
                   ref_backward, ref_forward, seed_of)
from layouts import half_or_numpy
from tolerances import assert_close, to_numpy64


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape,axis", [((64, 3, 8, 8), 1), ((4096, 4), 1), ((4, 6, 6, 5), -1),
                                        ((2, 3, 4, 5, 6), 1)])
def test_large_mean_stays_accurate(shape, axis, dtype):
    """1e4 + N(0, 1): a one-pass E[x^2] - E[x]^2 loses every digit of the variance in float32
    (and half of them in float64); bncore must stay close to the float64 reference."""
    rng = np.random.default_rng(12)
    c = shape[axis]
    x = (1e4 + rng.normal(size=shape)).astype(dtype)
    w, b = bn_params(rng, c, dtype)
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


ADVERSARIAL = [
    ("layer", dict(kind="layer", shape=(3, 5000), normalized_shape=(5000,))),
    ("layer-2d", dict(kind="layer", shape=(2, 40, 130), normalized_shape=(40, 130))),
    ("rms", dict(kind="rms", shape=(3, 5000), normalized_shape=(5000,))),
    ("group", dict(kind="group", shape=(2, 6, 30, 40), num_groups=3)),
    ("instance", dict(kind="instance", shape=(2, 3, 50, 60))),
]


NORMALIZE_ADVERSARIAL = [  # (shape, axes): columns, ConvNeXt channels, the middle axis
    ((6000, 3), (0,)),
    ((2, 300, 4, 5), (1,)),
    ((40, 7, 60), (0, 2)),
]


def _adversarial_case(spec):


    name, kw = spec
    return Case(name, **kw)


def _large_mean_bounds(dtype, kappa, mean_mag, rstd_ref, w):
    """The error a stable algorithm leaves (see test_batch_norm.test_large_mean_stays_accurate):
    the variance loses ~eps * kappa relative (kappa = |mean| / std), and the output the mean's
    rounding (in ulps of |mean|) times rstd * |w|. A one-pass E[x^2] - E[x]^2 is off by
    ~eps * kappa^2: every digit in float32 (kappa 1e4), 2 % in float64 (kappa 1e7)."""
    eps = float(np.finfo(dtype).eps)
    mean_ulps = 4 if dtype == "float32" else 64
    var_rtol = max(64 * eps, 16 * eps * kappa) if dtype == "float64" else 64 * eps
    wmax = 1.0 if w is None else float(np.max(np.abs(w)))
    out_atol = (mean_ulps + 4) * eps * mean_mag * float(np.max(rstd_ref)) * wmax
    return mean_ulps * eps, var_rtol, out_atol


LARGE_MEAN = [("float64", 1e4, 1e-3), ("float32", 1e4, 1.0)]


@pytest.mark.parametrize("dtype,mean_mag,spread", LARGE_MEAN, ids=["float64-1e4+-1e-3", "float32-1e4+-1"])
@pytest.mark.parametrize("spec", ADVERSARIAL, ids=lambda s: s[0])
def test_large_mean_small_spread_variants(spec, dtype, mean_mag, spread):
    case = _adversarial_case(spec)
    case.eps = 1e-5 * spread ** 2  # eps as small next to the variance as 1e-5 is next to 1
    rng = np.random.default_rng(seed_of("large-mean", case.name, dtype))
    x = (mean_mag + spread * rng.normal(size=case.shape)).astype(dtype)
    x64 = x.astype(np.float64)
    w, b = params(rng, case.param_shape, dtype, bias=case.has_bias)
    w64 = w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    y, (mean, rstd) = bncore_forward(case, x, w, b)
    y_ref, mean_ref, rstd_ref = ref_forward(case, x64, w64, b64, dtype=dtype)
    mean_rtol, var_rtol, out_atol = _large_mean_bounds(dtype, mean_mag / spread, mean_mag, rstd_ref, w)
    if case.kind == "rms":  # no cancellation in mean(x^2): plain tolerances
        assert_close(y, y_ref, dtype)
        assert_close(rstd, rstd_ref, dtype)
    else:
        assert np.all(np.abs(rstd_ref * spread - 1) < 0.2)  # the data really has that spread
        np.testing.assert_allclose(mean, mean_ref, rtol=mean_rtol, err_msg="save_mean")
        # rstd = (var + eps)^-1/2: half the variance's relative error
        np.testing.assert_allclose(rstd, rstd_ref, rtol=var_rtol, err_msg="save_rstd")
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=out_atol, err_msg="output")
    dy = rng.normal(size=case.shape).astype(dtype)
    dx, dw, db = bncore_backward(case, dy, x, w, (mean, rstd))
    dx_ref, dw_ref, db_ref = ref_backward(case, dy.astype(np.float64), x64, w64, dtype=dtype)
    if case.kind == "rms":
        assert_close(dx, dx_ref, dtype, "grad")
        assert_close(dw, dw_ref, dtype, "grad")
        return
    # the backward starts from the saved (input-dtype) mean: dx off by up to the output's bound,
    # dweight = sum(dy * xhat) by that bound times sum |dy| over a parameter's elements
    # (dx scales with rstd: its own relative error is the variance's at most)
    dx_atol = max(out_atol, var_rtol * float(np.max(np.abs(dx_ref))))
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=dx_atol, err_msg="grad_input")
    n_per_param = x.size / w.size
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=out_atol * (np.max(np.abs(db_ref)) + n_per_param ** 0.5) +
                               1e-4 * np.max(np.abs(dw_ref)), err_msg="grad_weight")
    assert_close(db, db_ref, dtype, "grad")


@pytest.mark.parametrize("dtype,mean_mag,spread", LARGE_MEAN, ids=["float64-1e4+-1e-3", "float32-1e4+-1"])
@pytest.mark.parametrize("shape,axes", NORMALIZE_ADVERSARIAL, ids=lambda v: str(v))
def test_large_mean_small_spread_normalize(shape, axes, dtype, mean_mag, spread):
    rng = np.random.default_rng(seed_of("large-mean-normalize", shape, axes, dtype))
    x = (mean_mag + spread * rng.normal(size=shape)).astype(dtype)
    if len(shape) == 2:  # columns of a transposed array too
        x = np.asfortranarray(x)
    pshape = tuple(shape[a] for a in axes)
    w, b = params(rng, pshape, dtype)
    eps = 1e-5 * spread ** 2
    y, mean, rstd = bncore.normalize_forward(x, axes, w, b, eps=eps)
    y_ref, mean_ref, rstd_ref = normalize_ref(x, axes, axes, w, b, eps)
    assert np.all(np.abs(rstd_ref * spread - 1) < 0.2)  # the data really has that spread
    mean_rtol, var_rtol, out_atol = _large_mean_bounds(dtype, mean_mag / spread, mean_mag, rstd_ref, w)
    np.testing.assert_allclose(mean, mean_ref, rtol=mean_rtol, err_msg="save_mean")
    np.testing.assert_allclose(rstd, rstd_ref, rtol=var_rtol, err_msg="save_rstd")
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=out_atol, err_msg="output")
    dy = rng.normal(size=shape).astype(dtype)
    dx, _, db = bncore.normalize_backward(dy, x, axes, w, mean, rstd)
    dx_ref, _, db_ref = normalize_backward_ref(dy, x, axes, axes, w, eps)
    dx_atol = max(out_atol, var_rtol * float(np.max(np.abs(dx_ref))))
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=dx_atol, err_msg="grad_input")
    assert_close(db, db_ref, dtype, "grad")


CONST_DTYPES = ["float32", "float64", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", CONST_DTYPES)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=repr)
def test_constant_groups_give_the_bias(case, dtype):
    """Variance 0: the output is the bias (RMS norm: 0 for an all-zero group), finite, no NaN; the
    gradient is finite and the reference's. Half the groups are constant, the others are not."""
    rng = np.random.default_rng(seed_of("const", case.name, dtype))
    x64 = data(rng, case.shape)
    grouped = x64.reshape(case.stat_shape + (-1,)) if case.kind != "group" else \
        x64.reshape(case.shape[:1] + (case.num_groups, -1))
    flat = grouped.reshape(-1, grouped.shape[-1])
    const = np.zeros(flat.shape[0], bool)
    const[::2] = True
    values = 0.0 if case.kind == "rms" else rng.uniform(-3, 3, size=const.sum())  # not dyadic: rounded means
    flat[const] = np.asarray(values).reshape(-1, 1)
    x64 = flat.reshape(case.shape)
    pdtype = "float32" if dtype in ("float16", "bfloat16") else dtype
    w64, b64 = params(rng, case.param_shape, np.float64, bias=case.has_bias)
    x = half_or_numpy(x64, dtype)
    x64 = to_numpy64(x)
    w, b = half_or_numpy(w64, pdtype), (None if b64 is None else half_or_numpy(b64, pdtype))
    w64, b64 = to_numpy64(w), (None if b is None else to_numpy64(b))
    y, saved = bncore_forward(case, x, w, b)
    y64 = to_numpy64(y)
    assert np.all(np.isfinite(y64)), "output: not finite"
    assert np.all(np.isfinite(to_numpy64(saved[1]))), "save_rstd: not finite"
    y_ref, _, r_ref = ref_forward(case, x64, w64, b64, dtype=dtype)
    # the constant groups: exactly what the bias is (0 for RMS norm), up to the output rounding
    if case.kind == "rms":
        expected = np.zeros_like(x64)
    else:
        expected = np.broadcast_to(_bias_view(case, b64), x64.shape)
    mask = np.broadcast_to(const.reshape(grouped.shape[:-1] + (1,)), grouped.shape).reshape(case.shape)
    assert_close(y64[mask], expected[mask], dtype, err_msg="output of the constant groups")
    assert_close(y64, y_ref, dtype, err_msg="output")
    dy = half_or_numpy(rng.normal(size=case.shape), dtype)
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    for name, g in (("grad_input", dx), ("grad_weight", dw), ("grad_bias", db)):
        assert g is None or np.all(np.isfinite(to_numpy64(g))), f"{name}: not finite"
    dx_ref, dw_ref, _ = ref_backward(case, to_numpy64(dy), x64, w64, dtype=dtype)
    # rstd of a constant group is 1/sqrt(eps): the gradient there is that large; compare relative to it
    s = max(1.0, float(np.max(np.abs(dx_ref))))
    assert_close(to_numpy64(dx) / s, dx_ref / s, dtype, "grad", err_msg="grad_input")
    assert_close(dw, dw_ref, pdtype if dtype in ("float32", "float64") else "float32", "grad")


def _bias_view(case, b64):
    if case.kind == "layer":
        return b64
    view = [1] * len(case.shape)
    view[1] = case.shape[1]
    return b64.reshape(view)


@pytest.mark.parametrize("dtype", CONST_DTYPES)
def test_constant_input_everywhere(dtype):
    """Every group constant, no affine: all zeros, never NaN, for each variant and normalize."""
    x = half_or_numpy(np.full((3, 4, 5, 6), 7.3), dtype)
    outs = {
        "layer": bncore.layer_norm(x, (4, 5, 6)),
        "group": bncore.group_norm(x, 2),
        "instance": bncore.instance_norm(x),
        "normalize-0": bncore.normalize(x, (0,)),
        "normalize-1-3": bncore.normalize(x, (1, 3)),
    }
    for name, y in outs.items():
        y64 = to_numpy64(y)
        assert not np.any(np.isnan(y64)), name
        np.testing.assert_allclose(y64, 0.0, atol=1e-2 if dtype != "float64" else 1e-10, err_msg=name)
    z = half_or_numpy(np.zeros((3, 4, 5, 6)), dtype)
    np.testing.assert_array_equal(to_numpy64(bncore.rms_norm(z, (5, 6))), 0.0)


def _big_half_data(rng, shape, dtype, magnitude, centered):
    """float16: values around 6e4 (its largest is 65504), or +-6e4 when centered;
    bfloat16: +-magnitude (its largest is 3.39e38)."""
    if dtype == "float16":
        if centered:
            v = rng.uniform(3e4, 6.5e4, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        else:
            v = rng.uniform(5.5e4, 6.5e4, size=shape)
    else:
        v = magnitude * rng.uniform(0.5, 1.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        if not centered:
            v = magnitude * rng.uniform(0.5, 1.0, size=shape)
    return v


BIG_HALF = [("float16", 6e4, False), ("float16", 6e4, True), ("bfloat16", 1e4, True), ("bfloat16", 1e18, True),
            ("bfloat16", 1e30, True), ("bfloat16", 1e38, True), ("bfloat16", 1e30, False)]


def _big_id(v):
    dtype, mag, centered = v
    return f"{dtype}-{mag:g}-{'centered' if centered else 'positive'}"


def _big_case_list():


    return [
        Case("layer", "layer", (4, 3000), normalized_shape=(3000,)),
        Case("layer-short-rows", "layer", (16, 40), normalized_shape=(40,)),
        Case("rms", "rms", (4, 3000), normalized_shape=(3000,)),
        Case("group", "group", (2, 4, 16, 20), num_groups=2),
        Case("instance", "instance", (2, 3, 20, 30)),
    ]


@pytest.mark.parametrize("big", BIG_HALF, ids=_big_id)
@pytest.mark.parametrize("case", _big_case_list(), ids=repr)
def test_half_data_near_its_largest_value(case, big):
    """Squares of such values overflow the half type (and beyond ~1.8e19 float32 too): the
    statistics must be accumulated so that nothing overflows. Output finite and the reference's."""
    dtype, magnitude, centered = big
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch", reason="torch is needed for this case")
    rng = np.random.default_rng(seed_of("big", case.name, big))
    v = _big_half_data(rng, case.shape, dtype, magnitude, centered)
    if dtype == "float16":
        x = v.astype(np.float16)
        assert np.all(np.isfinite(x)) and np.max(np.abs(x)) > 6e4
    else:
        x = torch.from_numpy(v).to(torch.bfloat16)
    x64 = to_numpy64(x)
    w64, b64 = params(rng, case.param_shape, np.float64, bias=case.has_bias)
    w = w64.astype(np.float32) if dtype == "float16" else torch.from_numpy(w64).float()
    b = None if b64 is None else (b64.astype(np.float32) if dtype == "float16" else torch.from_numpy(b64).float())
    w64, b64 = to_numpy64(w), (None if b is None else to_numpy64(b))
    y, saved = bncore_forward(case, x, w, b)
    y64 = to_numpy64(y)
    assert np.all(np.isfinite(y64)), f"output: {np.sum(~np.isfinite(y64))} values not finite"
    y_ref, m_ref, r_ref = ref_forward(case, x64, w64, b64, dtype=dtype)
    assert_close(saved[1], r_ref, "float32", err_msg="save_rstd")
    assert_close(y64, y_ref, dtype, err_msg="output")


@pytest.mark.parametrize("big", BIG_HALF, ids=_big_id)
@pytest.mark.parametrize("case", _big_case_list()[::2], ids=repr)
def test_half_data_near_its_largest_value_backward(case, big):
    """The backward on the reference's own statistics (so that a forward problem does not show
    here): grad_input relative to its largest value, grad_weight relative to its own."""
    dtype, magnitude, centered = big
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    rng = np.random.default_rng(seed_of("big-bwd", case.name, big))
    hdt = getattr(torch, dtype)
    x = torch.from_numpy(_big_half_data(rng, case.shape, dtype, magnitude, centered)).to(hdt)
    dy = torch.from_numpy(rng.normal(size=case.shape) * min(magnitude, 1e4) ** 0.5).to(hdt)
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    w64, b64 = params(rng, case.param_shape, np.float64, bias=case.has_bias)
    w = torch.from_numpy(w64).float()
    _, m_ref, r_ref = ref_forward(case, x64, to_numpy64(w), None, dtype=dtype)
    saved = (None if m_ref is None else torch.from_numpy(np.ascontiguousarray(m_ref)).float(),
             torch.from_numpy(np.ascontiguousarray(r_ref)).float())
    dx, dw, _ = bncore_backward(case, dy, x, w, saved)
    dx_ref, dw_ref, _ = ref_backward(case, dy64, x64, to_numpy64(w), dtype=dtype)
    assert np.all(np.isfinite(to_numpy64(dx))) and np.all(np.isfinite(to_numpy64(dw)))
    s = float(np.max(np.abs(dx_ref)))
    assert_close(to_numpy64(dx) / s, dx_ref / s, dtype, "grad", err_msg="grad_input / max |grad_input|")
    sw = float(np.max(np.abs(dw_ref)))
    assert_close(to_numpy64(dw) / sw, dw_ref / sw, dtype, "grad", err_msg="grad_weight / max |grad_weight|")


# ---------------------------------------------------------------- a large mean on every layout the engine treats apart

# (name, case, layout): contiguous rows of several 2,048-element pieces, NCHW planes, channels-last
# columns (torch channels_last and NumPy axis=-1), groups and instances of several pieces, columns
# of a Fortran array through normalize
LARGE_MEAN_LAYOUTS = [
    ("batch-nchw", Case("batch-nchw", "batch", (4, 3, 64, 64)), None),
    ("batch-channels-last", Case("batch-cl", "batch", (4, 8, 32, 32)), "channels_last"),
    ("batch-axis-last", Case("batch-nhwc", "batch", (8192, 4), axis=-1), None),
    ("layer-rows", Case("layer", "layer", (3, 5000), normalized_shape=(5000,)), None),
    ("layer-two-dims", Case("layer-2d", "layer", (2, 40, 130), normalized_shape=(40, 130)), None),
    ("group", Case("group", "group", (2, 6, 40, 40), num_groups=3), None),
    ("group-channels-last", Case("group-cl", "group", (2, 8, 32, 32), num_groups=2), "channels_last"),
    ("instance", Case("instance", "instance", (2, 3, 50, 60)), None),
    ("instance-channels-last", Case("instance-cl", "instance", (2, 4, 48, 48)), "channels_last"),
]
# float32 1e6 + N(0, 1): kappa = |mean| / std = 1e6, float32 rounds x to 1/16; float64 1e8 + N(0, 1)
HUGE_MEAN = [("float32", 1e6), ("float64", 1e8)]


@pytest.mark.parametrize("dtype,mean_mag", HUGE_MEAN, ids=[f"{d}-{m:g}" for d, m in HUGE_MEAN])
@pytest.mark.parametrize("name,case,layout", LARGE_MEAN_LAYOUTS, ids=[n for n, _, _ in LARGE_MEAN_LAYOUTS])
def test_huge_mean_on_every_layout(name, case, layout, dtype, mean_mag):
    """mean_mag + N(0, 1): rstd within the variance bound of a stable algorithm (float32: 64 ulps, i.e.
    ~8e-6; dropping the corrected two-pass term leaves ~3e-4 at 1e6), the mean within a few ulps of
    itself, the output and grad_input within the mean's rounding times rstd * |w|."""
    rng = np.random.default_rng(seed_of("huge-mean", name, dtype))
    x64 = mean_mag + rng.normal(size=case.shape)
    x = x64.astype(dtype)
    if layout is not None:
        torch = pytest.importorskip("torch", reason="torch is needed for channels-last tensors")
        x = torch.from_numpy(x).contiguous(memory_format=getattr(torch, layout))
        assert not x.is_contiguous()
    x64 = to_numpy64(x)
    w, b = params(rng, case.param_shape, dtype, bias=case.has_bias)
    if layout is not None:
        w, b = torch.from_numpy(w), torch.from_numpy(b)
    y, (mean, rstd) = bncore_forward(case, x, w, b)
    y_ref, mean_ref, rstd_ref = ref_forward(case, x64, to_numpy64(w), to_numpy64(b), dtype=dtype)
    assert np.all(np.abs(rstd_ref - 1) < 0.2)  # the data really has unit spread
    mean_rtol, var_rtol, out_atol = _large_mean_bounds(dtype, mean_mag, mean_mag, rstd_ref, to_numpy64(w))
    np.testing.assert_allclose(to_numpy64(mean), mean_ref, rtol=mean_rtol, err_msg="save_mean")
    np.testing.assert_allclose(to_numpy64(rstd), rstd_ref, rtol=var_rtol, err_msg="save_rstd")
    np.testing.assert_allclose(to_numpy64(y), y_ref, rtol=0, atol=out_atol, err_msg="output")
    dy64 = rng.normal(size=case.shape)
    dy = dy64.astype(dtype)
    if layout is not None:
        dy = torch.from_numpy(dy).contiguous(memory_format=getattr(torch, layout))
    dx, _, db = bncore_backward(case, dy, x, w, (mean, rstd))
    dx_ref, _, db_ref = ref_backward(case, to_numpy64(dy), x64, to_numpy64(w), dtype=dtype)
    dx_atol = max(out_atol, var_rtol * float(np.max(np.abs(dx_ref))))
    np.testing.assert_allclose(to_numpy64(dx), dx_ref, rtol=0, atol=dx_atol, err_msg="grad_input")
    assert_close(db, db_ref, dtype, "grad", err_msg="grad_bias")


@pytest.mark.parametrize("dtype,mean_mag", HUGE_MEAN, ids=[f"{d}-{m:g}" for d, m in HUGE_MEAN])
@pytest.mark.parametrize("order", ["C", "F"])
def test_huge_mean_normalize_columns(order, dtype, mean_mag):
    """normalize over axis 0 of a (6000, 3) array: columns of a C array (the column path) and of a
    Fortran one (contiguous rows of several pieces)."""
    rng = np.random.default_rng(seed_of("huge-mean-columns", order, dtype))
    x = np.asarray(mean_mag + rng.normal(size=(6000, 3)), dtype=dtype, order=order)
    w, b = params(rng, (3,), dtype)
    y, mean, rstd = bncore.normalize_forward(x, (0,), w, b, affine_axes=(1,))
    y_ref, mean_ref, rstd_ref = normalize_ref(x, (0,), (1,), w, b)
    mean_rtol, var_rtol, out_atol = _large_mean_bounds(dtype, mean_mag, mean_mag, rstd_ref, w)
    np.testing.assert_allclose(mean, mean_ref, rtol=mean_rtol, err_msg="save_mean")
    np.testing.assert_allclose(rstd, rstd_ref, rtol=var_rtol, err_msg="save_rstd")
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=out_atol, err_msg="output")
