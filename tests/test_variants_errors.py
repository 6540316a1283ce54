"""Bad input to layer, instance, group, RMS norm and `normalize`: a clear exception of
the right type naming the argument (and the numbers involved), and no state changed:
running statistics, `out` buffers and layers are compared bit for bit before and after.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import bncore

N, C, L = 2, 6, 5
NAN, INF = float("nan"), float("inf")


def x3(seed=0, shape=(N, C, L), dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) + 0.5).astype(dtype)


def ones(*shape):
    return np.ones(shape, np.float32)


# ---------------------------------------------------------------- functional forward errors

# name -> (call, exception type, regex patterns the message must contain)
FORWARD = {
    # normalized_shape that is not the input's trailing dims
    "layer-normalized_shape-mismatch": (lambda: bncore.layer_norm(x3(), (C,)), ValueError,
                                        ["normalized_shape", r"\[6\]", r"\[2, 6, 5\]"]),
    "layer-normalized_shape-too-long": (lambda: bncore.layer_norm(x3(), (1, N, C, L)), ValueError,
                                        ["normalized_shape"]),
    "layer-normalized_shape-two-dims": (lambda: bncore.layer_norm(x3(), (L, C)), ValueError,
                                        ["normalized_shape", r"\[5, 6\]"]),
    "rms-normalized_shape-mismatch": (lambda: bncore.rms_norm(x3(), (7,)), ValueError,
                                      ["normalized_shape", r"\[7\]"]),
    # empty normalized_shape
    "layer-normalized_shape-empty": (lambda: bncore.layer_norm(x3(), ()), ValueError, ["normalized_shape", "empty"]),
    "rms-normalized_shape-empty": (lambda: bncore.rms_norm(x3(), []), ValueError, ["normalized_shape", "empty"]),
    # channels not divisible by num_groups: both numbers in the message
    "group-not-divisible": (lambda: bncore.group_norm(x3(), 4), ValueError, ["num_groups", r"\b6\b", r"\b4\b"]),
    "group-more-groups-than-channels": (lambda: bncore.group_norm(x3(), 12), ValueError,
                                        ["num_groups", r"\b6\b", r"\b12\b"]),
    "group-zero-groups": (lambda: bncore.group_norm(x3(), 0), ValueError, ["num_groups"]),
    "group-float-groups": (lambda: bncore.group_norm(x3(), 2.0), ValueError, ["num_groups"]),
    # weight / bias of the wrong shape
    "layer-weight-shape": (lambda: bncore.layer_norm(x3(), (L,), ones(L + 1)), ValueError,
                           ["weight", r"\(5,\)", r"\(6,\)"]),
    "layer-bias-shape": (lambda: bncore.layer_norm(x3(), (C, L), ones(C, L), ones(L)), ValueError,
                         ["bias", r"\(6, 5\)", r"\(5,\)"]),
    "layer-weight-transposed": (lambda: bncore.layer_norm(x3(), (C, L), ones(L, C)), ValueError, ["weight"]),
    "rms-weight-shape": (lambda: bncore.rms_norm(x3(), (L,), ones(1, L)), ValueError, ["weight", r"\(1, 5\)"]),
    "group-weight-shape": (lambda: bncore.group_norm(x3(), 3, ones(3)), ValueError, ["weight", r"\(6,\)", r"\(3,\)"]),
    "group-bias-shape": (lambda: bncore.group_norm(x3(), 3, ones(C), ones(C, 1)), ValueError, ["bias"]),
    "instance-weight-shape": (lambda: bncore.instance_norm(x3(), weight=ones(L)), ValueError, ["weight", r"\(6,\)"]),
    "instance-bias-shape": (lambda: bncore.instance_norm(x3(), weight=ones(C), bias=ones(C + 1)), ValueError,
                            ["bias", r"\(7,\)"]),
    "normalize-weight-shape": (lambda: bncore.normalize(x3(), (1,), ones(L)), ValueError, ["weight", r"\(6,\)"]),
    "normalize-bias-affine-axes": (lambda: bncore.normalize(x3(), (1,), ones(N, L), ones(C), affine_axes=(0, 2)),
                                   ValueError, ["bias", r"\(2, 5\)"]),
    "layer-weight-int": (lambda: bncore.layer_norm(x3(), (L,), np.ones(L, np.int32)), TypeError, ["weight", "int32"]),
    # too few dims for a channel axis
    "group-1d": (lambda: bncore.group_norm(x3()[0, 0], 1), ValueError, ["input", "at least 2 dimensions"]),
    "group-0d": (lambda: bncore.group_norm(np.array(1.0, np.float32), 1), ValueError, ["input"]),
    "instance-2d": (lambda: bncore.instance_norm(x3()[0]), ValueError, ["input", "at least 3 dimensions"]),
    "instance-1d": (lambda: bncore.instance_norm(x3()[0, 0]), ValueError, ["input", "at least 3 dimensions"]),
    # eps: negative or non-finite, for every variant
    **{f"{v}-eps-{name}": (call, ValueError, ["eps", re.escape(text)])
       for name, bad, text in [("negative", -1e-5, "-1e-05"), ("nan", NAN, "nan"), ("inf", INF, "inf"),
                               ("minus-inf", -INF, "-inf")]
       for v, call in [("layer", lambda bad=bad: bncore.layer_norm(x3(), (L,), eps=bad)),
                       ("rms", lambda bad=bad: bncore.rms_norm(x3(), (L,), eps=bad)),
                       ("group", lambda bad=bad: bncore.group_norm(x3(), 2, eps=bad)),
                       ("instance", lambda bad=bad: bncore.instance_norm(x3(), eps=bad)),
                       ("normalize", lambda bad=bad: bncore.normalize(x3(), (0, 2), eps=bad))]},
    # normalize: axes out of range, repeated, empty, of the wrong type
    "normalize-axis-too-large": (lambda: bncore.normalize(x3(), (3,)), ValueError, ["axes", r"\b3\b", r"\[-3, 3\)"]),
    "normalize-axis-too-negative": (lambda: bncore.normalize(x3(), (-4,)), ValueError, ["axes", "-4"]),
    "normalize-int-axis-out-of-range": (lambda: bncore.normalize(x3(), 5), ValueError, ["axes", r"\b5\b"]),
    "normalize-axis-repeated": (lambda: bncore.normalize(x3(), (1, 1)), ValueError, ["axes", "distinct"]),
    "normalize-axis-repeated-negative": (lambda: bncore.normalize(x3(), (0, -3)), ValueError,
                                         ["axes", "distinct", r"\(0, -3\)"]),
    "normalize-axes-empty": (lambda: bncore.normalize(x3(), ()), ValueError, ["axes"]),
    "normalize-axis-float": (lambda: bncore.normalize(x3(), (1.0,)), TypeError, ["axes"]),
    "normalize-affine-axis-out-of-range": (lambda: bncore.normalize(x3(), (1,), affine_axes=(3,)), ValueError,
                                           ["affine_axes", r"\b3\b"]),
    "normalize-affine-axes-repeated": (lambda: bncore.normalize(x3(), (1,), affine_axes=(2, -1)), ValueError,
                                       ["affine_axes", "distinct"]),
    "normalize-scalar": (lambda: bncore.normalize(np.array(1.0, np.float32), (0,)), ValueError, ["input"]),
}


@pytest.mark.parametrize("case", list(FORWARD))
def test_bad_forward_arguments_raise_naming_the_argument(case):
    call, exc, patterns = FORWARD[case]
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is not bncore.InternalError
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"


# ---------------------------------------------------------------- backward errors


def _saved(kind, x):
    if kind == "layer":
        return bncore.layer_norm_forward(x, (L,))[1:]
    if kind == "group":
        return bncore.group_norm_forward(x, 2)[1:]
    if kind == "instance":
        return bncore.instance_norm_forward(x)[1:]
    return bncore.normalize_forward(x, (0, 2))[1:]


BACKWARD = {
    "layer-grad_output-shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x[:, :, :4], x, (L,), None, m, r),
                                ValueError, ["grad_output"]),
    "layer-grad_output-dtype": ("layer", lambda x, m, r: bncore.layer_norm_backward(x.astype(np.float64), x, (L,),
                                                                                    None, m, r),
                                TypeError, ["grad_output", "float32"]),
    "layer-normalized_shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (C,), None, m, r),
                               ValueError, ["normalized_shape"]),
    "layer-save_mean-shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (L,), None, m[:, :1], r),
                              ValueError, ["save_mean", r"\(2, 6\)"]),
    "layer-save_rstd-none": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (L,), None, m, None),
                             ValueError, ["save_rstd"]),
    "layer-weight-shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (L,), ones(C), m, r),
                           ValueError, ["weight"]),
    "rms-save_rstd-none": ("layer", lambda x, m, r: bncore.rms_norm_backward(x, x, (L,), None, None),
                           ValueError, ["save_rstd"]),
    "rms-normalized_shape-empty": ("layer", lambda x, m, r: bncore.rms_norm_backward(x, x, (), None, r),
                                   ValueError, ["normalized_shape"]),
    "group-not-divisible": ("group", lambda x, m, r: bncore.group_norm_backward(x, x, 4, None, m, r),
                            ValueError, ["num_groups", r"\b6\b", r"\b4\b"]),
    "group-save_mean-shape": ("group", lambda x, m, r: bncore.group_norm_backward(x, x, 3, None, m, r),
                              ValueError, ["save_mean", r"\(2, 3\)", r"\(2, 2\)"]),
    "instance-2d": ("instance", lambda x, m, r: bncore.instance_norm_backward(x[0], x[0], None, m, r),
                    ValueError, ["input", "at least 3"]),
    "instance-save_invstd-shape": ("instance", lambda x, m, r: bncore.instance_norm_backward(x, x, None, m, r[0]),
                                   ValueError, ["save_invstd"]),
    "normalize-axes-repeated": ("normalize", lambda x, m, r: bncore.normalize_backward(x, x, (0, 2, -1), None, m, r),
                                ValueError, ["axes", "distinct"]),
    "normalize-axes-out-of-range": ("normalize", lambda x, m, r: bncore.normalize_backward(x, x, (0, 3), None, m, r),
                                    ValueError, ["axes"]),
    "normalize-save_mean-none": ("normalize", lambda x, m, r: bncore.normalize_backward(x, x, (0, 2), None, None, r),
                                 ValueError, ["save_mean"]),
}


@pytest.mark.parametrize("case", list(BACKWARD))
def test_bad_backward_arguments_raise_naming_the_argument(case):
    kind, call, exc, patterns = BACKWARD[case]
    x = x3()
    m, r = _saved(kind, x)
    with pytest.raises(exc) as info:
        call(x, m, r)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"


# ---------------------------------------------------------------- instance norm: running statistics untouched


def _running():
    rng = np.random.default_rng(7)
    return rng.normal(size=C).astype(np.float32), rng.uniform(0.5, 2, size=C).astype(np.float32)


def _overlapping_out(rm, rv):
    buf = np.zeros(N * C * L, np.float32)
    return bncore.instance_norm(x3(), buf[:C], rv, out=buf.reshape(N, C, L))


INSTANCE_STATE = {
    "weight-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, ones(L)), ValueError, ["weight"]),
    "bias-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, ones(C), ones(2)), ValueError, ["bias"]),
    "eps-negative": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, eps=-1.0), ValueError, ["eps"]),
    "eps-nan": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, eps=NAN), ValueError, ["eps"]),
    "eps-inf": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, eps=INF), ValueError, ["eps"]),
    "momentum-range": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, momentum=1.5), ValueError, ["momentum"]),
    "input-2d": (lambda rm, rv: bncore.instance_norm(x3()[0], rm, rv), ValueError, ["input"]),
    "channels-mismatch": (lambda rm, rv: bncore.instance_norm(x3(shape=(N, C + 1, L)), rm, rv), ValueError,
                          ["running_mean", r"\(7,\)"]),
    "running_var-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, np.ones(C + 1, np.float32)), ValueError,
                          ["running_var"]),
    "only-running_mean": (lambda rm, rv: bncore.instance_norm(x3(), rm, None), ValueError,
                          ["running_mean", "running_var"]),
    "one-spatial-value": (lambda rm, rv: bncore.instance_norm(x3(shape=(N, C, 1)), rm, rv), ValueError,
                          ["Expected more than 1 spatial element"]),
    "out-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, out=np.empty((N, C, L + 1), np.float32)),
                  bncore.ShapeMismatchError, ["out"]),
    "out-dtype": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, out=np.empty((N, C, L))),
                  bncore.UnsupportedDtypeError, ["out", "float64"]),
    "out-overlaps-running_mean": (_overlapping_out, bncore.OverlapError, ["running_mean"]),
    "eval-without-running-stats": (lambda rm, rv: bncore.instance_norm(x3(), None, None, use_input_stats=False),
                                   RuntimeError, ["running_mean", "running_var"]),
}


@pytest.mark.parametrize("case", list(INSTANCE_STATE))
def test_instance_norm_failures_leave_running_stats_unchanged(case):
    call, exc, patterns = INSTANCE_STATE[case]
    rm, rv = _running()
    rm0, rv0 = rm.tobytes(), rv.tobytes()
    with pytest.raises(exc) as info:
        call(rm, rv)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert rm.tobytes() == rm0 and rv.tobytes() == rv0, "running statistics changed by a failed call"
    # and the same statistics still work
    bncore.instance_norm(x3(), rm, rv)
    assert rm.tobytes() != rm0


@pytest.mark.parametrize("call", [
    lambda out: bncore.layer_norm(x3(), (C,), out=out),
    lambda out: bncore.group_norm(x3(), 4, out=out),
    lambda out: bncore.rms_norm(x3(), (L,), eps=-1.0, out=out),
    lambda out: bncore.normalize(x3(), (1, 1), out=out),
], ids=["layer", "group", "rms", "normalize"])
def test_failed_call_leaves_out_untouched(call):
    out = np.full((N, C, L), 42.0, np.float32)
    with pytest.raises(ValueError):
        call(out)
    assert np.all(out == 42.0)


# ---------------------------------------------------------------- layers


def _snapshot(layer):
    snap = {k: np.asarray(v).tobytes() for k, v in layer.state_dict().items()}
    for k in ("weight_grad", "bias_grad"):
        v = getattr(layer, k)
        snap[k] = None if v is None else v.tobytes()
    return snap


def _make(kind):
    return {"layer": lambda: bncore.LayerNorm((C, L)), "rms": lambda: bncore.RMSNorm(L),
            "group": lambda: bncore.GroupNorm(3, C),
            "instance": lambda: bncore.InstanceNorm(C, affine=True, track_running_stats=True, momentum=0.3)}[kind]()


def _trained(kind):
    layer = _make(kind)
    for seed in range(3):  # non-trivial running statistics and gradients
        layer(x3(seed))
        layer.backward(x3(seed + 10))
    layer.weight += 0.25
    return layer


LAYER_BAD_INPUTS = {
    "layer": [("normalized_shape", (N, C, L + 1)), ("normalized_shape", (C,))],
    "rms": [("normalized_shape", (N, C, L + 2))],
    "group": [("weight", (N, C + 3, L)), ("input", (C,))],
    "instance": [("input", (C, L)), ("weight", (N, C + 1, L)), ("Expected more than 1 spatial", (N, C, 1))],
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,what,shape", [(k, w, s) for k, v in LAYER_BAD_INPUTS.items() for w, s in v])
def test_layer_state_unchanged_after_failed_forward(kind, what, shape, training):
    layer = _trained(kind)
    layer.train(training)
    if kind == "instance" and not training and what.startswith("Expected"):
        pytest.skip("one spatial value is fine in eval mode (the running statistics normalize)")
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=what):
        layer(x3(5, shape=shape))
    assert _snapshot(layer) == before, "state changed by a failed forward"
    # the backward still refers to the last successful forward (an (N, C, L) input)
    dx = layer.backward(x3(6))
    assert dx.shape == (N, C, L)


@pytest.mark.parametrize("kind", ["layer", "rms", "group", "instance"])
def test_layer_backward_errors_keep_gradients(kind):
    layer = _trained(kind)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(x3(1, shape=(N, C, L + 1)))
    with pytest.raises(TypeError, match="grad_output"):
        layer.backward(x3(1).astype(np.float64))
    assert _snapshot(layer) == before
    fresh = _make(kind)
    with pytest.raises(RuntimeError, match="backward"):
        fresh.backward(x3())


@pytest.mark.parametrize("make,exc,patterns", [
    (lambda: bncore.LayerNorm(()), ValueError, ["normalized_shape", "empty"]),
    (lambda: bncore.LayerNorm((4, 0)), ValueError, ["normalized_shape"]),
    (lambda: bncore.RMSNorm([]), ValueError, ["normalized_shape", "empty"]),
    (lambda: bncore.GroupNorm(4, 6), ValueError, ["num_groups", r"\b6\b", r"\b4\b"]),
    (lambda: bncore.GroupNorm(0, 6), ValueError, ["num_groups"]),
    (lambda: bncore.GroupNorm(2, 0), ValueError, ["num_channels"]),
    (lambda: bncore.InstanceNorm(0), ValueError, ["num_features"]),
    (lambda: bncore.LayerNorm(5, eps=-1.0), ValueError, ["eps"]),
    (lambda: bncore.LayerNorm(5, eps=NAN), ValueError, ["eps"]),
    (lambda: bncore.RMSNorm(5, eps=INF), ValueError, ["eps"]),
    (lambda: bncore.RMSNorm(5, eps=-1e-6), ValueError, ["eps"]),
    (lambda: bncore.GroupNorm(2, 6, eps=NAN), ValueError, ["eps"]),
    (lambda: bncore.InstanceNorm(6, eps=-INF), ValueError, ["eps"]),
    (lambda: bncore.InstanceNorm(6, momentum=-0.5), ValueError, ["momentum"]),
    (lambda: bncore.LayerNorm(5, dtype="int32"), TypeError, ["dtype"]),
], ids=["LayerNorm-empty", "LayerNorm-zero", "RMSNorm-empty", "GroupNorm-not-divisible", "GroupNorm-0-groups",
        "GroupNorm-0-channels", "InstanceNorm-0", "LayerNorm-eps-negative", "LayerNorm-eps-nan", "RMSNorm-eps-inf",
        "RMSNorm-eps-negative", "GroupNorm-eps-nan", "InstanceNorm-eps-minus-inf", "InstanceNorm-momentum",
        "LayerNorm-dtype"])
def test_layer_constructor_errors(make, exc, patterns):
    with pytest.raises(exc) as info:
        make()
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"


@pytest.mark.parametrize("kind,key,value,exc", [
    ("layer", "bias", np.ones((L, C)), ValueError),
    ("layer", "weight", np.ones((C, L), np.int64), TypeError),
    ("rms", "weight", np.ones(L + 1), ValueError),
    ("group", "bias", np.ones(C - 1), ValueError),
    ("instance", "running_var", np.ones(C + 1), ValueError),
    ("instance", "num_batches_tracked", np.array([1, 2]), ValueError),
])
def test_load_state_dict_is_all_or_nothing(kind, key, value, exc):
    layer = _trained(kind)
    before = _snapshot(layer)
    state = {k: np.full_like(v, 3) for k, v in layer.state_dict().items()}  # fine, but for one key
    state[key] = value
    with pytest.raises(exc, match=key):
        layer.load_state_dict(state)
    assert _snapshot(layer) == before
    missing = dict(state)
    del missing[key]
    with pytest.raises(KeyError, match=key):
        layer.load_state_dict(missing)
    assert _snapshot(layer) == before
