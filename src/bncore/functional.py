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
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from ._core import Tensor
from ._arrays import (Allocator, Array, Call, bump_versions, empty_like_of, family_of, is_torch, stat_dtype,
                      to_numpy)
from ._checks import (check_axes, check_axis, check_batch_values, check_eps, check_float, check_has_running_stats,
                      check_input, check_like_input, check_momentum, check_momentum_type, check_ndim,
                      check_normalized_shape, check_not_scalar, check_num_groups, check_param, check_positive_int,
                      check_running_pair, check_same_device, check_saved, check_stats)
from .errors import (BncoreError, InvalidArgumentError, MissingRunningStatsError, ShapeMismatchError,
                     UnsupportedDtypeError)

__all__ = [
    "MissingRunningStatsError", "batch_norm", "batch_norm_backward", "batch_norm_forward", "batch_renorm",
    "batch_renorm_backward", "batch_renorm_forward", "fold", "group_norm",
    "group_norm_backward", "group_norm_forward", "instance_norm", "instance_norm_backward", "instance_norm_forward",
    "layer_norm", "layer_norm_backward", "layer_norm_forward", "normalize", "normalize_backward", "normalize_forward",
    "renorm_schedule", "rms_norm", "rms_norm_backward", "rms_norm_forward",
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
             stats: Any = None, want_stats: bool = True, residual: Tensor | None = None) -> Outputs:
    """Runs bn_norm_forward_ex (bn_norm_forward_stats_ex with a RunningStats); returns
    (output, save_mean, save_rstd) in the caller's array type."""
    y, mean, rstd, _, _ = _forward_ex(call, desc, input, x, w, b, rm, rv, out, group_shape, stats, want_stats,
                                      residual)
    return y, mean, rstd


def _forward_ex(call: Call, desc: _core.Desc, input: Array, x: Tensor, w: Tensor | None, b: Tensor | None,
                rm: Tensor | None, rv: Tensor | None, out: Array | None, group_shape: tuple[int, ...],
                stats: Any = None, want_stats: bool = True, residual: Tensor | None = None,
                renorm_shape: tuple[int, ...] | None = None) -> tuple[Any, Any, Any, Any, Any]:
    """`_forward` with the renormalization factors: (output, save_mean, save_rstd, r, d), r and d
    (of `renorm_shape`) None without it."""
    check_same_device([("input", x), ("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv),
                       ("residual", residual)])
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
    r_obj = alloc.empty(renorm_shape, sdt) if renorm_shape is not None else None
    d_obj = alloc.empty(renorm_shape, sdt) if renorm_shape is not None else None
    tr, td = call.add(r_obj, "save_r", True), call.add(d_obj, "save_d", True)
    # the V2 operands only when there are any: a plain call keeps the 0.2 call's arguments
    extras: dict[str, Any] = {k: v for k, v in (("residual", residual), ("save_r", tr), ("save_d", td))
                              if v is not None}
    try:
        if stats is not None:
            _core.norm_forward_stats(desc, x, w, b, stats._handle, y, sm, sr, **extras)
        else:
            _core.norm_forward(desc, x, w, b, rm, rv, y, sm, sr, **extras)
    except BncoreError as err:
        raise _named_out(err, out, "y") from None
    return (alloc.finish(y_obj), alloc.finish(mean_obj), alloc.finish(rstd_obj), alloc.finish(r_obj),
            alloc.finish(d_obj))


def _backward(call: Call, desc: _core.Desc, input: Array, x: Tensor, grad_output: Array, w: Tensor | None,
              sm: Tensor | None, sr: Tensor, param_shape: tuple[int, ...], want_bias_grad: bool = True,
              out: Array | None = None) -> Outputs:
    """Runs bn_norm_backward_ex; returns (grad_input, grad_weight, grad_bias), the last two None without weight.
    `out` (optional) receives grad_input: any strides, it may be grad_output itself."""
    dx, dw, db, _ = _backward_ex(call, desc, input, x, grad_output, w, sm, sr, param_shape, want_bias_grad, out)
    return dx, dw, db


def _backward_ex(call: Call, desc: _core.Desc, input: Array, x: Tensor, grad_output: Array, w: Tensor | None,
                 sm: Tensor | None, sr: Tensor, param_shape: tuple[int, ...], want_bias_grad: bool = True,
                 out: Array | None = None, y: Tensor | None = None, r: Tensor | None = None,
                 d: Tensor | None = None, want_residual_grad: bool = False) -> tuple[Any, Any, Any, Any]:
    """`_backward` with the forward's output `y` (its ReLU mask), renormalization's r and d, and the
    residual's gradient: (grad_input, grad_weight, grad_bias, grad_residual or None)."""
    dy = call.need(grad_output, "grad_output")
    check_float(dy, "grad_output")
    check_like_input(dy, x, "grad_output")
    check_same_device([("input", x), ("grad_output", dy), ("weight", w), ("save_mean", sm), ("save_rstd", sr),
                       ("output", y), ("r", r), ("d", d)])
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
    dres_obj = alloc.empty(x.shape, x.dtype, like_layout=input) if want_residual_grad else None
    dres = call.add(dres_obj, "grad_residual", True)
    extras: dict[str, Any] = {k: v for k, v in (("y", y), ("save_r", r), ("save_d", d), ("dresidual", dres))
                              if v is not None}
    try:
        _core.norm_backward(desc, x, dy, w, sm, sr, dx, dw, db, **extras)
    except BncoreError as err:
        raise _named_out(err, out, "grad_input") from None
    return alloc.finish(dx_obj), alloc.finish(dw_obj), alloc.finish(db_obj), alloc.finish(dres_obj)


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


_ACTIVATIONS = {"relu": _core.ACTIVATION_RELU}


def _check_activation(activation: Any) -> int:
    """The C epilogue of `activation` (None or "relu")."""
    if activation is None:
        return _core.ACTIVATION_NONE
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]
    raise InvalidArgumentError(f"activation: expected None or 'relu', got {activation!r}")


