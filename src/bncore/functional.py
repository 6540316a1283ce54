"""The functional API: PyTorch's signatures over any DLPack tensor.

Every function checks its arguments with `bncore._checks` (naming the argument, what
was expected and what was given), describes the problem with a `bncore._core.Desc`
and makes one call into the C core through `_forward` / `_backward`. Nothing here
computes a number: each variant is only a different description of statistic groups
and parameter axes, and `normalize` takes that description directly.

Given PyTorch tensors, the plain functions (`batch_norm`, `layer_norm`, ..., `normalize`) are
differentiable: a call that torch must see (a gradient may be asked for; torch.compile, export,
jit.trace, torch.func, meta tensors) goes through bncore's registered custom ops
(`bncore._torch_ops`, imported only then, so importing bncore never imports torch).

`batch_norm` has a small-call fast path for tensors whose library publishes a DLPack
C exchange table (PyTorch): the same checks and the same description, with the
tensors borrowed without capsules and one C call (`_batch_norm_small`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from ._core import Tensor
from ._arrays import Allocator, Array, Call, bump_versions, empty_like_of, is_torch, stat_dtype
from ._checks import (check_axes, check_axis, check_batch_values, check_eps, check_float, check_has_running_stats,
                      check_input, check_like_input, check_momentum, check_momentum_type, check_ndim,
                      check_normalized_shape, check_not_scalar, check_num_groups, check_param, check_running_pair,
                      check_same_device, check_saved, check_stats)
from .errors import BncoreError, MissingRunningStatsError

__all__ = [
    "MissingRunningStatsError", "batch_norm", "batch_norm_backward", "batch_norm_forward", "group_norm",
    "group_norm_backward", "group_norm_forward", "instance_norm", "instance_norm_backward", "instance_norm_forward",
    "layer_norm", "layer_norm_backward", "layer_norm_forward", "normalize", "normalize_backward", "normalize_forward",
    "rms_norm", "rms_norm_backward", "rms_norm_forward",
]

_F32_EPS = float(np.finfo(np.float32).eps)
_F64_EPS = float(np.finfo(np.float64).eps)

Outputs = tuple[Any, Any, Any]


_TORCH_OPS: Any = None


def _torch_ops() -> Any:
    """bncore._torch_ops, imported on the first PyTorch tensor (torch is then imported already)."""
    global _TORCH_OPS
    if _TORCH_OPS is None:
        from . import _torch_ops

        _TORCH_OPS = _torch_ops
    return _TORCH_OPS


def _mask(axes: Sequence[int]) -> int:
    m = 0
    for a in axes:
        m |= 1 << a
    return m


# ---------------------------------------------------------------- the one forward and backward


def _named_out(err: BncoreError, out: Array | None, c_name: str) -> BncoreError:
    """The C core's error, with the output argument it calls `c_name` named as the caller knows it, out,
    when the caller passed one (the C core finds what only it can check, such as an out= whose
    elements overlap each other)."""
    if out is None:
        return err
    return type(err)(re.sub(rf"(?<!\w){c_name}(?!\w)", "out", str(err)))


def _forward(call: Call, desc: _core.Desc, input: Array, x: Tensor, w: Tensor | None, b: Tensor | None,
             rm: Tensor | None, rv: Tensor | None, out: Array | None, group_shape: tuple[int, ...],
             stats: Any = None, want_stats: bool = True) -> Outputs:
    """Runs bn_norm_forward (bn_norm_forward_stats with a RunningStats); returns
    (output, save_mean, save_rstd) in the caller's array type."""
    check_same_device([("input", x), ("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)])
    alloc = Allocator(input, x)
    y_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
    y = call.need(y_obj, "out", writable=True)
    check_like_input(y, x, "out")
    check_same_device([("input", x), ("out", y)])
    sdt = stat_dtype(x.dtype)
    # the plain functions return only the output: no statistics to allocate and export
    mean_obj = alloc.empty(group_shape, sdt) if want_stats else None
    rstd_obj = alloc.empty(group_shape, sdt) if want_stats else None
    sm, sr = call.add(mean_obj, "save_mean", True), call.add(rstd_obj, "save_rstd", True)
    try:
        if stats is not None:
            _core.norm_forward_stats(desc, x, w, b, stats._handle, y, sm, sr)
        else:
            _core.norm_forward(desc, x, w, b, rm, rv, y, sm, sr)
    except BncoreError as err:
        raise _named_out(err, out, "y") from None
    return alloc.finish(y_obj), alloc.finish(mean_obj), alloc.finish(rstd_obj)


def _backward(call: Call, desc: _core.Desc, input: Array, x: Tensor, grad_output: Array, w: Tensor | None,
              sm: Tensor | None, sr: Tensor, param_shape: tuple[int, ...], want_bias_grad: bool = True,
              out: Array | None = None) -> Outputs:
    """Runs bn_norm_backward; returns (grad_input, grad_weight, grad_bias), the last two None without weight.
    `out` (optional) receives grad_input: any strides, it may be grad_output itself."""
    dy = call.need(grad_output, "grad_output")
    check_float(dy, "grad_output")
    check_like_input(dy, x, "grad_output")
    check_same_device([("input", x), ("grad_output", dy), ("weight", w), ("save_mean", sm), ("save_rstd", sr)])
    alloc = Allocator(input, x)
    dx_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
    dw_obj = db_obj = None
    if w is not None:
        dw_obj = alloc.empty(param_shape, w.dtype)
        if want_bias_grad:
            db_obj = alloc.empty(param_shape, w.dtype)
    dx = call.need(dx_obj, "out", writable=True)
    check_like_input(dx, x, "out")
    dw, db = call.add(dw_obj, "grad_weight", True), call.add(db_obj, "grad_bias", True)
    try:
        _core.norm_backward(desc, x, dy, w, sm, sr, dx, dw, db)
    except BncoreError as err:
        raise _named_out(err, out, "grad_input") from None
    return alloc.finish(dx_obj), alloc.finish(dw_obj), alloc.finish(db_obj)


def _weight(call: Call, weight: Array | None, shape: tuple[int, ...], per: str) -> Tensor | None:
    """Imports and checks an optional weight: floating, exactly `shape` (one value per `per`)."""
    w = call.add(weight, "weight")
    check_param(w, "weight", shape, per)
    return w


def _affine(call: Call, weight: Array | None, bias: Array | None, shape: tuple[int, ...],
            per: str) -> tuple[Tensor | None, Tensor | None]:
    """Imports and checks weight and bias: floating, exactly `shape` (one value per `per`)."""
    w = _weight(call, weight, shape, per)
    b = call.add(bias, "bias")
    check_param(b, "bias", shape, per)
    return w, b


def _saved(call: Call, save_mean: Array | None, save_rstd: Array | None, group_shape: tuple[int, ...],
           rstd_name: str = "save_rstd", need_mean: bool = True) -> tuple[Tensor | None, Tensor]:
    sm = call.add(save_mean, "save_mean") if need_mean else None
    sr = call.add(save_rstd, rstd_name)
    if need_mean:
        check_saved(sm, "save_mean", group_shape)
    check_saved(sr, rstd_name, group_shape)
    assert sr is not None
    return sm, sr


def _running(call: Call, running_mean: Array | None, running_var: Array | None, shape: tuple[int, ...], per: str,
             writable: bool) -> tuple[Tensor | None, Tensor | None]:
    rm = call.add(running_mean, "running_mean", writable)
    rv = call.add(running_var, "running_var", writable)
    check_running_pair(rm, rv)
    check_param(rm, "running_mean", shape, per)
    check_param(rv, "running_var", shape, per)
    return rm, rv


# ---------------------------------------------------------------- batch norm


def _batch_setup(call: Call, input: Array, axis: Any) -> tuple[Tensor, int, int]:
    x = call.need(input, "input")
    check_input(x, "input", 2, "(N, C, ...)")
    ax = check_axis(axis, x.ndim, "axis")
    return x, ax, x.shape[ax]


def _batch_mode(shape: tuple[int, ...], ax: int, training: bool, has_running: bool, momentum: Any,
                stats: Any) -> tuple[int, float]:
    """The flags and momentum of a batch-norm forward, by PyTorch's rules (or a RunningStats' own)."""
    if stats is None:
        check_momentum_type(momentum)
    if not training:
        check_has_running_stats(has_running or stats is not None, "running_mean must be defined in evaluation mode")
        return _core.FLAG_USE_RUNNING_STATS, 0.0
    # PyTorch refuses one value per channel; Keras (a biased variance) takes it
    if stats is None or stats.convention != "keras":
        check_batch_values(shape, 0, ax, "Expected more than 1 value per channel when training")
    if stats is not None:
        return _core.FLAG_UPDATE_RUNNING_STATS, 0.0
    if has_running:
        return _core.FLAG_UPDATE_RUNNING_STATS, check_momentum(momentum)
    return 0, 0.0


def batch_norm_forward(input: Array, running_mean: Array | None = None, running_var: Array | None = None,
                       weight: Array | None = None, bias: Array | None = None, training: bool = False,
                       momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1, out: Array | None = None,
                       stats: Any = None, _want_stats: bool = True) -> Outputs:
    """Batch norm forward; returns ``(output, save_mean, save_invstd)``.

    Training (or no running statistics): the batch's mean and biased variance over
    every axis but ``axis`` normalize; running statistics, if given, are updated in
    place (``running_var`` receives the unbiased variance). Eval: the running
    statistics normalize. ``save_mean`` / ``save_invstd`` are the mean and
    1/sqrt(var + eps) actually used, float32 for half inputs. ``stats`` (a
    ``bncore.RunningStats``) may hold the running statistics instead, updated by its
    own convention (momentum, variance, nan_policy).
    """
    eps = check_eps(eps)
    with Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        per = f"channel of axis {ax}"
        w, b = _affine(call, weight, bias, (channels,), per)
        check_stats(stats, running_mean, channels)
        rm, rv = _running(call, running_mean, running_var, (channels,), per, writable=bool(training))
        flags, momentum_used = _batch_mode(x.shape, ax, bool(training), rm is not None, momentum, stats)
        desc = _core.Desc.batch(x.ndim, ax, eps).with_options(flags, momentum_used)
        return _forward(call, desc, input, x, w, b, rm, rv, out, (channels,), stats, _want_stats)


# validated descriptions of `_batch_norm_small`, keyed by everything its checks read (the scalars with
# their types, x's shape, which running statistics are given): a repeated call skips re-checking
_SMALL_DESCS: dict[tuple, _core.Desc] = {}
_SMALL_DESCS_MAX = 256


def _small_desc(key: tuple, shape: tuple[int, ...], training: bool, has_running: bool, momentum: Any, eps: Any,
                axis: Any) -> _core.Desc | None:
    """The checks and the description of `batch_norm_forward` for `_batch_norm_small` (None where a
    check fails: the checked path then raises), remembered under `key` for the next call."""
    try:
        eps = check_eps(eps)
        check_ndim(shape, "input", 2, "(N, C, ...)")
        ax = check_axis(axis, len(shape), "axis")
        flags, momentum_used = _batch_mode(shape, ax, training, has_running, momentum, None)
        desc = _core.Desc.batch(len(shape), ax, eps).with_options(flags, momentum_used)
    except (TypeError, ValueError):
        return None
    if len(_SMALL_DESCS) >= _SMALL_DESCS_MAX:
        _SMALL_DESCS.clear()
    _SMALL_DESCS[key] = desc
    return desc


def _batch_norm_small(input: Array, running_mean: Array | None, running_var: Array | None, weight: Array | None,
                      bias: Array | None, training: bool, momentum: Any, eps: Any, axis: Any) -> Array | None:
    """`batch_norm` for CPU tensors of a library with a DLPack C exchange table: the checks and the
    description of `batch_norm_forward` (remembered per key by `_small_desc`), the tensors borrowed
    without capsules, the output made by the library's `empty_like`, one C call. Returns None for
    anything else (other types or devices, a check that fails, running statistics that require grad,
    a call the C core refuses; it validates before it writes, so nothing changed): the checked path
    then runs and raises the explaining error. Written for the cost of a call of a few microseconds:
    no helper is called on a repeated call but the key's lookup."""
    shape = _core.exchange_shape(input)
    if shape is None:
        return None
    empty_like = empty_like_of(input)
    if empty_like is None:
        return None
    training = bool(training)
    has_running = running_mean is not None
    if has_running != (running_var is not None):
        return None  # `check_running_pair` in the checked path explains
    key = (shape, training, has_running, type(momentum), momentum, type(eps), eps, type(axis), axis)
    try:
        desc = _SMALL_DESCS.get(key)
    except TypeError:  # an unhashable scalar: the checked path explains
        return None
    if desc is None:
        desc = _small_desc(key, shape, training, has_running, momentum, eps, axis)
        if desc is None:
            return None
    if training and running_mean is not None and running_var is not None:
        # the running statistics are written: autograd's rules are `Call`'s (the checked path), so
        # statistics that require grad go there; others get their version counters advanced
        if ((is_torch(running_mean) and running_mean.requires_grad)
                or (is_torch(running_var) and running_var.requires_grad)):
            return None
        y = _core.exchange_forward(desc, empty_like, input, weight, bias, running_mean, running_var)
        if y is not None:
            bump_versions((running_mean, running_var))
        return y
    return _core.exchange_forward(desc, empty_like, input, weight, bias, running_mean, running_var)


def batch_norm(input: Array, running_mean: Array | None = None, running_var: Array | None = None,
               weight: Array | None = None, bias: Array | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: int = 1, out: Array | None = None) -> Array:
    """Batch norm, argument for argument as ``torch.nn.functional.batch_norm``; returns the output.

    ``axis`` is the channel axis (default 1, NCHW; -1 for channels-last data).
    ``out`` receives the output when given (any strides; it may be ``input`` itself).
    """
    if out is None:
        if is_torch(input):
            return _torch_ops().batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                           axis)
        return _batch_norm_plain(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis=axis,
                              out=out, _want_stats=False)[0]


def _batch_norm_plain(input: Array, running_mean: Array | None, running_var: Array | None, weight: Array | None,
                      bias: Array | None, training: bool, momentum: Any, eps: Any, axis: Any) -> Array:
    """`batch_norm` without autograd: the fast path, else the checked path."""
    y = _batch_norm_small(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
    if y is not None:
        return y
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis=axis,
                              _want_stats=False)[0]


def batch_norm_backward(grad_output: Array, input: Array, weight: Array | None, save_mean: Array,
                        save_invstd: Array, *, training: bool = True, axis: int = 1,
                        out: Array | None = None) -> Outputs:
    """Backward of batch norm; returns ``(grad_input, grad_weight, grad_bias)``.

    ``save_mean`` / ``save_invstd`` are what ``batch_norm_forward`` returned. With
    ``training=False`` the statistics are constants (eval mode): grad_input =
    grad_output * weight * invstd. ``grad_weight`` and ``grad_bias`` are None when
    ``weight`` is None. ``out`` receives grad_input when given (any strides; it may be
    ``grad_output`` itself).
    """
    with Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        w = _weight(call, weight, (channels,), f"channel of axis {ax}")
        sm, sr = _saved(call, save_mean, save_invstd, (channels,), "save_invstd")
        desc = _core.Desc.batch(x.ndim, ax, 0.0).with_options(0 if training else _core.FLAG_USE_RUNNING_STATS)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out)


# ---------------------------------------------------------------- layer norm and RMS norm


def _layer_setup(call: Call, input: Array, normalized_shape: Any) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    x = call.need(input, "input")
    check_float(x, "input")
    shape = check_normalized_shape(normalized_shape, x)
    return x, shape, tuple(x.shape[:x.ndim - len(shape)])


def layer_norm_forward(input: Array, normalized_shape: int | Sequence[int], weight: Array | None = None,
                       bias: Array | None = None, eps: float = 1e-5, *, out: Array | None = None,
                       _want_stats: bool = True) -> Outputs:
    """Layer norm over the trailing ``normalized_shape`` dims; returns ``(output, save_mean, save_rstd)``
    with one statistic per leading index (shape ``input.shape[:-len(normalized_shape)]``)."""
    eps = check_eps(eps)
    with Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w, b = _affine(call, weight, bias, shape, "element of normalized_shape")
        desc = _core.Desc.layer(x.ndim, len(shape), eps)
        return _forward(call, desc, input, x, w, b, None, None, out, lead, want_stats=_want_stats)


def layer_norm(input: Array, normalized_shape: int | Sequence[int], weight: Array | None = None,
               bias: Array | None = None, eps: float = 1e-5, *, out: Array | None = None) -> Array:
    """Layer norm, as ``torch.nn.functional.layer_norm``; returns the output."""
    if out is None and is_torch(input):
        return _torch_ops().layer_norm(input, normalized_shape, weight, bias, eps)
    return layer_norm_forward(input, normalized_shape, weight, bias, eps, out=out, _want_stats=False)[0]


def _layer_norm_plain(input: Array, normalized_shape: Any, weight: Array | None, bias: Array | None,
                      eps: Any) -> Array:
    return layer_norm_forward(input, normalized_shape, weight, bias, eps, _want_stats=False)[0]


def layer_norm_backward(grad_output: Array, input: Array, normalized_shape: int | Sequence[int],
                        weight: Array | None, save_mean: Array, save_rstd: Array, *,
                        out: Array | None = None) -> Outputs:
    """Backward of layer norm: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight."""
    with Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w = _weight(call, weight, shape, "element of normalized_shape")
        sm, sr = _saved(call, save_mean, save_rstd, lead)
        desc = _core.Desc.layer(x.ndim, len(shape), 0.0)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, shape, out=out)


