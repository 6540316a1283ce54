"""The functional API: PyTorch's signatures over any DLPack tensor.

Every function checks its arguments (naming the argument, what was expected and
what was given), describes the problem with a `bncore._core.Desc` and makes one
call into the C core through `_forward` / `_backward`. Nothing here computes a
number: each variant is only a different description of statistic groups and
parameter axes, and `normalize` takes that description directly.
"""
from __future__ import annotations

import math

import numpy as np

from . import _core
from ._arrays import Allocator, check_float, check_same_device, import_tensor, stat_dtype
from .errors import MissingRunningStatsError, ShapeMismatchError, UnsupportedDtypeError

_F32_EPS = float(np.finfo(np.float32).eps)
_F64_EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------- argument checks


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def _check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum: expected a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")


def _check_param(t, what: str, shape, per: str):
    """A parameter or statistic tensor: floating, exactly `shape`."""
    if t is None:
        return
    check_float(t, what)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {_shape_text(shape)} (one value per {per}), "
                         f"got {_shape_text(t.shape)}")


def _check_input(x, what: str, min_ndim: int, layout: str):
    check_float(x, what)
    if x.ndim < min_ndim:
        raise ValueError(f"{what}: expected at least {min_ndim} dimensions {layout}, got {x.ndim} "
                         f"(shape {_shape_text(x.shape)})")


def _axis(axis, ndim: int, what: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what}: expected an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: expected an axis in [{-ndim}, {ndim}) for a {ndim}-dimensional input, got {axis}")
    return int(axis) % ndim


def _axes(axes, ndim: int, what: str):
    """A sorted tuple of distinct axes; `axes` may be one int or a sequence."""
    seq = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    if not seq:
        raise ValueError(f"{what}: expected at least one axis, got none")
    out = [_axis(a, ndim, what) for a in seq]
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: expected distinct axes, got {tuple(seq)} (repeated after wrapping: "
                         f"{tuple(out)})")
    return tuple(sorted(out))


def _normalized_shape(normalized_shape, x, what="normalized_shape"):
    """Checks that normalized_shape is the input's trailing dims; returns it as a tuple."""
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if not shape:
        raise ValueError(f"{what}: expected at least one dimension, got an empty shape")
    k = len(shape)
    if k > x.ndim or tuple(x.shape[x.ndim - k:]) != tuple(int(s) for s in shape):
        raise ValueError(f"{what}: expected the input's trailing dimensions; given normalized_shape="
                         f"{list(shape)}, the input must have shape [*, {', '.join(str(s) for s in shape)}], "
                         f"but got input of size {list(x.shape)}")
    return tuple(int(s) for s in shape)


def _values_per_group(x, reduce_axes) -> int:
    n = 1
    for a in reduce_axes:
        n *= x.shape[a]
    return n


def _mask(axes) -> int:
    m = 0
    for a in axes:
        m |= 1 << a
    return m


class _Call:
    """The imported tensors of one call, handed back to their producers at the end."""

    def __init__(self):
        self.tensors = []

    def add(self, obj, what, writable=False):
        """Imports an optional tensor (None stays None)."""
        t = import_tensor(obj, what, writable)
        if t is not None:
            self.tensors.append(t)
        return t

    def need(self, obj, what):
        """Imports a required tensor."""
        if obj is None:
            raise TypeError(f"{what}: expected a tensor that supports DLPack (NumPy, PyTorch, JAX, ...), got None")
        return self.add(obj, what)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.tensors:
            t.release()
        return False


# ---------------------------------------------------------------- the one forward and backward


