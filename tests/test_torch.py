"""Every variant against PyTorch: torch.nn.functional with autograd, and bncore's layers against the
torch.nn modules over several training steps, every dtype (float32, float64, float16, bfloat16,
mixed half inputs with float32 parameters), and against the float64 reference as well.

A half result of PyTorch is itself rounded to half, so bncore is compared to PyTorch with twice the
half tolerance *and* to the float64 reference with the plain one.
"""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from cases import (CASES, bncore_backward, bncore_forward, data, params, ref_backward, ref_forward, ref_running,
                   seed_of, torch_forward)
from tolerances import assert_close, to_numpy64

torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
F = torch.nn.functional

# torch.rms_norm warns that float32 weights with half inputs take its unfused path: that is the point
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")


# ================================================================ batch norm

BN_STEPS = 10

# name -> (shape, memory format)
BN_LAYOUTS = {
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
@pytest.mark.parametrize("layout", list(BN_LAYOUTS))
def test_functional_training_steps_match_torch(layout, dtype):
    shape, fmt = BN_LAYOUTS[layout]
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    weight = (torch.rand(c, generator=gen, dtype=tdtype) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=tdtype).requires_grad_()
    t_rm, t_rv = torch.zeros(c, dtype=tdtype), torch.ones(c, dtype=tdtype)
    b_rm, b_rv = np.zeros(c, dtype), np.ones(c, dtype)  # bncore's statistics in NumPy arrays
    for step in range(BN_STEPS):
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
@pytest.mark.parametrize("layout", list(BN_LAYOUTS))
def test_functional_eval_matches_torch(layout, dtype):
    shape, fmt = BN_LAYOUTS[layout]
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
    for step in range(BN_STEPS):
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
    assert int(b_bn.num_batches_tracked) == BN_STEPS
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
    for step in range(BN_STEPS):
        x = rng.normal(size=(5, 3, 4)) * (1 + step) + step
        b_bn(x)
        means.append(x.mean(axis=(0, 2)))
        vars_.append(x.var(axis=(0, 2), ddof=1))
    np.testing.assert_allclose(b_bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
    # running_var starts at 1, weight 1 / 1 on the first step: the average of the batch variances
    np.testing.assert_allclose(b_bn.running_var, np.mean(vars_, axis=0), rtol=1e-12)


def test_batchnorm_state_dict_round_trip_torch_bncore_torch():
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
    for step in range(BN_STEPS):
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


# ================================================================ every variant of the case table, and the other layers


DTYPES = ["float32", "float64", "float16", "bfloat16"]
HALF = ("float16", "bfloat16")
# bncore vs PyTorch: both results are rounded to the input dtype, so up to twice the reference distance
VS_TORCH_SCALE = {"float16": 2.0, "bfloat16": 2.0, "float32": 1.0, "float64": 1.0}

# (dtype, parameter dtype): half inputs with half or float32 (mixed) parameters
DTYPE_MODES = [("float32", "float32"), ("float64", "float64"), ("float16", "float16"), ("float16", "float32"),
               ("bfloat16", "bfloat16"), ("bfloat16", "float32")]


def mode_id(m):
    return m[0] if m[0] == m[1] else f"{m[0]}-params-{m[1]}"


def stat_dtype(dtype):
    return "float32" if dtype in HALF else dtype


def param_grad_tolerances(dtype, pdtype):
    """(tolerance dtype, scale) for parameter gradients against the reference: float32 sums of
    exact half values in mixed mode (float32's own tolerance), else the input's."""
    if dtype in HALF and pdtype == "float32":
        return "float32", 1
    return dtype, 1


def _t(a, dtype):
    """A torch tensor of `dtype` from float64 NumPy data (None stays None)."""
    return None if a is None else torch.from_numpy(np.asarray(a, np.float64)).to(getattr(torch, dtype))


def _check_saved(case, saved, x64, w64, b64, dtype, ref_kwargs):
    _, m_ref, r_ref = ref_forward(case, x64, w64, b64, dtype=dtype, **ref_kwargs)
    m, r = saved
    sdt = getattr(torch, stat_dtype(dtype))
    assert r.dtype == sdt, f"save_rstd: expected {sdt}, got {r.dtype}"
    assert tuple(r.shape) == case.stat_shape
    # statistics of the exact input values, kept in float32 for half inputs: float32's tolerance
    assert_close(r, r_ref, stat_dtype(dtype), err_msg="save_rstd")
    if case.kind == "rms":
        assert m is None
    else:
        assert m.dtype == sdt and tuple(m.shape) == case.stat_shape
        assert_close(m, m_ref, stat_dtype(dtype), err_msg="save_mean")


@pytest.mark.parametrize("mode", DTYPE_MODES, ids=mode_id)
@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "instance"], ids=repr)
def test_functional_matches_torch_and_reference(case, mode):
    dtype, pdtype = mode
    rng = np.random.default_rng(seed_of("torch", case.name, mode))
    x64 = data(rng, case.shape, offset_axis=1)
    dy64 = rng.normal(size=case.shape)
    w64, b64 = params(rng, case.param_shape, np.float64, bias=case.has_bias)
    # the problem in the input dtype; the reference sees the exact (rounded) values
    x, dy = _t(x64, dtype), _t(dy64, dtype)
    w, b = _t(w64, pdtype), _t(b64, pdtype)
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    w64, b64 = to_numpy64(w), (None if b is None else to_numpy64(b))

    xt = x.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    bt = None if b is None else b.clone().requires_grad_()
    y_t = torch_forward(case, xt, wt, bt)
    y_t.backward(dy)

    y, saved = bncore_forward(case, x, w, b)
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.shape == x.shape
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and dw.shape == w.shape
    y_ref, _, _ = ref_forward(case, x64, w64, b64, dtype=dtype)
    dx_ref, dw_ref, db_ref = ref_backward(case, dy64, x64, w64, dtype=dtype)

    s = VS_TORCH_SCALE[dtype]
    assert_close(y, y_t, dtype, scale=s, err_msg="output vs torch")
    assert_close(y, y_ref, dtype, err_msg="output vs reference")
    _check_saved(case, saved, x64, w64, b64, dtype, {})
    assert_close(dx, xt.grad, dtype, "grad", scale=s, err_msg="grad_input vs torch")
    assert_close(dx, dx_ref, dtype, "grad", err_msg="grad_input vs reference")
    # parameter gradients: bncore's are sums in the parameters' dtype; torch's mixed-mode ones are
    # rounded through the input's half dtype, so they are compared with the input dtype's tolerance
    pt, pscale = param_grad_tolerances(dtype, pdtype)
    assert_close(dw, wt.grad, dtype, "grad", scale=s, err_msg="grad_weight vs torch")
    assert_close(dw, dw_ref, pt, "grad", scale=pscale, err_msg="grad_weight vs reference")
    if case.has_bias:
        assert db.dtype == b.dtype
        assert_close(db, bt.grad, dtype, "grad", scale=s, err_msg="grad_bias vs torch")
        assert_close(db, db_ref, pt, "grad", scale=pscale, err_msg="grad_bias vs reference")
    else:
        assert db is None