def _rms_eps(eps: Any, dtype: str) -> float:
    if eps is None:  # PyTorch: the machine epsilon of the type it computes in
        return _F64_EPS if dtype == "float64" else _F32_EPS
    return check_eps(eps)


def rms_norm_forward(input: Array, normalized_shape: int | Sequence[int], weight: Array | None = None,
                     eps: float | None = None, *, out: Array | None = None,
                     _want_stats: bool = True) -> tuple[Any, Any]:
    """RMS norm: ``y = x / sqrt(mean(x^2) + eps) * weight``; returns ``(output, save_rstd)``.
    ``eps=None`` is the machine epsilon of the compute type (float32's for half inputs)."""
    with Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w = _weight(call, weight, shape, "element of normalized_shape")
        desc = _core.Desc.rms(x.ndim, len(shape), _rms_eps(eps, x.dtype))
        y, _, rstd = _forward(call, desc, input, x, w, None, None, None, out, lead, want_stats=_want_stats)
        return y, rstd


def rms_norm(input: Array, normalized_shape: int | Sequence[int], weight: Array | None = None,
             eps: float | None = None, *, out: Array | None = None) -> Array:
    """RMS norm, as ``torch.nn.functional.rms_norm``; returns the output."""
    if out is None and is_torch(input):
        return _torch_ops().rms_norm(input, normalized_shape, weight, eps)
    return rms_norm_forward(input, normalized_shape, weight, eps, out=out, _want_stats=False)[0]