def _check_virtual_batch(virtual_batch_size: Any, shape: tuple[int, ...], ax: int, used: bool = True) -> int:
    """The size of ghost batch norm's virtual batches along axis 0 (0: none, or not `used`, as in eval,
    where only its type is checked); N must be a multiple."""
    if virtual_batch_size is None:
        return 0
    v = check_positive_int(virtual_batch_size, "virtual_batch_size")
    if not used:
        return 0
    if ax == 0:
        raise InvalidArgumentError("virtual_batch_size: the batch axis 0 is the channel axis here (axis=0)")
    if shape[0] % v:
        raise ShapeMismatchError(f"virtual_batch_size: the batch of {shape[0]} samples (axis 0) is not a multiple "
                                 f"of the virtual batch size {v}")
    return v


def _check_bound(value: Any, what: str, low: float) -> float:
    """A renormalization bound: a real number >= low (inf: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"{what}: expected a real number >= {low:g}, got {value!r}")
    v = float(value)
    if not v >= low:
        raise InvalidArgumentError(f"{what}: expected a value >= {low:g} (inf: unbounded), got {v!r}")
    return v


def _residual(call: Call, residual: Array | None, x: Tensor) -> Tensor | None:
    r = call.add(residual, "residual")
    if r is not None:
        check_like_input(r, x, "residual")
    return r


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


def _ghost_shape(shape: tuple[int, ...], v: int) -> tuple[int, ...]:
    """The shape of one virtual batch (PyTorch's one-value check applies to each)."""
    return (v,) + shape[1:] if v else shape


def batch_norm_forward(input: Array, running_mean: Array | None = None, running_var: Array | None = None,
                       weight: Array | None = None, bias: Array | None = None, training: bool = False,
                       momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1, out: Array | None = None,
                       stats: Any = None, virtual_batch_size: int | None = None, activation: str | None = None,
                       residual: Array | None = None, _want_stats: bool = True) -> Outputs:
    """Batch norm forward; returns ``(output, save_mean, save_invstd)``.

    Training (or no running statistics): the batch's mean and biased variance over
    every axis but ``axis`` normalize; running statistics, if given, are updated in
    place (``running_var`` receives the unbiased variance). Eval: the running
    statistics normalize. ``save_mean`` / ``save_invstd`` are the mean and
    1/sqrt(var + eps) actually used, float32 for half inputs. ``stats`` (a
    ``bncore.RunningStats``) may hold the running statistics instead, updated by its
    own convention (momentum, variance, nan_policy).

    ``virtual_batch_size`` (ghost batch norm, training only): axis 0 is split into
    consecutive virtual batches of that size, each normalized by its own statistics;
    ``save_mean`` / ``save_invstd`` then have shape (N / virtual_batch_size, C), and the
    running statistics receive the mean over the virtual batches. ``residual`` (the
    input's shape and dtype) is added and ``activation="relu"`` applied as the output is
    written: ``y = relu(bn(x) + residual)`` in one pass (docs/fused.md).
    """
    eps = check_eps(eps)
    act = _check_activation(activation)
    with Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        per = f"channel of axis {ax}"
        w, b = _affine(call, weight, bias, (channels,), per)
        res = _residual(call, residual, x)
        check_stats(stats, running_mean, channels)
        rm, rv = _running(call, running_mean, running_var, (channels,), per, writable=bool(training))
        batch_stats = bool(training) or (rm is None and stats is None)
        v = _check_virtual_batch(virtual_batch_size, x.shape, ax, used=batch_stats)  # eval ignores them
        flags, momentum_used = _batch_mode(_ghost_shape(x.shape, v), ax, bool(training), rm is not None, momentum,
                                           stats)
        desc = _core.Desc.batch(x.ndim, ax, eps).with_options(flags, momentum_used).with_extensions(
            virtual_batch_size=v, activation=act)
        groups = (x.shape[0] // v, channels) if v else (channels,)
        return _forward(call, desc, input, x, w, b, rm, rv, out, groups, stats, _want_stats, res)


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


def _small_output(input: Array, out: Any) -> Any:
    """How the one-call paths make their output: the library's `empty_like` of `input`, or `out`
    itself. `Call`'s rules for a written PyTorch tensor apply: an `out` that is not one, or that
    requires grad, takes the checked path (None)."""
    if out is None:
        return empty_like_of(input)
    if not is_torch(out) or out.requires_grad:
        return None
    return lambda _: out


def _batch_norm_small(input: Array, running_mean: Array | None, running_var: Array | None, weight: Array | None,
                      bias: Array | None, training: bool, momentum: Any, eps: Any, axis: Any,
                      out: Any = None) -> Array | None:
    """`batch_norm` for CPU tensors of a library with a DLPack C exchange table: the checks and the
    description of `batch_norm_forward` (remembered per key by `_small_desc`), the tensors borrowed
    without capsules, the output `out` (a PyTorch tensor that needs no grad) or made by the library's
    `empty_like`, one C call. Returns None for anything else (other types or devices, a check that
    fails, tensors that require grad where autograd's rules apply, a call the C core refuses; it
    validates before it writes, so nothing changed): the checked path then runs and raises the
    explaining error. Written for the cost of a call of a few microseconds: no helper is called on
    a repeated call but the key's lookup."""
    shape = _core.exchange_shape(input)
    if shape is None:
        return None
    written: tuple[Any, ...] = ()
    if out is None:
        empty_like = empty_like_of(input)
    else:
        empty_like = _small_output(input, out)
        written = (out,)
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
        written += (running_mean, running_var)
    y = _core.exchange_forward(desc, empty_like, input, weight, bias, running_mean, running_var)
    if y is not None and written:
        bump_versions(written)
    return y


# batch norm's backward descriptions, keyed by what their checks read (x's rank, the axis with its
# type, the mode): bounded like _SMALL_DESCS
_BACKWARD_DESCS: dict[tuple, _core.Desc] = {}


def _batch_norm_backward_small(grad_output: Array, input: Array, weight: Array | None, save_mean: Array,
                               save_invstd: Array, training: Any, axis: Any,
                               out: Any = None) -> tuple[Any, Any, Any] | None:
    """`batch_norm_backward` in one C call, as `_batch_norm_small` is the forward's: CPU tensors of a
    library with a DLPack C exchange table, views borrowed without capsules, grad_input into `out`
    (a PyTorch tensor that needs no grad) or made by the library's `empty_like`, grad_weight and
    grad_bias by its `empty_like` of the weight. (grad_input, grad_weight, grad_bias), or None for
    anything else (a check that fails, a call the C core refuses: nothing was written), where the
    checked path runs and explains."""
    shape = _core.exchange_shape(input)
    if shape is None:
        return None
    training = bool(training)
    key = (len(shape), type(axis), axis, training)
    try:
        desc = _BACKWARD_DESCS.get(key)
    except TypeError:  # an unhashable axis: the checked path explains
        return None
    if desc is None:
        try:
            check_ndim(shape, "input", 2, "(N, C, ...)")
            ax = check_axis(axis, len(shape), "axis")
        except (TypeError, ValueError):
            return None
        if len(_BACKWARD_DESCS) >= _SMALL_DESCS_MAX:
            _BACKWARD_DESCS.clear()
        desc = _BACKWARD_DESCS[key] = _core.Desc.batch(len(shape), ax, 0.0).with_options(
            0 if training else _core.FLAG_USE_RUNNING_STATS)
    empty_like = _small_output(input, out)
    if empty_like is None:
        return None
    grad_weight = grad_bias = None
    if weight is not None:
        param_like = empty_like_of(weight)
        if param_like is None:
            return None
        grad_weight, grad_bias = param_like(weight), param_like(weight)
    grad_input = _core.exchange_backward(desc, empty_like, input, grad_output, weight, save_mean, save_invstd,
                                         grad_weight, grad_bias)
    if grad_input is None:
        return None
    if out is not None:
        bump_versions((out,))
    return grad_input, grad_weight, grad_bias


def batch_norm(input: Array, running_mean: Array | None = None, running_var: Array | None = None,
               weight: Array | None = None, bias: Array | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: int = 1, out: Array | None = None, virtual_batch_size: int | None = None,
               activation: str | None = None, residual: Array | None = None) -> Array:
    """Batch norm, argument for argument as ``torch.nn.functional.batch_norm``; returns the output.

    ``axis`` is the channel axis (default 1, NCHW; -1 for channels-last data).
    ``out`` receives the output when given (any strides; it may be ``input`` itself).
    ``virtual_batch_size``, ``activation`` and ``residual``: see ``batch_norm_forward``.
    On torch tensors (without ``out``) the call is differentiable, through bncore's
    registered operators.
    """
    if out is None:
        if is_torch(input):
            return _torch_ops().batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                           axis, virtual_batch_size, activation, residual)
        return _batch_norm_plain(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                                 virtual_batch_size, activation, residual)
    # out= on PyTorch tensors: the fast path when nothing needs autograd's rules
    if (virtual_batch_size is None and activation is None and residual is None and is_torch(input)
            and not (input.requires_grad or getattr(weight, "requires_grad", False)
                     or getattr(bias, "requires_grad", False))):
        y = _batch_norm_small(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                              out=out)
        if y is not None:
            return y
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis=axis,
                              out=out, virtual_batch_size=virtual_batch_size, activation=activation,
                              residual=residual, _want_stats=False)[0]


