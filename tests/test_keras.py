"""bncore.BatchNorm(convention="keras") against keras.layers.BatchNormalization (Keras 3 on
the torch backend): outputs and moving statistics over several training steps, inference,
center / scale variants, and weights moved both ways (list and dict forms)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras 3 is needed for the Keras comparisons")

import bncore  # noqa: E402

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    pytest.skip("keras 3 is needed for the Keras comparisons", allow_module_level=True)

# Keras's own KerasVariable.numpy() / convert_to_numpy trip NumPy 2's __array__(copy=) deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

C = 4
STEPS = 5
SHAPES = {"NC": (16, C), "NHWC": (6, 3, 5, C)}
TOL = dict(float32=dict(rtol=2e-5, atol=2e-5), float64=dict(rtol=1e-12, atol=1e-12))


def np_(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def batches(seed, shape, n=STEPS, dtype="float32"):
    g = np.random.default_rng(seed)
    return [(g.normal(size=shape) * (1.5 + 0.3 * k) + 0.7 * k - 1.0).astype(dtype) for k in range(n)]


def keras_layer(shape, dtype="float32", **kwargs):
    layer = keras.layers.BatchNormalization(dtype=dtype, **kwargs)
    layer.build((None,) + tuple(shape[1:]))
    return layer


def keras_state(layer):
    """{name: array} of a Keras layer's variables (gamma, beta, moving_mean, moving_variance)."""
    return {w.path.split("/")[-1]: np_(w.value) for w in layer.weights}


def randomize(layer, seed):
    """Random gamma / beta (and non-trivial moving statistics) on a Keras layer."""
    g = np.random.default_rng(seed)
    values = []
    for w in layer.weights:
        name = w.path.split("/")[-1]
        if name == "gamma":
            values.append(g.uniform(0.5, 2.0, C))
        elif name == "beta":
            values.append(g.normal(size=C))
        elif name == "moving_mean":
            values.append(g.normal(size=C) * 0.1)
        else:
            values.append(g.uniform(0.8, 1.2, C))
    layer.set_weights([v.astype(layer.dtype) for v in values])


@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_training_steps_and_inference_match_keras(shape_name, center, scale):
    shape = SHAPES[shape_name]
    kl = keras_layer(shape, center=center, scale=scale)
    randomize(kl, 1)
    bl = bncore.BatchNorm(C, convention="keras", center=center, scale=scale)
    assert (bl.eps, bl.momentum, bl.axis) == (1e-3, 0.99, -1)  # Keras's defaults
    bl.load_keras_weights(kl.get_weights())
    assert list(bl.keras_weights()) == list(keras_state(kl))
    for step, x in enumerate(batches(2, shape)):
        yk = np_(kl(x, training=True))
        yb = bl(x)
        np.testing.assert_allclose(yb, yk, **TOL["float32"], err_msg=f"output, step {step}")
        ks, bs = keras_state(kl), bl.keras_weights()
        for name in ks:
            np.testing.assert_allclose(bs[name], ks[name], rtol=1e-6, atol=1e-7, err_msg=f"{name}, step {step}")
        assert int(bl.num_batches_tracked) == step + 1
    bl.eval()
    for x in batches(3, shape, n=2):
        np.testing.assert_allclose(bl(x), np_(kl(x, training=False)), **TOL["float32"], err_msg="inference")