def _rms_norm_plain(input: Array, normalized_shape: Any, weight: Array | None, eps: Any) -> Array:
    return rms_norm_forward(input, normalized_shape, weight, eps, _want_stats=False)[0]


def rms_norm_backward(grad_output: Array, input: Array, normalized_shape: int | Sequence[int], weight: Array | None,
                      save_rstd: Array, *, out: Array | None = None) -> Outputs:
    """Backward of RMS norm: ``(grad_input, grad_weight, None)``; grad_weight None without weight."""
    with Call() as call:
        x, shape, lead = _layer_setup(call, input, normalized_shape)
        w = _weight(call, weight, shape, "element of normalized_shape")
        _, sr = _saved(call, None, save_rstd, lead, need_mean=False)
        desc = _core.Desc.rms(x.ndim, len(shape), 0.0)
        return _backward(call, desc, input, x, grad_output, w, None, sr, shape, want_bias_grad=False, out=out)


# ---------------------------------------------------------------- instance norm


def _instance_setup(call: Call, input: Array) -> tuple[Tensor, int, tuple[int, int]]:
    x = call.need(input, "input")
    check_input(x, "input", 3, "(N, C, L, ...)")
    return x, x.shape[1], (x.shape[0], x.shape[1])


def _instance_mode(shape: tuple[int, ...], use_input_stats: bool, has_running: bool, momentum: Any,
                   stats: Any) -> tuple[int, float]:
    """The flags and momentum of an instance-norm forward, by PyTorch's rules."""
    if stats is None:
        check_momentum_type(momentum)
    if not use_input_stats:
        check_has_running_stats(has_running or stats is not None,
                                "Expected running_mean and running_var to be defined when use_input_stats is false")
        return _core.FLAG_USE_RUNNING_STATS, 0.0
    check_batch_values(shape, 2, -1, "Expected more than 1 spatial element when training")
    if stats is not None:
        return _core.FLAG_UPDATE_RUNNING_STATS, 0.0
    if has_running:
        return _core.FLAG_UPDATE_RUNNING_STATS, check_momentum(momentum)
    return 0, 0.0