def _batch_norm_plain(input: Array, running_mean: Array | None, running_var: Array | None, weight: Array | None,
                      bias: Array | None, training: bool, momentum: Any, eps: Any, axis: Any,
                      virtual_batch_size: Any = None, activation: Any = None, residual: Array | None = None) -> Array:
    """`batch_norm` without autograd: the fast path, else the checked path."""
    if virtual_batch_size is None and activation is None and residual is None:
        y = _batch_norm_small(input, running_mean, running_var, weight, bias, training, momentum, eps, axis)
        if y is not None:
            return y
    return batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis=axis,
                              virtual_batch_size=virtual_batch_size, activation=activation, residual=residual,
                              _want_stats=False)[0]


def batch_norm_backward(grad_output: Array, input: Array, weight: Array | None, save_mean: Array,
                        save_invstd: Array, *, training: bool = True, axis: int = 1, out: Array | None = None,
                        virtual_batch_size: int | None = None, activation: str | None = None,
                        output: Array | None = None, residual: bool = False) -> tuple[Any, ...]:
    """Backward of batch norm; returns ``(grad_input, grad_weight, grad_bias)``, and
    ``grad_residual`` fourth when ``residual`` (the forward had one).

    ``save_mean`` / ``save_invstd`` are what ``batch_norm_forward`` returned. With
    ``training=False`` the statistics are constants (eval mode): grad_input =
    grad_output * weight * invstd. ``grad_weight`` and ``grad_bias`` are None when
    ``weight`` is None. ``out`` receives grad_input when given (any strides; it may be
    ``grad_output`` itself). ``virtual_batch_size`` as in the forward (training only).
    With ``activation="relu"``, ``output`` is the forward's output: grad_output is
    masked where it is > 0; grad_residual is that masked gradient.
    """
    if virtual_batch_size is None and activation is None and output is None and not residual:
        grads = _batch_norm_backward_small(grad_output, input, weight, save_mean, save_invstd, training, axis, out)
        if grads is not None:
            return grads
    act = _check_activation(activation)
    with Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        v = _check_virtual_batch(virtual_batch_size, x.shape, ax, used=bool(training))
        w = _weight(call, weight, (channels,), f"channel of axis {ax}")
        groups = (x.shape[0] // v, channels) if v else (channels,)
        sm, sr = _saved(call, save_mean, save_invstd, groups, "save_invstd")
        y = call.add(output, "output")
        if act != _core.ACTIVATION_NONE and y is None:
            raise InvalidArgumentError("output: the forward's output is required with activation='relu', got None")
        if y is not None:
            check_like_input(y, x, "output")
        desc = _core.Desc.batch(x.ndim, ax, 0.0).with_options(0 if training else _core.FLAG_USE_RUNNING_STATS)
        desc = desc.with_extensions(virtual_batch_size=v, activation=act)
        dx, dw, db, dres = _backward_ex(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out,
                                        y=y if act != _core.ACTIVATION_NONE else None,
                                        want_residual_grad=bool(residual))
        return (dx, dw, db, dres) if residual else (dx, dw, db)


# ---------------------------------------------------------------- batch renormalization


def batch_renorm_forward(input: Array, running_mean: Array | None, running_var: Array | None,
                         weight: Array | None = None, bias: Array | None = None, training: bool = False,
                         momentum: float = 0.1, eps: float = 1e-5, *, rmax: float = 3.0, dmax: float = 5.0,
                         axis: int = 1, out: Array | None = None, stats: Any = None,
                         _want_stats: bool = True) -> tuple[Any, Any, Any, Any, Any]:
    """Batch renormalization (Ioffe 2017); returns ``(output, save_mean, save_invstd, r, d)``.

    Training: with the batch's mu_B, sigma_B = sqrt(var_B + eps) and the running
    statistics' mu, sigma (before this call's update),
    ``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``
    and ``y = ((x - mu_B) / sigma_B * r + d) * weight + bias``; the running statistics are
    then updated as batch norm's. ``r`` and ``d`` (one per channel) are what the backward
    needs. Eval: batch norm's eval (``r`` and ``d`` are None).
    """
    eps = check_eps(eps)
    rmax = _check_bound(rmax, "rmax", 1.0)
    dmax = _check_bound(dmax, "dmax", 0.0)
    with Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        per = f"channel of axis {ax}"
        w, b = _affine(call, weight, bias, (channels,), per)
        check_stats(stats, running_mean, channels)
        rm, rv = _running(call, running_mean, running_var, (channels,), per, writable=bool(training))
        check_has_running_stats(rm is not None or stats is not None,
                                "batch renormalization compares the batch with the running statistics: "
                                "running_mean and running_var are required")
        flags, momentum_used = _batch_mode(x.shape, ax, bool(training), rm is not None, momentum, stats)
        if not training:
            desc = _core.Desc.batch(x.ndim, ax, eps).with_options(flags, momentum_used)
            y, mean, invstd = _forward(call, desc, input, x, w, b, rm, rv, out, (channels,), stats, _want_stats)
            return y, mean, invstd, None, None
        desc = _core.Desc.batch(x.ndim, ax, eps).with_options(flags | _core.FLAG_RENORM, momentum_used)
        desc = desc.with_extensions(rmax=rmax, dmax=dmax)
        return _forward_ex(call, desc, input, x, w, b, rm, rv, out, (channels,), stats, _want_stats,
                           renorm_shape=(channels,) if _want_stats else None)


def batch_renorm(input: Array, running_mean: Array | None, running_var: Array | None, weight: Array | None = None,
                 bias: Array | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                 rmax: float = 3.0, dmax: float = 5.0, axis: int = 1, out: Array | None = None) -> Array:
    """Batch renormalization; returns the output (see ``batch_renorm_forward``)."""
    if out is None and is_torch(input):  # differentiable, through bncore's registered operators
        return _torch_ops().batch_renorm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                         rmax, dmax, axis)
    return batch_renorm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, rmax=rmax,
                                dmax=dmax, axis=axis, out=out, _want_stats=False)[0]


