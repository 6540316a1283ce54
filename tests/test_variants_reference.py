"""Layer, instance, group, RMS norm and `normalize(axes)` against the float64 reference
(tests/reference.py), with no PyTorch numbers involved:

- hypothesis-drawn shapes, axes (any subset for `normalize`, affine_axes another
  subset), strides and layouts (transposes, stepped slices, negative strides via
  NumPy, channels-last torch), forward and backward;
- `normalize(x, axes=(1,))` of NCHW data is ConvNeXt's channels layer norm, on
  non-contiguous inputs and without a copy;
- adversarial data: a large mean with a tiny spread, constant groups, half data
  near the largest value of its dtype;
- the identities between variants (group norm with 1 or C groups, RMS norm).
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bncore
from bncore.reference import normalize_backward_ref, normalize_ref
from tolerances import assert_close, to_numpy64
from variants_common import (CASES, bncore_backward, bncore_forward, data, params, ref_backward, ref_forward,
                             rms_default_eps, seed_of)

HYPOTHESIS = settings(max_examples=50, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _torch():
    return pytest.importorskip("torch", reason="torch is needed for this case")


# ---------------------------------------------------------------- layouts


def strided(rng, shape, perm, steps, dtype, values=None):
    """An array of logical shape `shape` whose memory has axis order `perm` and steps `steps`
    (negative: reversed) inside a larger buffer; `values` (float64, of `shape`) fills it."""
    phys = [shape[p] * abs(s) for p, s in zip(perm, steps)]
    base = rng.normal(size=phys).astype(dtype)
    view = base[tuple(slice(None, None, s) for s in steps)]
    view = view[tuple(slice(0, shape[p]) for p in perm)]
    out = view.transpose(np.argsort(perm))
    assert out.shape == tuple(shape)
    if values is not None:
        out[...] = values
    return out


def to_layout(values, layout, dtype, rng):
    """`values` (float64) as a tensor of `dtype` in one of the drawn layouts:
    ('numpy', perm, steps) or ('torch', perm, steps, channels_last)."""
    if layout[0] == "numpy":
        return strided(rng, values.shape, layout[1], layout[2], dtype, values)
    torch = _torch()
    _, perm, steps, channels_last = layout
    arr = strided(rng, values.shape, perm, [abs(s) for s in steps], dtype, values)  # torch: no negative strides
    t = torch.from_numpy(arr)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)
    return t


@st.composite
def layouts(draw, ndim, allow_torch=True):
    perm = tuple(draw(st.permutations(range(ndim))))
    steps = tuple(draw(st.lists(st.sampled_from([1, 2, -1, -2, 3]), min_size=ndim, max_size=ndim)))
    if allow_torch and draw(st.booleans()):
        return ("torch", perm, steps, ndim in (4, 5) and draw(st.booleans()))
    return ("numpy", perm, steps)


def _cond(rstd_ref):
    """Tiny groups (1 or 2 values) can have a variance near 0: errors grow with rstd."""
    r = np.max(np.abs(rstd_ref)) if np.size(rstd_ref) else 1.0
    return max(1.0, float(r))


# ---------------------------------------------------------------- hypothesis: normalize(axes)


def _subset(draw, ndim):
    mask = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim).filter(any))
    axes = [d for d in range(ndim) if mask[d]]
    # any spelling: negative axes, any order
    axes = [d - ndim if draw(st.booleans()) else d for d in axes]
    return tuple(draw(st.permutations(axes)))


@st.composite
def normalize_problems(draw):
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = _subset(draw, ndim)
    affine = draw(st.sampled_from(["default", "other", "none"]))
    affine_axes = None
    if affine == "other":  # a different subset than axes
        affine_axes = _subset(draw, ndim)
    rms = draw(st.booleans())
    with_bias = draw(st.booleans())
    dtype = draw(st.sampled_from(["float32", "float64"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    x_layout = draw(layouts(ndim))
    dy_layout = draw(layouts(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axes, affine, affine_axes, rms, with_bias, dtype, eps, x_layout, dy_layout, seed


@HYPOTHESIS
@given(normalize_problems())
def test_hypothesis_normalize_matches_reference(problem):
    shape, axes, affine, affine_axes, rms, with_bias, dtype, eps, x_layout, dy_layout, seed = problem
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    red = tuple(sorted({a % ndim for a in axes}))
    aff = red if affine_axes is None else tuple(sorted({a % ndim for a in affine_axes}))
    pshape = tuple(shape[a] for a in aff)
    x = to_layout(data(rng, shape, offset_axis=0) + rng.normal() * 3, x_layout, dtype, rng)
    dy = to_layout(rng.normal(size=shape), dy_layout, dtype, rng)
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    x_before = x64.copy()
    w = b = None
    if affine != "none":
        w, b = params(rng, pshape, dtype, bias=with_bias)
    kw = dict(affine_axes=affine_axes, rms=rms)
    y, mean, rstd = bncore.normalize_forward(x, axes, w, b, eps=eps, **kw)
    y_ref, mean_ref, rstd_ref = normalize_ref(x64, red, aff, w, b, eps, rms)
    assert type(y) is type(x) and tuple(y.shape) == shape
    gshape = tuple(shape[d] for d in range(ndim) if d not in red)
    assert tuple(rstd.shape) == gshape and tuple(mean.shape) == gshape
    cond = _cond(rstd_ref)
    assert_close(y, y_ref, dtype, scale=cond, err_msg="output")
    assert_close(rstd, rstd_ref, dtype, scale=cond, err_msg="save_rstd")
    assert_close(mean, mean_ref, dtype, err_msg="save_mean")
    np.testing.assert_array_equal(to_numpy64(x), x_before)  # the input is not touched
    dx, dw, db = bncore.normalize_backward(dy, x, axes, w, None if rms else mean, rstd, **kw)
    dx_ref, dw_ref, db_ref = normalize_backward_ref(dy64, x64, red, aff, w, eps, rms)
    assert type(dx) is type(x) and tuple(dx.shape) == shape
    n_group = int(np.prod([shape[d] for d in red]))
    n_param = int(np.prod(shape)) // max(1, int(np.prod(pshape)))
    assert_close(dx, dx_ref, dtype, "grad", scale=cond ** 2 * n_group ** 0.5, err_msg="grad_input")
    if w is None:
        assert dw is None and db is None
    else:
        assert tuple(dw.shape) == pshape
        assert_close(dw, dw_ref, dtype, "grad", scale=cond * n_param, err_msg="grad_weight")
        if rms:
            assert db is None
        else:
            assert_close(db, db_ref, dtype, "grad", scale=n_param, err_msg="grad_bias")


# ---------------------------------------------------------------- hypothesis: the named variants


@st.composite
def variant_problems(draw):
    kind = draw(st.sampled_from(["layer", "rms", "group", "instance"]))
    ndim = draw(st.integers(3 if kind == "instance" else (2 if kind == "group" else 1), 5))
    shape = list(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    num_groups, normalized_shape = 0, ()
    if kind == "group":
        num_groups = draw(st.integers(1, 3))
        shape[1] = num_groups * draw(st.integers(1, 3))
    if kind in ("layer", "rms"):
        k = draw(st.integers(1, ndim))
        normalized_shape = tuple(shape[ndim - k:])
    if kind == "instance":  # more than one value per instance when training
        shape[-1] = max(shape[-1], 2)
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3] + ([None] if kind == "rms" else [])))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    x_layout = draw(layouts(ndim))
    dy_layout = draw(layouts(ndim))
    seed = draw(st.integers(0, 2**32 - 1))
    from variants_common import Case

    case = Case(f"drawn-{kind}", kind, tuple(shape), normalized_shape=normalized_shape, num_groups=num_groups,
                eps=eps)
    return case, affine, dtype, x_layout, dy_layout, seed


@HYPOTHESIS
@given(variant_problems())
def test_hypothesis_variants_match_reference(problem):
    case, affine, dtype, x_layout, dy_layout, seed = problem
    rng = np.random.default_rng(seed)
    shape = case.shape
    x = to_layout(data(rng, shape, offset_axis=min(1, len(shape) - 1)), x_layout, dtype, rng)
    dy = to_layout(rng.normal(size=shape), dy_layout, dtype, rng)
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    w = b = None
    if affine:
        w, b = params(rng, case.param_shape, dtype, bias=case.has_bias)
    y, saved = bncore_forward(case, x, w, b)
    y_ref, m_ref, r_ref = ref_forward(case, x64, w, b, dtype=dtype)
    assert type(y) is type(x) and tuple(y.shape) == shape
    assert tuple(saved[1].shape) == case.stat_shape
    cond = _cond(r_ref)
    assert_close(y, y_ref, dtype, scale=cond, err_msg="output")
    assert_close(saved[1], r_ref, dtype, scale=cond, err_msg="save_rstd")
    if m_ref is not None:
        assert_close(saved[0], m_ref, dtype, err_msg="save_mean")
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    dx_ref, dw_ref, db_ref = ref_backward(case, dy64, x64, w, dtype=dtype)
    n = int(np.prod(shape))
    assert_close(dx, dx_ref, dtype, "grad", scale=cond ** 2 * n ** 0.5, err_msg="grad_input")
    if w is None:
        assert dw is None and db is None
    else:
        assert_close(dw, dw_ref, dtype, "grad", scale=cond * n, err_msg="grad_weight")
        if case.has_bias:
            assert_close(db, db_ref, dtype, "grad", scale=n, err_msg="grad_bias")


# ---------------------------------------------------------------- fixed layouts, every variant

FIXED_LAYOUTS = {
    "transposed": lambda a: np.ascontiguousarray(a.T).T,
    "reversed": lambda a: np.ascontiguousarray(a[::-1, ..., ::-1])[::-1, ..., ::-1],
    "sliced": lambda a: _sliced(a),
    "inner-reversed": lambda a: np.ascontiguousarray(a[..., ::-1])[..., ::-1],
}


def _sliced(a):
    big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
    view = big[tuple(slice(1, 1 + 2 * s, 2) for s in a.shape)]
    view[...] = a
    return view


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(FIXED_LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_numpy_layouts_match_reference(case, layout, dtype):
    rng = np.random.default_rng(seed_of("layouts", case.name, layout, dtype))
    x64 = data(rng, case.shape)
    dy64 = rng.normal(size=case.shape)
    x = FIXED_LAYOUTS[layout](x64.astype(dtype))
    dy = FIXED_LAYOUTS[layout](dy64.astype(dtype))
    assert not x.flags.c_contiguous
    w, b = params(rng, case.param_shape, dtype, bias=case.has_bias)
    y, saved = bncore_forward(case, x, w, b)
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y_ref, _, _ = ref_forward(case, x64, w, b, dtype=dtype)
    dx_ref, dw_ref, db_ref = ref_backward(case, dy64, x64, w, dtype=dtype)
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype, "grad")
    assert_close(dw, dw_ref, dtype, "grad", scale=10)
    if case.has_bias:
        assert_close(db, db_ref, dtype, "grad", scale=10)


# ---------------------------------------------------------------- ConvNeXt: layer norm over NCHW channels


def _convnext_inputs(kind, torch):
    """An NCHW (2, 8, 5, 6) float64 tensor that is not contiguous, in several ways."""
    gen = torch.Generator().manual_seed(21)
    if kind == "channels-last":  # NHWC memory, seen as NCHW: the ConvNeXt block's layout
        x = (torch.randn(2, 5, 6, 8, generator=gen, dtype=torch.float64) + 1).permute(0, 3, 1, 2)
    elif kind == "sliced":
        x = (torch.randn(2, 16, 10, 7, generator=gen, dtype=torch.float64) + 1)[:, ::2, ::2, 1:]
    elif kind == "transposed-hw":
        x = (torch.randn(2, 8, 6, 5, generator=gen, dtype=torch.float64) + 1).transpose(2, 3)
    else:
        raise ValueError(kind)
    assert tuple(x.shape) == (2, 8, 5, 6) and not x.is_contiguous()
    return x


@pytest.mark.parametrize("kind", ["channels-last", "sliced", "transposed-hw"])
def test_normalize_channels_is_convnext_layer_norm(kind):
    torch = _torch()
    F = torch.nn.functional
    x = _convnext_inputs(kind, torch)
    gen = torch.Generator().manual_seed(22)
    w = (torch.rand(8, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(8, generator=gen, dtype=torch.float64).requires_grad_()
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xt = x.detach().clone().requires_grad_()
    # ConvNeXt's LayerNorm over channels: permute to NHWC, normalize the last dim, permute back
    y_t = F.layer_norm(xt.permute(0, 2, 3, 1), (8,), w, b, 1e-6).permute(0, 3, 1, 2)
    y_t.backward(dy)
    y, mean, rstd = bncore.normalize_forward(x, axes=(1,), weight=w, bias=b, eps=1e-6)
    assert isinstance(y, torch.Tensor)
    if kind == "channels-last":  # the output keeps the input's (dense) layout
        assert y.stride() == x.stride()
    assert tuple(mean.shape) == (2, 5, 6)
    assert_close(y, y_t, "float64")
    dx, dw, db = bncore.normalize_backward(dy, x, (1,), w, mean, rstd)
    assert_close(dx, xt.grad, "float64", "grad")
    assert_close(dw, w.grad, "float64", "grad")
    assert_close(db, b.grad, "float64", "grad")
    # and the same numbers as the explicit permutation through bncore's own layer norm
    y2 = bncore.layer_norm(x.permute(0, 2, 3, 1), (8,), w, b, 1e-6).permute(0, 3, 1, 2)
    assert_close(y, y2, "float64")


@pytest.mark.parametrize("layout", ["nhwc-view", "reversed-channels", "stepped"])
def test_normalize_channels_reads_strided_numpy_without_a_copy(layout):
    """A 1 MiB non-contiguous NCHW array: the only new array is the output (no copy of the input,
    no contiguous staging), and the result is the reference's."""
    rng = np.random.default_rng(23)
    if layout == "nhwc-view":
        x = (rng.normal(size=(4, 32, 32, 64)) + 1).astype(np.float32).transpose(0, 3, 1, 2)
    elif layout == "reversed-channels":
        x = (rng.normal(size=(4, 64, 32, 32)) + 1).astype(np.float32)[:, ::-1]
    else:
        x = (rng.normal(size=(4, 64, 32, 64)) + 1).astype(np.float32)[..., ::2]
    assert not x.flags.c_contiguous and x.shape == (4, 64, 32, 32)
    w, b = params(rng, (64,), np.float32)
    tracemalloc.start()
    try:
        y = bncore.normalize(x, axes=(1,), weight=w, bias=b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the output (x.nbytes) and the (N, H, W) statistics; a copy of x would double it
    assert peak < 1.25 * x.nbytes, f"peak {peak} bytes for a {x.nbytes}-byte input"
    y_ref, _, _ = normalize_ref(x, (1,), (1,), w, b)
    assert_close(y, y_ref, "float32")


# ---------------------------------------------------------------- adversarial: a large mean


# (case, shape for big groups): groups of several pieces, columns, channel axes
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
    from variants_common import Case

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
        assert_close(dw, dw_ref, dtype, "grad", scale=10)
        return
    # the backward starts from the saved (input-dtype) mean: dx off by up to the output's bound,
    # dweight = sum(dy * xhat) by that bound times sum |dy| over a parameter's elements
    # (dx scales with rstd: its own relative error is the variance's at most)
    dx_atol = max(out_atol, var_rtol * float(np.max(np.abs(dx_ref))))
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=dx_atol, err_msg="grad_input")
    n_per_param = x.size / w.size
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=out_atol * (np.max(np.abs(db_ref)) + n_per_param ** 0.5) +
                               1e-4 * np.max(np.abs(dw_ref)), err_msg="grad_weight")
    assert_close(db, db_ref, dtype, "grad", scale=10)


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
    assert_close(db, db_ref, dtype, "grad", scale=10)


