"""bncore.torch.SyncBatchNorm with real processes: gloo on 127.0.0.1, 2 and 3 ranks.

Each run starts its ranks once (tests/sync_workers.py) and they compute every case of
their world size; here each case is compared with one process running bncore's plain
batch norm on the concatenated batch, and with the float64 reference. Uneven sizes, an
empty rank, one-row ranks, channels-last, 2-D to 5-D, several steps, momentum=None; then
DDP training of a small CNN against single-process training, and the module's own
semantics (no process group, convert_sync_batchnorm, the constructor).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import sync_workers as W  # noqa: E402
from tolerances import assert_close  # noqa: E402

import bncore.torch as bt  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _load(out_dir, kind, world):
    return [dict(np.load(out_dir / f"{kind}-{r}.npz")) for r in range(world)]


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    runs = {}
    for world in (2, 3):
        out = tmp_path_factory.mktemp(f"gloo{world}")
        W.run_ranks("torch", world, out)
        runs[world] = _load(out, "torch", world)
    return runs


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    W.run_ranks("ddp", 2, out)
    return _load(out, "ddp", 2)


@pytest.mark.mpi
@pytest.mark.parametrize("name", W.cases(W.TORCH_CASES))
def test_ranks_equal_one_process_on_the_concatenation(gloo_runs, name):
    world, sizes, channels, spatial, dtype, channels_last, momentum, nsteps = W.TORCH_CASES[name]
    ranks = gloo_runs[world]
    key = f"{name}/{{}}/{{}}".format
    for step, (_, _, mine, ref) in enumerate(W.single_process(name, sizes, channels, spatial, dtype, momentum,
                                                              nsteps)):
        y = np.concatenate([r[key(step, "y")] for r in ranks])
        dx = np.concatenate([r[key(step, "dx")] for r in ranks])
        # grad_weight / grad_bias: each rank's own contribution, which sum to the whole batch's
        dw, db = sum(r[key(step, "dw")] for r in ranks), sum(r[key(step, "db")] for r in ranks)
        for expected in (mine, ref):
            assert_close(y, expected["y"], dtype, err_msg=f"{name} step {step} y")
            assert_close(dx, expected["dx"], dtype, "grad", err_msg=f"{name} step {step} dx")
            assert_close(dw, expected["dw"], dtype, "grad", err_msg=f"{name} step {step} dw")
            assert_close(db, expected["db"], dtype, "grad", err_msg=f"{name} step {step} db")
        for stat in ("running_mean", "running_var"):
            for r in ranks:  # every rank holds bitwise the same running statistics
                np.testing.assert_array_equal(r[key(step, stat)], ranks[0][key(step, stat)])
            assert_close(ranks[0][key(step, stat)], mine[stat], dtype, err_msg=f"{name} step {step} {stat}")
            assert_close(ranks[0][key(step, stat)], ref[stat], dtype, err_msg=f"{name} step {step} {stat}")
        assert all(int(r[key(step, "num_batches_tracked")]) == step + 1 for r in ranks)
        if channels_last:  # outputs and input gradients keep the input's memory format
            assert all(bool(r[key(step, "y_channels_last")]) and bool(r[key(step, "dx_channels_last")])
                       for r in ranks)


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(W.TORCH_CASES))
def test_eval_uses_the_synchronized_running_statistics(gloo_runs, name):
    import bncore

    world, sizes, channels, spatial, dtype, _, momentum, nsteps = W.TORCH_CASES[name]
    ranks = gloo_runs[world]
    steps = W.single_process(name, sizes, channels, spatial, dtype, momentum, nsteps)
    x_last, _, mine, _ = steps[-1]
    starts = W.split(sizes)
    for r, res in enumerate(ranks):
        expected = bncore.batch_norm(x_last[starts[r]:starts[r + 1]], mine["running_mean"], mine["running_var"],
                                     np.linspace(0.5, 1.5, channels).astype(dtype),
                                     np.linspace(-1.0, 1.0, channels).astype(dtype))
        assert_close(res[f"{name}/eval/y"], expected, dtype)


@pytest.mark.mpi
def test_a_bad_rank_raises_its_error_and_the_others_name_it(gloo_runs):
    for world, ranks in gloo_runs.items():
        bad = world - 1
        for r, res in enumerate(ranks):
            error = str(res["failure/error"])
            if r == bad:
                assert error.startswith("ValueError") and "expected 3 channels" in error, error
            else:
                assert error.startswith("SyncError") and f"rank {bad} of {world}" in error, error
                assert tuple(res["failure/failed_ranks"]) == (bad,)
            assert bool(res["failure/unchanged"])
        # the group is still in step: the next forward combined every rank's rows 0 .. 6 (rank + 1) - 1
        means = [res["failure/next_running_mean"] for res in ranks]
        assert all(np.array_equal(m, means[0]) for m in means)
        rows = np.concatenate([np.arange(6.0 * (r + 1)).reshape(r + 1, 3, 2) for r in range(world)])
        np.testing.assert_allclose(means[0], 0.1 * rows.mean(axis=(0, 2)), rtol=1e-6)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ddp_training_equals_single_process_training(ddp_run, dtype):
    model = bt.convert(W.small_cnn(7, dtype, torch.nn.BatchNorm2d))  # bncore's plain batch norm
    losses, state = W.train(model, W.ddp_batches(dtype), slice(None), dtype)
    # each rank's loss is the mean over its half: their mean is the whole batch's loss
    ddp_losses = np.mean([r[f"{dtype}/losses"] for r in ddp_run], axis=0)
    assert_close(ddp_losses, losses, dtype, "grad")
    for key, value in state.items():
        for r in ddp_run:
            assert_close(r[f"{dtype}/state/{key}"], value, dtype, "grad", err_msg=key)


def test_without_a_process_group_it_is_plain_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    sync, plain = bt.SyncBatchNorm(4, momentum=None).double(), bt.BatchNorm2d(4, momentum=None).double()
    for _ in range(2):
        xs, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ys, yp = sync(xs), plain(xp)
        ys.backward(torch.ones_like(ys) * xs.detach())
        yp.backward(torch.ones_like(yp) * xp.detach())
        assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad)
    for a, b in zip(sync.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    sync.eval()
    plain.eval()
    assert torch.equal(sync(x), plain(x))


def test_input_checks_are_torch_s():
    layer = bt.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        layer(torch.ones(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        bt.SyncBatchNorm(0)(torch.ones(2, 0))


def test_constructor_matches_torch_s():
    ours = inspect.signature(bt.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]
    layer = bt.SyncBatchNorm(5)
    reference = torch.nn.SyncBatchNorm(5)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats, layer.process_group) == \
        (reference.eps, reference.momentum, reference.affine, reference.track_running_stats, None)
    assert list(layer.state_dict()) == list(reference.state_dict())


def test_convert_sync_batchnorm_keeps_every_tensor_and_converts_nested_modules():
    inner = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1), torch.nn.BatchNorm3d(3, momentum=None))
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2, affine=False), inner, torch.nn.SyncBatchNorm(4),
                                torch.nn.BatchNorm2d(6, track_running_stats=False))
    model[1][1].eval()
    model[1][1].qconfig = "q"
    before = [(m, dict(m.named_parameters(recurse=False)), dict(m.named_buffers(recurse=False)))
              for m in (model[0], model[1][1], model[2], model[3])]
    group = object()
    converted = bt.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    after = (model[0], model[1][1], model[2], model[3])
    for new, (old, params, buffers) in zip(after, before):
        assert type(new) is bt.SyncBatchNorm and new.process_group is group
        assert (new.num_features, new.eps, new.momentum, new.affine, new.track_running_stats) == \
            (old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
        assert new.training == old.training
        for name, tensor in {**params, **buffers}.items():
            assert getattr(new, name) is tensor, name
        assert not any(t.is_meta for t in new.state_dict().values())
    assert model[1][1].qconfig == "q" and not model[1][1].training
    assert model[3].running_mean is None
    alone = bt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert type(alone) is bt.SyncBatchNorm
    no_bias = torch.nn.BatchNorm2d(3, bias=False)
    converted = bt.SyncBatchNorm.convert_sync_batchnorm(no_bias)
    assert converted.bias is None and converted.weight is no_bias.weight