def batch_renorm_backward(grad_output: Array, input: Array, weight: Array | None, save_mean: Array,
                          save_invstd: Array, r: Array | None, d: Array | None, *, training: bool = True,
                          axis: int = 1, out: Array | None = None) -> Outputs:
    """Backward of batch renormalization; returns ``(grad_input, grad_weight, grad_bias)``.

    ``r`` and ``d`` (from the forward) are constants: grad_input is batch norm's with
    weight * r, grad_weight = r * sum(dy * xhat) + d * sum(dy), grad_bias = sum(dy).
    ``training=False``: batch norm's eval backward (``r``, ``d`` unused, may be None).
    """
    if not training:
        dx, dw, db = batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=False,
                                         axis=axis, out=out)
        return dx, dw, db
    with Call() as call:
        x, ax, channels = _batch_setup(call, input, axis)
        per = f"channel of axis {ax}"
        w = _weight(call, weight, (channels,), per)
        sm, sr = _saved(call, save_mean, save_invstd, (channels,), "save_invstd")
        tr, td = call.add(r, "r"), call.add(d, "d")
        check_saved(tr, "r", (channels,))
        check_saved(td, "d", (channels,))
        # the bounds only shaped r and d in the forward: any valid pair describes the backward
        desc = _core.Desc.batch(x.ndim, ax, 0.0).with_options(_core.FLAG_RENORM).with_extensions(rmax=1.0, dmax=0.0)
        dx, dw, db, _ = _backward_ex(call, desc, input, x, grad_output, w, sm, sr, (channels,), out=out, r=tr, d=td)
        return dx, dw, db