@pytest.mark.parametrize("mode", DTYPE_MODES, ids=mode_id)
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "instance"], ids=repr)
def test_instance_norm_running_stats_match_torch(case, mode):
    """use_input_stats=True over 3 steps updates the running statistics as PyTorch does (average over
    the batch of the instances' mean and unbiased variance); use_input_stats=False then normalizes
    with them, and its gradient treats them as constants."""
    dtype, pdtype = mode
    rng = np.random.default_rng(seed_of("instance", case.name, mode))
    c = case.shape[1]
    w64, b64 = params(rng, (c,), np.float64)
    w, b = _t(w64, pdtype), _t(b64, pdtype)
    w64, b64 = to_numpy64(w), to_numpy64(b)
    rm_t, rv_t = _t(rng.normal(size=c), pdtype), _t(rng.uniform(0.5, 2, size=c), pdtype)
    rm_b, rv_b = rm_t.clone(), rv_t.clone()  # bncore's, updated in place
    rm_ref, rv_ref = to_numpy64(rm_t).copy(), to_numpy64(rv_t).copy()  # copies: torch updates rm_t in place
    momentum = 0.3
    s = VS_TORCH_SCALE[dtype]
    for step, use_input_stats in enumerate([True, True, True, False]):
        msg = f"step {step} use_input_stats={use_input_stats}"
        x = _t(data(rng, case.shape) + 0.5 * step, dtype)
        dy = _t(rng.normal(size=case.shape), dtype)
        x64, dy64 = to_numpy64(x), to_numpy64(dy)
        xt, wt, bt = (a.clone().requires_grad_() for a in (x, w, b))
        y_t = torch_forward(case, xt, wt, bt, rm_t, rv_t, use_input_stats, momentum)
        y_t.backward(dy)
        rm_before, rv_before = rm_b.clone(), rv_b.clone()
        y, saved = bncore_forward(case, x, w, b, rm_b, rv_b, use_input_stats, momentum)
        dx, dw, db = bncore_backward(case, dy, x, w, saved, use_input_stats)
        stats = dict(rm=rm_ref, rv=rv_ref, use_input_stats=use_input_stats)
        y_ref, _, _ = ref_forward(case, x64, w64, b64, dtype=dtype, **stats)
        dx_ref, dw_ref, db_ref = ref_backward(case, dy64, x64, w64, dtype=dtype, **stats)
        _check_saved(case, saved, x64, w64, b64, dtype,
                     dict(rm=rm_ref, rv=rv_ref, use_input_stats=use_input_stats))
        assert_close(y, y_t, dtype, scale=s, err_msg=f"{msg}: output vs torch")
        assert_close(y, y_ref, dtype, err_msg=f"{msg}: output vs reference")
        assert_close(dx, xt.grad, dtype, "grad", scale=s, err_msg=f"{msg}: grad_input vs torch")
        assert_close(dx, dx_ref, dtype, "grad", err_msg=f"{msg}: grad_input vs reference")
        for got, t_grad, ref, name in ((dw, wt.grad, dw_ref, "grad_weight"), (db, bt.grad, db_ref, "grad_bias")):
            assert got.dtype == w.dtype
            pt, pscale = param_grad_tolerances(dtype, pdtype)
            assert_close(got, t_grad, dtype, "grad", scale=s, err_msg=f"{msg}: {name} vs torch")
            assert_close(got, ref, pt, "grad", scale=pscale, err_msg=f"{msg}: {name} vs reference")
        # running statistics: their own dtype kept, updated like torch's, or untouched
        assert rm_b.dtype == rm_t.dtype and rv_b.dtype == rv_t.dtype
        if use_input_stats:
            rm_ref, rv_ref = ref_running(case, x64, rm_ref, rv_ref, momentum)
            assert not torch.equal(rm_b, rm_before)
        else:
            assert torch.equal(rm_b, rm_before) and torch.equal(rv_b, rv_before)
        assert_close(rm_b, rm_t, pdtype, err_msg=f"{msg}: running_mean vs torch")
        assert_close(rv_b, rv_t, pdtype, err_msg=f"{msg}: running_var vs torch")
        # stored in the statistics' dtype: one rounding of the float64 update
        assert_close(rm_b, rm_ref, pdtype, scale=2, err_msg=f"{msg}: running_mean vs reference")
        assert_close(rv_b, rv_ref, pdtype, scale=2, err_msg=f"{msg}: running_var vs reference")
        rm_ref, rv_ref = to_numpy64(rm_b).copy(), to_numpy64(rv_b).copy()  # follow the stored (rounded) values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "instance"][:2], ids=repr)
