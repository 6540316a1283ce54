"""Bad inputs, every variant: a clear exception of the right type naming the argument (and the
numbers involved), and no state changed: running statistics, `out` buffers and layers are compared
bit for bit before and after. Then every C status maps to one exception class, and one version.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import re

import numpy as np
import pytest

import bncore
from bncore import _core


# ================================================================ batch norm

C = 3


def bn_data(seed=0, shape=(4, C, 5), dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) + 0.5).astype(dtype)


# ---------------------------------------------------------------- a tensor on another device


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeDeviceTensor:
    """A float32 DLPack producer that claims its memory is on another device (CUDA by default).
    The memory is host memory that nobody may read: bncore must refuse before touching it."""

    def __init__(self, arr, device_type=2, device_id=0):
        self.arr = np.ascontiguousarray(arr, np.float32)
        self._shape = (ctypes.c_int64 * self.arr.ndim)(*self.arr.shape)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data = self.arr.ctypes.data
        t.device = _DLDevice(device_type, device_id)
        t.ndim = self.arr.ndim
        t.dtype = _DLDataType(2, 32, 1)
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0
        self._device = (device_type, device_id)

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, **kwargs):
        return _PyCapsule_New(ctypes.addressof(self._managed), b"dltensor", None)  # no deleter: nothing to free


# ---------------------------------------------------------------- the bad inputs


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _consumed_capsule(a):
    """A DLPack capsule of `a` that has already been read once."""
    cap = a.__dlpack__()
    _core.import_tensor(cap, "probe").release()
    return cap


# id -> (function of (rm, rv) making the call, exception class, regexes the message must match)
FORWARD_CASES = {
    "1d-input": (lambda rm, rv: bncore.batch_norm(bn_data()[0, 0], rm, rv, training=True), ValueError,
                 ["input", "2 dimensions"]),
    "0d-input": (lambda rm, rv: bncore.batch_norm(np.ones((), np.float32), rm, rv, training=True),
                 ValueError, ["input"]),
    "weight-length": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, np.ones(C + 1, np.float32), training=True),
                      ValueError, ["weight", r"\(3,\)", r"\(4,\)"]),
    "bias-length": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, None, np.zeros(C - 1, np.float32),
                                                     training=True), ValueError, ["bias", r"\(2,\)"]),
    "weight-2d": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, np.ones((1, C), np.float32), training=True),
                  ValueError, ["weight"]),
    "running_mean-length": (lambda rm, rv: bncore.batch_norm(bn_data(), np.zeros(C + 2, np.float32), rv,
                                                             training=True), ValueError, ["running_mean"]),
    "running_var-length": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, np.ones(C + 2, np.float32), training=True),
                           ValueError, ["running_var"]),
    "running_var-length-eval": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, np.ones(1, np.float32),
                                                                 training=False), ValueError, ["running_var"]),
    "int-input": (lambda rm, rv: bncore.batch_norm(np.arange(4 * C * 5).reshape(4, C, 5), rm, rv, training=True),
                  TypeError, ["input", "int64", "float"]),
    "bool-input": (lambda rm, rv: bncore.batch_norm(np.ones((4, C, 5), bool), rm, rv, training=True),
                   TypeError, ["input", "bool"]),
    "int-weight": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, np.ones(C, np.int32), training=True),
                   TypeError, ["weight", "int32"]),
    "int-running_var": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, np.ones(C, np.int64), training=True),
                        TypeError, ["running_var", "int64"]),
    "one-value-per-channel": (lambda rm, rv: bncore.batch_norm(bn_data(shape=(1, C)), rm, rv, training=True),
                              ValueError, ["Expected more than 1 value per channel when training", r"\(1, 3\)"]),
    "one-value-per-channel-3d": (lambda rm, rv: bncore.batch_norm(bn_data(shape=(1, C, 1)), rm, rv, training=True),
                                 ValueError, ["Expected more than 1 value per channel"]),
    "readonly-out": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, out=_readonly(bn_data())),
                     ValueError, ["out", "read-only", r"bncore\.BatchNorm"]),
    "readonly-running_mean": (lambda rm, rv: bncore.batch_norm(bn_data(), _readonly(rm), rv, training=True),
                              ValueError, ["running_mean", "read-only", r"bncore\.BatchNorm"]),
    "readonly-running_var": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, _readonly(rv), training=True),
                             ValueError, ["running_var", "read-only", r"bncore\.BatchNorm"]),
    "consumed-capsule-input": (lambda rm, rv: bncore.batch_norm(_consumed_capsule(bn_data()), rm, rv, training=True),
                               ValueError, ["input", "consumed"]),
    "consumed-capsule-running_mean": (lambda rm, rv: bncore.batch_norm(
        bn_data(), _consumed_capsule(np.zeros(C, np.float32)), rv, training=True), ValueError,
        ["running_mean", "consumed"]),
    "list-input": (lambda rm, rv: bncore.batch_norm([[1.0, 2.0], [3.0, 4.0]], rm, rv, training=True), TypeError,
                   ["input", "DLPack", "list"]),
    "str-input": (lambda rm, rv: bncore.batch_norm("not a tensor", rm, rv, training=True), TypeError,
                  ["input", "DLPack", "str"]),
    "none-input": (lambda rm, rv: bncore.batch_norm(None, rm, rv, training=True), TypeError, ["input"]),
    "list-weight": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, [1.0, 1.0, 1.0], training=True), TypeError,
                    ["weight", "list"]),
    "str-running_mean": (lambda rm, rv: bncore.batch_norm(bn_data(), "zeros", rv, training=True), TypeError,
                         ["running_mean", "str"]),
    "device-running_mean": (lambda rm, rv: bncore.batch_norm(bn_data(), FakeDeviceTensor(np.zeros(C)), rv,
                                                             training=True), ValueError,
                            ["running_mean", "device", "cuda"]),
    "device-weight": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, FakeDeviceTensor(np.ones(C)),
                                                       training=True), ValueError, ["weight", "device", "cuda"]),
    "device-input": (lambda rm, rv: bncore.batch_norm(FakeDeviceTensor(bn_data()), rm, rv, training=True),
                     ValueError, ["device"]),
    "only-running_mean": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, None, training=True), ValueError,
                          ["running_mean", "running_var"]),
    "momentum-range": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, momentum=1.5), ValueError,
                       ["momentum"]),
    "momentum-type": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, momentum="0.1"), TypeError,
                      ["momentum"]),
    "eps-negative": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, eps=-1e-5), ValueError,
                     ["eps"]),
    "eps-nan": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, eps=float("nan")), ValueError,
                ["eps"]),
    "axis-range": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, axis=3), ValueError,
                   ["axis", "3"]),
    "axis-type": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, axis=1.0), TypeError, ["axis"]),
    "out-shape": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, out=np.empty((4, C, 6),
                                                                                                  np.float32)),
                  bncore.ShapeMismatchError, [r"\(4, 3, 6\)"]),
    "out-dtype": (lambda rm, rv: bncore.batch_norm(bn_data(), rm, rv, training=True, out=np.empty((4, C, 5))),
                  bncore.UnsupportedDtypeError, ["float64"]),
}


def _partial_overlap(rm, rv):
    buf = np.zeros(4 * C * 5 + 1, np.float32)
    x = buf[:-1].reshape(4, C, 5)
    x[...] = bn_data()
    out = buf[1:].reshape(4, C, 5)  # shifted by one element: partly the same memory as x
    return bncore.batch_norm(x, rm, rv, training=True, out=out)


def _running_mean_inside_out(rm, rv):
    buf = np.zeros(4 * C * 5, np.float32)
    out = buf.reshape(4, C, 5)
    return bncore.batch_norm(bn_data(), buf[:C], rv, training=True, out=out)


FORWARD_CASES["out-overlaps-input"] = (_partial_overlap, bncore.OverlapError, ["overlap"])
FORWARD_CASES["running_mean-overlaps-out"] = (_running_mean_inside_out, bncore.OverlapError,
                                              ["running_mean", "overlap"])


def _running_stats():
    rng = np.random.default_rng(100)
    return rng.normal(size=C).astype(np.float32), rng.uniform(0.5, 2, size=C).astype(np.float32)


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_bad_forward_input_raises_and_changes_nothing(case):
    call, exc, patterns = FORWARD_CASES[case]
    rm, rv = _running_stats()
    rm0, rv0 = rm.tobytes(), rv.tobytes()
    with pytest.raises(exc) as info:
        call(rm, rv)
    msg = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
    assert rm.tobytes() == rm0 and rv.tobytes() == rv0, "running statistics changed by a failed call"


def test_eval_without_running_stats_raises_like_torch():
    """torch.nn.functional.batch_norm(x, None, None, training=False) raises
    RuntimeError('running_mean must be defined in evaluation mode')."""
    x = bn_data()
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        bncore.batch_norm(x, None, None, training=False)
    with pytest.raises(bncore.MissingRunningStatsError):
        bncore.batch_norm_forward(x, None, None, np.ones(C, np.float32), None, training=False)


def test_torch_agrees_on_the_torch_like_errors():
    """The messages copied from PyTorch are PyTorch's (for the same exception builtin)."""
    torch = pytest.importorskip("torch", reason="torch is needed to compare messages")
    x = torch.from_numpy(bn_data(shape=(1, C)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.functional.batch_norm(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        torch.nn.functional.batch_norm(torch.from_numpy(bn_data()), None, None, training=False)


def test_read_only_running_stats_are_fine_in_eval():
    """Read-only statistics are refused only where bncore writes them (training)."""
    rm, rv = _running_stats()
    y = bncore.batch_norm(bn_data(), _readonly(rm), _readonly(rv), training=False)
    assert y.shape == (4, C, 5)


def test_jax_arrays_refused_where_written():
    """A JAX array is immutable: refused as out= with a read-only message."""
    pytest.importorskip("jax", reason="jax is not installed: immutable JAX arrays are not tested")
    import jax.numpy as jnp

    rm, rv = _running_stats()
    rm0, rv0 = rm.tobytes(), rv.tobytes()
    with pytest.raises(ValueError, match="read-only") as info:
        bncore.batch_norm(bn_data(), rm, rv, training=True, out=jnp.zeros((4, C, 5), jnp.float32))
    assert "out" in str(info.value)
    with pytest.raises(ValueError, match="read-only") as info:
        bncore.batch_norm(bn_data(), jnp.asarray(rm), rv, training=True)
    assert "running_mean" in str(info.value) and "bncore.BatchNorm" in str(info.value)
    assert rm.tobytes() == rm0 and rv.tobytes() == rv0


def test_read_only_versioned_capsule_refused_as_output():
    """A DLPack 1.x capsule flagged read-only (a read-only NumPy array's export) is refused where written."""
    rm, rv = _running_stats()
    rv0 = rv.tobytes()
    ro = _readonly(rm)
    cap = ro.__dlpack__(max_version=(1, 1))
    with pytest.raises(ValueError, match="read-only") as info:
        bncore.batch_norm(bn_data(), cap, rv, training=True)
    assert "running_mean" in str(info.value)
    assert rv.tobytes() == rv0


# ---------------------------------------------------------------- backward


BACKWARD_CASES = {
    "grad_output-shape": (lambda x, w, m, r: bncore.batch_norm_backward(np.ones((4, C, 6), np.float32), x, w, m, r),
                          ValueError, ["grad_output"]),
    "grad_output-int": (lambda x, w, m, r: bncore.batch_norm_backward(np.ones(x.shape, np.int32), x, w, m, r),
                        TypeError, ["grad_output"]),
    "grad_output-dtype": (lambda x, w, m, r: bncore.batch_norm_backward(x.astype(np.float64), x, w, m, r),
                          TypeError, ["grad_output", "float32"]),
    "input-1d": (lambda x, w, m, r: bncore.batch_norm_backward(x[0, 0], x[0, 0], w, m, r), ValueError, ["input"]),
    "save_mean-none": (lambda x, w, m, r: bncore.batch_norm_backward(x, x, w, None, r), ValueError, ["save_mean"]),
    "save_invstd-none": (lambda x, w, m, r: bncore.batch_norm_backward(x, x, w, m, None), ValueError,
                         ["save_invstd"]),
    "save_mean-length": (lambda x, w, m, r: bncore.batch_norm_backward(x, x, w, m[:2], r), ValueError,
                         ["save_mean"]),
    "weight-length": (lambda x, w, m, r: bncore.batch_norm_backward(x, x, w[:1], m, r), ValueError, ["weight"]),
    "list-grad_output": (lambda x, w, m, r: bncore.batch_norm_backward(x.tolist(), x, w, m, r), TypeError,
                         ["grad_output"]),
    "none-grad_output": (lambda x, w, m, r: bncore.batch_norm_backward(None, x, w, m, r), TypeError,
                         ["grad_output"]),
    "none-input": (lambda x, w, m, r: bncore.batch_norm_backward(x, None, w, m, r), TypeError, ["input"]),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_bad_backward_input_raises(case):
    call, exc, patterns = BACKWARD_CASES[case]
    x = bn_data()
    w = np.ones(C, np.float32)
    _, m, r = bncore.batch_norm_forward(x, training=True)
    with pytest.raises(exc) as info:
        call(x, w, m, r)
    for p in patterns:
        assert p in str(info.value), (p, str(info.value))


# ---------------------------------------------------------------- the layer keeps its state


def _layer_snapshot(layer):
    snap = {k: np.asarray(v).tobytes() for k, v in layer.state_dict().items()}
    for k in ("weight_grad", "bias_grad"):
        v = getattr(layer, k)
        snap[k] = None if v is None else v.tobytes()
    return snap


LAYER_CASES = {
    "1d-input": (lambda: bn_data()[0, 0], ValueError, "input"),
    "wrong-channels": (lambda: bn_data(shape=(4, C + 1, 5)), ValueError, "input: expected 3 channels"),
    "int-input": (lambda: np.ones((4, C, 5), np.int64), TypeError, "input"),
    "one-value-per-channel": (lambda: bn_data(shape=(1, C)), ValueError, "Expected more than 1 value per channel"),
    "consumed-capsule": (lambda: _consumed_capsule(bn_data()), ValueError, "consumed"),
    "list": (lambda: [[1.0] * C] * 4, TypeError, "input"),
    "str": (lambda: "x", TypeError, "input"),
    "none": (lambda: None, TypeError, "input"),
    "device": (lambda: FakeDeviceTensor(bn_data()), ValueError, "device"),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_batchnorm_layer_state_unchanged_after_failed_forward(case, training):
    make, exc, pattern = LAYER_CASES[case]
    if case == "one-value-per-channel" and not training:
        pytest.skip("one value per channel is valid in eval mode (the running statistics normalize)")
    layer = bncore.BatchNorm(C, momentum=0.3)
    for seed in range(3):  # non-trivial state and gradients
        layer(bn_data(seed))
        layer.backward(bn_data(seed + 10))
    layer.weight += 0.25
    layer.train(training)
    before = _layer_snapshot(layer)
    with pytest.raises(exc, match=pattern):
        layer(make())
    assert _layer_snapshot(layer) == before
    # the layer still works, and its backward refers to the last successful forward
    dx = layer.backward(bn_data(20))
    assert dx.shape == (4, C, 5)


def test_batchnorm_layer_backward_errors_keep_gradients():
    layer = bncore.BatchNorm(C)
    layer(bn_data(1))
    layer.backward(bn_data(2))
    before = _layer_snapshot(layer)
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(np.ones((4, C, 6), np.float32))
    with pytest.raises(TypeError, match="grad_output"):
        layer.backward("dy")
    assert _layer_snapshot(layer) == before
    fresh = bncore.BatchNorm(C)
    with pytest.raises(RuntimeError, match="backward"):
        fresh.backward(bn_data())


@pytest.mark.parametrize("bad", ["missing-key", "bad-shape", "int-dtype", "nbt-shape"])
def test_batchnorm_load_state_dict_is_all_or_nothing(bad):
    layer = bncore.BatchNorm(C)
    layer(bn_data(5))
    before = _layer_snapshot(layer)
    good = {"weight": np.full(C, 2.0), "bias": np.full(C, -1.0), "running_mean": np.full(C, 3.0),
            "running_var": np.full(C, 4.0), "num_batches_tracked": np.array(7)}
    state = dict(good)
    if bad == "missing-key":
        del state["running_var"]
        exc, pattern = KeyError, "running_var"
    elif bad == "bad-shape":
        state["running_var"] = np.ones(C + 1)  # comes after keys that are fine
        exc, pattern = ValueError, "running_var"
    elif bad == "int-dtype":
        state["running_var"] = np.ones(C, np.int64)
        exc, pattern = TypeError, "running_var"
    else:
        state["num_batches_tracked"] = np.array([1, 2])
        exc, pattern = ValueError, "num_batches_tracked"
    with pytest.raises(exc, match=pattern):
        layer.load_state_dict(state)
    assert _layer_snapshot(layer) == before
    layer.load_state_dict(good)
    assert int(layer.num_batches_tracked) == 7 and np.all(layer.running_var == 4.0)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 3.0}, ValueError, "num_features"),
    ({"num_features": 3, "eps": -1.0}, ValueError, "eps"),
    ({"num_features": 3, "momentum": 2.0}, ValueError, "momentum"),
    ({"num_features": 3, "dtype": "int32"}, TypeError, "dtype"),
])
def test_batchnorm_layer_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        bncore.BatchNorm(**kwargs)


# ---------------------------------------------------------------- statuses and versions


EXPECTED_BUILTIN = {
    1: ValueError,   # invalid argument
    2: ValueError,   # shape mismatch
    3: TypeError,    # unsupported dtype
    4: ValueError,   # unsupported device
    5: ValueError,   # overlap
    6: MemoryError,  # out of memory
    7: RuntimeError,  # internal
}


def test_every_status_maps_to_a_distinct_exception_class():
    count = _core.STATUS_COUNT
    assert count >= 2
    assert set(range(1, count)) <= set(EXPECTED_BUILTIN), "a new status needs its builtin in EXPECTED_BUILTIN"
    assert _core.error_for_status(0, "ok") is None
    classes = []
    for code in range(1, count):
        err = _core.error_for_status(code, f"message {code}")
        cls = type(err)
        assert isinstance(err, bncore.BncoreError), code
        assert isinstance(err, EXPECTED_BUILTIN[code]), (code, cls.__mro__)
        assert cls.status == code
        assert f"message {code}" in str(err)
        assert _core.status_string(code) in str(err)
        classes.append(cls)
    assert len(set(classes)) == len(classes), classes
    # and each is exported under its name
    for cls in classes:
        assert getattr(bncore, cls.__name__) is cls
    assert not issubclass(bncore.BncoreError, (ValueError, TypeError, MemoryError, RuntimeError))


def test_status_strings_are_distinct_and_non_empty():
    count = _core.STATUS_COUNT
    strings = [_core.status_string(code) for code in range(count)]
    assert all(isinstance(s, str) and s.strip() for s in strings), strings
    assert len(set(strings)) == count, strings
    # outside the range: "unknown status", distinct from every real one
    for code in (count, count + 5, -1):
        s = _core.status_string(code)
        assert "unknown" in s and s not in strings


def test_version_is_one_version():
    meta = importlib.metadata.version("bncore")
    assert bncore.__version__ == meta == _core.version_string()
    major, minor, patch = (int(p) for p in meta.split(".")[:3])
    assert _core.version() == major * 10000 + minor * 100 + patch


# ================================================================ layer, RMS, group, instance norm and normalize

VN, VC, VL = 2, 6, 5
NAN, INF = float("nan"), float("inf")


def x3(seed=0, shape=(VN, VC, VL), dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) + 0.5).astype(dtype)


