"""Batch norm against PyTorch: torch.nn.functional.batch_norm with autograd, and
bncore.BatchNorm against torch.nn.BatchNorm2d over several training steps."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from tolerances import assert_close

torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
F = torch.nn.functional

STEPS = 10

# name -> (shape, memory format)
LAYOUTS = {
    "2d": ((32, 5), None),
    "3d": ((8, 4, 7), None),
    "4d-nchw": ((4, 3, 5, 6), None),
    "4d-channels-last": ((4, 3, 5, 6), "channels_last"),
    "5d": ((2, 3, 3, 4, 5), None),
    "5d-channels-last": ((2, 3, 3, 4, 5), "channels_last_3d"),
}


def make(gen, shape, fmt, dtype, offset=0.0):
    x = torch.randn(shape, generator=gen, dtype=dtype) * 1.7 + offset
    if fmt is not None:
        x = x.contiguous(memory_format=getattr(torch, fmt))
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_functional_training_steps_match_torch(layout, dtype):
    shape, fmt = LAYOUTS[layout]
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    weight = (torch.rand(c, generator=gen, dtype=tdtype) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=tdtype).requires_grad_()
    t_rm, t_rv = torch.zeros(c, dtype=tdtype), torch.ones(c, dtype=tdtype)
    b_rm, b_rv = np.zeros(c, dtype), np.ones(c, dtype)  # bncore's statistics in NumPy arrays
    for step in range(STEPS):
        x = make(gen, shape, fmt, tdtype, offset=0.3 * step).requires_grad_()
        dy = make(gen, shape, fmt, tdtype)
        y_t = F.batch_norm(x, t_rm, t_rv, weight, bias, training=True, momentum=0.1, eps=1e-5)
        y_t.backward(dy)
        y_b, mean, invstd = bncore.batch_norm_forward(x, b_rm, b_rv, weight, bias, training=True, momentum=0.1,
                                                      eps=1e-5)
        assert isinstance(y_b, torch.Tensor) and y_b.dtype == tdtype and y_b.shape == x.shape
        if fmt is not None:
            assert y_b.is_contiguous(memory_format=getattr(torch, fmt))
        dx, dw, db = bncore.batch_norm_backward(dy, x, weight, mean, invstd)
        msg = f"step {step}"
        assert_close(y_b, y_t, dtype, err_msg=msg)
        assert_close(b_rm, t_rm, dtype, err_msg=msg)
        assert_close(b_rv, t_rv, dtype, err_msg=msg)
        assert_close(dx, x.grad, dtype, "grad", err_msg=msg)
        assert_close(dw, weight.grad, dtype, "grad", err_msg=msg)
        assert_close(db, bias.grad, dtype, "grad", err_msg=msg)
        with torch.no_grad():  # an SGD step so that the parameters move
            weight -= 0.1 * weight.grad
            bias -= 0.1 * bias.grad
        weight.grad = None
        bias.grad = None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_functional_eval_matches_torch(layout, dtype):
    shape, fmt = LAYOUTS[layout]
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(1)
    c = shape[1]
    weight = (torch.rand(c, generator=gen, dtype=tdtype) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=tdtype).requires_grad_()
    rm = torch.randn(c, generator=gen, dtype=tdtype)
    rv = torch.rand(c, generator=gen, dtype=tdtype) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = make(gen, shape, fmt, tdtype, 0.5).requires_grad_()
    dy = make(gen, shape, fmt, tdtype)
    y_t = F.batch_norm(x, rm, rv, weight, bias, training=False)
    y_t.backward(dy)
    y_b, mean, invstd = bncore.batch_norm_forward(x, rm, rv, weight, bias, training=False)
    assert_close(y_b, y_t, dtype)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    dx, dw, db = bncore.batch_norm_backward(dy, x, weight, mean, invstd, training=False)
    assert_close(dx, x.grad, dtype, "grad")
    assert_close(dw, weight.grad, dtype, "grad")
    assert_close(db, bias.grad, dtype, "grad")


def test_functional_channels_last_axis_minus_one_matches_torch_nchw():
    """Channels-last data given as NHWC with axis=-1 is batch norm of its NCHW permutation."""
    gen = torch.Generator().manual_seed(2)
    x_nhwc = torch.randn(4, 5, 6, 3, generator=gen, dtype=torch.float64) + 1
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    y_t = F.batch_norm(x_nhwc.permute(0, 3, 1, 2), None, None, w, b, training=True).permute(0, 2, 3, 1)
    y_b = bncore.batch_norm(x_nhwc, None, None, w, b, training=True, axis=-1)
    assert_close(y_b, y_t, "float64")


# ---------------------------------------------------------------- the BatchNorm layer vs torch.nn.BatchNorm2d


def _sync_grads_and_step(t_bn, b_bn, lr=0.05):
    with torch.no_grad():
        t_bn.weight -= lr * t_bn.weight.grad
        t_bn.bias -= lr * t_bn.bias.grad
    t_bn.weight.grad = None
    t_bn.bias.grad = None
    b_bn.weight -= lr * b_bn.weight_grad.astype(b_bn.weight.dtype)
    b_bn.bias -= lr * b_bn.bias_grad.astype(b_bn.bias.dtype)


def _assert_state_equal(b_bn, t_bn, dtype, msg=""):
    t_state = t_bn.state_dict()
    b_state = b_bn.state_dict()
    assert set(b_state) == set(t_state), (set(b_state), set(t_state))
    for k, v in t_state.items():
        if k == "num_batches_tracked":
            assert int(b_state[k]) == int(v), f"{msg} {k}"
        else:
            assert_close(b_state[k], v, dtype, err_msg=f"{msg} {k}")


@pytest.mark.parametrize("input_kind", ["torch", "numpy"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_layer_matches_batchnorm2d_over_steps(momentum, channels_last, input_kind):
    gen = torch.Generator().manual_seed(3)
    c = 4
    t_bn = torch.nn.BatchNorm2d(c, momentum=momentum)
    b_bn = bncore.BatchNorm(c, momentum=momentum)
    for step in range(STEPS):
        x = make(gen, (6, c, 5, 5), "channels_last" if channels_last else None, torch.float32, 0.2 * step)
        dy = make(gen, x.shape, "channels_last" if channels_last else None, torch.float32)
        x_t = x.clone().requires_grad_()
        y_t = t_bn(x_t)
        y_t.backward(dy)
        if input_kind == "numpy":
            y_b = b_bn(x.numpy())
            dx_b = b_bn.backward(dy.numpy())
            assert isinstance(y_b, np.ndarray) and isinstance(dx_b, np.ndarray)
        else:
            y_b = b_bn(x)
            dx_b = b_bn.backward(dy)
            assert isinstance(y_b, torch.Tensor) and isinstance(dx_b, torch.Tensor)
        msg = f"step {step}"
        assert_close(y_b, y_t, "float32", err_msg=msg)
        assert_close(dx_b, x_t.grad, "float32", "grad", err_msg=msg)
        assert_close(b_bn.weight_grad, t_bn.weight.grad, "float32", "grad", err_msg=msg)
        assert_close(b_bn.bias_grad, t_bn.bias.grad, "float32", "grad", err_msg=msg)
        _sync_grads_and_step(t_bn, b_bn)
        _assert_state_equal(b_bn, t_bn, "float32", msg)
    assert int(b_bn.num_batches_tracked) == STEPS
    # and in eval mode, with the accumulated statistics
    t_bn.eval()
    b_bn.eval()
    x = make(gen, (3, c, 5, 5), None, torch.float32, 1.0)
    with torch.no_grad():
        y_t = t_bn(x)
    y_b = b_bn(x)
    assert_close(y_b, y_t, "float32")
    state_before = b_bn.state_dict()
    b_bn(x)
    for k, v in b_bn.state_dict().items():  # eval leaves the state alone
        assert v.tobytes() == state_before[k].tobytes(), k


def test_cumulative_average_is_the_mean_of_batch_statistics():
    """momentum=None: after k steps running_mean is the plain average of the k batch means."""
    rng = np.random.default_rng(4)
    b_bn = bncore.BatchNorm(3, momentum=None, dtype="float64")
    means, vars_ = [], []
    for step in range(STEPS):
        x = rng.normal(size=(5, 3, 4)) * (1 + step) + step
        b_bn(x)
        means.append(x.mean(axis=(0, 2)))
        vars_.append(x.var(axis=(0, 2), ddof=1))
    np.testing.assert_allclose(b_bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
    # running_var starts at 1, weight 1 / 1 on the first step: the average of the batch variances
    np.testing.assert_allclose(b_bn.running_var, np.mean(vars_, axis=0), rtol=1e-12)


def test_state_dict_round_trip_torch_bncore_torch():
    gen = torch.Generator().manual_seed(5)
    c = 3
    t_bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        t_bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        t_bn.bias.copy_(torch.randn(c, generator=gen))
    for _ in range(3):  # non-trivial running statistics
        t_bn(make(gen, (4, c, 3, 3), None, torch.float32, 2.0))
    # torch -> bncore
    b_bn = bncore.BatchNorm(c)
    b_bn.load_state_dict(t_bn.state_dict())
    _assert_state_equal(b_bn, t_bn, "float32")
    assert int(b_bn.num_batches_tracked) == 3
    for k, v in t_bn.state_dict().items():  # loaded exactly
        np.testing.assert_array_equal(b_bn.state_dict()[k], v.numpy(), err_msg=k)
    # bncore -> torch
    t_bn2 = torch.nn.BatchNorm2d(c)
    t_bn2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in b_bn.state_dict().items()})
    for k, v in t_bn.state_dict().items():
        assert torch.equal(t_bn2.state_dict()[k], v), k
    x = make(gen, (5, c, 4, 4), None, torch.float32, 1.0)
    for mode in ("eval", "train"):
        for m in (t_bn, b_bn, t_bn2):
            getattr(m, mode)()
        with torch.no_grad():
            y1 = t_bn(x)
            y3 = t_bn2(x)
        y2 = b_bn(x)
        assert torch.equal(y1, y3)
        assert_close(y2, y1, "float32", err_msg=mode)
    # the training step moved all three the same way
    _assert_state_equal(b_bn, t_bn, "float32")
    for k, v in t_bn.state_dict().items():
        assert torch.equal(t_bn2.state_dict()[k], v), k


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_track_running_stats_false_matches_torch(mode):
    gen = torch.Generator().manual_seed(6)
    c = 3
    t_bn = torch.nn.BatchNorm2d(c, track_running_stats=False)
    b_bn = bncore.BatchNorm(c, track_running_stats=False)
    assert b_bn.running_mean is None and b_bn.running_var is None
    assert set(b_bn.state_dict()) == set(t_bn.state_dict()) == {"weight", "bias"}
    getattr(t_bn, mode)()
    getattr(b_bn, mode)()
    for step in range(3):
        x = make(gen, (4, c, 3, 5), None, torch.float32, step).requires_grad_()
        dy = make(gen, x.shape, None, torch.float32)
        y_t = t_bn(x)
        y_t.backward(dy)
        y_b = b_bn(x)
        dx_b = b_bn.backward(dy)
        # batch statistics in both modes
        assert_close(y_b, y_t, "float32")
        assert_close(dx_b, x.grad, "float32", "grad")
        assert_close(b_bn.weight_grad, t_bn.weight.grad, "float32", "grad")
        t_bn.zero_grad()
    assert b_bn.running_mean is None


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_affine_false_matches_torch(mode):
    gen = torch.Generator().manual_seed(7)
    c = 5
    t_bn = torch.nn.BatchNorm2d(c, affine=False)
    b_bn = bncore.BatchNorm(c, affine=False)
    assert b_bn.weight is None and b_bn.bias is None
    assert set(b_bn.state_dict()) == set(t_bn.state_dict())
    for step in range(3):  # some statistics first
        t_bn(make(gen, (4, c, 3, 3), None, torch.float32, step))
        b_bn(make(gen, (4, c, 3, 3), None, torch.float32, step))
    b_bn.load_state_dict(t_bn.state_dict())
    getattr(t_bn, mode)()
    getattr(b_bn, mode)()
    x = make(gen, (4, c, 3, 3), None, torch.float32, 1.0).requires_grad_()
    dy = make(gen, x.shape, None, torch.float32)
    y_t = t_bn(x)
    y_t.backward(dy)
    y_b = b_bn(x)
    dx_b = b_bn.backward(dy)
    assert_close(y_b, y_t, "float32")
    assert_close(dx_b, x.grad, "float32", "grad")
    assert b_bn.weight_grad is None and b_bn.bias_grad is None
    _assert_state_equal(b_bn, t_bn, "float32")


@pytest.mark.parametrize("shape,torch_cls", [((16, 5), "BatchNorm1d"), ((8, 5, 7), "BatchNorm1d"),
                                             ((2, 5, 3, 4, 3), "BatchNorm3d")])
def test_layer_matches_batchnorm_1d_3d(shape, torch_cls):
    gen = torch.Generator().manual_seed(8)
    c = shape[1]
    t_bn = getattr(torch.nn, torch_cls)(c, momentum=0.3)
    b_bn = bncore.BatchNorm(c, momentum=0.3)
    for step in range(STEPS):
        x = make(gen, shape, None, torch.float32, step * 0.1).requires_grad_()
        dy = make(gen, shape, None, torch.float32)
        y_t = t_bn(x)
        y_t.backward(dy)
        y_b = b_bn(x)
        dx_b = b_bn.backward(dy)
        assert_close(y_b, y_t, "float32")
        assert_close(dx_b, x.grad, "float32", "grad")
        _sync_grads_and_step(t_bn, b_bn)
        _assert_state_equal(b_bn, t_bn, "float32", f"step {step}")
