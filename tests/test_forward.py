"""Forward values against the float64 reference (bncore.reference), every variant.

Batch norm: shapes 2-D to 5-D, channel axes 1, -1 and others, every stride pattern NumPy and
PyTorch make (slices, transposes, negative strides, permutations, channels-last), training and
eval, running-statistic updates, empty batches, half inputs. Every variant of the case table:
NumPy layouts (forward and backward), eps (the default and another value) against the reference,
`normalize(x, axes=(1,))` as ConvNeXt's channels layer norm without a copy.
"""
from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

import bncore
from bncore.reference import all_but, batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref, normalize_ref
from cases import (BN_CASES, CASES, DTYPES, bn_params, case_id, bncore_backward, bncore_forward, data, params,
                   ref_backward, ref_forward, rms_default_eps, seed_of)
from layouts import FIXED_LAYOUTS, LAYOUTS, nonzero_data, with_layout
from tolerances import assert_close, to_numpy64


# ---------------------------------------------------------------- batch norm forward


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BN_CASES, ids=case_id)
def test_training_forward_matches_reference(case, layout, dtype):
    shape, axis = case
    rng = np.random.default_rng(seed_of(shape, axis, layout))
    c = shape[axis]
    x = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    x_before = x.copy()
    w, b = bn_params(rng, c, dtype)
    rm0 = rng.normal(size=c).astype(dtype)
    rv0 = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3, axis=axis)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x, w, b, eps=1e-3, axis=axis)
    assert type(y) is np.ndarray and y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == (c,) and invstd.shape == (c,)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, rstd_ref, dtype)
    rm_ref, rv_ref = batch_norm_running_ref(x, rm0, rv0, 0.2, axis=axis)
    assert_close(rm, rm_ref, dtype)
    assert_close(rv, rv_ref, dtype)
    # the input is not touched
    assert x.tobytes() == x_before.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BN_CASES, ids=case_id)
def test_eval_forward_matches_reference(case, layout, dtype):
    shape, axis = case
    rng = np.random.default_rng(seed_of(1, shape, axis, layout))
    c = shape[axis]
    x = with_layout(nonzero_data(rng, shape, dtype, axis), layout, rng)
    w, b = bn_params(rng, c, dtype)
    rm = rng.normal(size=c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=False, momentum=0.5, axis=axis)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x, w, b, axis=axis, running_mean=rm0, running_var=rv0)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, dtype)  # the statistics actually used: the running ones
    assert_close(invstd, rstd_ref, dtype)
    # eval never writes the running statistics
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BN_CASES[::2], ids=case_id)
def test_forward_without_affine_or_running_stats(case, dtype):
    shape, axis = case
    rng = np.random.default_rng(2)
    x = nonzero_data(rng, shape, dtype, axis)
    y = bncore.batch_norm(x, training=True, axis=axis)
    y_ref, _, _ = batch_norm_ref(x, axis=axis)
    assert_close(y, y_ref, dtype)
    # normalized: zero mean, unit (biased) variance per channel, up to eps
    red = all_but(x.ndim, axis)
    np.testing.assert_allclose(np.mean(to_numpy64(y), axis=red), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.var(to_numpy64(y), axis=red), 1.0, rtol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "reversed"])
def test_output_into_another_layout(layout):
    rng = np.random.default_rng(3)
    x = nonzero_data(rng, (4, 3, 5, 6))
    w, b = bn_params(rng, 3, np.float64)
    out = with_layout(np.zeros_like(x), layout)
    got = bncore.batch_norm(x, None, None, w, b, training=True, out=out)
    assert got is out
    assert_close(out, batch_norm_ref(x, w, b)[0], np.float64)


