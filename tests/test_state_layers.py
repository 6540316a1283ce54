"""Running statistics through layers and the functional API: nan_policy, failure
atomicity (every failing call leaves every state object bit for bit as it was), and
state_dict round trips PyTorch -> bncore -> PyTorch."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore import RunningStats

torch = pytest.importorskip("torch", reason="torch is needed for the PyTorch comparisons")

C = 3


def data(seed, shape=(6, C, 4, 5), dtype=np.float32, scale=1.5, shift=0.5):
    return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(dtype)


def with_nonfinite(x, value, where=((1, 0, 2, 3),)):
    x = x.copy()
    for idx in where:
        x[idx] = value
    return x


def layer_snapshot(layer):
    """Every byte of a layer's state, and its counters."""
    snap = {}
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        v = getattr(layer, key)
        snap[key] = None if v is None else (np.asarray(v).dtype.str, np.asarray(v).shape, np.asarray(v).tobytes())
    snap["skipped"] = layer.skipped_updates
    snap["momentum"] = layer.momentum
    snap["eps"] = layer.eps
    snap["training"] = layer.training
    return snap


def stats_snapshot(rs):
    return rs.mean.tobytes(), rs.var.tobytes(), rs.count, rs.skipped, rs.momentum


def trained_layer(seed=0, **kwargs):
    """A layer whose state is not the initial one (random affine, a few steps)."""
    layer = bncore.BatchNorm(C, **kwargs)
    g = np.random.default_rng(seed + 100)
    if layer.weight is not None:
        layer.weight = g.uniform(0.5, 2, C).astype(layer.dtype)
    if layer.bias is not None:
        layer.bias = g.normal(size=C).astype(layer.dtype)
    for k in range(3):
        layer(data(seed + k))
    return layer


def torch_twin(layer):
    """torch.nn.BatchNorm2d with the bncore layer's state."""
    m = torch.nn.BatchNorm2d(C, eps=layer.eps, momentum=layer.momentum)
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    return m


# ====================================================================== nan_policy


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_skip_leaves_running_stats_alone(bad, momentum):
    layer = trained_layer(momentum=momentum, nan_policy="skip")
    twin = torch_twin(layer)
    before = layer_snapshot(layer)
    x = with_nonfinite(data(7), bad)
    y = layer(x)
    after = layer_snapshot(layer)
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert after[key] == before[key], key
    assert layer.skipped_updates == before["skipped"] + 1 == 1
    # the output is still returned: PyTorch's output, NaN exactly where PyTorch puts NaN
    yt = twin(torch.from_numpy(x)).detach().numpy()
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yt))
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
    np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5, equal_nan=True)
    # a finite batch afterwards updates as if the bad batch had never come
    clean = trained_layer(momentum=momentum)
    z = data(8)
    layer(z)
    clean(z)
    np.testing.assert_array_equal(layer.running_mean, clean.running_mean)
    np.testing.assert_array_equal(layer.running_var, clean.running_var)
    assert int(layer.num_batches_tracked) == int(clean.num_batches_tracked) == 4
    assert layer.skipped_updates == 1


