"""Hypothesis-drawn problems against the float64 reference: batch norm, the named variants and
`normalize(axes)`, with any shape, axes, strides and layouts (transposes, stepped slices, negative
strides via NumPy, channels-last torch), forward and backward.

Small draws find shape and stride bugs; the sized draws below reach every engine path: rows longer
than a 2,048-element piece, tensors past the parallel threshold (32,768 elements), groups over
1 MiB (the two-phase path; smaller ones take the fused path), column reductions (channels-last),
and the half dtypes (float16 through NumPy and torch, bfloat16 through torch).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bncore
from bncore.reference import (all_but, batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref,
                              normalize_backward_bounds, normalize_backward_ref, normalize_ref)
from cases import (Case, bn_params, bncore_backward, bncore_forward, data, params, ref_backward, ref_backward_bounds,
                   ref_forward)
from layouts import strided, to_layout
from tolerances import assert_close, to_numpy64


HYPOTHESIS = settings(max_examples=50, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def layouts(draw, ndim, allow_torch=True):
    perm = tuple(draw(st.permutations(range(ndim))))
    steps = tuple(draw(st.lists(st.sampled_from([1, 2, -1, -2, 3]), min_size=ndim, max_size=ndim)))
    if allow_torch and draw(st.booleans()):
        return ("torch", perm, steps, ndim in (4, 5) and draw(st.booleans()))
    return ("numpy", perm, steps)


def _cond(rstd_ref):
    """Tiny drawn groups (1 or 2 values) can have a variance near 0. The variance of O(1) values errs
    by ~eps absolutely, so rstd, and what is formed from it, by ~eps * rstd relatively: tolerances
    scale with the largest rstd (>= 1). This is the conditioning of the problem, not its size."""
    r = np.max(np.abs(rstd_ref)) if np.size(rstd_ref) else 1.0
    return max(1.0, float(r))


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
    mag_dx, mag_dw, mag_db = normalize_backward_bounds(dy64, x64, red, aff, w, eps, rms)
    assert_close(dx, dx_ref, dtype, "grad", scale=cond, magnitude=mag_dx, err_msg="grad_input")
    if w is None:
        assert dw is None and db is None
    else:
        assert tuple(dw.shape) == pshape
        assert_close(dw, dw_ref, dtype, "grad", scale=cond, magnitude=mag_dw, err_msg="grad_weight")
        if rms:
            assert db is None
        else:
            assert_close(db, db_ref, dtype, "grad", magnitude=mag_db, err_msg="grad_bias")


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
    mag_dx, mag_dw, mag_db = ref_backward_bounds(case, dy64, x64, w, dtype=dtype)
    assert_close(dx, dx_ref, dtype, "grad", scale=cond, magnitude=mag_dx, err_msg="grad_input")
    if w is None:
        assert dw is None and db is None
    else:
        assert_close(dw, dw_ref, dtype, "grad", scale=cond, magnitude=mag_dw, err_msg="grad_weight")
        if case.has_bias:
            assert_close(db, db_ref, dtype, "grad", magnitude=mag_db, err_msg="grad_bias")


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
    w, b = bn_params(rng, c, dtype)
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
    mag_dx, mag_dw, mag_db = normalize_backward_bounds(dy, x, all_but(x.ndim, axis), (axis,), w, **stats)
    assert_close(dx, dx_ref, dtype, "grad", scale=cond, magnitude=mag_dx)
    assert_close(dw, dw_ref, dtype, "grad", scale=cond, magnitude=mag_dw)
    assert_close(db, db_ref, dtype, "grad", magnitude=mag_db)


# ---------------------------------------------------------------- sized draws: every engine path, half dtypes

PIECE = 2048                 # elements of a row piece (cpu.h BN_PIECE)
PARALLEL_MIN = 1 << 15       # elements from which a pass runs on several threads (engine.c BN_PAR_MIN)
FUSE_BYTES = 1 << 20         # a group whose forward operands (x, y) fit in this is fused (engine.c BN_FUSE_BYTES)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
PATHS = ["pieces", "parallel", "two-phase", "columns"]
SIZED_DTYPES = ["float32", "float64", "float16", "bfloat16"]


@st.composite
def sized_problems(draw, path, dtype):
    """A problem of `path`'s size for a drawn variant: groups longer than a piece; >= 32,768 elements of
    many small groups; one group past the fused limit (two-phase); or a channels-last / column layout.
    Returns (case, layout, affine, seed); layout is 'C', 'F' (reduced dims strided), 'channels-last'
    (torch) or 'sliced' (every other element of the last dim)."""
    kind = draw(st.sampled_from(["batch", "layer", "rms", "group", "instance"]))
    ints = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731
    layout = draw(st.sampled_from(["C", "sliced"]))
    if path == "pieces":  # each group several pieces long, the whole small
        g = ints(PIECE + 1, 3 * PIECE + 7)
        shapes = {"batch": (ints(2, 3), 2, g), "layer": (ints(1, 3), g), "rms": (ints(1, 3), g),
                  "group": (ints(1, 2), 4, g // 2 + 1), "instance": (ints(1, 2), 2, g)}
    elif path == "parallel":  # many short groups past the parallel threshold
        rows = ints(PARALLEL_MIN // 128 + 1, PARALLEL_MIN // 64)
        shapes = {"batch": (rows, ints(3, 8), 128), "layer": (rows, ints(128, 256)), "rms": (rows, ints(128, 256)),
                  "group": (ints(64, 96), 8, ints(65, 96)), "instance": (ints(64, 96), 4, ints(128, 160))}
    elif path == "two-phase":  # one group past the fused limit (its x and y over 1 MiB)
        g = FUSE_BYTES // (2 * ITEMSIZE[dtype]) + ints(1, 20000)
        shapes = {"batch": (2, 2, g // 2 + 1), "layer": (2, g), "rms": (1, g), "group": (1, 4, g // 2 + 1),
                  "instance": (1, 2, g)}
    else:  # columns: channels-last torch tensors; NumPy batch norm with axis=-1; layer rows strided (F order)
        layout = {"layer": "F", "rms": "F",
                  "batch": draw(st.sampled_from(["channels-last", "C"]))}.get(kind, "channels-last")
        c = ints(3, 96)
        shapes = {"batch": (ints(4, 16), ints(4, 16), ints(4, 16), c), "layer": (ints(200, 3000), ints(2, 40)),
                  "rms": (ints(200, 3000), ints(2, 40)), "group": (ints(1, 4), c * 2, ints(4, 16), ints(4, 16)),
                  "instance": (ints(1, 4), c, ints(4, 16), ints(4, 16))}
        if kind == "batch" and layout == "channels-last":
            shapes["batch"] = (shapes["batch"][0], c, shapes["batch"][1], shapes["batch"][2])
    shape = shapes[kind]
    axis = -1 if (path == "columns" and kind == "batch" and layout == "C") else 1
    if kind in ("layer", "rms"):
        case = Case(f"{path}-{kind}", kind, shape, normalized_shape=shape[-1:] if layout != "F" else shape[-1:],
                    eps=draw(st.sampled_from([1e-5, 1e-3])))
    else:
        case = Case(f"{path}-{kind}", kind, shape, num_groups=2 if kind == "group" else 0, axis=axis,
                    eps=draw(st.sampled_from([1e-5, 1e-3])))
    return case, layout, draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


def _sized_tensor(values, layout, dtype):
    """float64 `values` as `dtype` in `layout`; torch for bfloat16 and channels-last, NumPy otherwise."""
    if layout == "F":
        values = np.asfortranarray(values)
    elif layout == "sliced":
        big = np.zeros(values.shape[:-1] + (2 * values.shape[-1],))
        big[..., ::2] = values
        values = big[..., ::2]
    if dtype == "bfloat16" or layout == "channels-last":
        torch = pytest.importorskip("torch", reason="torch is needed for bfloat16 and channels-last tensors")
        t = torch.from_numpy(values)
        if layout == "channels-last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t.to(getattr(torch, dtype))  # keeps the strides (preserve_format)
    return values.astype(dtype, order="K")


def _group_size(case):
    shape = case.shape
    if case.kind in ("layer", "rms"):
        return int(np.prod(case.normalized_shape))
    if case.kind == "batch":
        return int(np.prod(shape)) // shape[case.channel_axis]
    spatial = int(np.prod(shape[2:]))
    return spatial * (shape[1] // case.num_groups if case.kind == "group" else 1)


def _sized_check(path, dtype, problem):
    case, layout, affine, seed = problem
    rng = np.random.default_rng(seed)
    shape = case.shape
    size, group = int(np.prod(shape)), _group_size(case)
    row = int(np.prod(shape[2:])) if case.kind == "batch" else group  # the group's longest contiguous run
    reaches = {"pieces": row > PIECE, "parallel": size >= PARALLEL_MIN,
               "two-phase": 2 * group * ITEMSIZE[dtype] > FUSE_BYTES,
               "columns": layout in ("channels-last", "F") or case.channel_axis == len(shape) - 1}
    assert reaches[path], (path, case.shape, layout)
    x = _sized_tensor(data(rng, shape, offset_axis=1), layout, dtype)
    dy = _sized_tensor(rng.normal(size=shape), layout, dtype)
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    pdtype = "float32" if dtype in ("float16", "bfloat16") else dtype  # mixed mode: float32 parameters
    w = b = None
    if affine:
        w, b = params(rng, case.param_shape, pdtype, bias=case.has_bias)
        if not isinstance(x, np.ndarray):
            import torch

            w, b = torch.from_numpy(w), (None if b is None else torch.from_numpy(b))
    w64, b64 = (None if w is None else to_numpy64(w)), (None if b is None else to_numpy64(b))
    y, saved = bncore_forward(case, x, w, b)
    y_ref, m_ref, r_ref = ref_forward(case, x64, w64, b64, dtype=dtype)
    assert type(y) is type(x) and tuple(y.shape) == shape
    assert_close(y, y_ref, dtype, err_msg="output")
    # statistics are kept in float32 for half inputs: float32's tolerance; the mean relative to the data's size
    assert_close(saved[1], r_ref, pdtype, err_msg="save_rstd")
    if m_ref is not None:
        assert_close(saved[0], m_ref, pdtype, magnitude=np.sqrt(np.mean(x64 ** 2)), err_msg="save_mean")
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    dx_ref, dw_ref, db_ref = ref_backward(case, dy64, x64, w64, dtype=dtype)
    mag_dx, mag_dw, mag_db = ref_backward_bounds(case, dy64, x64, w64, dtype=dtype)
    assert_close(dx, dx_ref, dtype, "grad", magnitude=mag_dx, err_msg="grad_input")
    if w is not None:  # sums in the parameters' dtype over the exact (half) values
        assert_close(dw, dw_ref, pdtype, "grad", magnitude=mag_dw, err_msg="grad_weight")
        if case.has_bias:
            assert_close(db, db_ref, pdtype, "grad", magnitude=mag_db, err_msg="grad_bias")


SIZED = settings(max_examples=3, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("dtype", SIZED_DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_hypothesis_engine_paths(path, dtype):
    """A few drawn problems per (path, dtype): every engine path in every dtype in the default run."""
    @SIZED
    @given(sized_problems(path, dtype))
    def check(problem):
        _sized_check(path, dtype, problem)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", SIZED_DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_hypothesis_engine_paths_many(path, dtype):
    """The same with 25 examples per (path, dtype): run with -m slow."""
    @settings(SIZED, max_examples=25)
    @given(sized_problems(path, dtype))
    def check(problem):
        _sized_check(path, dtype, problem)

    check()