def ones(*shape):
    return np.ones(shape, np.float32)


# ---------------------------------------------------------------- functional forward errors

# name -> (call, exception type, regex patterns the message must contain)
FORWARD = {
    # normalized_shape that is not the input's trailing dims
    "layer-normalized_shape-mismatch": (lambda: bncore.layer_norm(x3(), (VC,)), ValueError,
                                        ["normalized_shape", r"\[6\]", r"\[2, 6, 5\]"]),
    "layer-normalized_shape-too-long": (lambda: bncore.layer_norm(x3(), (1, VN, VC, VL)), ValueError,
                                        ["normalized_shape"]),
    "layer-normalized_shape-two-dims": (lambda: bncore.layer_norm(x3(), (VL, VC)), ValueError,
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
    "layer-weight-shape": (lambda: bncore.layer_norm(x3(), (VL,), ones(VL + 1)), ValueError,
                           ["weight", r"\(5,\)", r"\(6,\)"]),
    "layer-bias-shape": (lambda: bncore.layer_norm(x3(), (VC, VL), ones(VC, VL), ones(VL)), ValueError,
                         ["bias", r"\(6, 5\)", r"\(5,\)"]),
    "layer-weight-transposed": (lambda: bncore.layer_norm(x3(), (VC, VL), ones(VL, VC)), ValueError, ["weight"]),
    "rms-weight-shape": (lambda: bncore.rms_norm(x3(), (VL,), ones(1, VL)), ValueError, ["weight", r"\(1, 5\)"]),
    "group-weight-shape": (lambda: bncore.group_norm(x3(), 3, ones(3)), ValueError, ["weight", r"\(6,\)", r"\(3,\)"]),
    "group-bias-shape": (lambda: bncore.group_norm(x3(), 3, ones(VC), ones(VC, 1)), ValueError, ["bias"]),
    "instance-weight-shape": (lambda: bncore.instance_norm(x3(), weight=ones(VL)), ValueError, ["weight", r"\(6,\)"]),
    "instance-bias-shape": (lambda: bncore.instance_norm(x3(), weight=ones(VC), bias=ones(VC + 1)), ValueError,
                            ["bias", r"\(7,\)"]),
    "normalize-weight-shape": (lambda: bncore.normalize(x3(), (1,), ones(VL)), ValueError, ["weight", r"\(6,\)"]),
    "normalize-bias-affine-axes": (lambda: bncore.normalize(x3(), (1,), ones(VN, VL), ones(VC), affine_axes=(0, 2)),
                                   ValueError, ["bias", r"\(2, 5\)"]),
    "layer-weight-int": (lambda: bncore.layer_norm(x3(), (VL,), np.ones(VL, np.int32)), TypeError, ["weight", "int32"]),
    # too few dims for a channel axis
    "group-1d": (lambda: bncore.group_norm(x3()[0, 0], 1), ValueError, ["input", "at least 2 dimensions"]),
    "group-0d": (lambda: bncore.group_norm(np.array(1.0, np.float32), 1), ValueError, ["input"]),
    "instance-2d": (lambda: bncore.instance_norm(x3()[0]), ValueError, ["input", "at least 3 dimensions"]),
    "instance-1d": (lambda: bncore.instance_norm(x3()[0, 0]), ValueError, ["input", "at least 3 dimensions"]),
    # eps: negative or non-finite, for every variant
    **{f"{v}-eps-{name}": (call, ValueError, ["eps", re.escape(text)])
       for name, bad, text in [("negative", -1e-5, "-1e-05"), ("nan", NAN, "nan"), ("inf", INF, "inf"),
                               ("minus-inf", -INF, "-inf")]
       for v, call in [("layer", lambda bad=bad: bncore.layer_norm(x3(), (VL,), eps=bad)),
                       ("rms", lambda bad=bad: bncore.rms_norm(x3(), (VL,), eps=bad)),
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
        return bncore.layer_norm_forward(x, (VL,))[1:]
    if kind == "group":
        return bncore.group_norm_forward(x, 2)[1:]
    if kind == "instance":
        return bncore.instance_norm_forward(x)[1:]
    return bncore.normalize_forward(x, (0, 2))[1:]


BACKWARD = {
    "layer-grad_output-shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x[:, :, :4], x, (VL,), None, m, r),
                                ValueError, ["grad_output"]),
    "layer-grad_output-dtype": ("layer", lambda x, m, r: bncore.layer_norm_backward(x.astype(np.float64), x, (VL,),
                                                                                    None, m, r),
                                TypeError, ["grad_output", "float32"]),
    "layer-normalized_shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (VC,), None, m, r),
                               ValueError, ["normalized_shape"]),
    "layer-save_mean-shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (VL,), None, m[:, :1], r),
                              ValueError, ["save_mean", r"\(2, 6\)"]),
    "layer-save_rstd-none": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (VL,), None, m, None),
                             ValueError, ["save_rstd"]),
    "layer-weight-shape": ("layer", lambda x, m, r: bncore.layer_norm_backward(x, x, (VL,), ones(VC), m, r),
                           ValueError, ["weight"]),
    "rms-save_rstd-none": ("layer", lambda x, m, r: bncore.rms_norm_backward(x, x, (VL,), None, None),
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
    return rng.normal(size=VC).astype(np.float32), rng.uniform(0.5, 2, size=VC).astype(np.float32)


def _overlapping_out(rm, rv):
    buf = np.zeros(VN * VC * VL, np.float32)
    return bncore.instance_norm(x3(), buf[:VC], rv, out=buf.reshape(VN, VC, VL))


INSTANCE_STATE = {
    "weight-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, ones(VL)), ValueError, ["weight"]),
    "bias-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, ones(VC), ones(2)), ValueError, ["bias"]),
    "eps-negative": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, eps=-1.0), ValueError, ["eps"]),
    "eps-nan": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, eps=NAN), ValueError, ["eps"]),
    "eps-inf": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, eps=INF), ValueError, ["eps"]),
    "momentum-range": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, momentum=1.5), ValueError, ["momentum"]),
    "input-2d": (lambda rm, rv: bncore.instance_norm(x3()[0], rm, rv), ValueError, ["input"]),
    "channels-mismatch": (lambda rm, rv: bncore.instance_norm(x3(shape=(VN, VC + 1, VL)), rm, rv), ValueError,
                          ["running_mean", r"\(7,\)"]),
    "running_var-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, np.ones(VC + 1, np.float32)), ValueError,
                          ["running_var"]),
    "only-running_mean": (lambda rm, rv: bncore.instance_norm(x3(), rm, None), ValueError,
                          ["running_mean", "running_var"]),
    "one-spatial-value": (lambda rm, rv: bncore.instance_norm(x3(shape=(VN, VC, 1)), rm, rv), ValueError,
                          ["Expected more than 1 spatial element"]),
    "out-shape": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, out=np.empty((VN, VC, VL + 1), np.float32)),
                  bncore.ShapeMismatchError, ["out"]),
    "out-dtype": (lambda rm, rv: bncore.instance_norm(x3(), rm, rv, out=np.empty((VN, VC, VL))),
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
    lambda out: bncore.layer_norm(x3(), (VC,), out=out),
    lambda out: bncore.group_norm(x3(), 4, out=out),
    lambda out: bncore.rms_norm(x3(), (VL,), eps=-1.0, out=out),
    lambda out: bncore.normalize(x3(), (1, 1), out=out),
], ids=["layer", "group", "rms", "normalize"])
def test_failed_call_leaves_out_untouched(call):
    out = np.full((VN, VC, VL), 42.0, np.float32)
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
    return {"layer": lambda: bncore.LayerNorm((VC, VL)), "rms": lambda: bncore.RMSNorm(VL),
            "group": lambda: bncore.GroupNorm(3, VC),
            "instance": lambda: bncore.InstanceNorm(VC, affine=True, track_running_stats=True, momentum=0.3)}[kind]()


