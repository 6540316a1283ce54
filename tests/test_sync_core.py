"""bncore.sync driven by an in-process communicator (tests/sync_workers.ThreadGroup: one thread
per rank, an all-reduce that sums every rank's buffer): 1, 2, 64 and 1,024 simulated ranks
with random uneven sizes and empty ranks. Every rank must hold bitwise the same statistics,
equal to one process on the concatenated batch; a failing rank must not leave the others
hanging; and bncore.steps composed on one tensor must be the one-call batch norm."""
from __future__ import annotations

import numpy as np
import pytest
from sync_workers import ThreadGroup, split
from tolerances import assert_close

import bncore
from bncore import reference, steps, sync

CHANNELS, SPATIAL = 3, (2,)


def _sizes(world, rng):
    """Random uneven sizes in [0, 4], with empty ranks when world > 1 and more than one row overall."""
    sizes = rng.integers(0, 5, size=world)
    if world > 1:
        sizes[rng.integers(0, world)] = 0
        sizes[(np.flatnonzero(sizes == 0)[0] + 1) % world] = 3
    else:
        sizes[0] = max(sizes[0], 2)
    return sizes


def _batch(total, dtype, rng, steps_=2, mean=5.0):
    shape = (total, CHANNELS, *SPATIAL)
    return [((rng.normal(size=shape) * 2.0 + mean).astype(dtype), rng.normal(size=shape).astype(dtype))
            for _ in range(steps_)]


def _run(world, sizes, batches, dtype, momentum=0.1):
    """Every rank runs SyncBatchNorm forward + backward on its slice of each batch."""
    starts = split(sizes)
    group = ThreadGroup(world)

    def rank_fn(rank, comm):
        layer = bncore.SyncBatchNorm(CHANNELS, momentum=momentum, comm=comm, dtype=dtype)
        layer.weight[:] = np.linspace(0.5, 1.5, CHANNELS)
        layer.bias[:] = np.linspace(-1.0, 1.0, CHANNELS)
        out = []
        for x, dy in batches:
            rows = slice(starts[rank], starts[rank + 1])
            y = layer(x[rows])
            saved = layer._sync_saved
            out.append({"y": y, "dx": layer.backward(dy[rows]), "dw": layer.weight_grad, "db": layer.bias_grad,
                        "mean": saved.save_mean, "rstd": saved.save_rstd, "state": layer.state_dict()})
        return out

    results = group.run(rank_fn)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results, group


def _single_process(batches, dtype, momentum=0.1):
    layer = bncore.BatchNorm(CHANNELS, momentum=momentum, dtype=dtype)
    layer.weight[:] = np.linspace(0.5, 1.5, CHANNELS)
    layer.bias[:] = np.linspace(-1.0, 1.0, CHANNELS)
    out = []
    for x, dy in batches:
        y = layer(x)
        out.append({"y": y, "dx": layer.backward(dy), "dw": layer.weight_grad, "db": layer.bias_grad,
                    "state": layer.state_dict()})
    return out


@pytest.mark.parametrize("world,dtype,mean", [(1, "float64", 5.0), (2, "float64", 5.0), (64, "float64", 5.0),
                                              (1024, "float64", 5.0), (1024, "float64", 1e4), (2, "float32", 5.0),
                                              (64, "float32", 5.0), (64, "float32", 1e4)])