def test_skip_counts_every_bad_batch_and_eval_is_unaffected():
    layer = trained_layer(nan_policy="skip")
    for k in range(3):
        layer(with_nonfinite(data(10 + k), np.nan, where=((0, k, 0, 0),)))
    assert layer.skipped_updates == 3 and int(layer.num_batches_tracked) == 3
    layer.eval()
    before = layer_snapshot(layer)
    layer(with_nonfinite(data(13), np.nan))  # eval never updates nor counts
    assert layer_snapshot(layer) == before


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_propagate_matches_pytorch_with_nan(dtype):
    layer = trained_layer(dtype=dtype)
    twin = torch_twin(layer).to(getattr(torch, dtype))
    x = with_nonfinite(data(9, dtype=dtype), np.nan, where=((1, 0, 2, 3), (4, 2, 0, 0)))
    y = layer(x)
    yt = twin(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isnan(layer.running_mean[[0, 2]]).all() and np.isnan(layer.running_var[[0, 2]]).all()
    assert np.isfinite(layer.running_mean[1]) and np.isfinite(layer.running_var[1])
    np.testing.assert_allclose(layer.running_mean, twin.running_mean.numpy(), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(layer.running_var, twin.running_var.numpy(), rtol=1e-6, equal_nan=True)
    assert int(layer.num_batches_tracked) == twin.num_batches_tracked.item() == 4
    assert layer.skipped_updates == 0


@pytest.mark.parametrize("shape, where", [
    ((4, C, 2, 2), (0, 0, 0, 0)),
    ((4, C, 2, 2), (2, 2, 0, 0)),
    ((2, 2, 3), (1, 1, 0)),
    ((8, C), (3, 1)),
])
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_propagate_matches_pytorch_with_inf(shape, where, bad):
    """An infinite value: PyTorch's batch mean is +-inf and its variance NaN, and so are its
    running statistics; nan_policy='propagate' promises PyTorch's behaviour."""
    c = shape[1]
    x = np.ones(shape, np.float64)
    x[where] = bad
    rm, rv = np.zeros(c), np.ones(c)
    _, save_mean, _ = bncore.batch_norm_forward(x, rm, rv, training=True)
    tm, tv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    torch.nn.functional.batch_norm(torch.from_numpy(x), tm, tv, training=True)
    np.testing.assert_array_equal(rm, tm.numpy(), err_msg="running_mean")
    np.testing.assert_array_equal(rv, tv.numpy(), err_msg="running_var")
    np.testing.assert_array_equal(save_mean[where[1]], bad, err_msg="save_mean")


def test_functional_with_skip_stats():
    rs = RunningStats(C, nan_policy="skip")
    rs.update(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 0.5]), 10)
    before = stats_snapshot(rs)
    x = with_nonfinite(data(11), np.nan)
    y, mean, invstd = bncore.batch_norm_forward(x, training=True, stats=rs)
    assert stats_snapshot(rs)[:3] == before[:3]
    assert rs.skipped == 1 and rs.count == 1
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()
    np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isnan(mean[0]) and np.isfinite(mean[1:]).all()
    # a finite batch is folded in by the state's own rule (torch: momentum 0.1, unbiased var)
    z = data(12).astype(np.float64)
    m0, v0 = rs.mean.astype(np.float64), rs.var.astype(np.float64)
    bncore.batch_norm_forward(z, training=True, stats=rs)
    n = z.size // C
    np.testing.assert_allclose(rs.mean, 0.9 * m0 + 0.1 * z.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(rs.var, 0.9 * v0 + 0.1 * z.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-6)
    assert (rs.count, rs.skipped) == (2, 1)
    # eval with the state normalizes by it and changes nothing
    before = stats_snapshot(rs)
    y_eval, _, _ = bncore.batch_norm_forward(z, training=False, stats=rs)
    assert stats_snapshot(rs) == before
    ref = (z - rs.mean.reshape(1, C, 1, 1)) / np.sqrt(rs.var.reshape(1, C, 1, 1) + 1e-5)
    np.testing.assert_allclose(y_eval, ref, rtol=1e-6, atol=1e-6)


def test_functional_with_propagate_stats():
    rs = RunningStats(C, dtype="float64")
    x = with_nonfinite(data(14, dtype=np.float64), np.nan)
    bncore.batch_norm_forward(x, training=True, stats=rs)
    assert np.isnan(rs.mean[0]) and np.isnan(rs.var[0]) and np.isfinite(rs.mean[1:]).all()
    assert (rs.count, rs.skipped) == (1, 0)


def test_keras_convention_skip():
    layer = bncore.BatchNorm(C, convention="keras", nan_policy="skip")
    x = data(15, shape=(4, 5, C))
    layer(x)
    before = layer_snapshot(layer)
    bad = x.copy()
    bad[0, 0, 1] = np.nan
    layer(bad)
    after = layer_snapshot(layer)
    assert after["running_mean"] == before["running_mean"] and after["running_var"] == before["running_var"]
    assert layer.skipped_updates == 1


def test_bad_nan_policy():
    with pytest.raises(ValueError, match=r"nan_policy: expected 'propagate' or 'skip', got 'ignore'"):
        bncore.BatchNorm(C, nan_policy="ignore")


# ====================================================================== failure atomicity


class _Exploding:
    """A tensor whose export raises."""

    def __dlpack__(self, **kwargs):
        raise RuntimeError("export failed")

    def __dlpack_device__(self):
        return (1, 0)


def _layer_failures():
    x = data(20)
    return {
        "too few channels": (lambda layer: layer(x[:, :2]), ValueError),
        "1-d input": (lambda layer: layer(np.ones(C, np.float32)), ValueError),
        "int input": (lambda layer: layer(np.ones((4, C), np.int32)), TypeError),
        "one value per channel": (lambda layer: layer(np.ones((1, C), np.float32)), ValueError),
        "exploding input": (lambda layer: layer(_Exploding()), RuntimeError),
        "None input": (lambda layer: layer(None), TypeError),
        "weight of wrong length": (
            lambda layer: (setattr(layer, "weight", np.ones(C + 1, np.float32)), layer(x)), ValueError),
        "int weight": (lambda layer: (setattr(layer, "weight", np.ones(C, np.int64)), layer(x)), TypeError),
        "bad eps": (lambda layer: (setattr(layer, "eps", -1.0), layer(x)), ValueError),
        "bad momentum": (lambda layer: setattr(layer, "momentum", 3.0), ValueError),
        "momentum to None": (lambda layer: setattr(layer, "momentum", None), ValueError),
        "state_dict wrong shape": (
            lambda layer: layer.load_state_dict({**layer.state_dict(), "running_var": np.ones(C + 1)}), ValueError),
        "state_dict missing key": (
            lambda layer: layer.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "bias"}),
            KeyError),
        "state_dict extra key": (
            lambda layer: layer.load_state_dict({**layer.state_dict(), "foo": np.ones(C)}), KeyError),
        "state_dict int weights": (
            lambda layer: layer.load_state_dict({**layer.state_dict(), "weight": np.ones(C, np.int32)}), TypeError),
        "state_dict exploding value": (
            lambda layer: layer.load_state_dict({**layer.state_dict(), "running_var": _Exploding()}), Exception),
        "state_dict two counts": (
            lambda layer: layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": np.array([1, 2])}),
            ValueError),
        "keras weights wrong count": (lambda layer: layer.load_keras_weights([np.ones(C)] * 3), ValueError),
        "keras weights wrong shape": (
            lambda layer: layer.load_keras_weights([np.ones(C), np.ones(C), np.ones(C), np.ones(C + 2)]), ValueError),
    }