def _forward(call, desc, input, x, w, b, rm, rv, out, group_shape, stats=None, want_stats=True):
    """Runs bn_norm_forward (bn_norm_forward_stats with a RunningStats); returns
    (output, save_mean, save_rstd) in the caller's array type."""
    check_same_device([("input", x), ("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)])
    alloc = Allocator(input, x)
    y_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
    y = call.add(y_obj, "out", writable=True)
    if tuple(y.shape) != tuple(x.shape):
        raise ShapeMismatchError(f"out: expected the input's shape {_shape_text(x.shape)}, "
                                       f"got {_shape_text(y.shape)}")
    if y.dtype != x.dtype:
        raise UnsupportedDtypeError(f"out: expected the input's dtype {x.dtype}, got {y.dtype}")
    check_same_device([("input", x), ("out", y)])
    sdt = stat_dtype(x.dtype)
    # the plain functions return only the output: no statistics to allocate and export
    mean_obj = alloc.empty(group_shape, sdt) if want_stats else None
    rstd_obj = alloc.empty(group_shape, sdt) if want_stats else None
    sm, sr = call.add(mean_obj, "save_mean", True), call.add(rstd_obj, "save_rstd", True)
    if stats is not None:
        _core.norm_forward_stats(desc, x, w, b, stats._handle, y, sm, sr)
    else:
        _core.norm_forward(desc, x, w, b, rm, rv, y, sm, sr)
    return alloc.finish(y_obj), alloc.finish(mean_obj), alloc.finish(rstd_obj)


def _backward(call, desc, input, x, grad_output, w, sm, sr, param_shape, want_bias_grad=True, out=None):
    """Runs bn_norm_backward; returns (grad_input, grad_weight, grad_bias), the last two None without weight.
    `out` (optional) receives grad_input: any strides, it may be grad_output itself."""
    dy = call.need(grad_output, "grad_output")
    check_float(dy, "grad_output")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"grad_output: expected the input's shape {_shape_text(x.shape)}, "
                         f"got {_shape_text(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"grad_output: expected the input's dtype {x.dtype}, got {dy.dtype}")
    check_same_device([("input", x), ("grad_output", dy), ("weight", w), ("save_mean", sm), ("save_rstd", sr)])
    alloc = Allocator(input, x)
    dx_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
    dw_obj = db_obj = None
    if w is not None:
        dw_obj = alloc.empty(param_shape, w.dtype)
        if want_bias_grad:
            db_obj = alloc.empty(param_shape, w.dtype)
    dx = call.add(dx_obj, "out", True)
    if tuple(dx.shape) != tuple(x.shape):
        raise ShapeMismatchError(f"out: expected the input's shape {_shape_text(x.shape)}, "
                                       f"got {_shape_text(dx.shape)}")
    if dx.dtype != x.dtype:
        raise UnsupportedDtypeError(f"out: expected the input's dtype {x.dtype}, got {dx.dtype}")
    _core.norm_backward(desc, x, dy, w, sm, sr, dx,
                        call.add(dw_obj, "grad_weight", True), call.add(db_obj, "grad_bias", True))
    return alloc.finish(dx_obj), alloc.finish(dw_obj), alloc.finish(db_obj)


def _weight(call, weight, shape, per):
    """Imports and checks an optional weight: floating, exactly `shape` (one value per `per`)."""
    w = call.add(weight, "weight")
    _check_param(w, "weight", shape, per)
    return w


def _affine(call, weight, bias, shape, per):
    """Imports and checks weight and bias: floating, exactly `shape` (one value per `per`)."""
    w = _weight(call, weight, shape, per)
    b = call.add(bias, "bias")
    _check_param(b, "bias", shape, per)
    return w, b


def _saved(call, save_mean, save_rstd, group_shape, rstd_name="save_rstd", need_mean=True):
    sm = call.add(save_mean, "save_mean") if need_mean else None
    sr = call.add(save_rstd, rstd_name)
    for name, t in (("save_mean", sm), (rstd_name, sr)):
        if t is None and (need_mean or name == rstd_name):
            raise ValueError(f"{name}: required for the backward pass, got None")
        _check_param(t, name, group_shape, "statistic group")
    return sm, sr


def _check_stats(stats, running_mean, channels):
    """A RunningStats passed as `stats=` replaces running_mean / running_var."""
    if stats is None:
        return
    from .state import RunningStats

    if not isinstance(stats, RunningStats):
        raise TypeError(f"stats: expected a bncore.RunningStats, got {type(stats).__name__}")
    if running_mean is not None:
        raise ValueError("stats: pass either running_mean/running_var or stats, not both")
    if stats.num_features != channels:
        raise ValueError(f"stats: expected running statistics of {channels} channels, got {stats.num_features}")


def _running(call, running_mean, running_var, shape, per, writable):
    rm = call.add(running_mean, "running_mean", writable)
    rv = call.add(running_var, "running_var", writable)
    if (rm is None) != (rv is None):
        raise ValueError("running_mean and running_var: pass both or neither")
    _check_param(rm, "running_mean", shape, per)
    _check_param(rv, "running_var", shape, per)
    return rm, rv


# ---------------------------------------------------------------- batch norm


def _batch_setup(call, input, axis):
    x = call.need(input, "input")
    _check_input(x, "input", 2, "(N, C, ...)")
    ax = _axis(axis, x.ndim, "axis")
    return x, ax, x.shape[ax]


def batch_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, axis=1, out=None, stats=None, _want_stats=True):
    """Batch norm forward; returns ``(output, save_mean, save_invstd)``.

    Training (or no running statistics): the batch's mean and biased variance over
    every axis but ``axis`` normalize; running statistics, if given, are updated in
    place (``running_var`` receives the unbiased variance). Eval: the running
    statistics normalize. ``save_mean`` / ``save_invstd`` are the mean and
    1/sqrt(var + eps) actually used, float32 for half inputs. ``stats`` (a
    ``bncore.RunningStats``) may hold the running statistics instead, updated by its
    own convention (momentum, variance, nan_policy).
    """
    _check_eps(eps)
    with _Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        per = f"channel of axis {ax}"
        w, b = _affine(call, weight, bias, (channels,), per)
        _check_stats(stats, running_mean, channels)
        rm, rv = _running(call, running_mean, running_var, (channels,), per, writable=bool(training))
        flags = momentum_used = 0
        if not training and rm is None and stats is None:
            raise MissingRunningStatsError("running_mean must be defined in evaluation mode")
        if training:
            # PyTorch refuses one value per channel; Keras (a biased variance) takes it
            keras = stats is not None and stats.convention == "keras"
            if not keras and _values_per_group(x, [d for d in range(x.ndim) if d != ax]) == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{_shape_text(x.shape)}")
            if stats is not None:
                flags = _core.FLAG_UPDATE_RUNNING_STATS
            elif rm is not None:
                _check_momentum(momentum)
                flags, momentum_used = _core.FLAG_UPDATE_RUNNING_STATS, float(momentum)
        else:
            flags = _core.FLAG_USE_RUNNING_STATS
        desc = _core.Desc.batch(x.ndim, ax, float(eps)).with_options(flags, momentum_used)
        return _forward(call, desc, input, x, w, b, rm, rv, out, (channels,), stats, _want_stats)


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, axis=1, out=None):
    """Batch norm, argument for argument as ``torch.nn.functional.batch_norm``; returns the output.

    ``axis`` is the channel axis (default 1, NCHW; -1 for channels-last data).
    ``out`` receives the output when given (any strides; it may be ``input`` itself).
    """
    if (out is None and type(input).__module__ == "torch" and isinstance(momentum, (int, float))
            and isinstance(eps, (int, float)) and isinstance(axis, int) and not isinstance(axis, bool)):
        # PyTorch tensors: borrowed views through torch's DLPack C exchange API, no Python checks;
        # None means anything unusual, and the full path below then checks and explains
        y = _core.batch_norm_fast(input, running_mean, running_var, weight, bias, bool(training),
                                  float(momentum), float(eps), axis)
        if y is not None:
            return y
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis=axis,
                              out=out, _want_stats=False)[0]


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, *, training=True, axis=1, out=None):
    """Backward of batch norm; returns ``(grad_input, grad_weight, grad_bias)``.

    ``save_mean`` / ``save_invstd`` are what ``batch_norm_forward`` returned. With
    ``training=False`` the statistics are constants (eval mode): grad_input =
    grad_output * weight * invstd. ``grad_weight`` and ``grad_bias`` are None when
    ``weight`` is None. ``out`` receives grad_input when given (any strides; it may be
    ``grad_output`` itself).
    """
    with _Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        w = _weight(call, weight, (channels,), f"channel of axis {ax}")
        sm, sr = _saved(call, save_mean, save_invstd, (channels,), "save_invstd")
        desc = _core.Desc.batch(x.ndim, ax, 0.0).with_options(0 if training else _core.FLAG_USE_RUNNING_STATS)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out)