def test_instance_norm_without_running_stats_or_affine(case, dtype):
    rng = np.random.default_rng(seed_of("instance-plain", case.name, dtype))
    x = _t(data(rng, case.shape), dtype)
    dy = _t(rng.normal(size=case.shape), dtype)
    xt = x.clone().requires_grad_()
    y_t = torch_forward(case, xt)
    y_t.backward(dy)
    y, saved = bncore_forward(case, x)
    dx, dw, db = bncore_backward(case, dy, x, None, saved)
    assert dw is None and db is None
    x64, dy64 = to_numpy64(x), to_numpy64(dy)
    s = VS_TORCH_SCALE[dtype]
    assert_close(y, y_t, dtype, scale=s)
    assert_close(y, ref_forward(case, x64, dtype=dtype)[0], dtype)
    assert_close(dx, xt.grad, dtype, "grad", scale=s)
    assert_close(dx, ref_backward(case, dy64, x64, dtype=dtype)[0], dtype, "grad")


@pytest.mark.parametrize("case", CASES[::2], ids=repr)
def test_numpy_float16_matches_reference_and_torch(case):
    """NumPy float16 in, NumPy float16 out (float32 statistics), same numbers as through torch."""
    rng = np.random.default_rng(seed_of("np16", case.name))
    x = data(rng, case.shape).astype(np.float16)
    dy = rng.normal(size=case.shape).astype(np.float16)
    w, b = params(rng, case.param_shape, np.float32, bias=case.has_bias)
    y, saved = bncore_forward(case, x, w, b)
    dx, dw, db = bncore_backward(case, dy, x, w, saved)
    assert type(y) is np.ndarray and y.dtype == np.float16 and dx.dtype == np.float16
    assert saved[1].dtype == np.float32 and (saved[0] is None or saved[0].dtype == np.float32)
    assert dw.dtype == np.float32
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64 = w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    y_ref, _, _ = ref_forward(case, x64, w64, b64, dtype="float16")
    dx_ref, dw_ref, db_ref = ref_backward(case, dy64, x64, w64, dtype="float16")
    assert_close(y, y_ref, "float16")
    assert_close(dx, dx_ref, "float16", "grad")
    assert_close(dw, dw_ref, "float32", "grad")
    if b is not None:
        assert_close(db, db_ref, "float32", "grad")
    # the very same bits as the torch float16 tensor route
    y2, saved2 = bncore_forward(case, torch.from_numpy(x), torch.from_numpy(w),
                                None if b is None else torch.from_numpy(b))
    assert y2.numpy().tobytes() == y.tobytes()
    assert saved2[1].numpy().tobytes() == saved[1].tobytes()