def instance_norm_forward(input: Array, running_mean: Array | None = None, running_var: Array | None = None,
                          weight: Array | None = None, bias: Array | None = None, use_input_stats: bool = True,
                          momentum: float = 0.1, eps: float = 1e-5, *, out: Array | None = None, stats: Any = None,
                          _want_stats: bool = True) -> Outputs:
    """Instance norm over the spatial dims of each (sample, channel); returns
    ``(output, save_mean, save_invstd)`` of shape (N, C). With running statistics
    and ``use_input_stats`` they are updated with the average over the batch of the
    instances' mean and unbiased variance (PyTorch's rule); without
    ``use_input_stats`` they normalize."""
    eps = check_eps(eps)
    with Call() as call:
        x, channels, groups = _instance_setup(call, input)
        w, b = _affine(call, weight, bias, (channels,), "channel")
        check_stats(stats, running_mean, channels)
        rm, rv = _running(call, running_mean, running_var, (channels,), "channel", writable=bool(use_input_stats))
        flags, momentum_used = _instance_mode(x.shape, bool(use_input_stats), rm is not None, momentum, stats)
        desc = _core.Desc.instance(x.ndim, eps).with_options(flags, momentum_used)
        return _forward(call, desc, input, x, w, b, rm, rv, out, groups, stats, _want_stats)


