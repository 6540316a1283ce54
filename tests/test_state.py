"""State that outlives a call: bncore.RunningStats, bncore.Moments and precise_stats.

RunningStats is checked against a float64 model of each convention's rule (and,
for the torch convention, against PyTorch's own running buffers); its arrays are
checked to be zero-copy views; every refused call must leave its bytes as they
were. Moments are checked against exact per-channel statistics (shifted data
summed with math.fsum), merges against the statistics of the concatenated data.
"""
from __future__ import annotations

import gc
import math

import numpy as np
import pytest

import bncore
from bncore import Moments, RunningStats, precise_stats

try:
    import torch
except ImportError:  # the NumPy-only tests still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is needed for the zero-copy and PyTorch checks")

C = 3


def rng(seed=0):
    return np.random.default_rng(seed)


def snapshot(rs: RunningStats):
    return rs.mean.tobytes(), rs.var.tobytes(), rs.count, rs.skipped, rs.momentum


def batch_stats(x):
    """(mean, biased var, n) per channel of an (N, C) float64 batch."""
    return x.mean(0), x.var(0), x.shape[0]


# ====================================================================== RunningStats


def test_defaults_and_initial_state():
    rs = RunningStats(C)
    assert (rs.convention, rs.momentum, rs.dtype, rs.nan_policy) == ("torch", 0.1, "float32", "propagate")
    assert rs.mean.dtype == np.float32 and rs.var.dtype == np.float32
    assert rs.mean.shape == rs.var.shape == (C,)
    np.testing.assert_array_equal(rs.mean, np.zeros(C))
    np.testing.assert_array_equal(rs.var, np.ones(C))
    assert (rs.count, rs.skipped) == (0, 0)
    rk = RunningStats(C, convention="keras", dtype="float64")
    assert rk.momentum == 0.99 and rk.mean.dtype == np.float64
    assert "count=0" in repr(rs) and "'keras'" in repr(rk)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.1, 0.37, 0.0, 1.0])