def test_every_rank_gets_the_same_statistics_as_one_process(world, dtype, mean):
    rng = np.random.default_rng(world)
    sizes = _sizes(world, rng)
    batches = _batch(int(sizes.sum()), dtype, rng, mean=mean)
    results, group = _run(world, sizes, batches, dtype)
    assert group.calls == 2 * len(batches)  # one all-reduce forward, one backward, per step
    single = _single_process(batches, dtype)
    # a large mean loses digits in x - mean in any implementation: the condition number mean / std
    # (std 2 here) scales the table's tolerances, which leave about 100 ulps
    scale = max(1.0, mean / 2.0 / 100.0)
    for step, (x, dy) in enumerate(batches):
        ranks = [r[step] for r in results]
        for key in ("mean", "rstd"):
            for r in ranks:
                np.testing.assert_array_equal(r[key], ranks[0][key])  # bitwise, on every rank
        for r in ranks:
            for key, value in r["state"].items():
                np.testing.assert_array_equal(value, ranks[0]["state"][key])
        y = np.concatenate([r["y"] for r in ranks])
        dx = np.concatenate([r["dx"] for r in ranks])
        dw, db = sum(r["dw"] for r in ranks), sum(r["db"] for r in ranks)
        ref_y, ref_mean, ref_rstd = reference.batch_norm_ref(x, np.linspace(0.5, 1.5, CHANNELS),
                                                             np.linspace(-1.0, 1.0, CHANNELS))
        ref_dx, ref_dw, ref_db = reference.batch_norm_backward_ref(dy, x, np.linspace(0.5, 1.5, CHANNELS))
        assert_close(ranks[0]["mean"], ref_mean, dtype, scale=scale)
        assert_close(ranks[0]["rstd"], ref_rstd, dtype, scale=scale)
        single_step = single[step]
        for got, mine, ref, kind in ((y, single_step["y"], ref_y, "value"), (dx, single_step["dx"], ref_dx, "grad"),
                                     (dw, single_step["dw"], ref_dw, "grad"), (db, single_step["db"], ref_db, "grad")):
            assert_close(got, mine, dtype, kind, scale=scale)
            assert_close(got, ref, dtype, kind, scale=scale)
        for key in ("running_mean", "running_var"):
            assert_close(ranks[0]["state"][key], single[step]["state"][key], dtype, scale=scale)
        assert int(ranks[0]["state"]["num_batches_tracked"]) == step + 1


def test_cumulative_average_and_channels_last_axis():
    rng = np.random.default_rng(5)
    sizes = np.array([2, 0, 1, 3])
    batches = [(np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy())
               for x, dy in _batch(int(sizes.sum()), "float64", rng, 3)]
    starts = split(sizes)

    def rank_fn(rank, comm):
        layer = bncore.SyncBatchNorm(CHANNELS, momentum=None, comm=comm, axis=-1, dtype="float64")
        for x, dy in batches:
            layer(x[starts[rank]:starts[rank + 1]])
            layer.backward(dy[starts[rank]:starts[rank + 1]])
        return layer.state_dict()

    states = ThreadGroup(4).run(rank_fn)
    plain = bncore.BatchNorm(CHANNELS, momentum=None, axis=-1, dtype="float64")
    for x, _dy in batches:
        plain(x)
    for state in states:
        for key, value in plain.state_dict().items():
            assert_close(state[key], value, "float64")


def _fail_run(world, bad_input=(), bad_grad=()):
    """Ranks in bad_input get a wrong channel count, ranks in bad_grad a wrong grad shape."""
    def rank_fn(rank, comm):
        layer = bncore.SyncBatchNorm(CHANNELS, comm=comm, dtype="float64")
        before = {k: v.copy() for k, v in layer.state_dict().items()}
        x = np.arange(4.0 * (CHANNELS + (rank in bad_input))).reshape(2, CHANNELS + (rank in bad_input), 2)
        try:
            layer(x)
            dy = np.ones((2, CHANNELS, 3 if rank in bad_grad else 2))
            layer.backward(dy)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            error = exc
        else:
            error = None
        after = layer.state_dict()
        unchanged = all(np.array_equal(before[k], after[k]) for k in before)
        # the group is still in step: one more, good, training step works everywhere
        layer(np.arange(12.0).reshape(2, CHANNELS, 2))
        return error, unchanged

    return ThreadGroup(world, timeout=30.0).run(rank_fn)


def test_a_rank_with_a_bad_input_raises_its_own_error_and_the_others_name_it():
    results = _fail_run(4, bad_input=(2,))
    for rank, (error, unchanged) in enumerate(results):
        assert unchanged, rank
        if rank == 2:
            assert type(error) is ValueError and "expected 3 channels" in str(error)
        else:
            assert isinstance(error, sync.SyncError) and error.failed_ranks == (2,)
            assert "rank 2 of 4" in str(error)


def test_several_failing_ranks_are_all_named():
    results = _fail_run(5, bad_input=(0, 3))
    for rank, (error, _) in enumerate(results):
        if rank in (0, 3):
            assert type(error) is ValueError
        else:
            assert isinstance(error, sync.SyncError) and error.failed_ranks == (0, 3)


def test_a_rank_with_a_bad_gradient_fails_the_backward_everywhere():
    results = _fail_run(3, bad_grad=(1,))
    for rank, (error, _) in enumerate(results):
        if rank == 1:
            assert isinstance(error, bncore.BncoreError) and not isinstance(error, sync.SyncError)
        else:
            assert isinstance(error, sync.SyncError) and error.failed_ranks == (1,)
            assert "rank 1 of 3" in str(error)


