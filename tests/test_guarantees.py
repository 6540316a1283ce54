"""The promises of docs/guarantees.md, one test (or a few) each.

Atomic loaders, autograd never fooled by a write through bncore, and thread safety of
the state objects. Each test names the promise it checks."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import bncore
from bncore.errors import InvalidArgumentError


def _snapshot(layer):
    return {k: v.tobytes() for k, v in layer.state_dict().items()}


def _loaded_layer():
    layer = bncore.BatchNorm(4)
    layer.load_state_dict({"weight": np.arange(4.0) + 1, "bias": np.arange(4.0) - 1,
                           "running_mean": np.full(4, 0.5), "running_var": np.full(4, 2.0),
                           "num_batches_tracked": np.array(7)})
    return layer


# ------------------------------------------------------------------ all-or-nothing loaders


@pytest.mark.parametrize("count", [np.array(2**63, np.uint64), np.array(2**64 - 1, np.uint64), np.array(-1),
                                   np.array(2**63 - 1, np.uint64) + np.uint64(1)])
def test_load_state_dict_bad_count_changes_nothing(count):
    layer = _loaded_layer()
    before = _snapshot(layer)
    new = {"weight": np.full(4, 9.0), "bias": np.full(4, 9.0), "running_mean": np.full(4, 9.0),
           "running_var": np.full(4, 9.0), "num_batches_tracked": count}
    with pytest.raises(InvalidArgumentError, match="num_batches_tracked"):
        layer.load_state_dict(new)
    assert _snapshot(layer) == before


def test_load_state_dict_python_int_2_63_refused():
    layer = _loaded_layer()
    before = _snapshot(layer)
    with pytest.raises(InvalidArgumentError, match="num_batches_tracked"):
        layer.load_state_dict({**layer.state_dict(), "weight": np.zeros(4), "num_batches_tracked": 2**63})
    assert _snapshot(layer) == before


def test_load_state_dict_largest_count_loads():
    layer = _loaded_layer()
    layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": np.array(2**63 - 1, np.uint64)})
    assert int(layer.num_batches_tracked) == 2**63 - 1


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_complex_refused(key):
    layer = _loaded_layer()
    before = _snapshot(layer)
    state = {k: np.full(4, 3.0) for k in ("weight", "bias", "running_mean", "running_var")}
    state["num_batches_tracked"] = np.array(1)
    state[key] = np.full(4, 1 + 2j)
    with pytest.raises(TypeError, match=key):
        layer.load_state_dict(state)
    assert _snapshot(layer) == before


@pytest.mark.parametrize("which", ["mean", "var"])
def test_running_stats_load_complex_refused(which):
    stats = bncore.RunningStats(3)
    stats.load(np.ones(3), np.full(3, 2.0), 5)
    before = (stats.mean.tobytes(), stats.var.tobytes(), stats.count)
    values = {"mean": np.zeros(3), "var": np.zeros(3)}
    values[which] = np.full(3, 1 + 1j)
    with pytest.raises(TypeError, match=which):
        stats.load(values["mean"], values["var"], 6)
    assert (stats.mean.tobytes(), stats.var.tobytes(), stats.count) == before


def test_running_stats_load_bad_count_changes_nothing():
    stats = bncore.RunningStats(3)
    stats.load(np.ones(3), np.full(3, 2.0), 5)
    before = (stats.mean.tobytes(), stats.var.tobytes(), stats.count)
    with pytest.raises(InvalidArgumentError, match="count"):
        stats.load(np.zeros(3), np.zeros(3), 2**63)
    assert (stats.mean.tobytes(), stats.var.tobytes(), stats.count) == before


def test_running_stats_load_goes_through_one_c_call(monkeypatch):
    """The whole replacement is one RunningStatsHandle.load (under the state's lock)."""
    stats = bncore.RunningStats(3)
    calls = []
    handle = stats._handle

    class Spy:
        def __getattr__(self, name):
            return getattr(handle, name)

        def load(self, *args):
            calls.append(args[2:])
            return handle.load(*args)

    monkeypatch.setattr(stats, "_handle", Spy())
    stats.load(np.ones(3), np.full(3, 2.0), 4)
    assert calls == [(4, 0)]
    layer = bncore.BatchNorm(3)
    layer.stats._handle, real = Spy(), layer.stats._handle
    handle = real
    calls.clear()
    layer.load_state_dict({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.ones(3),
                           "running_var": np.ones(3), "num_batches_tracked": np.array(2)})
    assert calls == [(2, 0)]
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("name", ["gamma", "beta", "moving_mean", "moving_variance"])
def test_load_keras_weights_complex_refused(name):
    layer = bncore.BatchNorm(3, convention="keras")
    layer.load_keras_weights({"gamma": np.full(3, 2.0), "beta": np.ones(3), "moving_mean": np.ones(3),
                              "moving_variance": np.full(3, 3.0)})
    before = _snapshot(layer)
    weights = {k: np.full(3, 5.0) for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    weights[name] = np.full(3, 1 - 1j)
    with pytest.raises(TypeError, match=name):
        layer.load_keras_weights(weights)
    assert _snapshot(layer) == before


def test_load_keras_weights_all_stored():
    layer = bncore.BatchNorm(3, convention="keras")
    layer.load_keras_weights([np.full(3, 2.0), np.ones(3), np.full(3, 4.0), np.full(3, 3.0)])
    np.testing.assert_array_equal(layer.weight, 2.0)
    np.testing.assert_array_equal(layer.running_mean, 4.0)
    np.testing.assert_array_equal(layer.running_var, 3.0)


# ------------------------------------------------------------------ autograd is never fooled


def _torch():
    return pytest.importorskip("torch")


def _torch_error(op):
    """The RuntimeError torch itself raises for `op` (its own in-place op)."""
    with pytest.raises(RuntimeError) as info:
        op()
    return str(info.value)


def test_out_into_leaf_requiring_grad_refused_as_torch_does():
    torch = _torch()
    x = torch.randn(4, 3, requires_grad=True)
    before = x.detach().clone()
    assert "leaf Variable that requires grad" in _torch_error(lambda: x.add_(1))
    with pytest.raises(RuntimeError, match="out: a leaf Variable that requires grad is being used in an in-place"):
        bncore.layer_norm(x, 3, out=x)
    assert torch.equal(x.detach(), before)
    view = x[1:]
    assert "view of a leaf Variable" in _torch_error(lambda: view.add_(1))
    with pytest.raises(RuntimeError, match="view of a leaf Variable"):
        bncore.layer_norm(x[1:], 3, out=view)
    with torch.no_grad():  # torch allows it without grad mode, and so does bncore
        x.add_(0)
        bncore.layer_norm(x.detach().clone(), 3, out=x)


def test_out_into_tensor_saved_for_backward_raises_at_backward():
    torch = _torch()
    for write in (lambda h: h.add_(1), lambda h: bncore.layer_norm(h.detach().clone(), 3, out=h)):
        x = torch.randn(4, 3, requires_grad=True)
        h = x * 2  # not a leaf
        loss = (h * h).sum()  # saves h
        write(h)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_out_into_saved_leaf_not_requiring_grad_raises_at_backward():
    torch = _torch()
    for write in (lambda a: a.add_(1), lambda a: bncore.layer_norm(a.clone(), 3, out=a)):
        a = torch.randn(4, 3)
        w = torch.randn(4, 3, requires_grad=True)
        loss = (a * w).sum()  # saves a for w's gradient
        write(a)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("checked", [False, True])
def test_running_stats_written_bump_versions(checked):
    """The running statistics batch_norm updates in place: small-call fast path and checked path."""
    torch = _torch()
    x = torch.randn(8, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.randn(3, requires_grad=True)
    loss = (rm * w).sum() + (rv * w).sum()  # saves rm and rv
    v0 = (rm._version, rv._version)
    kwargs = {"out": torch.empty_like(x)} if checked else {}
    bncore.batch_norm(x, rm, rv, training=True, **kwargs)
    assert rm._version > v0[0] and rv._version > v0[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("checked", [False, True])
def test_running_stats_leaf_requiring_grad_refused(checked):
    torch = _torch()
    x = torch.randn(8, 3)
    rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3)
    kwargs = {"out": torch.empty_like(x)} if checked else {}
    with pytest.raises(RuntimeError, match="running_mean: a leaf Variable that requires grad"):
        bncore.batch_norm(x, rm, rv, training=True, **kwargs)
    assert torch.equal(rm.detach(), torch.zeros(3))
    bncore.batch_norm(x, rm, rv, training=False)  # eval only reads them


def test_backward_out_bumps_version():
    torch = _torch()
    x, dy = torch.randn(4, 3), torch.randn(4, 3)
    _, mean, rstd = bncore.layer_norm_forward(x, 3)
    dx = torch.empty_like(x)
    v = dx._version
    bncore.layer_norm_backward(dy, x, 3, None, mean, rstd, out=dx)
    assert dx._version > v


# ------------------------------------------------------------------ thread safety of state objects

THREADS = 8


def _in_threads(work, count=THREADS):
    """Runs work(i) in `count` threads started together; re-raises the first failure."""
    barrier = threading.Barrier(count)
    errors = []

    def run(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _stats_bytes(stats):
    return stats.mean.tobytes(), stats.var.tobytes(), stats.count


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_shared_by_threads_equal_serial(momentum):
    rng = np.random.default_rng(0)
    mean, var = rng.standard_normal(64), rng.random(64) + 0.5
    shared, serial = bncore.RunningStats(64, momentum), bncore.RunningStats(64, momentum)
    for _ in range(THREADS * 1000):
        serial.update(mean, var, 16)
    _in_threads(lambda i: [shared.update(mean, var, 16) for _ in range(1000)])
    assert _stats_bytes(shared) == _stats_bytes(serial)
    assert shared.count == THREADS * 1000


def _batch(value, channels=100_000):
    return np.full((2, channels), value, np.float64)


def test_batch_norm_shared_by_threads_equal_serial():
    """The issue's repro. Constant data: every channel's update is the same elementwise arithmetic,
    so a serial run of a narrower layer gives each channel's exact value."""
    shared, serial = bncore.BatchNorm(100_000, dtype="float64"), bncore.BatchNorm(1000, dtype="float64")
    for _ in range(THREADS * 50):
        serial(_batch(0.75, 1000))
    x = _batch(0.75)
    _in_threads(lambda i: [shared(x) for _ in range(50)])
    assert np.ptp(shared.running_mean) == 0.0
    assert shared.running_mean[:1000].tobytes() == serial.running_mean.tobytes()
    assert shared.running_var[:1000].tobytes() == serial.running_var.tobytes()
    assert int(shared.num_batches_tracked) == THREADS * 50


def test_batch_norm_threads_with_different_data_stay_channel_consistent():
    """Inputs that do not commute: each update is still whole, so every channel saw the same sequence."""
    shared = bncore.BatchNorm(20_000, dtype="float64")
    _in_threads(lambda i: [shared(_batch(float(i), 20_000)) for _ in range(50)])
    assert np.ptp(shared.running_mean) == 0.0
    assert np.ptp(shared.running_var) == 0.0


def test_separate_objects_in_threads_equal_serial():
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal(32), rng.random(32) + 0.5) for _ in range(THREADS)]
    threaded = [bncore.RunningStats(32) for _ in range(THREADS)]
    serial = [bncore.RunningStats(32) for _ in range(THREADS)]
    for s, (m, v) in zip(serial, data):
        for _ in range(300):
            s.update(m, v, 8)
    _in_threads(lambda i: [threaded[i].update(*data[i], 8) for _ in range(300)])
    assert [_stats_bytes(s) for s in threaded] == [_stats_bytes(s) for s in serial]
    layers = [bncore.BatchNorm(1000, dtype="float64") for _ in range(THREADS)]
    serial_layers = [bncore.BatchNorm(1000, dtype="float64") for _ in range(THREADS)]
    for i, layer in enumerate(serial_layers):
        for _ in range(20):
            layer(_batch(float(i), 1000) + np.arange(2.0)[:, None])
    _in_threads(lambda i: [layers[i](_batch(float(i), 1000) + np.arange(2.0)[:, None]) for _ in range(20)])
    for a, b in zip(layers, serial_layers):
        assert _snapshot(a) == _snapshot(b)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_module_shared_by_threads(momentum):
    """A bncore.torch module's buffers (running statistics and batch counter) are updated one call
    at a time: same data gives the serial result bitwise, different data stays channel-consistent."""
    torch = _torch()
    import bncore.torch as bt

    def module():
        return bt.BatchNorm1d(20_000, momentum=momentum, dtype=torch.float64)

    same = torch.from_numpy(_batch(0.75, 20_000))
    shared, serial = module(), module()
    for _ in range(THREADS * 20):
        serial(same)
    _in_threads(lambda i: [shared(same) for _ in range(20)])
    assert torch.equal(shared.running_mean, serial.running_mean)
    assert torch.equal(shared.running_var, serial.running_var)
    assert int(shared.num_batches_tracked) == THREADS * 20
    mixed = module()
    _in_threads(lambda i: [mixed(torch.from_numpy(_batch(float(i), 20_000))) for _ in range(20)])
    assert float(mixed.running_mean.max() - mixed.running_mean.min()) == 0.0
    assert int(mixed.num_batches_tracked) == THREADS * 20


# ------------------------------------------------------------------ the docs' promises


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("running", [False, True])
@pytest.mark.parametrize("fn", ["batch_norm", "batch_norm_forward", "instance_norm"])
def test_functions_refuse_momentum_none_as_torch(fn, running, training):
    """batch_norm.md: a momentum that is not a number raises TypeError, used or not, as in torch."""
    torch = _torch()
    x = torch.randn(4, 3, 5)
    rs = (torch.zeros(3), torch.ones(3)) if running else (None, None)
    if fn == "instance_norm":
        with pytest.raises(TypeError):
            torch.nn.functional.instance_norm(x, *rs, use_input_stats=training, momentum=None)
        with pytest.raises(TypeError, match="momentum"):
            bncore.instance_norm(x, *rs, use_input_stats=training, momentum=None)
        return
    with pytest.raises(TypeError):
        torch.nn.functional.batch_norm(x, *rs, training=training, momentum=None)
    with pytest.raises(TypeError, match="momentum"):
        getattr(bncore, fn)(x, *rs, training=training, momentum=None)
    with pytest.raises(TypeError, match="momentum"):
        getattr(bncore, fn)(x.numpy(), *(None if r is None else r.numpy() for r in rs), training=training,
                            momentum=None)


def test_instance_norm_momentum_none_leaves_statistics_alone():
    """instance_norm.md: with momentum=None the running statistics do not move, as in torch."""
    torch = _torch()
    x = np.random.default_rng(2).standard_normal((2, 3, 5))
    layer = bncore.InstanceNorm(3, momentum=None, track_running_stats=True)
    ref = torch.nn.InstanceNorm1d(3, momentum=None, track_running_stats=True)
    layer(x)
    ref(torch.from_numpy(x).float())
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert torch.equal(ref.running_mean, torch.zeros(3)) and torch.equal(ref.running_var, torch.ones(3))


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_single_row_with_inf_or_nan_gets_nan_rstd(bad):
    """numerics.md: a one-row group holding inf or NaN gets a NaN rstd."""
    x = np.array([[1.0, bad, 2.0]])
    _, _, rstd = bncore.layer_norm_forward(x, 3)
    assert np.isnan(rstd).all()


def test_self_overlapping_outputs_refused():
    """guarantees.md: an output that overlaps itself (zero strides) is refused, nothing written."""
    x = np.random.default_rng(3).standard_normal((4, 3))
    out = np.lib.stride_tricks.as_strided(np.zeros(3), (4, 3), (0, 8))
    with pytest.raises(bncore.OverlapError):
        bncore.layer_norm(x, 3, out=out)
    rm = np.lib.stride_tricks.as_strided(np.zeros(1), (3,), (0,))
    with pytest.raises(bncore.OverlapError):
        bncore.batch_norm(x, rm, np.ones(3), training=True)
