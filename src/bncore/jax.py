"""bncore.jax: bncore's normalizations as JAX functions, through JAX's FFI.

    >>> import jax, jax.numpy as jnp, bncore.jax as bnj
    >>> x = jnp.ones((4, 8))
    >>> y = jax.jit(lambda x: bnj.layer_norm(x, 8))(x)

Each call is one XLA custom call (``jax.ffi.ffi_call``) into bncore's C ABI on XLA's
own buffers: no host callback, no copy, no Python at execution time. The handlers are
C (``bncore._jax_ffi``); this module only describes problems and wires the
transformations:

- ``jax.jit``: the custom call is part of the compiled program.
- ``jax.grad`` / ``jax.vjp``: a ``jax.custom_vjp`` whose backward is bncore's
  backward (``bn_norm_backward``), with the statistics the forward saved.
- ``jax.vmap``: a ``jax.custom_batching.custom_vmap`` rule describes the batched
  problem to bncore directly: the vmapped axis becomes one more axis that is not
  reduced, so every vmapped instance is normalized by its own statistics (batch norm
  too), in one call, with no loop. Parameters that are vmapped (or per-instance
  running statistics) become parameters indexed by that axis as well.

Functional style: running statistics go in and the updated ones come out;
nothing is modified in place. The returned running statistics are not
differentiated (``jax.lax.stop_gradient``): they are state, not a function value.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _core, _jax_ffi

try:
    from jax import ffi as _ffi
except ImportError:  # jax < 0.4.38
    # the same module under its old name; the jax that mypy checks against has only the new one
    from jax.extend import ffi as _ffi  # type: ignore[attr-defined,no-redef]

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "normalize", "rms_norm"]

_FORWARD, _BACKWARD = "bncore_norm_forward", "bncore_norm_backward"
_ffi.register_ffi_target(_FORWARD, _jax_ffi.norm_forward, platform="cpu")
_ffi.register_ffi_target(_BACKWARD, _jax_ffi.norm_backward, platform="cpu")

# which optional buffers a call has (the handlers' `operands` attribute, _jax_ffi.c)
_WEIGHT, _BIAS, _RUNNING, _DWEIGHT = 1, 2, 4, 8

_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
_F32_EPS = float(np.finfo(np.float32).eps)
_F64_EPS = float(np.finfo(np.float64).eps)


class _Desc(NamedTuple):
    """bn_norm_desc_t as a hashable value (a static argument of the custom call)."""
    reduce_axes: int
    param_axes: int
    split_axis: int
    num_groups: int
    eps: float
    momentum: float
    flags: int

    @staticmethod
    def of(core_desc, split_axis=-1, num_groups=0, flags=0, momentum=0.0):
        """From a bncore._core.Desc (made by bncore's own variant mappings)."""
        return _Desc(int(core_desc.reduce_axes), int(core_desc.param_axes), split_axis, num_groups,
                     float(core_desc.eps), float(momentum), int(core_desc.flags) | flags)

    def batched(self, param_batched: bool) -> _Desc:
        """The same problem with one more leading axis that is not reduced (a vmapped
        axis); parameters are indexed by it too when `param_batched`."""
        return self._replace(reduce_axes=self.reduce_axes << 1,
                             param_axes=(self.param_axes << 1) | int(param_batched),
                             split_axis=self.split_axis + 1 if self.split_axis >= 0 else -1)

    def attrs(self, operands: int) -> dict:
        return dict(reduce_axes=np.int64(self.reduce_axes), param_axes=np.int64(self.param_axes),
                    split_axis=np.int64(self.split_axis), num_groups=np.int64(self.num_groups),
                    eps=np.float64(self.eps), momentum=np.float64(self.momentum), flags=np.int64(self.flags),
                    operands=np.int64(operands))

    @property
    def update(self) -> bool:
        return bool(self.flags & _core.FLAG_UPDATE_RUNNING_STATS)

    @property
    def eval_mode(self) -> bool:
        return bool(self.flags & _core.FLAG_USE_RUNNING_STATS)

    @property
    def rms(self) -> bool:
        return bool(self.flags & _core.FLAG_RMS)

    def axes(self, mask_name: str, ndim: int):
        mask = getattr(self, mask_name)
        return [d for d in range(ndim) if mask >> d & 1]

    def group_shape(self, shape):
        return tuple(self.num_groups if d == self.split_axis else shape[d]
                     for d in range(len(shape)) if not self.reduce_axes >> d & 1)

    def param_shape(self, shape):
        return tuple(shape[d] for d in self.axes("param_axes", len(shape)))


def _stat_dtype(dtype):
    """Saved statistics: float32 for half inputs, else the input's dtype (as bncore.functional)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


# ---------------------------------------------------------------- the two custom calls, vmappable


def _broadcast(a, size):
    return jnp.broadcast_to(a, (size,) + a.shape)


@functools.cache
def _forward_op(desc: _Desc, has_weight: bool, has_bias: bool, has_running: bool):
    """f(x, params) -> (y, save_mean, save_rstd[, new_running_mean, new_running_var]), params the
    present ones of (weight, bias, running_mean, running_var) in that order."""
    operands = _WEIGHT * has_weight | _BIAS * has_bias | _RUNNING * has_running
    first_running = 1 + has_weight + has_bias

    @jax.custom_batching.custom_vmap
    def op(x, params):
        sdt = _stat_dtype(x.dtype)
        groups = desc.group_shape(x.shape)
        out = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(groups, sdt),
               jax.ShapeDtypeStruct(groups, sdt)]
        aliases = {}
        if desc.update:
            rm, rv = params[first_running - 1], params[first_running]
            out += [jax.ShapeDtypeStruct(rm.shape, rm.dtype), jax.ShapeDtypeStruct(rv.shape, rv.dtype)]
            aliases = {first_running: 3, first_running + 1: 4}
        call = _ffi.ffi_call(_FORWARD, out, input_output_aliases=aliases)
        return tuple(call(x, *params, **desc.attrs(operands)))

    @op.def_vmap
    def op_vmap(axis_size, in_batched, x, params):
        x_batched, params_batched = in_batched
        # per-instance parameters when any is vmapped, or when each instance updates its own statistics
        per_instance = any(params_batched) or (desc.update and x_batched)
        x = x if x_batched else _broadcast(x, axis_size)
        params = tuple(p if b or not per_instance else _broadcast(p, axis_size)
                       for p, b in zip(params, params_batched))
        outs = _forward_op(desc.batched(per_instance), has_weight, has_bias, has_running)(x, params)
        return outs, tuple(True for _ in outs)

    return op


@functools.cache
def _backward_op(desc: _Desc, has_weight: bool, dweight_dtype, dbias_dtype):
    """f(x, dy, params) -> (dx[, dweight][, dbias]), params = ([weight,] save_mean, save_rstd)."""
    operands = _WEIGHT * has_weight | _DWEIGHT * (dweight_dtype is not None) | _BIAS * (dbias_dtype is not None)

    @jax.custom_batching.custom_vmap
    def op(x, dy, params):
        pshape = desc.param_shape(x.shape)
        out = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
        out += [jax.ShapeDtypeStruct(pshape, dt) for dt in (dweight_dtype, dbias_dtype) if dt is not None]
        return tuple(_ffi.ffi_call(_BACKWARD, out)(x, dy, *params, **desc.attrs(operands)))

    @op.def_vmap
    def op_vmap(axis_size, in_batched, x, dy, params):
        # every instance has its own parameter gradients: all operands get the vmapped axis
        x_b, dy_b, params_b = in_batched
        x, dy = (a if b else _broadcast(a, axis_size) for a, b in ((x, x_b), (dy, dy_b)))
        params = tuple(p if b else _broadcast(p, axis_size) for p, b in zip(params, params_b))
        outs = _backward_op(desc.batched(True), has_weight, dweight_dtype, dbias_dtype)(x, dy, params)
        return outs, tuple(True for _ in outs)

    return op


# ---------------------------------------------------------------- one differentiable normalization


def _present(*arrays):
    return tuple(a for a in arrays if a is not None)


def _forward(desc, x, w, b, rm, rv):
    has_running = rm is not None and (desc.update or desc.eval_mode)
    outs = _forward_op(desc, w is not None, b is not None, has_running)(
        x, _present(w, b, *((rm, rv) if has_running else ())))
    y, save_mean, save_rstd = outs[:3]
    new_rm, new_rv = outs[3:] if desc.update else (rm, rv)
    return y, save_mean, save_rstd, new_rm, new_rv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _norm(desc, x, w, b, rm, rv):
    y, _, _, new_rm, new_rv = _forward(desc, x, w, b, rm, rv)
    return y, new_rm, new_rv


def _norm_fwd(desc, x, w, b, rm, rv):
    y, save_mean, save_rstd, new_rm, new_rv = _forward(desc, x, w, b, rm, rv)
    return (y, new_rm, new_rv), (x, w, b, rm, rv, save_mean, save_rstd)


def _norm_bwd(desc, residuals, cotangents):
    # the cotangents of the running statistics are zero: _normalization stops their gradient
    x, w, b, rm, rv, save_mean, save_rstd = residuals
    dy = cotangents[0]
    eval_stats = desc.eval_mode and rm is not None
    # in eval mode the running statistics are inputs of y: their gradients need sum(dy * xhat)
    # and sum(dy) per parameter index, which are grad_weight and grad_bias
    dw_dtype = w.dtype if w is not None else (rv.dtype if eval_stats else None)
    db_dtype = b.dtype if b is not None else (rm.dtype if eval_stats else None)
    outs = _backward_op(desc, w is not None, dw_dtype, db_dtype)(
        x, dy.astype(x.dtype), _present(w, save_mean, save_rstd))
    dx, rest = outs[0], list(outs[1:])
    sum_dy_xhat = rest.pop(0) if dw_dtype is not None else None
    sum_dy = rest.pop(0) if db_dtype is not None else None
    dw = sum_dy_xhat if w is not None else None
    db = sum_dy if b is not None else None
    drm = drv = None
    if rm is not None:
        drm, drv = jnp.zeros_like(rm), jnp.zeros_like(rv)
        if eval_stats:
            # y = (x - rm) * rstd * w + b, rstd = (rv + eps)^-1/2: the chain rule per parameter index
            rstd = jax.lax.rsqrt(rv.astype(jnp.float32 if rv.dtype.itemsize < 4 else rv.dtype) + desc.eps)
            # (xhat = (x - rm) * rstd, so d y / d rv = -w * xhat * rstd^2 / 2)
            w_rstd = rstd if w is None else rstd * w
            # eval_stats made dw_dtype and db_dtype non-None above, so both sums were computed
            assert sum_dy is not None and sum_dy_xhat is not None
            drm = (-w_rstd * sum_dy).astype(rm.dtype)
            drv = (-0.5 * w_rstd * rstd * sum_dy_xhat).astype(rv.dtype)
    return dx, dw, db, drm, drv


_norm.defvjp(_norm_fwd, _norm_bwd)


def _normalization(desc, x, w, b, rm, rv):
    y, new_rm, new_rv = _norm(desc, x, w, b, rm, rv)
    if new_rm is not None:
        new_rm, new_rv = jax.lax.stop_gradient(new_rm), jax.lax.stop_gradient(new_rv)
    return y, new_rm, new_rv


# ---------------------------------------------------------------- argument checks


def _array(a, what):
    if a is None:
        return None
    a = jnp.asarray(a)
    if a.dtype not in _FLOATS:
        raise TypeError(f"{what}: expected a floating dtype (float16, bfloat16, float32 or float64), got {a.dtype}")
    return a


def _check_shape(a, what, shape, per):
    if a is not None and tuple(a.shape) != tuple(shape):
        raise _core.ShapeMismatchError(f"{what}: expected shape {tuple(shape)} (one value per {per}), "
                                       f"got {tuple(a.shape)}")


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_momentum(momentum):
    if momentum is None:
        raise ValueError("momentum: None (the cumulative average) needs a batch count, which the functional "
                         "JAX API does not carry; pass a float in [0, 1]")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
    return float(momentum)


def _check_static_bool(value, what):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what}: expected a Python bool (it selects the computation, so it cannot be traced), "
                        f"got {type(value).__name__}")
    return bool(value)


def _with_running(desc, x, w, b, mean, var, training, momentum, what_groups):
    """Batch and instance norm: the training / eval choice and the running statistics."""
    if (mean is None) != (var is None):
        raise ValueError("mean and var: pass both or neither")
    pshape = desc.param_shape(x.shape)
    for a, what in ((mean, "mean"), (var, "var")):
        _check_shape(a, what, pshape, "channel")
    if training:
        n = math.prod(x.shape[d] for d in desc.axes("reduce_axes", x.ndim))
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per {what_groups} when training, got input size "
                             f"{tuple(x.shape)}")
        if mean is not None:
            desc = desc._replace(flags=desc.flags | _core.FLAG_UPDATE_RUNNING_STATS, momentum=_check_momentum(momentum))
    elif mean is None:
        raise _core.InvalidArgumentError("mean and var: required in evaluation mode (training=False)")
    else:
        desc = desc._replace(flags=desc.flags | _core.FLAG_USE_RUNNING_STATS)
    return _normalization(desc, x, w, b, mean, var)


# ---------------------------------------------------------------- the public functions


def batch_norm(x, mean=None, var=None, weight=None, bias=None, *, training=False, momentum=0.1, eps=1e-5, axis=1):
    """Batch norm over every axis but ``axis`` (the channel axis; -1 for channels-last).

    Returns ``(y, new_mean, new_var)``. Training: the batch's statistics normalize, and
    when ``mean`` / ``var`` (running statistics, one per channel) are given the
    updated ones come back, PyTorch's rule: ``(1 - momentum) * old + momentum * batch``
    with the unbiased batch variance. Eval (``training=False``): ``mean`` / ``var``
    normalize and come back unchanged. Without running statistics the last two are None.
    """
    x, weight, bias, mean, var = (_array(a, n) for a, n in ((x, "x"), (weight, "weight"), (bias, "bias"),
                                                            (mean, "mean"), (var, "var")))
    training = _check_static_bool(training, "training")
    if x.ndim < 2:
        raise ValueError(f"x: expected at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: expected an int in [{-x.ndim}, {x.ndim}), got {axis!r}")
    desc = _Desc.of(_core.Desc.batch(x.ndim, int(axis) % x.ndim, _check_eps(eps)))
    pshape = desc.param_shape(x.shape)
    _check_shape(weight, "weight", pshape, "channel")
    _check_shape(bias, "bias", pshape, "channel")
    return _with_running(desc, x, weight, bias, mean, var, training, momentum, "channel")


def instance_norm(x, mean=None, var=None, weight=None, bias=None, *, use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm over the spatial axes of each (sample, channel) of an (N, C, ...) ``x``.

    Returns ``(y, new_mean, new_var)`` as ``batch_norm`` does, with ``use_input_stats``
    in the role of ``training``: the running statistics are updated with the batch
    average of the instances' mean and unbiased variance (PyTorch's rule), or, with
    ``use_input_stats=False``, normalize.
    """
    x, weight, bias, mean, var = (_array(a, n) for a, n in ((x, "x"), (weight, "weight"), (bias, "bias"),
                                                            (mean, "mean"), (var, "var")))
    use_input_stats = _check_static_bool(use_input_stats, "use_input_stats")
    if x.ndim < 3:
        raise ValueError(f"x: expected at least 3 dimensions (N, C, L, ...), got shape {tuple(x.shape)}")
    desc = _Desc.of(_core.Desc.instance(x.ndim, _check_eps(eps)))
    for a, what in ((weight, "weight"), (bias, "bias")):
        _check_shape(a, what, desc.param_shape(x.shape), "channel")
    return _with_running(desc, x, weight, bias, mean, var, use_input_stats, momentum, "instance")


def _normalized_ndim(x, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    k = len(shape)
    if not shape or k > x.ndim or tuple(x.shape[x.ndim - k:]) != tuple(int(s) for s in shape):
        raise ValueError(f"normalized_shape: expected the input's trailing dimensions, got {list(shape)} for an "
                         f"input of shape {list(x.shape)}")
    return k


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` axes (an int or a tuple); returns y.
    ``weight`` / ``bias`` have shape ``normalized_shape``."""
    x, weight, bias = _array(x, "x"), _array(weight, "weight"), _array(bias, "bias")
    desc = _Desc.of(_core.Desc.layer(x.ndim, _normalized_ndim(x, normalized_shape), _check_eps(eps)))
    for a, what in ((weight, "weight"), (bias, "bias")):
        _check_shape(a, what, desc.param_shape(x.shape), "element of normalized_shape")
    return _normalization(desc, x, weight, bias, None, None)[0]


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """RMS norm, ``y = x / sqrt(mean(x^2) + eps) * weight`` over the trailing axes; returns y.
    ``eps=None`` is the machine epsilon of the compute type (float32's for half inputs), as PyTorch."""
    x, weight = _array(x, "x"), _array(weight, "weight")
    eps = (_F64_EPS if x.dtype == jnp.float64 else _F32_EPS) if eps is None else _check_eps(eps)
    desc = _Desc.of(_core.Desc.rms(x.ndim, _normalized_ndim(x, normalized_shape), eps))
    _check_shape(weight, "weight", desc.param_shape(x.shape), "element of normalized_shape")
    return _normalization(desc, x, weight, None, None, None)[0]


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm of an (N, C, ...) ``x``: channels in ``num_groups`` groups, statistics over
    each (sample, group); returns y. ``weight`` / ``bias`` have one value per channel."""
    x, weight, bias = _array(x, "x"), _array(weight, "weight"), _array(bias, "bias")
    if x.ndim < 2:
        raise ValueError(f"x: expected at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1 \
            or x.shape[1] % num_groups:
        raise ValueError(f"num_groups: expected a positive int dividing the {x.shape[1]} channels, got {num_groups!r}")
    desc = _Desc.of(_core.Desc.group(x.ndim, int(num_groups), _check_eps(eps)), split_axis=1,
                    num_groups=int(num_groups))
    for a, what in ((weight, "weight"), (bias, "bias")):
        _check_shape(a, what, desc.param_shape(x.shape), "channel")
    return _normalization(desc, x, weight, bias, None, None)[0]


def _axes(axes, ndim, what):
    seq = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    if not seq or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim
                      for a in seq):
        raise ValueError(f"{what}: expected one or more axes in [{-ndim}, {ndim}), got {axes!r}")
    out = sorted({int(a) % ndim for a in seq})
    if len(out) != len(seq):
        raise ValueError(f"{what}: expected distinct axes, got {axes!r}")
    return out


def normalize(x, axes, weight=None, bias=None, *, affine_axes=None, eps=1e-5, rms=False):
    """Statistics over ``axes`` (one group per index of the others); ``weight`` / ``bias``
    have ``x``'s sizes at ``affine_axes`` (default ``axes``); ``rms`` subtracts no mean.
    Every variant is a case of it; returns y."""
    x, weight, bias = _array(x, "x"), _array(weight, "weight"), _array(bias, "bias")
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    red = _axes(axes, x.ndim, "axes")
    aff = red if affine_axes is None else _axes(affine_axes, x.ndim, "affine_axes")
    mask = functools.reduce(lambda m, a: m | 1 << a, red, 0)
    amask = functools.reduce(lambda m, a: m | 1 << a, aff, 0)
    desc = _Desc.of(_core.Desc.axes(mask, amask, _check_eps(eps), _core.FLAG_RMS if rms else 0))
    for a, what in ((weight, "weight"), (bias, "bias")):
        _check_shape(a, what, desc.param_shape(x.shape), f"index of axes {tuple(aff)}")
    return _normalization(desc, x, weight, bias, None, None)[0]
