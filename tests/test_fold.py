"""bncore.fold: an eval-mode batch norm folded into the preceding layer's weight and bias."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import fold_ref
from tolerances import assert_close


def _bn(rng, c):
    return (rng.normal(size=c), rng.uniform(0.2, 3.0, size=c), rng.uniform(0.5, 1.5, size=c), rng.normal(size=c))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((6, 3, 3, 3), 0), ((4, 6, 3, 3), 1), ((5, 7), 0), ((6,), 0),
                                        ((6, 2, 3, 3, 3), 0), ((3, 6, 2), -2)])
def test_fold_matches_reference(shape, axis, dtype):
    rng = np.random.default_rng(1)
    c = shape[axis]
    w = rng.normal(size=shape).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    mean, var, gamma, beta = _bn(rng, c)
    fw, fb = bncore.fold(w, b, mean, var, gamma, beta, 1e-3, axis=axis)
    rw, rb = fold_ref(w, b, mean, var, gamma, beta, 1e-3, axis % len(shape))
    assert fw.dtype == dtype and fb.dtype == dtype and fw.shape == w.shape and fb.shape == (c,)
    assert_close(fw, rw, dtype)
    assert_close(fb, rb, dtype)


def test_folded_linear_layer_equals_linear_then_batch_norm():
    """The point of folding: batch_norm(x @ W.T + b) in eval == x @ W'.T + b'."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 5))
    w, b = rng.normal(size=(4, 5)), rng.normal(size=4)
    mean, var, gamma, beta = _bn(rng, 4)
    y = bncore.batch_norm(x @ w.T + b, mean, var, gamma, beta, training=False)
    fw, fb = bncore.fold(w, b, mean, var, gamma, beta)
    np.testing.assert_allclose(x @ fw.T + fb, y, rtol=1e-12, atol=1e-12)


def test_defaults_bias_none_gamma_beta_none():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    mean, var, _, _ = _bn(rng, 3)
    fw, fb = bncore.fold(w, None, mean, var)
    rw, rb = fold_ref(w, None, mean, var, np.ones(3), np.zeros(3))
    assert fb.dtype == np.float32
    assert_close(fw, rw, np.float32)
    assert_close(fb, rb, np.float32)


def test_computed_in_float64_then_rounded_once():
    """A float16 weight: each folded value is the float64 result rounded once to float16."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 4)).astype(np.float16)
    b = rng.normal(size=8).astype(np.float16)
    mean, var, gamma, beta = _bn(rng, 8)
    fw, fb = bncore.fold(w, b, mean, var, gamma, beta)
    rw, rb = fold_ref(w, b, mean, var, gamma, beta)
    np.testing.assert_array_equal(fw, rw.astype(np.float16))
    np.testing.assert_array_equal(fb, rb.astype(np.float16))


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(rng.normal(size=4)))
        bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, size=4)))
        bn.weight.copy_(torch.from_numpy(rng.normal(size=4)))
        bn.bias.copy_(torch.from_numpy(rng.normal(size=4)))
    fw, fb = bncore.fold(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert isinstance(fw, torch.Tensor) and fw.dtype == torch.float32
    x = torch.from_numpy(rng.normal(size=(2, 3, 6, 6)).astype(np.float32))
    with torch.no_grad():
        want = bn(conv(x))
        got = torch.nn.functional.conv2d(x, fw, fb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # ConvTranspose: out-channels at axis 1
    deconv = torch.nn.ConvTranspose2d(3, 4, 3)
    fw, fb = bncore.fold(deconv.weight, deconv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                         axis=1)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.conv_transpose2d(x, fw, fb), bn(deconv(x)), rtol=1e-5,
                                   atol=1e-5)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(3, 2)), rng.normal(size=3)
    mean, var, gamma, beta = _bn(rng, 3)
    copies = [a.copy() for a in (w, b, mean, var, gamma, beta)]
    bncore.fold(w, b, mean, var, gamma, beta)
    for a, c in zip((w, b, mean, var, gamma, beta), copies):
        np.testing.assert_array_equal(a, c)