# ---------------------------------------------------------------- layer norm and RMS norm


def _layer_setup(call, input, normalized_shape):
    x = call.need(input, "input")
    check_float(x, "input")
    shape = _normalized_shape(normalized_shape, x)
    return x, shape, tuple(x.shape[:x.ndim - len(shape)])


def layer_norm_forward(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, _want_stats=True):
    """Layer norm over the trailing ``normalized_shape`` dims; returns ``(output, save_mean, save_rstd)``
    with one statistic per leading index (shape ``input.shape[:-len(normalized_shape)]``)."""
    _check_eps(eps)
    with _Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w, b = _affine(call, weight, bias, shape, "element of normalized_shape")
        desc = _core.Desc.layer(x.ndim, len(shape), float(eps))
        return _forward(call, desc, input, x, w, b, None, None, out, lead, want_stats=_want_stats)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer norm, as ``torch.nn.functional.layer_norm``; returns the output."""
    return layer_norm_forward(input, normalized_shape, weight, bias, eps, out=out, _want_stats=False)[0]


def layer_norm_backward(grad_output, input, normalized_shape, weight, save_mean, save_rstd, *, out=None):
    """Backward of layer norm: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight."""
    with _Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w = _weight(call, weight, shape, "element of normalized_shape")
        sm, sr = _saved(call, save_mean, save_rstd, lead)
        desc = _core.Desc.layer(x.ndim, len(shape), 0.0)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, shape, out=out)


def _rms_eps(eps, dtype):
    if eps is None:  # PyTorch: the machine epsilon of the type it computes in
        return _F64_EPS if dtype == "float64" else _F32_EPS
    _check_eps(eps)
    return float(eps)


def rms_norm_forward(input, normalized_shape, weight=None, eps=None, *, out=None, _want_stats=True):
    """RMS norm: ``y = x / sqrt(mean(x^2) + eps) * weight``; returns ``(output, save_rstd)``.
    ``eps=None`` is the machine epsilon of the compute type (float32's for half inputs)."""
    with _Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w = _weight(call, weight, shape, "element of normalized_shape")
        desc = _core.Desc.rms(x.ndim, len(shape), _rms_eps(eps, x.dtype))
        y, _, rstd = _forward(call, desc, input, x, w, None, None, None, out, lead, want_stats=_want_stats)
        return y, rstd


def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None):
    """RMS norm, as ``torch.nn.functional.rms_norm``; returns the output."""
    return rms_norm_forward(input, normalized_shape, weight, eps, out=out, _want_stats=False)[0]