def test_one_value_over_all_ranks_is_refused_on_every_rank():
    sizes = [0, 1, 0]

    def rank_fn(rank, comm):
        layer = bncore.SyncBatchNorm(CHANNELS, comm=comm)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            layer(np.ones((sizes[rank], CHANNELS), np.float32))
        return int(layer.num_batches_tracked)

    assert ThreadGroup(3).run(rank_fn) == [0, 0, 0]


def test_all_ranks_empty():
    def rank_fn(rank, comm):
        layer = bncore.SyncBatchNorm(CHANNELS, comm=comm)
        y = layer(np.ones((0, CHANNELS, 4), np.float32))
        dx = layer.backward(np.ones((0, CHANNELS, 4), np.float32))
        return y.shape, dx.shape, layer.running_mean.copy()

    for y_shape, dx_shape, mean in ThreadGroup(2).run(rank_fn):
        assert y_shape == dx_shape == (0, CHANNELS, 4)
        np.testing.assert_array_equal(mean, np.zeros(CHANNELS))


def _refusing_collective(rank=0, world=2):
    def allreduce(buffer):
        raise AssertionError("no collective expected")
    return sync.Collective(allreduce, rank, world)


def test_eval_makes_no_collective():
    layer = bncore.SyncBatchNorm(CHANNELS, comm=_refusing_collective())
    layer.eval()
    x = np.random.default_rng(0).normal(size=(4, CHANNELS, 2)).astype(np.float32)
    plain = bncore.BatchNorm(CHANNELS).eval()
    np.testing.assert_array_equal(layer(x), plain(x))
    np.testing.assert_array_equal(layer.backward(x), plain.backward(x))


def test_backward_without_input_gradient_makes_no_collective():
    x = np.random.default_rng(1).normal(size=(4, CHANNELS, 2))
    _, saved = sync.sync_batch_norm_forward(x, comm=sync.Collective(lambda b: None, 0, 1), num_features=CHANNELS)
    dx, dw, db = sync.sync_batch_norm_backward(x, saved, comm=_refusing_collective(), input_grad=False)
    _, ref_dw, ref_db = bncore.batch_norm_backward(x, x, np.ones(CHANNELS), saved.save_mean, saved.save_rstd)
    assert dx is None
    np.testing.assert_array_equal(dw, ref_dw)
    np.testing.assert_array_equal(db, ref_db)


def test_buffer_sizes():
    seen = []

    def allreduce(buffer):
        assert buffer.dtype == np.float64 and buffer.flags.c_contiguous
        seen.append(buffer.shape)

    layer = bncore.SyncBatchNorm(5, comm=sync.Collective(allreduce, 2, 7))
    x = np.ones((3, 5, 4), np.float32)
    layer(x)
    assert seen == [(7, 11)]  # world x (2C + 1): rows of the other ranks stay zero, so count 0 there
    layer.backward(x)
    assert seen[1] == (12,)  # 2C sums and 2 failure-agreement values


def test_state_dict_round_trip_and_protocol():
    layer = bncore.SyncBatchNorm(CHANNELS, comm=sync.Collective(lambda b: None, 0, 1), dtype="float64")
    x = np.random.default_rng(2).normal(size=(5, CHANNELS))
    layer(x)
    other = bncore.SyncBatchNorm(CHANNELS, comm=sync.Collective(lambda b: None, 0, 1), dtype="float64")
    other.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[key], value)
    assert isinstance(layer, bncore.BatchNorm) and layer.train() is layer and not layer.eval().training


def test_collective_arguments_are_checked():
    with pytest.raises(TypeError, match="comm"):
        bncore.SyncBatchNorm(3, comm=object())
    with pytest.raises(TypeError, match="allreduce"):
        sync.Collective(None, 0, 1)
    with pytest.raises(ValueError, match="rank"):
        sync.Collective(lambda b: None, 2, 2)


# ---------------------------------------------------------------- the steps, composed on one process