def instance_norm(input: Array, running_mean: Array | None = None, running_var: Array | None = None,
                  weight: Array | None = None, bias: Array | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, out: Array | None = None) -> Array:
    """Instance norm, as ``torch.nn.functional.instance_norm``; returns the output."""
    if out is None and is_torch(input):
        return _torch_ops().instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                                          eps)
    return instance_norm_forward(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                 out=out, _want_stats=False)[0]


def _instance_norm_plain(input: Array, running_mean: Array | None, running_var: Array | None, weight: Array | None,
                         bias: Array | None, use_input_stats: bool, momentum: Any, eps: Any) -> Array:
    return instance_norm_forward(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                 _want_stats=False)[0]


def instance_norm_backward(grad_output: Array, input: Array, weight: Array | None, save_mean: Array,
                           save_invstd: Array, *, use_input_stats: bool = True,
                           out: Array | None = None) -> Outputs:
    """Backward of instance norm: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight."""
    with Call() as call:
        x, channels, groups = _instance_setup(call, input)
        w = _weight(call, weight, (channels,), "channel")
        sm, sr = _saved(call, save_mean, save_invstd, groups, "save_invstd")
        desc = _core.Desc.instance(x.ndim, 0.0).with_options(0 if use_input_stats else _core.FLAG_USE_RUNNING_STATS)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out)