# ---------------------------------------------------------------- saved statistics vs torch's own


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_statistics_match_torch_native(dtype):
    """torch.native_layer_norm / native_group_norm return (out, mean, rstd): bncore's saved
    statistics are the same numbers (float32 for half inputs in both)."""
    tdt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(6, 8, 5, generator=gen, dtype=torch.float64) * 2 + 1).to(tdt)
    w = torch.rand(8, 5, generator=gen, dtype=torch.float64).to(tdt) + 0.5
    b = torch.randn(8, 5, generator=gen, dtype=torch.float64).to(tdt)
    s = VS_TORCH_SCALE[dtype]
    _, mean_t, rstd_t = torch.native_layer_norm(x, [8, 5], w, b, 1e-5)
    _, mean, rstd = bncore.layer_norm_forward(x, (8, 5), w, b, 1e-5)
    assert mean.dtype == rstd.dtype == getattr(torch, stat_dtype(dtype))  # torch's are half in half
    # torch's own statistics are rounded to the input dtype (half for half inputs)
    assert_close(mean, mean_t.reshape(6), dtype, scale=s)
    assert_close(rstd, rstd_t.reshape(6), dtype, scale=s)
    wc, bc = w[:, 0].contiguous(), b[:, 0].contiguous()
    _, mean_t, rstd_t = torch.native_group_norm(x, wc, bc, 6, 8, 5, 4, 1e-5)
    _, mean, rstd = bncore.group_norm_forward(x, 4, wc, bc, 1e-5)
    assert mean.shape == mean_t.shape == (6, 4)
    assert_close(mean, mean_t, dtype, scale=s)
    assert_close(rstd, rstd_t, dtype, scale=s)


# ---------------------------------------------------------------- layers vs torch.nn modules

STEPS = 4


