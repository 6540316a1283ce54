"""The functional API: PyTorch's signatures over any DLPack tensor.

Every function here checks its arguments (naming the argument, what was
expected and what was given), describes the problem with a `bncore._core.Desc`
and makes one call into the C core. Nothing here computes a number.
"""
from __future__ import annotations

import math

from . import _core
from ._arrays import (Allocator, check_float, check_same_device, import_tensor, stat_dtype)


class MissingRunningStatsError(_core.InvalidArgumentError, RuntimeError):
    """Evaluation mode needs running statistics (PyTorch raises RuntimeError here)."""


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_eps(eps):
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def _check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum: expected a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")


def _check_per_channel(t, what: str, count: int, per: str):
    if t is None:
        return
    check_float(t, what)
    if t.ndim != 1 or t.shape[0] != count:
        raise ValueError(f"{what}: expected shape ({count},) (one value per {per}), got {_shape_text(t.shape)}")


def _channel_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected a channel axis in [{-ndim}, {ndim}) for a {ndim}-dimensional input, "
                         f"got {axis}")
    return axis % ndim


class _Call:
    """The imported tensors of one call, released (handed back to their producers) at the end."""

    def __init__(self):
        self.tensors = []

    def add(self, obj, what, writable=False):
        t = import_tensor(obj, what, writable)
        if t is not None:
            self.tensors.append(t)
        return t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.tensors:
            t.release()
        return False


def batch_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Batch norm forward; returns ``(output, save_mean, save_invstd)``.

    Training (or no running statistics): the batch's mean and biased variance over
    every axis but ``axis`` normalize; running statistics, if given, are updated in
    place (``running_var`` receives the unbiased variance). Eval: the running
    statistics normalize. ``save_mean`` / ``save_invstd`` are the mean and
    1/sqrt(var + eps) actually used, float32 for half inputs.
    """
    _check_eps(eps)
    with _Call() as call:
        x = call.add(input, "input")
        check_float(x, "input")
        if x.ndim < 2:
            raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got {x.ndim} "
                             f"(shape {_shape_text(x.shape)})")
        ax = _channel_axis(axis, x.ndim)
        channels = x.shape[ax]
        w = call.add(weight, "weight")
        b = call.add(bias, "bias")
        rm = call.add(running_mean, "running_mean", writable=bool(training))
        rv = call.add(running_var, "running_var", writable=bool(training))
        for name, t in (("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)):
            _check_per_channel(t, name, channels, f"channel of axis {ax}")
        if (rm is None) != (rv is None):
            raise ValueError("running_mean and running_var: pass both or neither")
        use_batch_stats = training or rm is None
        flags = 0
        if use_batch_stats:
            per_channel = 1
            for d, s in enumerate(x.shape):
                if d != ax:
                    per_channel *= s
            if per_channel == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{_shape_text(x.shape)}")
            if rm is not None:
                _check_momentum(momentum)
                flags = _core.FLAG_UPDATE_RUNNING_STATS
        else:
            if rm is None:
                raise MissingRunningStatsError("running_mean must be defined in evaluation mode")
            flags = _core.FLAG_USE_RUNNING_STATS
        check_same_device([("input", x), ("weight", w), ("bias", b), ("running_mean", rm),
                           ("running_var", rv)])
        alloc = Allocator(input, x)
        y_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
        y = call.add(y_obj, "out", writable=True)
        sdt = stat_dtype(x.dtype)
        mean_obj = alloc.empty((channels,), sdt)
        rstd_obj = alloc.empty((channels,), sdt)
        desc = _core.Desc.batch(x.ndim, ax, float(eps)).with_options(
            flags, float(momentum) if flags & _core.FLAG_UPDATE_RUNNING_STATS else 0.0)
        _core.norm_forward(desc, x, w, b, rm, rv, y, call.add(mean_obj, "save_mean", True),
                           call.add(rstd_obj, "save_invstd", True))
    return alloc.finish(y_obj), alloc.finish(mean_obj), alloc.finish(rstd_obj)


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, axis=1, out=None):
    """Batch norm, argument for argument as ``torch.nn.functional.batch_norm``; returns the output.

    ``axis`` is the channel axis (default 1, NCHW; -1 for channels-last data).
    ``out`` receives the output when given (any strides; it may be ``input`` itself).
    """
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis=axis,
                              out=out)[0]


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, *, training=True, axis=1):
    """Backward of batch norm; returns ``(grad_input, grad_weight, grad_bias)``.

    ``save_mean`` / ``save_invstd`` are what ``batch_norm_forward`` returned. With
    ``training=False`` the statistics are constants (eval mode): grad_input =
    grad_output * weight * invstd. ``grad_weight`` and ``grad_bias`` are None when
    ``weight`` is None.
    """
    with _Call() as call:
        x = call.add(input, "input")
        check_float(x, "input")
        if x.ndim < 2:
            raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got {x.ndim}")
        ax = _channel_axis(axis, x.ndim)
        channels = x.shape[ax]
        dy = call.add(grad_output, "grad_output")
        check_float(dy, "grad_output")
        if dy.shape != x.shape:
            raise ValueError(f"grad_output: expected the input's shape {_shape_text(x.shape)}, "
                             f"got {_shape_text(dy.shape)}")
        w = call.add(weight, "weight")
        sm = call.add(save_mean, "save_mean")
        sr = call.add(save_invstd, "save_invstd")
        for name, t in (("weight", w), ("save_mean", sm), ("save_invstd", sr)):
            if t is None and name != "weight":
                raise ValueError(f"{name}: required for the backward pass, got None")
            _check_per_channel(t, name, channels, f"channel of axis {ax}")
        check_same_device([("input", x), ("grad_output", dy), ("weight", w), ("save_mean", sm),
                           ("save_invstd", sr)])
        alloc = Allocator(input, x)
        dx_obj = alloc.empty(x.shape, x.dtype, like_layout=input)
        dw_obj = db_obj = None
        if w is not None:
            dw_obj = alloc.empty((channels,), w.dtype)
            db_obj = alloc.empty((channels,), w.dtype)
        desc = _core.Desc.batch(x.ndim, ax, 0.0).with_options(0 if training else _core.FLAG_USE_RUNNING_STATS)
        _core.norm_backward(desc, x, dy, w, sm, sr, call.add(dx_obj, "grad_input", True),
                            call.add(dw_obj, "grad_weight", True), call.add(db_obj, "grad_bias", True))
    return alloc.finish(dx_obj), alloc.finish(dw_obj), alloc.finish(db_obj)