def renorm_schedule(step: int, *, rmax: float = 3.0, dmax: float = 5.0, start: int = 5000,
                    rmax_steps: int = 40000, dmax_steps: int = 25000) -> tuple[float, float]:
    """The (rmax, dmax) of training step `step` by the paper's warm-up: plain batch norm
    (1, 0) for the first `start` steps, then rmax rises linearly from 1 to its final value
    over `rmax_steps` steps and dmax from 0 over `dmax_steps` steps."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InvalidArgumentError(f"step: expected an int >= 0, got {step!r}")
    rmax = _check_bound(rmax, "rmax", 1.0)
    dmax = _check_bound(dmax, "dmax", 0.0)
    for value, what in ((start, "start"), (rmax_steps, "rmax_steps"), (dmax_steps, "dmax_steps")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InvalidArgumentError(f"{what}: expected an int >= 0, got {value!r}")

    def ramp(steps: int) -> float:
        if steps == 0:
            return 1.0 if step >= start else 0.0
        return min(max((step - start) / steps, 0.0), 1.0)

    return 1.0 + (rmax - 1.0) * ramp(rmax_steps), dmax * ramp(dmax_steps)


# ---------------------------------------------------------------- folding into a preceding layer


def _as_float64(value: Array, what: str) -> np.ndarray:
    arr = to_numpy(value, what)
    if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
        raise UnsupportedDtypeError(f"{what}: expected a real array, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _like(ref: Array, values: np.ndarray) -> Any:
    """`values` (float64) in the array type, dtype and device of `ref`."""
    fam = family_of(ref)
    if fam == "torch":
        torch = sys.modules["torch"]
        return torch.from_numpy(values).to(device=ref.device, dtype=ref.dtype)
    if fam == "jax":
        import jax.numpy as jnp

        return jnp.asarray(values, dtype=ref.dtype)
    if fam == "cupy":
        return sys.modules["cupy"].asarray(values, dtype=ref.dtype)
    dtype = getattr(ref, "dtype", None)
    try:
        return values.astype(np.dtype(dtype)) if dtype is not None else values
    except TypeError:
        return values


def fold(weight: Array, bias: Array | None, running_mean: Array, running_var: Array, gamma: Array | None = None,
         beta: Array | None = None, eps: float = 1e-5, *, axis: int = 0) -> tuple[Any, Any]:
    """Folds an eval-mode batch norm into the layer before it; returns ``(weight, bias)``.

    ``w' = w * gamma / sqrt(var + eps)`` along ``axis`` of ``weight`` (0: the output channels
    of Conv / Linear weights; 1 for ConvTranspose), ``b' = (b - mean) * gamma / sqrt(var + eps)
    + beta``. ``bias`` None is zeros, ``gamma`` / ``beta`` None are ones / zeros. Computed in
    float64; the results have weight's array type and dtype (the bias too, when bias is None).
    """
    eps = check_eps(eps)
    w = _as_float64(weight, "weight")
    if w.ndim < 1:
        raise InvalidArgumentError("weight: expected an array of at least 1 dimension, got a scalar")
    ax = check_axis(axis, w.ndim, "axis")
    channels = w.shape[ax]
    vectors = {}
    for value, what in ((running_mean, "running_mean"), (running_var, "running_var"), (gamma, "gamma"),
                        (beta, "beta"), (bias, "bias")):
        if value is None:
            continue
        arr = _as_float64(value, what)
        if arr.shape != (channels,):
            raise ShapeMismatchError(f"{what}: expected shape ({channels},) (weight's axis {ax}), got {arr.shape}")
        vectors[what] = arr
    scale = vectors.get("gamma", np.ones(channels)) / np.sqrt(vectors["running_var"] + eps)
    shape = [1] * w.ndim
    shape[ax] = channels
    folded_w = w * scale.reshape(shape)
    folded_b = (vectors.get("bias", np.zeros(channels)) - vectors["running_mean"]) * scale + vectors.get(
        "beta", np.zeros(channels))
    return _like(weight, folded_w), _like(bias if bias is not None else weight, folded_b)


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