def _trained(kind):
    layer = _make(kind)
    for seed in range(3):  # non-trivial running statistics and gradients
        layer(x3(seed))
        layer.backward(x3(seed + 10))
    layer.weight += 0.25
    return layer


LAYER_BAD_INPUTS = {
    "layer": [("normalized_shape", (VN, VC, VL + 1)), ("normalized_shape", (VC,))],
    "rms": [("normalized_shape", (VN, VC, VL + 2))],
    "group": [("weight", (VN, VC + 3, VL)), ("input", (VC,))],
    "instance": [("input", (VC, VL)), ("weight", (VN, VC + 1, VL)), ("Expected more than 1 spatial", (VN, VC, 1))],
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
    assert dx.shape == (VN, VC, VL)


@pytest.mark.parametrize("kind", ["layer", "rms", "group", "instance"])
def test_layer_backward_errors_keep_gradients(kind):
    layer = _trained(kind)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(x3(1, shape=(VN, VC, VL + 1)))
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
    ("layer", "bias", np.ones((VL, VC)), ValueError),
    ("layer", "weight", np.ones((VC, VL), np.int64), TypeError),
    ("rms", "weight", np.ones(VL + 1), ValueError),
    ("group", "bias", np.ones(VC - 1), ValueError),
    ("instance", "running_var", np.ones(VC + 1), ValueError),
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