@pytest.mark.parametrize("shape,axis", [((6, 4, 5, 3), 1), ((7, 3), 1), ((4, 3, 2, 5), -1)])
def test_steps_over_halves_compose_to_the_one_call_batch_norm(shape, axis):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape) * 3.0 + 1e4  # a large mean: the merge must not cancel
    dy = rng.normal(size=shape)
    channels = shape[axis]
    w, b = np.linspace(0.5, 1.5, channels), np.linspace(-1, 1, channels)
    half = shape[0] // 2
    parts = []
    for rows in (slice(0, half), slice(half, None)):
        mean, m2 = np.empty(channels), np.empty(channels)
        parts.append((np.full(channels, float(steps.stats(x[rows], mean, m2, axis=axis))), mean, m2))
    count, mean, m2 = np.empty(channels), np.empty(channels), np.empty(channels)
    steps.merge(*parts[0], *parts[1], count, mean, m2)
    rm, rv = np.zeros(channels), np.ones(channels)
    y, sm, sr = steps.forward(x, mean, m2, int(count[0]), w, b, axis=axis, running_mean=rm, running_var=rv)
    ref_rm, ref_rv = np.zeros(channels), np.ones(channels)
    ref_y, ref_sm, ref_sr = bncore.batch_norm_forward(x, ref_rm, ref_rv, w, b, training=True, axis=axis)
    ref = reference.batch_norm_ref(x, w, b, axis=axis)
    assert_close(y, ref[0], "float64")
    assert_close(y, ref_y, "float64")
    assert_close(rv, ref_rv, "float64")
    sum_dy, sum_dy_xhat = np.zeros(channels), np.zeros(channels)
    for rows in (slice(0, half), slice(half, None)):
        s1, s2 = np.empty(channels), np.empty(channels)
        steps.backward_reduce(dy[rows], x[rows], sm, sr, s1, s2, axis=axis)
        sum_dy += s1
        sum_dy_xhat += s2
    dx = steps.backward_apply(dy, x, w, sm, sr, sum_dy, sum_dy_xhat, int(count[0]), axis=axis)
    ref_dx, ref_dw, ref_db = bncore.batch_norm_backward(dy, x, w, ref_sm, ref_sr, axis=axis)
    assert_close(dx, ref_dx, "float64", "grad")
    assert_close(dx, reference.batch_norm_backward_ref(dy, x, w, axis=axis)[0], "float64", "grad")
    assert_close(sum_dy_xhat, ref_dw, "float64", "grad")
    assert_close(sum_dy, ref_db, "float64", "grad")


def test_backward_steps_on_a_part_with_one_element_per_channel():
    """A rank holding one element of a larger group: its part of the sums and of dx is not zero
    (the one-element rule of the C core looks at the count behind the statistics)."""
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    dy = np.array([[1.0], [0.0], [0.0], [0.0]])
    mean, m2 = np.empty(1), np.empty(1)
    count = steps.stats(x, mean, m2)
    _, sm, sr = steps.forward(x, mean, m2, count)
    sum_dy, sum_dy_xhat = np.empty(1), np.empty(1)
    steps.backward_reduce(dy[:1], x[:1], sm, sr, sum_dy, sum_dy_xhat)  # the rank holding row 0 alone
    np.testing.assert_allclose(sum_dy_xhat, dy[0] * (x[0] - sm) * sr)
    whole = steps.backward_apply(dy, x, None, sm, sr, sum_dy, sum_dy_xhat, count)
    part = steps.backward_apply(dy[:1], x[:1], None, sm, sr, sum_dy, sum_dy_xhat, count)
    np.testing.assert_allclose(part, whole[:1])


def test_steps_on_the_whole_tensor_are_bitwise_the_one_call_forward():
    x = np.random.default_rng(4).normal(size=(8, 5, 7, 3)).astype(np.float32)
    mean, m2 = np.empty(5), np.empty(5)
    count = steps.stats(x, mean, m2)
    y, sm, sr = steps.forward(x, mean, m2, count)
    ref_y, ref_sm, ref_sr = bncore.batch_norm_forward(x, training=True)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(sm, ref_sm)
    np.testing.assert_array_equal(sr, ref_sr)


def test_forward_step_tells_autograd_it_wrote_torch_running_statistics():
    # SyncBatchNorm's module relies on it: the step's write is the one version bump
    torch = pytest.importorskip("torch", reason="the version counters are PyTorch's")
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    mean, m2 = np.empty(5), np.empty(5)
    count = steps.stats(x, mean, m2)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    before = rm._version, rv._version
    steps.forward(x, mean, m2, count, running_mean=rm, running_var=rv, momentum=0.1)
    assert rm._version > before[0] and rv._version > before[1]
    np.testing.assert_allclose(rm.numpy(), 0.1 * mean)


def test_steps_name_missing_outputs():
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match="mean"):
        steps.stats(x, None, np.empty(3))
    with pytest.raises(bncore.ShapeMismatchError):
        steps.stats(x, np.empty(4), np.empty(4))