def test_torch_rule(dtype, momentum):
    """new = (1 - m) * old + m * batch; the unbiased variance var * n / (n - 1) is stored."""
    rs = RunningStats(C, momentum, dtype=dtype)
    ref_m, ref_v = np.zeros(C), np.ones(C)
    g = rng(1)
    for step, n in enumerate([5, 2, 17, 100, 3]):
        x = g.normal(size=(n, C)) * (step + 1) + step
        bm, bv, n = batch_stats(x)
        rs.update(bm, bv, n)
        ref_m = (1 - momentum) * ref_m + momentum * bm
        ref_v = (1 - momentum) * ref_v + momentum * bv * n / (n - 1)
        if dtype == "float32":  # the state is rounded to float32 after every step
            ref_m, ref_v = ref_m.astype(np.float32).astype(np.float64), ref_v.astype(np.float32).astype(np.float64)
        rtol = 1e-6 if dtype == "float32" else 1e-14
        np.testing.assert_allclose(rs.mean, ref_m, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(rs.var, ref_v, rtol=rtol, atol=rtol)
        assert rs.count == step + 1 and rs.skipped == 0


@needs_torch
def test_torch_rule_matches_pytorch_buffers():
    """The same batches through torch.nn.functional.batch_norm move PyTorch's buffers identically."""
    rs = RunningStats(C, 0.2, dtype="float64")
    tm, tv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    g = rng(2)
    for n in (4, 9, 2, 33):
        x = g.normal(size=(n, C)) * 3 + 1
        torch.nn.functional.batch_norm(torch.from_numpy(x), tm, tv, training=True, momentum=0.2)
        rs.update(*batch_stats(x))
    np.testing.assert_allclose(rs.mean, tm.numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(rs.var, tv.numpy(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cumulative_average(dtype):
    """momentum=None: after k updates the state is the plain average of the k batch values."""
    rs = RunningStats(C, None, dtype=dtype)
    assert rs.momentum is None
    g = rng(3)
    means, uvars = [], []
    for k, n in enumerate([3, 8, 2, 50, 7, 11], start=1):
        x = g.normal(size=(n, C)) * k + 10 * k
        bm, bv, n = batch_stats(x)
        means.append(bm)
        uvars.append(bv * n / (n - 1))
        rs.update(bm, bv, n)
        assert rs.count == k
        rtol = 2e-6 if dtype == "float32" else 1e-13
        np.testing.assert_allclose(rs.mean, np.mean(means, axis=0), rtol=rtol)
        np.testing.assert_allclose(rs.var, np.mean(uvars, axis=0), rtol=rtol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.5])
def test_keras_rule(dtype, momentum):
    """new = m * old + (1 - m) * batch; the biased variance is stored; n = 1 is allowed."""
    rs = RunningStats(C, momentum, convention="keras", dtype=dtype)
    ref_m, ref_v = np.zeros(C), np.ones(C)
    g = rng(4)
    for step, n in enumerate([6, 1, 13, 2]):
        x = g.normal(size=(n, C)) * 2 + step
        bm, bv, n = batch_stats(x)
        rs.update(bm, bv, n)
        ref_m = momentum * ref_m + (1 - momentum) * bm
        ref_v = momentum * ref_v + (1 - momentum) * bv
        if dtype == "float32":
            ref_m, ref_v = ref_m.astype(np.float32).astype(np.float64), ref_v.astype(np.float32).astype(np.float64)
        rtol = 1e-6 if dtype == "float32" else 1e-13
        np.testing.assert_allclose(rs.mean, ref_m, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(rs.var, ref_v, rtol=rtol, atol=rtol)
        assert rs.count == step + 1


def test_keras_stores_biased_torch_unbiased():
    x = rng(5).normal(size=(4, C))
    bm, bv, n = batch_stats(x)
    t = RunningStats(C, 1.0, dtype="float64")            # factor 1: the batch value itself
    k = RunningStats(C, 0.0, convention="keras", dtype="float64")
    t.update(bm, bv, n)
    k.update(bm, bv, n)
    np.testing.assert_allclose(t.var, bv * 4 / 3, rtol=1e-15)
    np.testing.assert_allclose(k.var, bv, rtol=1e-15)
    np.testing.assert_allclose(t.mean, bm, rtol=1e-15)
    np.testing.assert_allclose(k.mean, bm, rtol=1e-15)


@needs_torch
def test_inputs_of_any_producer_and_dtype():
    """batch_mean / batch_var may be lists, float32 / float64 arrays or torch tensors."""
    bm, bv = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    states = [RunningStats(C, 1.0, dtype="float64") for _ in range(4)]
    states[0].update(bm, bv, 5)
    states[1].update(np.array(bm, np.float32), np.array(bv, np.float32), 5)
    states[2].update(torch.tensor(bm, dtype=torch.float64), torch.tensor(bv, dtype=torch.float64), 5)
    states[3].update(torch.tensor(bm, requires_grad=True), torch.tensor(bv), np.int64(5))
    for s in states:
        np.testing.assert_allclose(s.mean, bm)
        np.testing.assert_allclose(s.var, np.array(bv) * 5 / 4, rtol=1e-7)


def test_counters_and_setters():
    rs = RunningStats(C, nan_policy="skip")
    rs.update(np.ones(C), np.ones(C), 4)
    rs.update(np.full(C, np.nan), np.ones(C), 4)
    rs.update(np.ones(C), np.full(C, np.inf), 4)
    rs.update(np.ones(C), np.ones(C), 4)
    assert (rs.count, rs.skipped) == (2, 2)
    rs.count = 17
    assert (rs.count, rs.skipped) == (17, 2)
    rs.momentum = 0.5
    assert rs.momentum == 0.5
    before = rs.mean.copy()
    rs.update(np.full(C, 3.0), np.ones(C), 4)
    np.testing.assert_allclose(rs.mean, 0.5 * before + 0.5 * 3.0, rtol=1e-6)


def test_load_replaces_state():
    rs = RunningStats(C, dtype="float64")
    rs.load([1.0, 2.0, 3.0], np.array([4.0, 5.0, 6.0], np.float32), count=9)
    np.testing.assert_array_equal(rs.mean, [1, 2, 3])
    np.testing.assert_array_equal(rs.var, [4, 5, 6])
    assert rs.count == 9
    rs.load(np.zeros(C), np.ones(C))
    assert rs.count == 9


# ---------------------------------------------------------------------- zero-copy views


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_views_are_zero_copy(dtype):
    rs = RunningStats(C, 0.5, dtype=dtype)
    m_np, v_np = rs.mean, rs.var
    m_t, v_t = torch.from_dlpack(rs.mean), torch.from_dlpack(rs.var)
    assert m_t.dtype == getattr(torch, dtype)
    assert np.shares_memory(m_np, rs.mean) and np.shares_memory(v_np, rs.var)
    assert not np.shares_memory(rs.mean, rs.var)
    assert m_t.data_ptr() == rs.mean.ctypes.data and v_t.data_ptr() == rs.var.ctypes.data
    rs.update(np.full(C, 4.0), np.full(C, 3.0), 4)  # later updates are seen by earlier views
    np.testing.assert_array_equal(m_np, [2.0] * C)
    np.testing.assert_array_equal(m_t.numpy(), [2.0] * C)
    np.testing.assert_allclose(v_t.numpy(), 0.5 + 0.5 * 4.0)
    m_t[1] = 42.0  # writes through any view change the state
    assert rs.mean[1] == 42.0
    rs.var[2] = -1.0
    assert v_t[2].item() == -1.0


@needs_torch
def test_views_keep_the_state_alive():
    rs = RunningStats(C, 1.0, dtype="float64")
    rs.update(np.full(C, 7.0), np.full(C, 2.0), 3)
    t = torch.from_dlpack(rs.mean)
    a = rs.var
    del rs
    gc.collect()
    junk = [np.full(C, -5.0) for _ in range(100)]  # reuse freed memory if it had been freed
    np.testing.assert_array_equal(t.numpy(), [7.0] * C)
    np.testing.assert_array_equal(a, [3.0] * C)
    del junk


def test_whole_state_has_no_dlpack():
    with pytest.raises(TypeError, match=r"export \.mean or \.var"):
        np.from_dlpack(RunningStats(C))
    with pytest.raises(TypeError, match=r"export \.mean or \.var"):
        RunningStats(C).__dlpack__()


# ---------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(convention="tf"), ValueError, r"convention: expected 'torch' or 'keras', got 'tf'"),
    (dict(dtype="float16"), TypeError, r"dtype: expected 'float32' or 'float64', got 'float16'"),
    (dict(nan_policy="omit"), ValueError, r"nan_policy: expected 'propagate' or 'skip', got 'omit'"),
    (dict(momentum=1.5), ValueError, r"momentum: expected a value in \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), ValueError, r"momentum: expected a value in \[0, 1\], got -0.1"),
    (dict(momentum=float("nan")), ValueError, r"momentum: expected a value in \[0, 1\]"),
    (dict(momentum="0.1"), TypeError, r"momentum: expected a float or None, got str"),
    (dict(momentum=True), TypeError, r"momentum: expected a float"),
    (dict(momentum=None, convention="keras"), ValueError, r"None .* only in the torch convention"),
    (dict(momentum=1.01, convention="keras"), ValueError, r"momentum: expected a value in \[0, 1\]"),
    (dict(num_features=0), ValueError, r"num_features: expected a positive int, got 0"),
    (dict(num_features=2.0), ValueError, r"num_features: expected a positive int, got 2.0"),
    (dict(num_features=True), ValueError, r"num_features: expected a positive int"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs = dict(kwargs)
    n = kwargs.pop("num_features", C)
    with pytest.raises(exc, match=match):
        RunningStats(n, **kwargs)


def _bad_updates():
    ok = np.ones(C)
    return {
        "n=1 (torch)": (lambda rs: rs.update(ok, ok, 1), bncore.InvalidArgumentError,
                        r"n: expected more than 1 values .*unbiased.* got 1"),
        "n=0": (lambda rs: rs.update(ok, ok, 0), bncore.InvalidArgumentError, r"n: expected more than 1"),
        "n<0": (lambda rs: rs.update(ok, ok, -4), bncore.InvalidArgumentError, r"got -4"),
        "n float": (lambda rs: rs.update(ok, ok, 5.0), TypeError, r"n: expected an int, got float"),
        "n bool": (lambda rs: rs.update(ok, ok, True), TypeError, r"n: expected an int, got bool"),
        "mean too long": (lambda rs: rs.update(np.ones(C + 1), ok, 5), bncore.ShapeMismatchError,
                          r"batch_mean: expected 3 values \(one per feature\), got 4"),
        "var too short": (lambda rs: rs.update(ok, np.ones(C - 1), 5), bncore.ShapeMismatchError,
                          r"batch_var: expected 3 values .*got 2"),
        "int mean": (lambda rs: rs.update(np.ones(C, np.int32), ok, 5), bncore.UnsupportedDtypeError,
                     r"batch_mean: expected a floating dtype"),
        "None var": (lambda rs: rs.update(ok, None, 5), TypeError, r"expected tensors, got None"),
        "momentum 2": (lambda rs: setattr(rs, "momentum", 2.0), ValueError, r"momentum: expected a value in \[0, 1\]"),
        "momentum None": (lambda rs: setattr(rs, "momentum", None), ValueError, r"cumulative average"),
        "count < 0": (lambda rs: setattr(rs, "count", -1), bncore.InvalidArgumentError,
                      r"counts: expected values >= 0"),
        "load shape": (lambda rs: rs.load(np.ones(C + 1), ok), ValueError, r"mean: expected shape \(3,\), got \(4,\)"),
        "load var shape": (lambda rs: rs.load(ok, np.ones((C, 1))), ValueError, r"var: expected shape \(3,\)"),
        "load count": (lambda rs: rs.load(ok * 9, ok * 9, count=-1), ValueError,
                       r"count: expected (a value >= 0|an int in \[0, 2\*\*63\))"),
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(_bad_updates()))
def test_bad_calls_raise_and_change_nothing(case, dtype):
    call, exc, match = _bad_updates()[case]
    rs = RunningStats(C, 0.3, dtype=dtype)
    rs.update(rng(6).normal(size=C), rng(7).uniform(1, 2, size=C), 8)
    before = snapshot(rs)
    with pytest.raises(exc, match=match):
        call(rs)
    assert snapshot(rs) == before


def test_keras_n_limits():
    rs = RunningStats(C, convention="keras")
    rs.update(np.ones(C), np.zeros(C), 1)  # the biased variance of one value is fine
    before = snapshot(rs)
    with pytest.raises(bncore.InvalidArgumentError, match=r"n: expected more than 0 value"):
        rs.update(np.ones(C), np.zeros(C), 0)
    assert snapshot(rs) == before


def test_load_with_unrepresentable_count_changes_nothing():
    """load() promises "checked first, then written: all or nothing": a count that does not fit
    the C counter (int64) must be refused before mean and var are written."""
    rs = RunningStats(C, dtype="float64")
    before = snapshot(rs)
    with pytest.raises((OverflowError, ValueError)):
        rs.load(np.full(C, 3.0), np.full(C, 4.0), count=2**63)
    assert snapshot(rs) == before


# ====================================================================== Moments


def exact_moments(x, axis):
    """count, mean, m2 per index of `axis`, as exact as float64 can hold them: each channel's
    data is shifted by a representative value (exact for the data used here) and summed with fsum."""
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0).reshape(x.shape[axis], -1)
    n = xm.shape[1]
    mean, m2 = np.zeros(xm.shape[0]), np.zeros(xm.shape[0])
    for c, col in enumerate(xm):
        if n == 0:
            continue
        shift = float(np.round(np.median(col)))
        d = col - shift
        mu = math.fsum(d) / n
        mean[c] = shift + mu
        m2[c] = math.fsum((d - mu) ** 2)
    return np.full(xm.shape[0], float(n)), mean, m2


def assert_moments(m: Moments, count, mean, m2, mean_rtol=1e-15, m2_rtol=1e-13):
    np.testing.assert_array_equal(m.count, count)
    scale = np.maximum(np.abs(mean), 1.0)
    np.testing.assert_array_less(np.abs(m.mean - mean), mean_rtol * scale * 4 + 1e-300)
    np.testing.assert_allclose(m.m2, m2, rtol=m2_rtol, atol=1e-300)


def _layout_cases():
    g = rng(10)
    x4 = g.normal(size=(5, 4, 6, 7))
    yield "2d", g.normal(size=(300, 3)), 1
    yield "2d-axis0", g.normal(size=(3, 300)) * 4 - 2, 0
    yield "3d-axis-1", g.normal(size=(4, 5, 6)), -1
    yield "4d-nchw", x4, 1
    yield "4d-axis2", x4, 2
    yield "4d-transposed-view", x4.transpose(0, 2, 3, 1), 3          # channels-last strides
    yield "4d-sliced", x4[:, ::2, 1:, ::-1], 1                       # gaps and a negative stride
    yield "float32", g.normal(size=(64, 5, 3)).astype(np.float32), 1
    yield "1d", g.normal(size=7), 0                                 # each element its own channel
    yield "large-mean", 1e6 + g.normal(size=(40, 3, 50)), 1


@pytest.mark.parametrize("name, x, axis", list(_layout_cases()), ids=[c[0] for c in _layout_cases()])
def test_from_batch_matches_reference(name, x, axis):
    m = Moments.from_batch(x, axis=axis)
    count, mean, m2 = exact_moments(x, axis)
    assert_moments(m, count, mean, m2, m2_rtol=1e-10 if name == "large-mean" else 1e-13)


@needs_torch
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_from_batch_of_torch_tensors(fmt):
    x = torch.randn(6, 4, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 + 3
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    m = Moments.from_batch(x, axis=1)
    assert_moments(m, *exact_moments(x.numpy(), 1))


def test_from_batch_of_float32_long_rows():
    """Long contiguous float32 rows (a layer-norm-like reduction, axis 0 of (N, L)): docs/numerics.md
    says their pieces are summed in float32 lanes with a corrected second pass, so the moments are
    not exact in float64 (bncore.h's bn_norm_moments says "accumulated in double") but stay far
    below float32 resolution."""
    x = rng(17).uniform(0, 3000, size=(5, 6000)).astype(np.float32)
    m = Moments.from_batch(x, axis=0)
    count, mean, m2 = exact_moments(x, 0)
    np.testing.assert_array_equal(m.count, count)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-8)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-6)
    m64 = Moments.from_batch(x.astype(np.float64), axis=0)  # float64 input: float64 accumulation
    assert_moments(m64, count, mean, m2)


def test_from_batch_of_empty_batches():
    for shape in [(0, C), (0, C, 4), (5, C, 0)]:
        m = Moments.from_batch(np.zeros(shape), axis=1)
        np.testing.assert_array_equal(m.count, np.zeros(C))
        np.testing.assert_array_equal(m.mean, np.zeros(C))
        np.testing.assert_array_equal(m.m2, np.zeros(C))
        assert np.isnan(m.var()).all()


def test_var():
    x = rng(11).normal(size=(20, C)) * 3
    m = Moments.from_batch(x)
    np.testing.assert_allclose(m.var(), x.var(0), rtol=1e-13)
    np.testing.assert_allclose(m.var(unbiased=False), x.var(0), rtol=1e-13)
    np.testing.assert_allclose(m.var(unbiased=True), x.var(0, ddof=1), rtol=1e-13)
    one = Moments.from_batch(x[:1])
    np.testing.assert_array_equal(one.var(), np.zeros(C))
    assert np.isnan(one.var(unbiased=True)).all()


def _merge_cases():
    g = rng(12)
    yield "equal", [g.normal(size=(50, C)) for _ in range(4)]
    yield "different-means", [g.normal(size=(30, C)) * (k + 1) + 5 * k for k in range(5)]
    yield "1-vs-100000", [g.normal(size=(1, C)) + 3, g.normal(size=(100000, C))]
    yield "100000-vs-1", [g.normal(size=(100000, C)), g.normal(size=(1, C)) - 7]
    yield "with-empty", [np.zeros((0, C)), g.normal(size=(7, C)), np.zeros((0, C)), g.normal(size=(2, C)) + 1,
                         np.zeros((0, C))]
    yield "large-mean", [1e6 + g.normal(size=(k, C)) for k in (1, 100000, 0, 3, 40)]
    yield "single-rows", [g.normal(size=(1, C)) for _ in range(9)]


@pytest.mark.parametrize("name, parts", list(_merge_cases()), ids=[c[0] for c in _merge_cases()])
def test_merge_equals_concatenated(name, parts):
    ms = [Moments.from_batch(p) for p in parts]
    whole = exact_moments(np.concatenate(parts), 1)
    # Chan's merge of separately rounded part means loses about eps * |mean| / std relative in m2
    m2_rtol = 1e-9 if name == "large-mean" else 1e-13
    assert_moments(Moments.merge_all(ms), *whole, m2_rtol=m2_rtol)
    pair = ms[0]
    for m in ms[1:]:
        pair = pair.merge(m)
    assert_moments(pair, *whole, m2_rtol=m2_rtol)
    # order does not matter (within rounding)
    rev = Moments.merge_all(ms[::-1])
    perm = Moments.merge_all([ms[i] for i in rng(13).permutation(len(ms))])
    for other in (rev, perm):
        assert_moments(other, *whole, m2_rtol=m2_rtol)


def test_merge_with_empty_is_exact():
    x = rng(14).normal(size=(9, C))
    m = Moments.from_batch(x)
    for e in (Moments.empty(C), Moments.from_batch(np.zeros((0, C)))):
        for merged in (m.merge(e), e.merge(m), Moments.merge_all([e, m, e])):
            np.testing.assert_array_equal(merged.count, m.count)
            np.testing.assert_array_equal(merged.mean, m.mean)
            np.testing.assert_array_equal(merged.m2, m.m2)
    none = Moments.merge_all([Moments.empty(C), Moments.from_batch(np.zeros((0, C)))])
    np.testing.assert_array_equal(none.count, np.zeros(C))
    np.testing.assert_array_equal(none.mean, np.zeros(C))
    np.testing.assert_array_equal(none.m2, np.zeros(C))


def test_merge_does_not_modify_parts():
    a, b = Moments.from_batch(rng(15).normal(size=(5, C))), Moments.from_batch(rng(16).normal(size=(6, C)) + 2)
    before = [v.copy() for v in (a.count, a.mean, a.m2, b.count, b.mean, b.m2)]
    a.merge(b)
    Moments.merge_all([a, b])
    for v, w in zip(before, (a.count, a.mean, a.m2, b.count, b.mean, b.m2)):
        np.testing.assert_array_equal(v, w)


def test_moments_errors():
    with pytest.raises(ValueError, match=r"expected equal 1-D shapes"):
        Moments(np.ones(3), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match=r"expected equal 1-D shapes"):
        Moments(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"other: expected moments of 3 channels, got 4"):
        Moments.empty(3).merge(Moments.empty(4))
    with pytest.raises(ValueError, match=r"merge_all: expected at least one"):
        Moments.merge_all([])
    with pytest.raises(ValueError, match=r"axis"):
        Moments.from_batch(np.ones((4, 3)), axis=2)
    with pytest.raises(TypeError, match=r"floating"):
        Moments.from_batch(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match=r"scalar"):
        Moments.from_batch(np.array(1.0))


# ====================================================================== precise_stats


def _shifted_batches(seed, shape, n, axis=1, scale=1.0):
    """Batches whose means differ a lot: the average of batch variances is then far from the
    variance of all the data."""
    g = rng(seed)
    out = []
    for k in range(n):
        shift_shape = [1] * len(shape)
        shift_shape[axis] = shape[axis]
        shift = (3.0 * k) * np.ones(shift_shape) + np.arange(shape[axis]).reshape(shift_shape)
        out.append(((g.normal(size=shape) * scale * (1 + 0.2 * k)) + shift).astype(np.float32))
    return out


def _pooled(batches, axis, unbiased):
    x = np.concatenate([np.moveaxis(b.astype(np.float64), axis, -1).reshape(-1, b.shape[axis]) for b in batches])
    return x.mean(0), x.var(0, ddof=1 if unbiased else 0), x


def test_precise_stats_bncore_torch_convention():
    batches = _shifted_batches(20, (8, C, 4, 4), 5)
    layer = bncore.BatchNorm(C, dtype="float64")
    for b in batches:  # ordinary training: an exponential average, not the pooled statistics
        layer(b)
    count_before = layer.num_batches_tracked.copy()
    total = precise_stats(layer, batches)
    mean, var, x = _pooled(batches, 1, unbiased=True)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)
    np.testing.assert_array_equal(layer.num_batches_tracked, count_before)
    assert isinstance(total, Moments)
    np.testing.assert_array_equal(total.count, np.full(C, x.shape[0]))
    # the pooled variance is not the average of the batch variances (the batch means differ)
    avg_of_vars = np.mean([b.astype(np.float64).var(axis=(0, 2, 3), ddof=1) for b in batches], axis=0)
    assert np.all(layer.running_var > 1.5 * avg_of_vars)
    # and eval now normalizes with the pooled statistics
    layer.eval()
    y = layer(batches[0])
    ref = (batches[0].astype(np.float64) - mean.reshape(1, C, 1, 1)) / np.sqrt(var.reshape(1, C, 1, 1) + 1e-5)
    np.testing.assert_allclose(y, ref.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_precise_stats_bncore_keras_convention():
    batches = _shifted_batches(21, (6, 5, 5, C), 4, axis=-1)
    layer = bncore.BatchNorm(C, convention="keras")
    total = precise_stats(layer, batches)
    mean, var, x = _pooled(batches, -1, unbiased=False)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-6)
    # float32 data: the forward's own moments (float32 lanes per piece)
    np.testing.assert_allclose(total.var(), var, rtol=1e-6)
    avg_of_vars = np.mean([b.astype(np.float64).var(axis=(0, 1, 2)) for b in batches], axis=0)
    assert np.all(np.abs(layer.running_var - avg_of_vars) > 0.5 * avg_of_vars)


@needs_torch
def test_precise_stats_torch_module():
    gen = torch.Generator().manual_seed(22)
    batches = [torch.randn(8, C, 5, 5, generator=gen) * (1 + k) + 4.0 * k for k in range(4)]
    module = torch.nn.BatchNorm2d(C)
    module.train()
    for b in batches:
        module(b)
    nbt = module.num_batches_tracked.clone()
    precise_stats(module, batches)
    x = torch.cat(batches).double()
    np.testing.assert_allclose(module.running_mean.numpy(), x.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(module.running_var.numpy(), x.var(dim=(0, 2, 3), unbiased=True).numpy(), rtol=1e-6)
    assert module.running_mean.dtype == torch.float32
    assert module.num_batches_tracked.item() == nbt.item()
    avg_of_vars = torch.stack([b.double().var(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.all(module.running_var.double() > 1.5 * avg_of_vars)
    # eval through the module uses them
    module.eval()
    with torch.no_grad():
        y = module(batches[1])
    ref = (batches[1].double() - x.mean(dim=(0, 2, 3)).view(1, C, 1, 1)) / torch.sqrt(
        x.var(dim=(0, 2, 3)).view(1, C, 1, 1) + 1e-5)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_precise_stats_accepts_a_generator():
    batches = _shifted_batches(23, (4, C), 6)
    layer = bncore.BatchNorm(C, dtype="float64")
    precise_stats(layer, (b for b in batches))
    mean, var, _ = _pooled(batches, 1, unbiased=True)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-6)