@pytest.mark.parametrize("case", list(_layer_failures()))
def test_failing_layer_calls_change_nothing(case):
    call, exc = _layer_failures()[case]
    layer = trained_layer()
    # keep the original arrays: failing cases that assign a bad weight or eps restore them below
    weight, eps = layer.weight, layer.eps
    before = layer_snapshot(layer)
    with pytest.raises(exc):
        call(layer)
    layer.weight, layer.eps = weight, eps
    assert layer_snapshot(layer) == before


def test_failing_state_dict_load_with_negative_count_changes_nothing():
    """load_state_dict promises "every value is checked before any is stored": a negative
    num_batches_tracked must be refused before weight, bias and the running statistics change."""
    layer = trained_layer()
    before = layer_snapshot(layer)
    bad = {"weight": np.full(C, 5.0), "bias": np.full(C, 6.0), "running_mean": np.full(C, 7.0),
           "running_var": np.full(C, 8.0), "num_batches_tracked": np.array(-1)}
    with pytest.raises((ValueError, bncore.InvalidArgumentError)):
        layer.load_state_dict(bad)
    assert layer_snapshot(layer) == before


def _functional_failures():
    x = data(21)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    return {
        "read-only out": (lambda rs: bncore.batch_norm_forward(x, training=True, stats=rs, out=ro), ValueError),
        "out of wrong shape": (lambda rs: bncore.batch_norm_forward(x, training=True, stats=rs,
                                                                     out=np.empty((6, C, 4, 4), np.float32)),
                               bncore.ShapeMismatchError),
        "out of wrong dtype": (lambda rs: bncore.batch_norm_forward(x, training=True, stats=rs,
                                                                     out=np.empty(x.shape, np.float64)),
                               bncore.UnsupportedDtypeError),
        "weight of wrong length": (lambda rs: bncore.batch_norm_forward(x, None, None, np.ones(C + 1, np.float32),
                                                                         training=True, stats=rs), ValueError),
        "bias of wrong dtype": (lambda rs: bncore.batch_norm_forward(x, None, None, None, np.ones(C, np.int32),
                                                                      training=True, stats=rs), TypeError),
        "stats of other width": (lambda rs: bncore.batch_norm_forward(x[:, :2], training=True, stats=rs), ValueError),
        "stats and running_mean": (lambda rs: bncore.batch_norm_forward(x, np.zeros(C), np.ones(C), training=True,
                                                                         stats=rs), ValueError),
        "stats not a RunningStats": (lambda rs: bncore.batch_norm_forward(x, training=True, stats=rs.mean),
                                     TypeError),
        "one value per channel": (lambda rs: bncore.batch_norm_forward(np.ones((1, C)), training=True, stats=rs),
                                  ValueError),
        "bad eps": (lambda rs: bncore.batch_norm_forward(x, training=True, stats=rs, eps=float("nan")), ValueError),
        "bad axis": (lambda rs: bncore.batch_norm_forward(x, training=True, stats=rs, axis=4), ValueError),
        "out overlapping the state (eval)": (
            lambda rs: bncore.batch_norm_forward(np.ones((1, C), rs.mean.dtype), training=False, stats=rs,
                                                 out=rs.mean.reshape(1, C)), bncore.OverlapError),
        "exploding input": (lambda rs: bncore.batch_norm_forward(_Exploding(), training=True, stats=rs),
                            RuntimeError),
    }