def rms_norm_backward(grad_output, input, normalized_shape, weight, save_rstd, *, out=None):
    """Backward of RMS norm: ``(grad_input, grad_weight, None)``; grad_weight None without weight."""
    with _Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w = _weight(call, weight, shape, "element of normalized_shape")
        _, sr = _saved(call, None, save_rstd, lead, need_mean=False)
        desc = _core.Desc.rms(x.ndim, len(shape), 0.0)
        return _backward(call, desc, input, x, grad_output, w, None, sr, shape, want_bias_grad=False, out=out)


# ---------------------------------------------------------------- instance norm


def _instance_setup(call, input):
    x = call.need(input, "input")
    _check_input(x, "input", 3, "(N, C, L, ...)")
    return x, x.shape[1], (x.shape[0], x.shape[1])


def instance_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                          momentum=0.1, eps=1e-5, *, out=None, stats=None, _want_stats=True):
    """Instance norm over the spatial dims of each (sample, channel); returns
    ``(output, save_mean, save_invstd)`` of shape (N, C). With running statistics
    and ``use_input_stats`` they are updated with the average over the batch of the
    instances' mean and unbiased variance (PyTorch's rule); without
    ``use_input_stats`` they normalize."""
    _check_eps(eps)
    with _Call() as call:
        x, channels, groups = _instance_setup(call, input)
        w, b = _affine(call, weight, bias, (channels,), "channel")
        _check_stats(stats, running_mean, channels)
        rm, rv = _running(call, running_mean, running_var, (channels,), "channel", writable=bool(use_input_stats))
        flags = momentum_used = 0
        if use_input_stats:
            if _values_per_group(x, range(2, x.ndim)) == 1:
                raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                                 f"{_shape_text(x.shape)}")
            if stats is not None:
                flags = _core.FLAG_UPDATE_RUNNING_STATS
            elif rm is not None:
                _check_momentum(momentum)
                flags, momentum_used = _core.FLAG_UPDATE_RUNNING_STATS, float(momentum)
        else:
            if rm is None and stats is None:
                raise MissingRunningStatsError(
                    "Expected running_mean and running_var to be defined when use_input_stats is false")
            flags = _core.FLAG_USE_RUNNING_STATS
        desc = _core.Desc.instance(x.ndim, float(eps)).with_options(flags, momentum_used)
        return _forward(call, desc, input, x, w, b, rm, rv, out, groups, stats, _want_stats)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, out=None):
    """Instance norm, as ``torch.nn.functional.instance_norm``; returns the output."""
    return instance_norm_forward(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                 out=out, _want_stats=False)[0]


def instance_norm_backward(grad_output, input, weight, save_mean, save_invstd, *, use_input_stats=True, out=None):
    """Backward of instance norm: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight."""
    with _Call() as call:
        x, channels, groups = _instance_setup(call, input)
        w = _weight(call, weight, (channels,), "channel")
        sm, sr = _saved(call, save_mean, save_invstd, groups, "save_invstd")
        desc = _core.Desc.instance(x.ndim, 0.0).with_options(0 if use_input_stats else _core.FLAG_USE_RUNNING_STATS)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out)