def _layer_pair(kind, dtype):
    """(torch module, bncore layer, input shape) with non-trivial parameters copied torch -> bncore."""
    gen = torch.Generator().manual_seed(seed_of("layer", kind, dtype) % 2**31)
    tdt = getattr(torch, dtype)
    if kind == "LayerNorm":
        t, b, shape = torch.nn.LayerNorm((5, 6), dtype=tdt), bncore.LayerNorm((5, 6), dtype=dtype), (4, 3, 5, 6)
    elif kind == "LayerNorm-no-bias":
        t, b, shape = (torch.nn.LayerNorm(7, bias=False, dtype=tdt), bncore.LayerNorm(7, bias=False, dtype=dtype),
                       (6, 7))
    elif kind == "InstanceNorm2d":
        t = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True, momentum=0.2, dtype=tdt)
        b = bncore.InstanceNorm(4, affine=True, track_running_stats=True, momentum=0.2, dtype=dtype)
        shape = (3, 4, 5, 6)
    elif kind == "GroupNorm":
        t, b, shape = torch.nn.GroupNorm(3, 6, dtype=tdt), bncore.GroupNorm(3, 6, dtype=dtype), (4, 6, 3, 5)
    elif kind == "RMSNorm":
        t, b, shape = torch.nn.RMSNorm((3, 8), dtype=tdt), bncore.RMSNorm((3, 8), dtype=dtype), (5, 3, 8)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=tdt) + 0.5 if name == "weight" else
                    torch.randn(p.shape, generator=gen, dtype=tdt))
    b.load_state_dict(t.state_dict())
    return t, b, shape, gen


def _fresh_bncore(kind):
    return {"LayerNorm": lambda: bncore.LayerNorm((5, 6)), "LayerNorm-no-bias": lambda: bncore.LayerNorm(7, bias=False),
            "InstanceNorm2d": lambda: bncore.InstanceNorm(4, affine=True, track_running_stats=True, momentum=0.2),
            "GroupNorm": lambda: bncore.GroupNorm(3, 6), "RMSNorm": lambda: bncore.RMSNorm((3, 8))}[kind]()


LAYER_KINDS = ["LayerNorm", "LayerNorm-no-bias", "InstanceNorm2d", "GroupNorm", "RMSNorm"]


def _assert_state_close(b_layer, t_layer, dtype, msg="", count=True):
    """Same keys in the same order, same values; `count=False` leaves num_batches_tracked to
    test_instance_norm_layer_num_batches_tracked_matches_torch."""
    t_state = t_layer.state_dict()
    b_state = b_layer.state_dict()
    assert list(b_state) == list(t_state), f"{msg}: keys {list(b_state)} vs torch's {list(t_state)}"
    for k, v in t_state.items():
        if k == "num_batches_tracked":
            if count:
                assert int(b_state[k]) == int(v), f"{msg}: {k} is {int(b_state[k])}, torch's is {int(v)}"
        else:
            assert b_state[k].dtype == np.dtype(dtype), k
            assert_close(b_state[k], v, dtype, err_msg=f"{msg}: {k}")