def test_custom_momentum_epsilon_and_axis(dtype="float32"):
    """Keras's momentum m (new = m * old + (1 - m) * batch), its epsilon, a channels-first axis.
    (float32 only: a Keras layer with dtype="float64" on the torch backend is itself only
    float32-accurate, so it is no float64 reference.)"""
    shape = (5, C, 3, 2)
    kl = keras_layer(shape, dtype=dtype, axis=1, momentum=0.8, epsilon=1e-5)
    randomize(kl, 4)
    bl = bncore.BatchNorm(C, eps=1e-5, momentum=0.8, axis=1, convention="keras", dtype=dtype)
    bl.load_keras_weights(kl.get_weights())
    for x in batches(5, shape, dtype=dtype):
        yk = np_(kl(keras.ops.convert_to_tensor(x, dtype=dtype), training=True))
        assert yk.dtype == dtype
        np.testing.assert_allclose(bl(x), yk, **TOL[dtype])
    ks = keras_state(kl)
    np.testing.assert_allclose(bl.running_mean, ks["moving_mean"], **TOL[dtype])
    np.testing.assert_allclose(bl.running_var, ks["moving_variance"], **TOL[dtype])
    bl.eval()
    x = batches(6, shape, n=1, dtype=dtype)[0]
    np.testing.assert_allclose(bl(x), np_(kl(keras.ops.convert_to_tensor(x, dtype=dtype), training=False)),
                               **TOL[dtype])


def test_moving_variance_is_biased_and_momentum_is_keras_s():
    """One step from the initial state, by hand: Keras stores the biased variance."""
    x = batches(7, (5, C), n=1)[0].astype(np.float64)
    bl = bncore.BatchNorm(C, convention="keras", dtype="float64")
    bl(x)
    np.testing.assert_allclose(bl.running_mean, 0.01 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bl.running_var, 0.99 + 0.01 * x.var(0), rtol=1e-12)


def test_weights_keras_to_bncore_list_and_dict():
    kl = keras_layer(SHAPES["NC"])
    randomize(kl, 8)
    for x in batches(9, SHAPES["NC"], n=2):
        kl(x, training=True)
    from_list = bncore.BatchNorm(C, convention="keras").load_keras_weights(kl.get_weights())
    from_dict = bncore.BatchNorm(C, convention="keras").load_keras_weights(keras_state(kl))
    for bl in (from_list, from_dict):
        ks = keras_state(kl)
        np.testing.assert_array_equal(bl.weight, ks["gamma"])
        np.testing.assert_array_equal(bl.bias, ks["beta"])
        np.testing.assert_array_equal(bl.running_mean, ks["moving_mean"])
        np.testing.assert_array_equal(bl.running_var, ks["moving_variance"])
        bl.eval()
        x = batches(10, SHAPES["NC"], n=1)[0]
        np.testing.assert_allclose(bl(x), np_(kl(x, training=False)), **TOL["float32"])


@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False), (False, False)])
def test_weights_bncore_to_keras(center, scale):
    shape = SHAPES["NHWC"]
    bl = bncore.BatchNorm(C, convention="keras", center=center, scale=scale)
    g = np.random.default_rng(11)
    if scale:
        bl.weight = g.uniform(0.5, 2, C).astype(np.float32)
    if center:
        bl.bias = g.normal(size=C).astype(np.float32)
    for x in batches(12, shape, n=3):
        bl(x)
    kl = keras_layer(shape, center=center, scale=scale)
    kl.set_weights(list(bl.keras_weights().values()))
    ks = keras_state(kl)
    assert list(ks) == list(bl.keras_weights())
    for name, v in bl.keras_weights().items():
        np.testing.assert_array_equal(ks[name], v, err_msg=name)
    bl.eval()
    x = batches(13, shape, n=1)[0]
    np.testing.assert_allclose(bl(x), np_(kl(x, training=False)), **TOL["float32"])
    bl.train()
    np.testing.assert_allclose(bl(x), np_(kl(x, training=True)), **TOL["float32"])