# ---------------------------------------------------------------- adversarial: constant groups


def _half_or_numpy(values, dtype):
    """float64 values as a tensor of dtype: NumPy for float16/32/64, torch for bfloat16."""
    if dtype == "bfloat16":
        torch = _torch()
        return torch.from_numpy(values).to(torch.bfloat16)
    return values.astype(dtype)


CONST_DTYPES = ["float32", "float64", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", CONST_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=repr)
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
    x = _half_or_numpy(x64, dtype)
    x64 = to_numpy64(x)
    w, b = _half_or_numpy(w64, pdtype), (None if b64 is None else _half_or_numpy(b64, pdtype))
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
    dy = _half_or_numpy(rng.normal(size=case.shape), dtype)
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    for name, g in (("grad_input", dx), ("grad_weight", dw), ("grad_bias", db)):
        assert g is None or np.all(np.isfinite(to_numpy64(g))), f"{name}: not finite"
    dx_ref, dw_ref, _ = ref_backward(case, to_numpy64(dy), x64, w64, dtype=dtype)
    # rstd of a constant group is 1/sqrt(eps): the gradient there is that large; compare relative to it
    s = max(1.0, float(np.max(np.abs(dx_ref))))
    assert_close(to_numpy64(dx) / s, dx_ref / s, dtype, "grad", err_msg="grad_input")
    assert_close(dw, dw_ref, pdtype if dtype in ("float32", "float64") else "float32", "grad", scale=10)


def _bias_view(case, b64):
    if case.kind == "layer":
        return b64
    view = [1] * len(case.shape)
    view[1] = case.shape[1]
    return b64.reshape(view)


@pytest.mark.parametrize("dtype", CONST_DTYPES)
def test_constant_input_everywhere(dtype):
    """Every group constant, no affine: all zeros, never NaN, for each variant and normalize."""
    x = _half_or_numpy(np.full((3, 4, 5, 6), 7.3), dtype)
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
    z = _half_or_numpy(np.zeros((3, 4, 5, 6)), dtype)
    np.testing.assert_array_equal(to_numpy64(bncore.rms_norm(z, (5, 6))), 0.0)


# ---------------------------------------------------------------- adversarial: half data near its largest value


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
    from variants_common import Case

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
        torch = _torch()
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
    assert_close(saved[1], r_ref, "float32", scale=10, err_msg="save_rstd")
    assert_close(y64, y_ref, dtype, err_msg="output")


@pytest.mark.parametrize("big", BIG_HALF, ids=_big_id)
@pytest.mark.parametrize("case", _big_case_list()[::2], ids=repr)
def test_half_data_near_its_largest_value_backward(case, big):
    """The backward on the reference's own statistics (so that a forward problem does not show
    here): grad_input relative to its largest value, grad_weight relative to its own."""
    dtype, magnitude, centered = big
    torch = _torch()
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


# ---------------------------------------------------------------- identities between the variants


def _variant_inputs(dtype, layout, shape=(3, 6, 5, 4)):
    rng = np.random.default_rng(seed_of("identities", dtype, layout))
    v = data(rng, shape)
    dyv = rng.normal(size=shape)
    if layout == "channels-last":
        torch = _torch()
        to = (lambda a: torch.from_numpy(a).to(getattr(torch, dtype)).contiguous(memory_format=torch.channels_last))
    elif dtype == "bfloat16":
        torch = _torch()
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


@pytest.mark.parametrize("mode", IDENTITY_MODES, ids=lambda m: "-".join(m))
def test_group_norm_with_c_groups_is_instance_norm(mode):
    dtype, layout = mode
    x, dy, rng = _variant_inputs(dtype, layout)
    pdtype = "float32" if dtype in ("float16", "bfloat16") else dtype
    w, b = params(rng, (6,), pdtype)
    if not isinstance(x, np.ndarray):
        torch = _torch()
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


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("mode", IDENTITY_MODES, ids=lambda m: "-".join(m))
def test_rms_norm_is_normalize_rms(mode, eps):
    dtype, layout = mode
    x, dy, rng = _variant_inputs(dtype, layout)
    pdtype = "float32" if dtype in ("float16", "bfloat16") else dtype
    w, _ = params(rng, (5, 4), pdtype, bias=False)
    if not isinstance(x, np.ndarray):
        torch = _torch()
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
    # and both are the reference's RMS norm
    y_ref, _, _ = normalize_ref(to_numpy64(x), (2, 3), (2, 3), to_numpy64(w), None, eps2, rms=True)
    assert_close(y1, y_ref, dtype)


def test_layer_norm_is_normalize_over_trailing_axes_and_instance_is_spatial():
    rng = np.random.default_rng(31)
    x = data(rng, (3, 4, 5, 6))
    w, b = params(rng, (5, 6), np.float64)
    _same(bncore.layer_norm(x, (5, 6), w, b), bncore.normalize(x, (2, 3), w, b), "float64")
    wc, bc = params(rng, (4,), np.float64)
    _same(bncore.instance_norm(x, None, None, wc, bc), bncore.normalize(x, (2, 3), wc, bc, affine_axes=(1,)),
          "float64")
    # batch norm too: every axis but the channels
    _same(bncore.batch_norm(x, None, None, wc, bc, training=True),
          bncore.normalize(x, (0, 2, 3), wc, bc, affine_axes=(1,)), "float64")