@pytest.mark.parametrize("input_kind", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_matches_torch_module_over_steps(kind, dtype, input_kind):
    t, b, shape, gen = _layer_pair(kind, dtype)
    tdt = getattr(torch, dtype)
    assert list(b.state_dict()) == list(t.state_dict())
    for step in range(STEPS):
        msg = f"{kind} step {step}"
        x = torch.randn(shape, generator=gen, dtype=tdt) * 1.5 + 0.3 * step
        dy = torch.randn(shape, generator=gen, dtype=tdt)
        xt = x.clone().requires_grad_()
        y_t = t(xt)
        y_t.backward(dy)
        if input_kind == "numpy":
            y = b(x.numpy())
            dx = b.backward(dy.numpy())
            assert type(y) is np.ndarray and type(dx) is np.ndarray
        else:
            y = b(x)
            dx = b.backward(dy)
            assert isinstance(y, torch.Tensor) and isinstance(dx, torch.Tensor)
        assert_close(y, y_t, dtype, err_msg=msg)
        assert_close(dx, xt.grad, dtype, "grad", err_msg=msg)
        params = dict(t.named_parameters())
        for name in ("weight", "bias"):
            got = getattr(b, f"{name}_grad")
            if name in params:
                assert_close(got, params[name].grad, dtype, "grad", err_msg=f"{msg}: {name}_grad")
            else:
                assert got is None, f"{msg}: {name}_grad"
        with torch.no_grad():  # an SGD step on both
            for name, p in params.items():
                p -= 0.1 * p.grad
                setattr(b, name, getattr(b, name) - 0.1 * getattr(b, f"{name}_grad").astype(dtype))
        t.zero_grad()
        _assert_state_close(b, t, dtype, msg, count=False)
    # evaluation mode (for InstanceNorm: the running statistics normalize)
    t.eval()
    b.eval()
    x = torch.randn(shape, generator=gen, dtype=tdt) + 1.0
    xt = x.clone().requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=tdt)
    y_t = t(xt)
    y_t.backward(dy)
    before = b.state_dict()
    y = b(x)
    dx = b.backward(dy)
    assert_close(y, y_t, dtype, err_msg="eval")
    assert_close(dx, xt.grad, dtype, "grad", err_msg="eval")
    for k, v in b.state_dict().items():  # eval leaves the state alone
        assert v.tobytes() == before[k].tobytes(), k
    _assert_state_close(b, t, dtype, "eval", count=False)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_state_dict_round_trip_torch_bncore_torch(kind):
    t, _, shape, gen = _layer_pair(kind, "float32")
    if kind == "InstanceNorm2d":  # non-trivial running statistics
        for _ in range(3):
            t(torch.randn(shape, generator=gen) * 2 + 1)
    b = _fresh_bncore(kind)  # default parameters until loaded
    b.load_state_dict(t.state_dict())
    assert list(b.state_dict()) == list(t.state_dict())
    for k, v in t.state_dict().items():  # loaded exactly
        np.testing.assert_array_equal(b.state_dict()[k], v.numpy(), err_msg=k)
    t2, _, _, _ = _layer_pair(kind, "float32")
    t2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in b.state_dict().items()})
    for k, v in t.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v), k
    x = torch.randn(shape, generator=gen) + 0.5
    for mode in ("eval", "train"):
        for m in (t, b, t2):
            getattr(m, mode)()
        with torch.no_grad():
            y1, y3 = t(x), t2(x)
        y2 = b(x)
        assert torch.equal(y1, y3)
        assert_close(y2, y1, "float32", err_msg=mode)
    _assert_state_close(b, t, "float32", "after a training step", count=False)


def test_instance_norm_layer_num_batches_tracked_matches_torch():
    """torch.nn.InstanceNorm has the num_batches_tracked buffer (from _NormBase) but never counts:
    it stays 0 through training steps, and so must bncore's for the state dicts to agree."""
    t = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    b = bncore.InstanceNorm(3, affine=True, track_running_stats=True)
    gen = torch.Generator().manual_seed(13)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, generator=gen) + 1
        assert_close(b(x), t(x), "float32")
    assert int(t.num_batches_tracked) == 0
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked)
    _assert_state_close(b, t, "float32", "after 3 steps")


def test_instance_norm_layer_momentum_none_matches_torch():
    """torch.nn.InstanceNorm passes momentum=None on as 0.0: the running statistics stay as they are."""
    t = torch.nn.InstanceNorm2d(3, momentum=None, track_running_stats=True)
    b = bncore.InstanceNorm(3, momentum=None, track_running_stats=True)
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, generator=gen) + 1
        assert_close(b(x), t(x), "float32")
    _assert_state_close(b, t, "float32", "momentum=None")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_half_inputs_with_float32_state(kind, dtype):
    """Mixed mode: float32 parameters and running statistics, half inputs; torch's module in float32
    given the same half inputs gives the reference numbers."""
    t, b, shape, gen = _layer_pair(kind, "float32")
    hdt = getattr(torch, dtype)
    for step in range(2):
        x = (torch.randn(shape, generator=gen) * 1.5 + 0.5).to(hdt)
        dy = torch.randn(shape, generator=gen).to(hdt)
        xt = x.float().requires_grad_()  # torch in float32 on the half values: near the exact result
        y_t = t(xt)
        y_t.backward(dy.float())
        y = b(x)
        dx = b.backward(dy)
        assert y.dtype == hdt and dx.dtype == hdt
        assert_close(y, y_t, dtype, err_msg=f"step {step}")
        assert_close(dx, xt.grad, dtype, "grad", err_msg=f"step {step}")
        assert b.weight_grad.dtype == np.float32
        assert_close(b.weight_grad, t.weight.grad, "float32", "grad")
        t.zero_grad()
        _assert_state_close(b, t, "float32", f"step {step}", count=False)