# ---------------------------------------------------------------- batch norm: torch layouts and half inputs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 3, 4, 5, 3)], ids=lambda s: f"{len(s)}d")
def test_channels_last_torch_matches_reference(shape, dtype):
    torch = pytest.importorskip("torch", reason="torch is needed for channels-last tensors")
    rng = np.random.default_rng(4)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    xn = nonzero_data(rng, shape, dtype)
    x = torch.from_numpy(xn).to(memory_format=fmt)
    assert x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
    w, b = bn_params(rng, shape[1], dtype)
    rm, rv = torch.zeros(shape[1], dtype=x.dtype), torch.ones(shape[1], dtype=x.dtype)
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, torch.from_numpy(w), torch.from_numpy(b),
                                                training=True, momentum=0.1)
    y_ref, mean_ref, rstd_ref = batch_norm_ref(xn, w, b)
    assert isinstance(y, torch.Tensor) and y.is_contiguous(memory_format=fmt)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, dtype)
    assert_close(invstd, rstd_ref, dtype)
    rm_ref, rv_ref = batch_norm_running_ref(xn, np.zeros(shape[1]), np.ones(shape[1]), 0.1)
    assert_close(rm, rm_ref, dtype)
    assert_close(rv, rv_ref, dtype)
    dy = torch.from_numpy(nonzero_data(rng, shape, dtype)).to(memory_format=fmt)
    dx, dw, db = bncore.batch_norm_backward(dy, x, torch.from_numpy(w), mean, invstd)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy.numpy(), xn, w)
    assert isinstance(dx, torch.Tensor) and dx.is_contiguous(memory_format=fmt)
    assert_close(dx, dx_ref, dtype, "grad")
    assert_close(dw, dw_ref, dtype, "grad")
    assert_close(db, db_ref, dtype, "grad")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_match_reference(dtype):
    torch = pytest.importorskip("torch", reason="torch is needed for bfloat16 tensors")
    rng = np.random.default_rng(5)
    xn = nonzero_data(rng, (8, 3, 4, 4))
    x = torch.from_numpy(xn).to(getattr(torch, dtype))
    x64 = x.double().numpy()
    w, b = bn_params(rng, 3, np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, torch.from_numpy(w), torch.from_numpy(b),
                                                training=True)
    assert y.dtype == x.dtype and mean.dtype == torch.float32 and invstd.dtype == torch.float32
    y_ref, mean_ref, rstd_ref = batch_norm_ref(x64, w, b)
    assert_close(y, y_ref, dtype)
    assert_close(mean, mean_ref, "float32")  # saved statistics are float32
    assert_close(invstd, rstd_ref, "float32")
    dy = torch.from_numpy(rng.normal(size=x.shape)).to(x.dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, torch.from_numpy(w), mean, invstd)
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy.double().numpy(), x64, w)
    assert dx.dtype == x.dtype
    assert_close(dx, dx_ref, dtype, "grad")
    # the sums are float32 (the weight's dtype) over the exact half values
    assert_close(dw, dw_ref, "float32", "grad")
    assert_close(db, db_ref, "float32", "grad")


# ---------------------------------------------------------------- batch norm: running statistics


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_running_statistics_over_steps(momentum, dtype):
    rng = np.random.default_rng(9)
    c = 4
    rm = np.zeros(c, dtype)
    rv = np.ones(c, dtype)
    rm_ref, rv_ref = np.zeros(c), np.ones(c)
    for step in range(5):
        n = 3 + step  # the unbiased correction n / (n - 1) changes with the batch size
        x = nonzero_data(rng, (n, c, 2), dtype)
        bncore.batch_norm(x, rm, rv, training=True, momentum=momentum)
        rm_ref, rv_ref = batch_norm_running_ref(x, rm_ref, rv_ref, momentum)
        assert rm.dtype == dtype and rv.dtype == dtype
        assert_close(rm, rm_ref, dtype, err_msg=f"step {step}")
        assert_close(rv, rv_ref, dtype, err_msg=f"step {step}")


def test_running_var_is_unbiased():
    """momentum 1: running_var is exactly the batch's unbiased variance, running_mean the batch mean."""
    x = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [7.0, 70.0]])
    rm, rv = np.zeros(2), np.ones(2)
    bncore.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(rv, x.var(axis=0, ddof=1), rtol=1e-14)
    # while the normalization itself uses the biased variance
    _, _, invstd = bncore.batch_norm_forward(x, training=True, eps=0.0)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x.var(axis=0)), rtol=1e-14)


def test_running_stats_float64_with_float32_input():
    """Running statistics may have their own float dtype."""
    rng = np.random.default_rng(10)
    x = nonzero_data(rng, (16, 3, 4), np.float32)
    rm, rv = np.zeros(3), np.ones(3)
    bncore.batch_norm(x, rm, rv, training=True, momentum=0.5)
    rm_ref, rv_ref = batch_norm_running_ref(x, np.zeros(3), np.ones(3), 0.5)
    assert_close(rm, rm_ref, np.float32)
    assert_close(rv, rv_ref, np.float32)


# ---------------------------------------------------------------- batch norm: empty batches


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4), 1), ((0, 4, 5, 3), -1), ((2, 3, 0, 4), 1),
                                        ((0, 2, 3, 4, 5), 1)])
