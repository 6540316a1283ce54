"""A catalogue of bad calls across the whole public API (issue 14, item 5).

Each row: an id, a maker that returns (the bad call, the state objects it could touch), the expected
exception type (or, for the C ABI, the bn_status_t), and a substring naming the offending argument.
The one test snapshots every state byte for byte, makes the call, checks the type and the name in
the message, and checks that every snapshot is unchanged. Rows where the library does not raise or
names no argument are strict xfails whose reason says what is wrong.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

import bncore

torch = pytest.importorskip("torch")
import bncore.torch as bt  # noqa: E402

IAE = bncore.InvalidArgumentError
SME = bncore.ShapeMismatchError
UDE = bncore.UnsupportedDtypeError
OVL = bncore.OverlapError
MRS = bncore.MissingRunningStatsError

C = 3


def x3(shape=(4, C, 5), dtype=np.float32, seed=0):
    return (np.random.default_rng(seed).normal(size=shape) + 0.5).astype(dtype)


def rstats(c=C):
    return np.zeros(c, np.float32), np.ones(c, np.float32)


def self_overlapping(shape, dtype=np.float32):
    """A writable array whose elements all share one memory location (stride 0)."""
    base = np.zeros(1, dtype)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=(0,) * len(shape), writeable=True)


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def xf(reason):
    """A finding: the call does not raise the right error or names no argument."""
    return pytest.mark.xfail(strict=True, reason=reason)




# ================================================================ snapshots


def snap(obj):
    """Every state byte of obj, in a comparable form."""
    if isinstance(obj, np.ndarray):
        return ("nd", obj.dtype.str, obj.shape, obj.strides, obj.tobytes())
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu" or t.layout != torch.strided:
            return ("t", str(t.dtype), tuple(t.shape), str(t.device))
        return ("t", str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    if isinstance(obj, torch.nn.Module):
        return ("m", obj.training, tuple((k, snap(v)) for k, v in obj.state_dict().items()))
    if isinstance(obj, bncore.RunningStats):
        return ("rs", snap(obj.mean), snap(obj.var), obj.count, obj.skipped, obj.momentum)
    if isinstance(obj, bncore.Moments):
        return ("mo", snap(obj.count), snap(obj.mean), snap(obj.m2))
    if isinstance(obj, (list, tuple)):
        return tuple(snap(v) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("bncore"):
        # a layer: every attribute (arrays, the RunningStats, the saved forward, hyperparameters)
        return ("obj", tuple((k, snap(v)) for k, v in sorted(vars(obj).items())))
    return ("v", repr(obj))


# ================================================================ the C ABI through ctypes


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class Desc(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint64), ("reduce_axes", ctypes.c_uint64), ("param_axes", ctypes.c_uint64),
                ("split_axis", ctypes.c_int32), ("reserved", ctypes.c_int32), ("num_groups", ctypes.c_int64),
                ("eps", ctypes.c_double), ("momentum", ctypes.c_double), ("flags", ctypes.c_uint32),
                ("reserved2", ctypes.c_uint32), ("virtual_batch_size", ctypes.c_int64), ("rmax", ctypes.c_double),
                ("dmax", ctypes.c_double), ("activation", ctypes.c_uint32), ("reserved3", ctypes.c_uint32)]


FLAG_USE_RUNNING_STATS = 1 << 1
FLAG_UPDATE_RUNNING_STATS = 1 << 2
FLAG_GIVEN_STATS = 1 << 5

_LIB = None


def lib():
    global _LIB
    if _LIB is None:
        L = ctypes.CDLL(bncore.get_library())
        P = ctypes.POINTER
        L.bn_last_error.restype = ctypes.c_char_p
        L.bn_last_error.argtypes = []
        L.bn_norm_desc_init_batch.restype = ctypes.c_int
        L.bn_norm_desc_init_batch.argtypes = [P(Desc), ctypes.c_int32, ctypes.c_int32, ctypes.c_double]
        L.bn_norm_forward.restype = ctypes.c_int
        L.bn_norm_forward.argtypes = [ctypes.c_void_p, P(Desc), P(DLTensor), P(DLTensor), P(DLTensor), P(DLTensor),
                                      P(DLTensor), ctypes.c_int64, P(DLTensor), P(DLTensor), P(DLTensor),
                                      P(DLTensor), P(DLTensor)]
        _LIB = L
    return _LIB


class Tensor:
    """A DLTensor over a NumPy array (kept alive here); shape and strides (in elements) may be forged."""

    def __init__(self, arr, shape=None, strides=None, code=None):
        self.arr = arr
        shape = arr.shape if shape is None else shape
        if strides is None:
            strides = tuple(s // arr.itemsize for s in arr.strides)
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._strides = (ctypes.c_int64 * len(shape))(*strides)
        t = self.t = DLTensor()
        t.data = arr.ctypes.data
        t.device = DLDevice(1, 0)
        t.ndim = len(shape)
        kind = {"f": 2, "i": 0, "u": 1}[arr.dtype.kind] if code is None else code
        t.dtype = DLDataType(kind, arr.dtype.itemsize * 8, 1)
        t.shape = self._shape
        t.strides = self._strides
        t.byte_offset = 0

    def ptr(self):
        return ctypes.pointer(self.t)


def c_batch_desc(ndim=3, eps=1e-5):
    d = Desc()
    assert lib().bn_norm_desc_init_batch(ctypes.byref(d), ndim, 1, eps) == 0
    return d


class CCall:
    """The arguments of one bn_norm_forward call; every field may be spoiled before calling."""

    def __init__(self, x=None):
        self.xa = x3() if x is None else x
        self.rm, self.rv = rstats()
        self.ya = np.empty_like(self.xa)
        self.desc = c_batch_desc(self.xa.ndim)
        self.desc_ptr = ctypes.pointer(self.desc)
        self.x = Tensor(self.xa)
        self.weight = self.bias = self.stats_mean = self.stats_m2 = None
        self.stats_count = 0
        self.running_mean, self.running_var = Tensor(self.rm), Tensor(self.rv)
        self.y = Tensor(self.ya)
        self.save_mean = self.save_rstd = None

    def states(self):
        return [self.xa, self.rm, self.rv]

    def __call__(self):
        def p(t):
            return None if t is None else t.ptr()
        return lib().bn_norm_forward(None, self.desc_ptr, p(self.x), p(self.weight), p(self.bias),
                                     p(self.stats_mean), p(self.stats_m2), self.stats_count, p(self.running_mean),
                                     p(self.running_var), p(self.y), p(self.save_mean), p(self.save_rstd))


def c_forward(spoil):
    def make():
        c = CCall()
        spoil(c)
        return c, c.states()
    return make


def c_init(desc_null=False, ndim=3, axis=1, eps=1e-5):
    def make():
        d = Desc()
        ptr = None if desc_null else ctypes.byref(d)
        return (lambda: lib().bn_norm_desc_init_batch(ptr, ndim, axis, eps)), []
    return make


def _set(obj, **fields):
    for k, v in fields.items():
        setattr(obj, k, v)


def _spoil_shape(c):
    c.x = Tensor(c.xa, shape=(4, -3, 5))


def _spoil_int_x(c):
    c.xa = np.arange(60, dtype=np.int32).reshape(4, 3, 5)
    c.x = Tensor(c.xa)
    c.y = Tensor(np.empty_like(c.xa))


def _spoil_y_overlaps_running(c):
    c.desc.flags = FLAG_UPDATE_RUNNING_STATS
    c.desc.momentum = 0.1
    c.y = Tensor(c.rm, shape=c.xa.shape, strides=(0, 1, 0))


def _spoil_given_stats(c):
    c.desc.flags = FLAG_GIVEN_STATS
    c.stats_count = 20


def _spoil_eval_no_running(c):
    c.desc.flags = FLAG_USE_RUNNING_STATS
    c.running_mean = c.running_var = None


def _spoil_big_struct(c):
    # a caller compiled against a newer, larger struct whose extra bytes are not zero
    big = (ctypes.c_uint8 * (ctypes.sizeof(Desc) + 8))()
    ctypes.memmove(big, ctypes.byref(c.desc), ctypes.sizeof(Desc))
    big[ctypes.sizeof(Desc)] = 1
    c._big = big
    c.desc_ptr = ctypes.cast(big, ctypes.POINTER(Desc))
    c.desc_ptr.contents.struct_size = ctypes.sizeof(Desc) + 8


FLAG_RENORM = 1 << 6


def _spoil_v1_struct_renorm(c):
    # a caller of the 0.2 layout: the V2 fields read as 0, so RENORM's rmax is 0
    c.desc.struct_size = 64
    c.desc.flags = FLAG_RENORM


C_ROWS = [
    ("c_forward_renorm_rmax_below_1", c_forward(lambda c: _set(c.desc, flags=FLAG_RENORM, rmax=0.5, dmax=1.0)),
     "rmax"),
    ("c_forward_renorm_dmax_negative", c_forward(lambda c: _set(c.desc, flags=FLAG_RENORM, rmax=2.0, dmax=-1.0)),
     "dmax"),
    ("c_forward_renorm_eval", c_forward(lambda c: _set(c.desc, flags=FLAG_RENORM | FLAG_USE_RUNNING_STATS, rmax=2.0,
                                                        dmax=1.0)), "RENORM"),
    ("c_forward_renorm_v1_struct", c_forward(_spoil_v1_struct_renorm), "rmax"),
    ("c_forward_renorm_without_running", c_forward(lambda c: (_set(c.desc, flags=FLAG_RENORM, rmax=2.0, dmax=1.0),
                                                              _set(c, running_mean=None, running_var=None))),
     "running_mean"),
    ("c_forward_bad_activation", c_forward(lambda c: _set(c.desc, activation=2)), "activation"),
    ("c_forward_reserved3_nonzero", c_forward(lambda c: _set(c.desc, reserved3=1)), "reserved3"),
    ("c_forward_virtual_batch_negative", c_forward(lambda c: _set(c.desc, virtual_batch_size=-2)),
     "virtual_batch_size"),
    ("c_forward_virtual_batch_non_multiple", c_forward(lambda c: _set(c.desc, virtual_batch_size=3,
                                                                      flags=FLAG_UPDATE_RUNNING_STATS,
                                                                      momentum=0.1)), "virtual_batch_size"),
    ("c_init_null_desc", c_init(desc_null=True), "desc"),
    ("c_init_ndim_0", c_init(ndim=0), "ndim"),
    ("c_init_axis_out_of_range", c_init(axis=7), "axis"),
    ("c_init_negative_eps", c_init(eps=-1.0), "eps"),
    ("c_forward_null_desc", c_forward(lambda c: _set(c, desc_ptr=None)), "desc"),
    ("c_forward_unknown_flags", c_forward(lambda c: _set(c.desc, flags=1 << 12)), "flags"),
    ("c_forward_nan_eps", c_forward(lambda c: _set(c.desc, eps=float("nan"))), "eps"),
    ("c_forward_null_x", c_forward(lambda c: _set(c, x=None)), "x"),
    ("c_forward_negative_size", c_forward(_spoil_shape), "x"),
    ("c_forward_y_shape_mismatch", c_forward(lambda c: _set(c, y=Tensor(np.empty((4, 3, 4), np.float32)))), "y"),
    ("c_forward_int_dtype", c_forward(_spoil_int_x), "x"),
    ("c_forward_y_overlaps_running_mean", c_forward(_spoil_y_overlaps_running), "y"),
    ("c_forward_stride0_y", c_forward(lambda c: _set(c, y=Tensor(c.ya, strides=(0, 0, 0)))), "y"),
    ("c_forward_given_stats_without_stats", c_forward(_spoil_given_stats), "stats_mean"),
    ("c_forward_eval_without_running", c_forward(_spoil_eval_no_running), "running_mean"),
    ("c_forward_struct_size_0", c_forward(lambda c: _set(c.desc, struct_size=0)), "struct_size"),
    ("c_forward_struct_size_too_big", c_forward(_spoil_big_struct), "struct_size"),
    ("c_forward_reserved_nonzero", c_forward(lambda c: _set(c.desc, reserved=1)), "reserved"),
    ("c_forward_momentum_2", c_forward(lambda c: _set(c.desc, flags=FLAG_UPDATE_RUNNING_STATS, momentum=2.0)),
     "momentum"),
    ("c_forward_weight_wrong_size", c_forward(lambda c: _set(c, weight=Tensor(np.ones(4, np.float32)))), "weight"),
]

# expected status per C row (bn_status_t)
C_STATUS = {"c_forward_virtual_batch_non_multiple": 2,
            "c_forward_y_shape_mismatch": 2, "c_forward_weight_wrong_size": 2, "c_forward_int_dtype": 3,
            "c_forward_y_overlaps_running_mean": 5, "c_forward_stride0_y": 5}


# ================================================================ Python rows


def call(fn, *args, states=(), **kwargs):
    """A maker for fn(*args, **kwargs); argument factories (callables marked by `lazy`) are built fresh."""
    def make():
        built = [a() if isinstance(a, Lazy) else a for a in args]
        kw = {k: (v() if isinstance(v, Lazy) else v) for k, v in kwargs.items()}
        objs = [a for a in list(built) + list(kw.values()) if isinstance(a, (np.ndarray, torch.Tensor))]
        return (lambda: fn(*built, **kw)), objs + list(states)
    return make


class Lazy:
    def __init__(self, f):
        self.f = f

    def __call__(self):
        return self.f()


X = Lazy(x3)
RM = Lazy(lambda: np.zeros(C, np.float32))
RV = Lazy(lambda: np.ones(C, np.float32))


def on(factory, method):
    """A maker calling method(obj) on a fresh obj = factory(); obj is the state."""
    def make():
        obj = factory()
        return (lambda: method(obj)), [obj]
    return make


def bn_layer(**kw):
    return bncore.BatchNorm(C, **kw)


def trained_bn():
    layer = bncore.BatchNorm(C)
    layer.forward(x3())
    return layer


def trained_stats():
    s = bncore.RunningStats(C)
    s.update(np.ones(C), np.ones(C), 10)
    return s


def bn_state(**over):
    s = {"weight": np.ones(C, np.float32), "bias": np.zeros(C, np.float32), "running_mean": np.full(C, 2.0),
         "running_var": np.full(C, 3.0), "num_batches_tracked": np.array(5)}
    s.update(over)
    return s


def bn_state_missing():
    s = bn_state()
    del s["running_mean"]
    return s


def bn_saved():
    _, sm, sr = bncore.batch_norm_forward(x3(), training=True)
    return sm, sr


def ln_saved():
    _, sm, sr = bncore.layer_norm_forward(x3(), 5)
    return sm, sr


def setter(obj_factory, attr, value):
    def make():
        obj = obj_factory()
        return (lambda: setattr(obj, attr, value)), [obj]
    return make


def f(name):
    return getattr(bncore, name)




# (id, maker, expected exception, substring naming the argument[, marks])
def _residual_is_out():
    x, rm, r = x3(), np.zeros(C, np.float32), x3(seed=1)
    return (lambda: bncore.batch_norm(x, rm, np.ones(C, np.float32), training=True, residual=r, out=r)), [x, rm, r]


PY_ROWS = [
    # ------------------------------------------------------------ batch renorm, ghost batch norm, fused epilogues
    ("renorm_rmax_below_1", call(f("batch_renorm"), X, RM, RV, training=True, rmax=0.5), IAE, "rmax"),
    ("renorm_rmax_nan", call(f("batch_renorm"), X, RM, RV, training=True, rmax=float("nan")), IAE, "rmax"),
    ("renorm_dmax_negative", call(f("batch_renorm"), X, RM, RV, training=True, dmax=-0.1), IAE, "dmax"),
    ("renorm_dmax_str", call(f("batch_renorm"), X, RM, RV, training=True, dmax="5"), IAE, "dmax"),
    ("renorm_without_running", call(f("batch_renorm"), X, None, None, training=True), MRS, "running_mean"),
    ("renorm_running_var_shape", call(f("batch_renorm"), X, RM, Lazy(lambda: np.ones(4, np.float32)),
                                      training=True), SME, "running_var"),
    ("renorm_backward_r_missing", call(f("batch_renorm_backward"), X, X, None, Lazy(lambda: np.zeros(C, np.float32)),
                                       Lazy(lambda: np.ones(C, np.float32)), None, RM), IAE, "r"),
    ("renorm_layer_rmax", call(bn_layer, renorm=True, rmax=0.9), IAE, "rmax"),
    ("renorm_layer_ghost", call(bn_layer, renorm=True, virtual_batch_size=2), IAE, "virtual_batch_size"),
    ("ghost_non_multiple", call(f("batch_norm"), X, RM, RV, training=True, virtual_batch_size=3), SME,
     "virtual_batch_size"),
    ("ghost_zero", call(f("batch_norm"), X, RM, RV, training=True, virtual_batch_size=0), IAE, "virtual_batch_size"),
    ("ghost_one_value_per_virtual_batch", call(f("batch_norm"), Lazy(lambda: x3((4, C))), RM, RV, training=True,
                                               virtual_batch_size=1), IAE, "input"),
    ("ghost_layer_non_multiple", on(lambda: bncore.BatchNorm(C, virtual_batch_size=3), lambda m: m.forward(x3())),
     SME, "virtual_batch_size"),
    ("fused_bad_activation", call(f("batch_norm"), X, RM, RV, training=True, activation="gelu"), IAE, "activation"),
    ("fused_activation_not_str", call(f("batch_norm"), X, RM, RV, training=True, activation=1), IAE, "activation"),
    ("fused_residual_shape", call(f("batch_norm"), X, RM, RV, training=True,
                                  residual=Lazy(lambda: np.ones((4, C, 4), np.float32))), SME, "residual"),
    ("fused_residual_dtype", call(f("batch_norm"), X, RM, RV, training=True,
                                  residual=Lazy(lambda: np.ones((4, C, 5), np.float64))), UDE, "residual"),
    ("fused_residual_is_out", _residual_is_out, OVL, "residual"),
    ("fused_backward_relu_without_output", call(f("batch_norm_backward"), X, X, None,
                                                Lazy(lambda: np.zeros(C, np.float32)),
                                                Lazy(lambda: np.ones(C, np.float32)), activation="relu"),
     IAE, "output"),
    ("fold_var_shape", call(f("fold"), Lazy(lambda: np.ones((C, 2, 3, 3), np.float32)), None, RM,
                            Lazy(lambda: np.ones(4, np.float32))), SME, "running_var"),
    ("fold_axis", call(f("fold"), Lazy(lambda: np.ones((C, 2), np.float32)), None, RM, RV, axis=2), IAE, "axis"),
    # ------------------------------------------------------------ batch norm, functional
    ("bn_negative_eps", call(f("batch_norm"), X, RM, RV, training=True, eps=-1.0), IAE, "eps"),
    ("bn_nan_eps", call(f("batch_norm"), X, RM, RV, training=True, eps=float("nan")), IAE, "eps"),
    ("bn_momentum_str", call(f("batch_norm"), X, RM, RV, training=True, momentum="a"), TypeError, "momentum"),
    ("bn_momentum_2", call(f("batch_norm"), X, RM, RV, training=True, momentum=2.0), IAE, "momentum"),
    ("bn_running_mean_shape", call(f("batch_norm"), X, Lazy(lambda: np.zeros(4, np.float32)), RV, training=True),
     SME, "running_mean"),
    ("bn_running_var_missing", call(f("batch_norm"), X, RM, None, training=True), IAE, "running_var"),
    ("bn_weight_shape", call(f("batch_norm"), X, RM, RV, Lazy(lambda: np.ones(4, np.float32)), training=True),
     SME, "weight"),
    ("bn_bias_shape", call(f("batch_norm"), X, RM, RV, None, Lazy(lambda: np.ones(2, np.float32)), training=True),
     SME, "bias"),
    ("bn_int_input", call(f("batch_norm"), Lazy(lambda: np.ones((4, C, 5), np.int32)), RM, RV, training=True),
     UDE, "input"),
    ("bn_complex_input", call(f("batch_norm"), Lazy(lambda: np.ones((4, C, 5), np.complex64)), RM, RV,
                              training=True), UDE, "input"),
    ("bn_1d_input", call(f("batch_norm"), Lazy(lambda: np.ones(5, np.float32)), training=True), IAE, "input"),
    ("bn_axis_out_of_range", call(f("batch_norm"), X, RM, RV, training=True, axis=5), IAE, "axis"),
    ("bn_eval_without_running", call(f("batch_norm"), X, training=False), MRS, "running_mean"),
    ("bn_one_value_per_channel", call(f("batch_norm"), Lazy(lambda: x3((1, C))), RM, RV, training=True),
     IAE, "input"),
    ("bn_out_shape", call(f("batch_norm"), X, RM, RV, training=True, out=Lazy(lambda: np.empty((4, C, 4),
                                                                                                np.float32))),
     SME, "out"),
    ("bn_out_int", call(f("batch_norm"), X, RM, RV, training=True, out=Lazy(lambda: np.empty((4, C, 5), np.int32))),
     UDE, "out"),
    ("bn_out_read_only", call(f("batch_norm"), X, RM, RV, training=True,
                              out=Lazy(lambda: read_only(np.empty((4, C, 5), np.float32)))), ValueError, "out"),
    ("bn_out_stride0", call(f("batch_norm"), X, RM, RV, training=True, out=Lazy(lambda: self_overlapping((4, C, 5)))),
     OVL, "out"),
    ("bn_running_mean_read_only", call(f("batch_norm"), X, Lazy(lambda: read_only(np.zeros(C, np.float32))), RV,
                                       training=True), ValueError, "running_mean"),
    ("bn_running_mean_int", call(f("batch_norm"), X, Lazy(lambda: np.zeros(C, np.int64)), RV, training=True),
     UDE, "running_mean"),
    ("bn_running_mean_stride0", call(f("batch_norm"), X, Lazy(lambda: self_overlapping((C,))), RV, training=True),
     OVL, "running_mean"),
    ("bn_input_none", call(f("batch_norm"), None, RM, RV, training=True), TypeError, "input"),
    ("bn_input_list_of_str", call(f("batch_norm"), [["a"]], RM, RV, training=True), TypeError, "input"),
    ("bn_forward_weight_2d", call(f("batch_norm_forward"), X, RM, RV, Lazy(lambda: np.ones((C, 1), np.float32)),
                                  training=True), SME, "weight"),
    ("bn_backward_grad_shape", call(f("batch_norm_backward"), Lazy(lambda: x3((4, C, 4))), X, None,
                                    Lazy(lambda: np.zeros(C, np.float32)), Lazy(lambda: np.ones(C, np.float32))),
     SME, "grad_output"),
    ("bn_backward_save_mean_shape", call(f("batch_norm_backward"), X, X, None, Lazy(lambda: np.zeros(4, np.float32)),
                                         Lazy(lambda: np.ones(C, np.float32))), SME, "save_mean"),
    ("bn_backward_save_invstd_none", call(f("batch_norm_backward"), X, X, None, Lazy(lambda: np.zeros(C, np.float32)),
                                          None), IAE, "save_invstd"),
    ("bn_backward_grad_int", call(f("batch_norm_backward"), Lazy(lambda: np.ones((4, C, 5), np.int32)), X, None,
                                  Lazy(lambda: np.zeros(C, np.float32)), Lazy(lambda: np.ones(C, np.float32))),
     UDE, "grad_output"),
    # ------------------------------------------------------------ layer norm / RMS norm
    ("ln_shape_float", call(f("layer_norm"), X, 5.0), TypeError, "normalized_shape"),
    ("ln_shape_mismatch", call(f("layer_norm"), X, (4,)), SME, "normalized_shape"),
    ("ln_shape_too_long", call(f("layer_norm"), X, (2, 4, C, 5)), SME, "normalized_shape"),
    ("ln_weight_shape", call(f("layer_norm"), X, 5, Lazy(lambda: np.ones(4, np.float32))), SME, "weight"),
    ("ln_bias_int", call(f("layer_norm"), X, 5, None, Lazy(lambda: np.ones(5, np.int32))), UDE, "bias"),
    ("ln_negative_eps", call(f("layer_norm"), X, 5, eps=-1e-5), IAE, "eps"),
    ("ln_eps_str", call(f("layer_norm"), X, 5, eps="small"), IAE, "eps"),
    ("ln_out_stride0", call(f("layer_norm"), X, 5, out=Lazy(lambda: self_overlapping((4, C, 5)))), OVL, "out"),
    ("ln_out_dtype", call(f("layer_norm"), X, 5, out=Lazy(lambda: np.empty((4, C, 5), np.float64))), UDE, "out"),
    ("ln_forward_input_none", call(f("layer_norm_forward"), None, 5), TypeError, "input"),
    ("ln_backward_save_rstd_shape", call(lambda: bncore.layer_norm_backward(x3(), x3(), 5, None, ln_saved()[0],
                                                                            np.ones(3, np.float32))), SME,
     "save_rstd"),
    ("ln_backward_weight_shape", call(lambda: bncore.layer_norm_backward(x3(), x3(), 5, np.ones(4, np.float32),
                                                                         *ln_saved())), SME, "weight"),
    ("rms_negative_eps", call(f("rms_norm"), X, 5, eps=-1.0), IAE, "eps"),
    ("rms_weight_shape", call(f("rms_norm"), X, 5, Lazy(lambda: np.ones(6, np.float32))), SME, "weight"),
    ("rms_shape_mismatch", call(f("rms_norm_forward"), X, (C, 4)), SME, "normalized_shape"),
    ("rms_backward_save_rstd_shape", call(f("rms_norm_backward"), X, X, 5, None,
                                          Lazy(lambda: np.ones((4, 2), np.float32))), SME, "save_rstd"),
    # ------------------------------------------------------------ group norm
    ("gn_groups_not_dividing", call(f("group_norm"), X, 2), SME, "num_groups"),
    ("gn_groups_zero", call(f("group_norm"), X, 0), IAE, "num_groups"),
    ("gn_groups_str", call(f("group_norm"), X, "3"), IAE, "num_groups"),
    ("gn_weight_shape", call(f("group_norm"), X, 3, Lazy(lambda: np.ones(4, np.float32))), SME, "weight"),
    ("gn_1d_input", call(f("group_norm_forward"), Lazy(lambda: np.ones(6, np.float32)), 3), IAE, "input"),
    ("gn_backward_save_mean_shape", call(f("group_norm_backward"), X, X, 3, None,
                                         Lazy(lambda: np.zeros((4, 2), np.float32)),
                                         Lazy(lambda: np.ones((4, 3), np.float32))), SME, "save_mean"),
    # ------------------------------------------------------------ instance norm
    ("in_2d_input", call(f("instance_norm"), Lazy(lambda: x3((4, C))), RM, RV), IAE, "input"),
    ("in_eval_without_running", call(f("instance_norm"), X, use_input_stats=False), MRS, "running_mean"),
    ("in_running_var_shape", call(f("instance_norm"), X, RM, Lazy(lambda: np.ones(5, np.float32))), SME,
     "running_var"),
    ("in_momentum_str", call(f("instance_norm"), X, RM, RV, momentum="x"), TypeError, "momentum"),
    ("in_forward_negative_eps", call(f("instance_norm_forward"), X, RM, RV, eps=-2.0), IAE, "eps"),
    ("in_backward_weight_shape", call(f("instance_norm_backward"), X, X, Lazy(lambda: np.ones(2, np.float32)),
                                      Lazy(lambda: np.zeros((4, C), np.float32)),
                                      Lazy(lambda: np.ones((4, C), np.float32))), SME, "weight"),
    # ------------------------------------------------------------ normalize
    ("norm_axes_none", call(f("normalize"), X, None), TypeError, "axes"),
    ("norm_axes_out_of_range", call(f("normalize"), X, (7,)), IAE, "axes"),
    ("norm_axes_duplicate", call(f("normalize"), X, (1, 1)), IAE, "axes"),
    ("norm_affine_axes_out_of_range", call(f("normalize"), X, (2,), affine_axes=(9,)), IAE, "affine_axes"),
    ("norm_forward_weight_shape", call(f("normalize_forward"), X, (2,), Lazy(lambda: np.ones(4, np.float32))), SME,
     "weight"),
    ("norm_backward_save_mean_none", call(f("normalize_backward"), X, X, (2,), None, None,
                                          Lazy(lambda: np.ones((4, C), np.float32))), IAE, "save_mean"),
    # ------------------------------------------------------------ layers: constructors
    ("BatchNorm_zero_features", call(bncore.BatchNorm, 0), IAE, "num_features"),
    ("BatchNorm_float_features", call(bncore.BatchNorm, 3.5), IAE, "num_features"),
    ("BatchNorm_negative_eps", call(bncore.BatchNorm, C, eps=-1.0), IAE, "eps"),
    ("BatchNorm_momentum_1_5", call(bncore.BatchNorm, C, momentum=1.5), IAE, "momentum"),
    ("BatchNorm_int_dtype", call(bncore.BatchNorm, C, dtype="int32"), UDE, "dtype"),
    ("BatchNorm_bad_convention", call(bncore.BatchNorm, C, convention="jax"), IAE, "convention"),
    ("BatchNorm_bad_nan_policy", call(bncore.BatchNorm, C, nan_policy="ignore"), IAE, "nan_policy"),
    ("LayerNorm_float_shape", call(bncore.LayerNorm, 5.0), TypeError, "normalized_shape"),
    ("LayerNorm_zero_shape", call(bncore.LayerNorm, (0,)), IAE, "normalized_shape"),
    ("GroupNorm_not_dividing", call(bncore.GroupNorm, 2, C), SME, "num_channels"),
    ("GroupNorm_zero_channels", call(bncore.GroupNorm, 1, 0), IAE, "num_channels"),
    ("InstanceNorm_zero_features", call(bncore.InstanceNorm, 0), IAE, "num_features"),
    ("InstanceNorm_momentum_str", call(bncore.InstanceNorm, C, momentum="x"), TypeError, "momentum"),
    ("RMSNorm_negative_eps", call(bncore.RMSNorm, 5, eps=-1.0), IAE, "eps"),
    ("RMSNorm_bad_dtype", call(bncore.RMSNorm, 5, dtype="complex64"), UDE, "dtype"),
    # ------------------------------------------------------------ layers: forward / backward
    ("BatchNorm_forward_wrong_channels", on(trained_bn, lambda m: m.forward(x3((4, 5, 2)))), SME, "input"),
    ("BatchNorm_forward_int", on(trained_bn, lambda m: m.forward(np.ones((4, C, 2), np.int16))), UDE, "input"),
    ("BatchNorm_eval_forward_wrong_channels", on(lambda: trained_bn().eval(), lambda m: m.forward(x3((4, 2, 2)))),
     SME, "input"),
    ("BatchNorm_backward_before_forward", on(bn_layer, lambda m: m.backward(x3())), RuntimeError, "backward"),
    ("BatchNorm_backward_grad_shape", on(trained_bn, lambda m: m.backward(x3((4, C, 4)))), SME, "grad_output"),
    ("BatchNorm_momentum_setter", setter(trained_bn, "momentum", 2.0), IAE, "momentum"),
    ("LayerNorm_forward_wrong_shape", on(lambda: bncore.LayerNorm(5), lambda m: m.forward(x3((4, C, 4)))), SME,
     "normalized_shape"),
    ("LayerNorm_backward_before_forward", on(lambda: bncore.LayerNorm(5), lambda m: m.backward(x3())),
     RuntimeError, "backward"),
    ("GroupNorm_forward_wrong_channels", on(lambda: bncore.GroupNorm(3, 6), lambda m: m.forward(x3((2, 4, 5)))),
     SME, "num_groups"),
    ("GroupNorm_backward_before_forward", on(lambda: bncore.GroupNorm(1, C), lambda m: m.backward(x3())),
     RuntimeError, "backward"),
    ("InstanceNorm_forward_2d", on(lambda: bncore.InstanceNorm(C, track_running_stats=True),
                                   lambda m: m.forward(x3((4, C)))), IAE, "input"),
    ("InstanceNorm_backward_before_forward", on(lambda: bncore.InstanceNorm(C), lambda m: m.backward(x3())),
     RuntimeError, "backward"),
    ("RMSNorm_forward_wrong_shape", on(lambda: bncore.RMSNorm(5), lambda m: m.forward(x3((4, C, 6)))), SME,
     "normalized_shape"),
    ("RMSNorm_backward_before_forward", on(lambda: bncore.RMSNorm(5), lambda m: m.backward(x3())), RuntimeError,
     "backward"),
    # ------------------------------------------------------------ layers: loaders
    ("BatchNorm_load_missing_key", on(trained_bn, lambda m: m.load_state_dict(bn_state_missing())), KeyError,
     "running_mean"),
    ("BatchNorm_load_unexpected_key", on(trained_bn, lambda m: m.load_state_dict(bn_state(bogus=np.ones(1)))),
     KeyError, "bogus"),
    ("BatchNorm_load_weight_shape", on(trained_bn, lambda m: m.load_state_dict(bn_state(weight=np.ones(4)))), SME,
     "weight"),
    ("BatchNorm_load_count_2_63", on(trained_bn, lambda m: m.load_state_dict(
        bn_state(num_batches_tracked=np.array(2**63, np.uint64)))), IAE, "num_batches_tracked"),
    ("BatchNorm_load_count_negative", on(trained_bn, lambda m: m.load_state_dict(
        bn_state(num_batches_tracked=np.array(-1)))), IAE, "num_batches_tracked"),
    ("BatchNorm_load_running_var_complex", on(trained_bn, lambda m: m.load_state_dict(
        bn_state(running_var=np.ones(C, np.complex128)))), TypeError, "running_var"),
    ("BatchNorm_load_bias_str", on(trained_bn, lambda m: m.load_state_dict(bn_state(bias="zeros"))), SME,
     "bias"),
    ("LayerNorm_load_weight_shape", on(lambda: bncore.LayerNorm(5), lambda m: m.load_state_dict(
        {"weight": np.ones(4), "bias": np.zeros(5)})), SME, "weight"),
    ("GroupNorm_load_bias_shape", on(lambda: bncore.GroupNorm(1, C), lambda m: m.load_state_dict(
        {"weight": np.ones(C), "bias": np.zeros((C, 1))})), SME, "bias"),
    ("RMSNorm_load_unexpected_key", on(lambda: bncore.RMSNorm(5), lambda m: m.load_state_dict(
        {"weight": np.ones(5), "bias": np.zeros(5)})), KeyError, "bias"),
    ("BatchNorm_keras_list_too_short", on(trained_bn, lambda m: m.load_keras_weights([np.ones(C)])), ValueError,
     "weights"),
    ("BatchNorm_keras_gamma_shape", on(trained_bn, lambda m: m.load_keras_weights(
        {"gamma": np.ones(4), "beta": np.zeros(C), "moving_mean": np.zeros(C), "moving_variance": np.ones(C)})),
     SME, "gamma"),
    ("BatchNorm_keras_moving_mean_complex", on(trained_bn, lambda m: m.load_keras_weights(
        {"gamma": np.ones(C), "beta": np.zeros(C), "moving_mean": np.zeros(C, np.complex64),
         "moving_variance": np.ones(C)})), TypeError, "moving_mean"),
    ("BatchNorm_keras_missing_variance", on(trained_bn, lambda m: m.load_keras_weights(
        {"gamma": np.ones(C), "beta": np.zeros(C), "moving_mean": np.zeros(C)})), KeyError, "moving_variance"),
    # ------------------------------------------------------------ RunningStats
    ("RunningStats_zero_features", call(bncore.RunningStats, 0), IAE, "num_features"),
    ("RunningStats_bad_convention", call(bncore.RunningStats, C, convention="tf"), IAE, "convention"),
    ("RunningStats_int_dtype", call(bncore.RunningStats, C, dtype="int8"), UDE, "dtype"),
    ("RunningStats_keras_cumulative", call(bncore.RunningStats, C, None, convention="keras"), IAE, "momentum"),
    ("RunningStats_momentum_negative", call(bncore.RunningStats, C, -0.5), IAE, "momentum"),
    ("RunningStats_update_mean_shape", on(trained_stats, lambda s: s.update(np.ones(4), np.ones(C), 10)), SME,
     "batch_mean"),
    ("RunningStats_update_negative_n", on(trained_stats, lambda s: s.update(np.ones(C), np.ones(C), -1)), IAE, "n"),
    ("RunningStats_update_n_str", on(trained_stats, lambda s: s.update(np.ones(C), np.ones(C), "10")), TypeError,
     "n"),
    ("RunningStats_update_var_none", on(trained_stats, lambda s: s.update(np.ones(C), None, 10)), TypeError,
     "batch_var"),
    ("RunningStats_update_var_int", on(trained_stats, lambda s: s.update(np.ones(C), np.ones(C, np.int32), 10)),
     UDE, "batch_var"),
    ("RunningStats_load_mean_shape", on(trained_stats, lambda s: s.load(np.ones(4), np.ones(C))), SME, "mean"),
    ("RunningStats_load_var_complex", on(trained_stats, lambda s: s.load(np.ones(C), np.ones(C, np.complex128))),
     TypeError, "var"),
    ("RunningStats_load_negative_count", on(trained_stats, lambda s: s.load(np.ones(C), np.ones(C), -1)), IAE,
     "count"),
    ("RunningStats_load_count_2_64", on(trained_stats, lambda s: s.load(np.ones(C), np.ones(C), 2**64)), IAE,
     "count"),
    ("RunningStats_momentum_to_none", setter(trained_stats, "momentum", None), IAE, "momentum"),
    ("RunningStats_momentum_2", setter(trained_stats, "momentum", 2.0), IAE, "momentum"),
    ("RunningStats_momentum_str", setter(trained_stats, "momentum", "fast"), TypeError, "momentum"),
    # ------------------------------------------------------------ Moments
    ("Moments_merge_ndarray", on(lambda: bncore.Moments.from_batch(x3()), lambda m: m.merge(np.ones(C))), TypeError,
     "other"),
    ("Moments_merge_channels", on(lambda: bncore.Moments.from_batch(x3()),
                                  lambda m: m.merge(bncore.Moments.empty(4))), SME, "other"),
    ("Moments_from_batch_axis", call(bncore.Moments.from_batch, X, axis=5), IAE, "axis"),
    ("Moments_from_batch_int", call(bncore.Moments.from_batch, Lazy(lambda: np.ones((4, C), np.int32))), UDE, "x"),
    ("Moments_from_batch_scalar", call(bncore.Moments.from_batch, Lazy(lambda: np.float32(1.0))), TypeError, "x"),
    ("Moments_init_shapes", call(bncore.Moments, np.ones(C), np.ones(C), np.ones(4)), SME, "m2"),
]


# ------------------------------------------------------------ torch modules


def tmod(factory, make_input, train=True):
    def make():
        torch.manual_seed(0)
        m = factory()
        m.train(train)
        inp = make_input()
        return (lambda: m(inp)), [m, inp]
    return make


def tx(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(1))


TORCH_ROWS = [
    ("torch_BatchNorm2d_3d_input", tmod(lambda: bt.BatchNorm2d(C), lambda: tx(4, C, 5)), ValueError, "input"),
    ("torch_BatchNorm2d_wrong_channels", tmod(lambda: bt.BatchNorm2d(C), lambda: tx(2, 4, 3, 3)), SME, "input"),
    ("torch_BatchNorm2d_int_input", tmod(lambda: bt.BatchNorm2d(C), lambda: torch.ones(2, C, 3, 3, dtype=torch.int32)),
     UDE, "input"),
    ("torch_BatchNorm2d_negative_eps", tmod(lambda: bt.BatchNorm2d(C, eps=-1.0), lambda: tx(2, C, 3, 3)), ValueError,
     "eps"),
    ("torch_BatchNorm2d_momentum_true", tmod(lambda: bt.BatchNorm2d(C, momentum=True), lambda: tx(2, C, 3, 3)),
     TypeError, "momentum"),
    ("torch_BatchNorm1d_one_value", tmod(lambda: bt.BatchNorm1d(C), lambda: tx(1, C)), ValueError, "input"),
    ("torch_BatchNorm2d_eval_wrong_channels", tmod(lambda: bt.BatchNorm2d(C), lambda: tx(2, 5, 3, 3), train=False),
     SME, "input"),
    ("torch_BatchNorm2d_meta", tmod(lambda: bt.BatchNorm2d(C), lambda: torch.empty(2, C, 3, 3, device="meta")),
     bncore.UnsupportedDeviceError, "input"),
    ("torch_InstanceNorm1d_1d_input", tmod(lambda: bt.InstanceNorm1d(C), lambda: tx(5)), ValueError, "input"),
    ("torch_InstanceNorm2d_int", tmod(lambda: bt.InstanceNorm2d(C), lambda: torch.ones(2, C, 3, 3,
                                                                                      dtype=torch.int64)),
     UDE, "input"),
    ("torch_LayerNorm_wrong_shape", tmod(lambda: bt.LayerNorm(5), lambda: tx(4, 4)), SME, "normalized_shape"),
    ("torch_GroupNorm_wrong_channels", tmod(lambda: bt.GroupNorm(3, 6), lambda: tx(2, 4, 5)), SME, "num_groups"),
    ("torch_RMSNorm_wrong_shape", tmod(lambda: bt.RMSNorm(5), lambda: tx(4, 6)), SME, "normalized_shape"),
    ("torch_LayerNorm_int", tmod(lambda: bt.LayerNorm(5), lambda: torch.ones(4, 5, dtype=torch.int32)), UDE, "input"),
]


def _expand(rows):
    out = []
    for r in rows:
        rid, make, exc, name, *marks = r
        out.append(pytest.param(make, exc, name, id=rid, marks=marks[0] if marks else ()))
    return out


CATALOGUE = _expand(PY_ROWS) + _expand(TORCH_ROWS) + [
    pytest.param(make, C_STATUS.get(rid, 1), name, id=rid, marks=marks[0] if marks else ())
    for rid, make, name, *marks in C_ROWS]


def test_snapshots_see_a_change():
    """The snapshots are not vacuous: a good call that writes state changes them."""
    layer, stats, module = bncore.BatchNorm(C), trained_stats(), bt.BatchNorm2d(C)
    rm = np.zeros(C, np.float32)
    before = [snap(o) for o in (layer, stats, module, rm)]
    layer.forward(x3())
    stats.update(np.full(C, 5.0), np.full(C, 2.0), 10)
    module(tx(2, C, 3, 3))
    bncore.batch_norm(x3(), rm, np.ones(C, np.float32), training=True)
    after = [snap(o) for o in (layer, stats, module, rm)]
    assert all(b != a for b, a in zip(before, after))


def test_catalogue_size():
    assert len(CATALOGUE) >= 80
    assert len({p.id for p in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("make, expected, name", CATALOGUE)
def test_bad_call(make, expected, name):
    bad_call, states = make()
    before = [snap(s) for s in states]
    if isinstance(expected, int):  # the C ABI: a status and bn_last_error()
        status = bad_call()
        message = lib().bn_last_error().decode()
        assert status == expected, f"status {status} ({message!r}), expected {expected}"
    else:
        with pytest.raises(BaseException) as info:
            bad_call()
        assert isinstance(info.value, expected), f"{type(info.value).__name__}: {info.value}"
        message = str(info.value)
    assert re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message), f"{name!r} not named in {message!r}"
    after = [snap(s) for s in states]
    for i, (b, a) in enumerate(zip(before, after)):
        assert b == a, f"state {i} ({type(states[i]).__name__}) changed"