def test_keras_to_bncore_to_keras_round_trip():
    shape = SHAPES["NHWC"]
    src = keras_layer(shape)
    randomize(src, 14)
    for x in batches(15, shape, n=3):
        src(x, training=True)
    bl = bncore.BatchNorm(C, convention="keras").load_keras_weights(src.get_weights())
    dst = keras_layer(shape)
    dst.set_weights(list(bl.keras_weights().values()))
    for a, b in zip(src.get_weights(), dst.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = batches(16, shape, n=1)[0]
    np.testing.assert_array_equal(np_(dst(x, training=False)), np_(src(x, training=False)))
    bl.eval()
    np.testing.assert_allclose(bl(x), np_(src(x, training=False)), **TOL["float32"])
    bl.train()
    np.testing.assert_allclose(bl(x), np_(dst(x, training=True)), **TOL["float32"])
    np.testing.assert_array_equal(np_(dst(x, training=True)), np_(src(x, training=True)))
    np.testing.assert_allclose(bl.running_mean, keras_state(src)["moving_mean"], rtol=1e-6, atol=1e-7)


def test_keras_weights_names_follow_center_and_scale():
    assert list(bncore.BatchNorm(C, convention="keras").keras_weights()) == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    assert list(bncore.BatchNorm(C, convention="keras", center=False).keras_weights()) == [
        "gamma", "moving_mean", "moving_variance"]
    assert list(bncore.BatchNorm(C, convention="keras", scale=False).keras_weights()) == [
        "beta", "moving_mean", "moving_variance"]
    assert list(bncore.BatchNorm(C, convention="keras", center=False, scale=False).keras_weights()) == [
        "moving_mean", "moving_variance"]
    for center in (True, False):
        for scale in (True, False):
            kl = keras_layer((2, C), center=center, scale=scale)
            bl = bncore.BatchNorm(C, convention="keras", center=center, scale=scale)
            assert list(keras_state(kl)) == list(bl.keras_weights())
            assert len(kl.get_weights()) == len(bl.keras_weights())


def _snap(bl):
    return {k: v.tobytes() for k, v in bl.keras_weights().items()}, int(bl.num_batches_tracked)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda ws: ws[:3], ValueError, r"expected 4 arrays \(gamma, beta, moving_mean, moving_variance\), got 3"),
    (lambda ws: ws + [ws[0]], ValueError, r"expected 4 arrays"),
    (lambda ws: [ws[0], ws[1], ws[2], np.ones(C + 1)], ValueError,
     r"moving_variance: expected shape \(4,\), got \(5,\)"),
    (lambda ws: [np.ones((C, 1))] + ws[1:], ValueError, r"gamma: expected shape \(4,\), got \(4, 1\)"),
    (lambda ws: dict(zip(["gamma", "beta", "moving_mean"], ws)), KeyError, r"expected keys"),
    (lambda ws: {**dict(zip(["gamma", "beta", "moving_mean", "moving_variance"], ws)), "extra": ws[0]},
     KeyError, r"expected keys"),
    (lambda ws: dict(zip(["gamma", "beta", "moving_mean", "moving_var"], ws)), KeyError, r"expected keys"),
])
def test_bad_weights_raise_and_change_nothing(bad, exc, match):
    kl = keras_layer(SHAPES["NC"])
    randomize(kl, 17)
    bl = bncore.BatchNorm(C, convention="keras")
    for x in batches(18, SHAPES["NC"], n=2):
        bl(x)
    before = _snap(bl)
    with pytest.raises(exc, match=match):
        bl.load_keras_weights(bad(kl.get_weights()))
    assert _snap(bl) == before


def test_keras_shape_mismatch_refused_by_keras_and_bncore():
    kl = keras_layer(SHAPES["NC"])
    with pytest.raises(ValueError):
        kl.set_weights([np.ones(C + 1, np.float32)] * 4)
    bl = bncore.BatchNorm(C + 1, convention="keras")
    before = _snap(bl)
    with pytest.raises(ValueError):
        bl.load_keras_weights(kl.get_weights())
    assert _snap(bl) == before


def test_training_on_a_single_sample_as_keras():
    """Keras trains on a batch of one sample per channel (biased variance 0); the keras
    convention stores the biased variance, so one value per channel is enough."""
    kl = keras_layer((1, C))
    bl = bncore.BatchNorm(C, convention="keras")
    x = batches(19, (1, C), n=1)[0]
    yk = np_(kl(x, training=True))
    yb = bl(x)
    np.testing.assert_allclose(yb, yk, **TOL["float32"])
    np.testing.assert_allclose(bl.running_mean, keras_state(kl)["moving_mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bl.running_var, keras_state(kl)["moving_variance"], rtol=1e-6, atol=1e-7)