# ---------------------------------------------------------------- group norm


def _group_setup(call, input, num_groups):
    x = call.need(input, "input")
    _check_input(x, "input", 2, "(N, C, ...)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"num_groups: expected the number of channels in input ({channels}) to be divisible by "
                         f"num_groups, but got num_groups={num_groups} (input shape {_shape_text(x.shape)})")
    return x, channels, (x.shape[0], int(num_groups))


def group_norm_forward(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None, _want_stats=True):
    """Group norm: channels split into ``num_groups`` groups, statistics over each
    (sample, group); returns ``(output, save_mean, save_rstd)`` of shape (N, num_groups)."""
    _check_eps(eps)
    with _Call() as call:
        x, channels, groups = _group_setup(call, input, num_groups)
        w, b = _affine(call, weight, bias, (channels,), "channel")
        desc = _core.Desc.group(x.ndim, int(num_groups), float(eps))
        return _forward(call, desc, input, x, w, b, None, None, out, groups, want_stats=_want_stats)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None):
    """Group norm, as ``torch.nn.functional.group_norm``; returns the output."""
    return group_norm_forward(input, num_groups, weight, bias, eps, out=out, _want_stats=False)[0]


def group_norm_backward(grad_output, input, num_groups, weight, save_mean, save_rstd, *, out=None):
    """Backward of group norm: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight."""
    with _Call() as call:
        x, channels, groups = _group_setup(call, input, num_groups)
        w = _weight(call, weight, (channels,), "channel")
        sm, sr = _saved(call, save_mean, save_rstd, groups)
        desc = _core.Desc.group(x.ndim, int(num_groups), 0.0)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out)


# ---------------------------------------------------------------- any axes


def _normalize_setup(call, input, axes, affine_axes):
    x = call.need(input, "input")
    check_float(x, "input")
    if x.ndim < 1:
        raise ValueError("input: expected at least 1 dimension, got a scalar")
    red = _axes(axes, x.ndim, "axes")
    aff = red if affine_axes is None else _axes(affine_axes, x.ndim, "affine_axes")
    param_shape = tuple(x.shape[a] for a in aff)
    group_shape = tuple(x.shape[a] for a in range(x.ndim) if a not in red)
    return x, red, aff, param_shape, group_shape


def normalize_forward(input, axes, weight=None, bias=None, *, affine_axes=None, eps=1e-5, rms=False, out=None, _want_stats=True):
    """Statistics over ``axes`` (one group per index of the other axes); weight and
    bias have the input's sizes at ``affine_axes`` (default: ``axes``). Runs on any
    strides without a copy. Returns ``(output, save_mean, save_rstd)``, the
    statistics shaped as the input without ``axes``."""
    _check_eps(eps)
    with _Call() as call:
        x, red, aff, pshape, gshape = _normalize_setup(call, input, axes, affine_axes)
        w, b = _affine(call, weight, bias, pshape, f"index of axes {aff}")
        desc = _core.Desc.axes(_mask(red), _mask(aff), float(eps), _core.FLAG_RMS if rms else 0)
        return _forward(call, desc, input, x, w, b, None, None, out, gshape, want_stats=_want_stats)


def normalize(input, axes, weight=None, bias=None, *, affine_axes=None, eps=1e-5, rms=False, out=None):
    """The general entry point every variant is a case of; returns the output.
    ``normalize(x, axes=(1,))`` is layer norm over the channels of an NCHW tensor."""
    return normalize_forward(input, axes, weight, bias, affine_axes=affine_axes, eps=eps, rms=rms, out=out,
                             _want_stats=False)[0]


def normalize_backward(grad_output, input, axes, weight, save_mean, save_rstd, *, affine_axes=None, rms=False,
                       out=None):
    """Backward of ``normalize``: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight
    (grad_bias also None with ``rms``). ``save_mean`` may be None with ``rms``."""
    with _Call() as call:
        x, red, aff, pshape, gshape = _normalize_setup(call, input, axes, affine_axes)
        w = _weight(call, weight, pshape, f"index of axes {aff}")
        sm, sr = _saved(call, save_mean, save_rstd, gshape, need_mean=not rms)
        desc = _core.Desc.axes(_mask(red), _mask(aff), 0.0, _core.FLAG_RMS if rms else 0)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, pshape, want_bias_grad=not rms, out=out)