# ---------------------------------------------------------------- group norm


def _group_setup(call: Call, input: Array, num_groups: Any) -> tuple[Tensor, int, int, tuple[int, int]]:
    x = call.need(input, "input")
    check_input(x, "input", 2, "(N, C, ...)")
    groups = check_num_groups(num_groups, x)
    return x, groups, x.shape[1], (x.shape[0], groups)


def group_norm_forward(input: Array, num_groups: int, weight: Array | None = None, bias: Array | None = None,
                       eps: float = 1e-5, *, out: Array | None = None, _want_stats: bool = True) -> Outputs:
    """Group norm: channels split into ``num_groups`` groups, statistics over each
    (sample, group); returns ``(output, save_mean, save_rstd)`` of shape (N, num_groups)."""
    eps = check_eps(eps)
    with Call() as call:
        x, groups, channels, group_shape = _group_setup(call, input, num_groups)
        w, b = _affine(call, weight, bias, (channels,), "channel")
        desc = _core.Desc.group(x.ndim, groups, eps)
        return _forward(call, desc, input, x, w, b, None, None, out, group_shape, want_stats=_want_stats)


def group_norm(input: Array, num_groups: int, weight: Array | None = None, bias: Array | None = None,
               eps: float = 1e-5, *, out: Array | None = None) -> Array:
    """Group norm, as ``torch.nn.functional.group_norm``; returns the output."""
    if out is None and is_torch(input):
        return _torch_ops().group_norm(input, num_groups, weight, bias, eps)
    return group_norm_forward(input, num_groups, weight, bias, eps, out=out, _want_stats=False)[0]