def test_zero_size_batch(shape, axis, training):
    rng = np.random.default_rng(11)
    c = shape[axis]
    x = np.zeros(shape)
    w, b = bn_params(rng, c, np.float64)
    rm = rng.normal(size=c)
    rv = rng.uniform(0.5, 2.0, size=c)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
    assert y.shape == shape and y.size == 0 and y.dtype == x.dtype
    assert mean.shape == (c,) and invstd.shape == (c,)
    # no element, no statistic: the running statistics are untouched, bit for bit
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()
    dx, dw, db = bncore.batch_norm_backward(x, x, w, mean, invstd, training=training, axis=axis)
    assert dx.shape == shape
    np.testing.assert_array_equal(dw, np.zeros(c))  # an empty sum
    np.testing.assert_array_equal(db, np.zeros(c))


def test_zero_size_batch_torch():
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
    x = torch.zeros(0, 3, 4, 4).to(memory_format=torch.channels_last)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = bncore.batch_norm(x, rm, rv, training=True)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ---------------------------------------------------------------- every variant: NumPy layouts


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
    assert_close(dw, dw_ref, dtype, "grad")
    if case.has_bias:
        assert_close(db, db_ref, dtype, "grad")


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
    torch = pytest.importorskip("torch", reason="torch is needed for this case")
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


# ---------------------------------------------------------------- eps: the default and another value, every variant


def _eps_calls(case, x, w, b, rm, rv, training, kw):
    """(y, mean, rstd) from the *_forward function and y from the plain one, eps given in `kw` or left out."""
    k, ax, ns, g = case.kind, case.axis, case.normalized_shape, case.num_groups
    if k == "batch":
        y, m, r = bncore.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training=training, axis=ax, **kw)
        return (y, m, r), bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, axis=ax, **kw)
    if k == "instance":
        y, m, r = bncore.instance_norm_forward(x, rm.copy(), rv.copy(), w, b, use_input_stats=training, **kw)
        return (y, m, r), bncore.instance_norm(x, rm.copy(), rv.copy(), w, b, use_input_stats=training, **kw)
    if k == "layer":
        return bncore.layer_norm_forward(x, ns, w, b, **kw), bncore.layer_norm(x, ns, w, b, **kw)
    if k == "group":
        return bncore.group_norm_forward(x, g, w, b, **kw), bncore.group_norm(x, g, w, b, **kw)
    y, r = bncore.rms_norm_forward(x, ns, w, **kw)
    return (y, None, r), bncore.rms_norm(x, ns, w, **kw)


EPS_MODES = [(c, e, t) for c in CASES for e in ("default", 0.1)
             for t in ([True, False] if c.has_running_stats else [True])]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case,eps,training", EPS_MODES,
                         ids=[f"{c.name}-eps-{e}-{'train' if t else 'eval'}" for c, e, t in EPS_MODES])
def test_eps_matches_reference(case, eps, training, dtype):
    """The variance is made about the size of eps (the default: 1e-5, RMS norm the compute type's
    machine epsilon), so that eps moves rstd by ~30%: a wrong eps, default or given, is far outside
    the dtype's tolerance. Eval (batch, instance): the running variance is that small too."""
    rng = np.random.default_rng(seed_of("eps", case.name, eps, training, dtype))
    ref_eps = (rms_default_eps(dtype) if case.kind == "rms" else 1e-5) if eps == "default" else eps
    spread = float(np.sqrt(ref_eps))  # var ~ eps
    x64 = spread * (rng.normal(size=case.shape) + rng.uniform(-1, 1))
    x = x64.astype(dtype)
    w, b = params(rng, case.param_shape, dtype, bias=case.has_bias)
    c = case.shape[case.channel_axis]
    rm = (spread * rng.uniform(-1, 1, size=c)).astype(dtype)
    rv = (ref_eps * rng.uniform(0.5, 2.0, size=c)).astype(dtype)
    kw = {} if eps == "default" else {"eps": eps}
    (y, mean, rstd), y_plain = _eps_calls(case, x, w, b, rm, rv, training, kw)
    y_ref, mean_ref, rstd_ref = ref_forward(dataclasses.replace(case, eps=ref_eps), x.astype(np.float64), w, b, rm, rv,
                                            use_input_stats=training, dtype=dtype)
    assert_close(rstd, rstd_ref, dtype, err_msg="rstd")
    if mean_ref is not None:
        assert_close(np.asarray(mean) / spread, mean_ref / spread, dtype, err_msg="mean / spread")
    assert_close(y, y_ref, dtype, err_msg="output of the *_forward function")
    assert_close(y_plain, y_ref, dtype, err_msg="output of the plain function")