@pytest.mark.parametrize("nan_policy", ["propagate", "skip"])
@pytest.mark.parametrize("case", list(_functional_failures()))
def test_failing_functional_calls_change_nothing(case, nan_policy):
    call, exc = _functional_failures()[case]
    rs = RunningStats(C, 0.25, nan_policy=nan_policy)
    rs.update(np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, 3.0]), 7)
    rs.update(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]), 7)
    before = stats_snapshot(rs)
    with pytest.raises(exc):
        call(rs)
    assert stats_snapshot(rs) == before


def test_failing_keras_layer_calls_change_nothing():
    layer = trained_layer(convention="keras", axis=1)
    before = layer_snapshot(layer)
    for call in (lambda: layer.load_keras_weights({"gamma": np.ones(C), "beta": np.ones(C)}),
                 lambda: layer.load_keras_weights({**layer.keras_weights(), "extra": np.ones(C)}),
                 lambda: layer.load_keras_weights([np.ones(C)] * 5),
                 lambda: layer.load_keras_weights([np.ones(C), np.ones(C), np.ones((C, 1)), np.ones(C)]),
                 lambda: layer(np.ones((5, C + 1, 2), np.float32))):
        with pytest.raises((KeyError, ValueError)):
            call()
        assert layer_snapshot(layer) == before


# ====================================================================== PyTorch state_dict round trips


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_to_bncore_to_torch(dtype):
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(30)
    src = torch.nn.BatchNorm2d(C, momentum=0.3).to(tdtype)
    with torch.no_grad():
        src.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        src.bias.copy_(torch.randn(C, generator=gen))
    for _ in range(3):
        src(torch.randn(5, C, 4, 4, generator=gen, dtype=tdtype) * 2 + 1)

    layer = bncore.BatchNorm(C, momentum=0.3, dtype=dtype)
    layer.load_state_dict(src.state_dict())
    sd = layer.state_dict()
    assert list(sd) == list(src.state_dict())
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    assert sd["num_batches_tracked"].dtype == np.int64

    dst = torch.nn.BatchNorm2d(C, momentum=0.3).to(tdtype)
    dst.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    # the same outputs and state in train and eval
    x = torch.randn(6, C, 3, 5, generator=gen, dtype=tdtype) * 1.5 - 0.5
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for mode in ("train", "eval"):
        src.train(mode == "train")
        dst.train(mode == "train")
        layer.train(mode == "train")
        with torch.no_grad():
            ys, yd = src(x), dst(x)
        yb = layer(x)
        assert torch.equal(ys, yd)
        np.testing.assert_allclose(yb.numpy(), ys.numpy(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(layer.running_mean, src.running_mean.numpy(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(layer.running_var, src.running_var.numpy(), rtol=rtol, atol=rtol)
        assert int(layer.num_batches_tracked) == src.num_batches_tracked.item() == 4


def test_state_dict_values_are_copies():
    layer = trained_layer()
    sd = layer.state_dict()
    sd["running_mean"][:] = 99.0
    sd["num_batches_tracked"][...] = 99
    assert not np.any(layer.running_mean == 99.0) and int(layer.num_batches_tracked) == 3
    # loading does not alias the given arrays either
    src = {k: v.copy() for k, v in trained_layer(seed=5).state_dict().items()}
    layer.load_state_dict(src)
    src["running_var"][:] = -1.0
    assert np.all(layer.running_var > 0)


def test_loaded_stats_stay_zero_copy_views():
    layer = trained_layer()
    mean_view = torch.from_dlpack(layer.running_mean)
    layer.load_state_dict(trained_layer(seed=9).state_dict())
    np.testing.assert_array_equal(mean_view.numpy(), layer.running_mean)
    assert np.shares_memory(layer.running_mean, layer.stats.mean)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_counts_but_does_not_move_the_stats_as_pytorch(momentum):
    """A zero-size training batch: PyTorch advances num_batches_tracked (so a later cumulative
    factor is 1/3, not 1/2) and leaves the running statistics alone; so does bncore."""
    layer = bncore.BatchNorm(C, momentum=momentum)
    twin = torch.nn.BatchNorm2d(C, momentum=momentum)
    x, z = data(40), data(41)
    empty = np.zeros((0, C, 2, 2), np.float32)
    for batch in (x, empty, z):
        y = layer(batch)
        yt = twin(torch.from_numpy(batch)).detach().numpy()
        assert y.shape == yt.shape
        np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.running_mean, twin.running_mean.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(layer.running_var, twin.running_var.numpy(), rtol=1e-6, atol=1e-7)
        assert int(layer.num_batches_tracked) == twin.num_batches_tracked.item()
    assert int(layer.num_batches_tracked) == 3