def _group_norm_plain(input: Array, num_groups: Any, weight: Array | None, bias: Array | None, eps: Any) -> Array:
    return group_norm_forward(input, num_groups, weight, bias, eps, _want_stats=False)[0]


def group_norm_backward(grad_output: Array, input: Array, num_groups: int, weight: Array | None, save_mean: Array,
                        save_rstd: Array, *, out: Array | None = None) -> Outputs:
    """Backward of group norm: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight."""
    with Call() as call:
        x, groups, channels, group_shape = _group_setup(call, input, num_groups)
        w = _weight(call, weight, (channels,), "channel")
        sm, sr = _saved(call, save_mean, save_rstd, group_shape)
        desc = _core.Desc.group(x.ndim, groups, 0.0)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out)


# ---------------------------------------------------------------- any axes


def _normalize_setup(call: Call, input: Array, axes: Any, affine_axes: Any) -> tuple[
        Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    x = call.need(input, "input")
    check_float(x, "input")
    check_not_scalar(x, "input")
    red = check_axes(axes, x.ndim, "axes")
    aff = red if affine_axes is None else check_axes(affine_axes, x.ndim, "affine_axes")
    param_shape = tuple(x.shape[a] for a in aff)
    group_shape = tuple(x.shape[a] for a in range(x.ndim) if a not in red)
    return x, red, aff, param_shape, group_shape


def normalize_forward(input: Array, axes: int | Sequence[int], weight: Array | None = None,
                      bias: Array | None = None, *, affine_axes: int | Sequence[int] | None = None, eps: float = 1e-5,
                      rms: bool = False, out: Array | None = None, _want_stats: bool = True) -> Outputs:
    """Statistics over ``axes`` (one group per index of the other axes); weight and
    bias have the input's sizes at ``affine_axes`` (default: ``axes``). Runs on any
    strides without a copy. Returns ``(output, save_mean, save_rstd)``, the
    statistics shaped as the input without ``axes``."""
    eps = check_eps(eps)
    with Call() as call:
        x, red, aff, pshape, gshape = _normalize_setup(call, input, axes, affine_axes)
        w, b = _affine(call, weight, bias, pshape, f"index of axes {aff}")
        desc = _core.Desc.axes(_mask(red), _mask(aff), eps, _core.FLAG_RMS if rms else 0)
        return _forward(call, desc, input, x, w, b, None, None, out, gshape, want_stats=_want_stats)


def normalize(input: Array, axes: int | Sequence[int], weight: Array | None = None, bias: Array | None = None, *,
              affine_axes: int | Sequence[int] | None = None, eps: float = 1e-5, rms: bool = False,
              out: Array | None = None) -> Array:
    """The general entry point every variant is a case of; returns the output.
    ``normalize(x, axes=(1,))`` is layer norm over the channels of an NCHW tensor."""
    if out is None and is_torch(input):
        return _torch_ops().normalize(input, axes, weight, bias, affine_axes, eps, rms)
    return normalize_forward(input, axes, weight, bias, affine_axes=affine_axes, eps=eps, rms=rms, out=out,
                             _want_stats=False)[0]


def _normalize_plain(input: Array, axes: Any, weight: Array | None, bias: Array | None, affine_axes: Any, eps: Any,
                     rms: bool) -> Array:
    return normalize_forward(input, axes, weight, bias, affine_axes=affine_axes, eps=eps, rms=rms,
                             _want_stats=False)[0]


def normalize_backward(grad_output: Array, input: Array, axes: int | Sequence[int], weight: Array | None,
                       save_mean: Array | None, save_rstd: Array, *, affine_axes: int | Sequence[int] | None = None,
                       rms: bool = False, out: Array | None = None) -> Outputs:
    """Backward of ``normalize``: ``(grad_input, grad_weight, grad_bias)``; the last two None without weight
    (grad_bias also None with ``rms``). ``save_mean`` may be None with ``rms``."""
    with Call() as call:
        x, red, aff, pshape, gshape = _normalize_setup(call, input, axes, affine_axes)
        w = _weight(call, weight, pshape, f"index of axes {aff}")
        sm, sr = _saved(call, save_mean, save_rstd, gshape, need_mean=not rms)
        desc = _core.Desc.axes(_mask(red), _mask(aff), 0.0, _core.FLAG_RMS if rms else 0)
        return _backward(call, desc, input, x, grad_output, w, sm, sr, pshape, want_bias_grad=not rms, out=out)
