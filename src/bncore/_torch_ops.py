"""bncore's norms as PyTorch custom operators (``torch.ops.bncore.*``), the one path from torch to bncore.

Each variant is two operators registered with ``torch.library.custom_op``: a forward that returns
the output and the statistics its backward needs, and that backward. Each has a fake (meta) kernel,
which says what shapes, dtypes and strides come out without computing, so that torch.compile,
torch.export, meta tensors and FakeTensor tracing see one opaque op; the forward has a registered
autograd formula (``register_autograd`` + ``setup_context``) that calls the backward op, and both
have a vmap rule. Running statistics are declared in ``mutates_args``: they are written in place,
and functionalization (compile, export) sees it.

The kernels call `bncore.functional`'s ``*_forward`` / ``*_backward``: no number is computed here.

The wrappers at the bottom (`batch_norm`, ..., used by `bncore.torch`'s modules and by
`bncore.functional` when it is given torch tensors) call the op whenever torch must see it: a
gradient may be asked for, or the call is traced (torch.compile, torch.export, torch.jit.trace),
transformed (torch.func) or on tensor subclasses (FakeTensor, meta). A plain eager call that needs
no gradient calls bncore's plain function instead: the same kernel, without the dispatcher's
overhead and without allocating the statistics only a backward uses (docs/torch.md measures it).

Importing this module imports torch; `bncore.functional` imports it lazily, only for torch tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _core
from . import functional as _F
from ._arrays import check_torch_write, empty_like_of
from ._checks import as_tuple, check_axes, check_axis, check_eps, check_int, check_momentum_type, check_positive_int
from .errors import UnsupportedDeviceError, UnsupportedDtypeError

Tensor = torch.Tensor
_HALF = (torch.float16, torch.bfloat16)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The statistics' dtype: float32 for half inputs, else the input's (bncore's rule)."""
    return torch.float32 if x.dtype in _HALF else x.dtype


def _check_like_input(x: Tensor, **tensors: Tensor | None) -> None:
    """The fake kernels' share of bncore's checks, those that decide where and in what a call could
    compute: a floating input, and every tensor on the input's device (a meta input with CPU
    parameters would otherwise trace, and fail only when run)."""
    if not x.is_floating_point():
        raise UnsupportedDtypeError(f"input: expected a floating dtype (float16, bfloat16, float32 or float64), "
                                    f"got {str(x.dtype).replace('torch.', '')}")
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise UnsupportedDeviceError(f"{name}: expected a tensor on the device of input ({x.device}), "
                                         f"got one on {t.device}")


def _fake_forward(x: Tensor, stat_shape: Sequence[Any], n_stats: int = 2, **tensors: Tensor | None) -> tuple[
        Tensor, ...]:
    """The forward's outputs as bncore allocates them: y like x (its strides kept), statistics fresh;
    `tensors` (the other inputs, by name) are checked to be on the input's device."""
    _check_like_input(x, **tensors)
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    return (y, *(x.new_empty(tuple(stat_shape), dtype=_stat_dtype(x)) for _ in range(n_stats)))


def _fake_backward(x: Tensor, weight: Tensor, n_param_grads: int = 2) -> tuple[Tensor, ...]:
    dx = torch.empty_like(x, memory_format=torch.preserve_format)
    return (dx, *(torch.empty_like(weight, memory_format=torch.contiguous_format) for _ in range(n_param_grads)))


# ---------------------------------------------------------------- the operators

# bncore's kernels take any strides and lay their outputs out like the input (the fake kernels say
# so), so inductor may hand them its own layouts: without the tag it copies every input into the
# traced strides first (a channels-last convolution's output into NCHW and back, per norm).
_ANY_LAYOUT = (torch.Tag.flexible_layout,)


def _updated(running: Tensor | None, writes: bool) -> Tensor | None:
    """The running statistic the op writes and returns (a copy: the op is functional), or None."""
    return running.clone() if writes and running is not None else None


def _returned(x: Tensor, updated: Tensor | None) -> Tensor:
    """An updated running statistic as the op returns it; no statistic is an empty tensor."""
    return updated if updated is not None else x.new_empty((0,), dtype=_stat_dtype(x))


def _fake_running(x: Tensor, running: Tensor | None, writes: bool) -> Tensor:
    if writes and running is not None:
        return torch.empty_like(running)
    return x.new_empty((0,), dtype=_stat_dtype(x))


@torch.library.custom_op("bncore::batch_norm", mutates_args=(), tags=_ANY_LAYOUT)
def _batch_norm_op(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool, momentum: float, eps: float, axis: int,
                   virtual_batch_size: int = 0, activation: str = "none",
                   residual: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd, new_running_mean, new_running_var): the running statistics, when
    training and given, updated into copies (empty tensors otherwise); the wrapper writes them back.
    ``virtual_batch_size`` 0 is none (ghost batch norm otherwise: the statistics are (N / size, C));
    ``activation`` "none" or "relu" and ``residual``: the fused epilogue relu(bn(x) + residual)."""
    rm, rv = _updated(running_mean, training), _updated(running_var, training)
    rm_used, rv_used = (rm, rv) if training else (running_mean, running_var)
    plain = not virtual_batch_size and activation == "none" and residual is None
    outputs = (_batch_forward_one_call(input, weight, bias, rm_used, rv_used, training, momentum, eps, axis)
               if plain else None)
    if outputs is None:
        outputs = _F.batch_norm_forward(input, rm_used, rv_used, weight, bias, training, momentum, eps, axis=axis,
                                        virtual_batch_size=virtual_batch_size or None,
                                        activation=_activation(activation), residual=residual)
    y, mean, invstd = outputs
    return y, mean, invstd, _returned(input, rm), _returned(input, rv)


def _activation(name: str) -> str | None:
    """The functional API's spelling of an op's activation argument ("none" is None)."""
    return None if name == "none" else name


def _ghost_stat_shape(x: Tensor, axis: int, virtual_batch_size: int, batch_stats: bool) -> tuple[Any, ...]:
    """The saved statistics' shape: one per channel, or per (virtual batch, channel) for ghost batch norm."""
    channels = x.shape[axis]
    return (x.shape[0] // virtual_batch_size, channels) if virtual_batch_size and batch_stats else (channels,)


# A small batch norm spends more time in Python than in its kernel: the ops' kernels try one C call
# first, with the description that functional's small-call path validated once per key (shape,
# mode, scalars) and views borrowed through PyTorch's DLPack exchange table. The C core validates
# every tensor before it writes; where it refuses (or a key fails a check), nothing was written and
# the checked path runs and raises the error that names the culprit.


def _batch_forward_one_call(input: Tensor, weight: Tensor | None, bias: Tensor | None, rm: Tensor | None,
                            rv: Tensor | None, training: bool, momentum: float, eps: float,
                            axis: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(output, save_mean, save_invstd) from one C call, or None: the checked path decides."""
    if rm is None or rv is None:
        return None  # functional's small path keys on both statistics or neither: the checked path
    shape = tuple(input.shape)
    key = (shape, training, True, float, momentum, float, eps, int, axis)
    desc = _F._SMALL_DESCS.get(key) or _F._small_desc(key, shape, training, True, momentum, eps, axis)
    empty_like = empty_like_of(input)
    if desc is None or empty_like is None:
        return None
    mean = input.new_empty((shape[axis],), dtype=_stat_dtype(input))
    invstd = torch.empty_like(mean)
    y = _core.exchange_forward(desc, empty_like, input, weight, bias, rm, rv, mean, invstd)
    return None if y is None else (y, mean, invstd)


@_batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, axis, virtual_batch_size=0,
      activation="none", residual=None):
    batch_stats = training or (running_mean is None and running_var is None)
    return (*_fake_forward(input, _ghost_stat_shape(input, axis, virtual_batch_size, batch_stats), weight=weight,
                           bias=bias, running_mean=running_mean, running_var=running_var, residual=residual),
            _fake_running(input, running_mean, training), _fake_running(input, running_var, training))


@torch.library.custom_op("bncore::batch_norm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _batch_norm_backward_op(grad_output: Tensor, input: Tensor, weight: Tensor, save_mean: Tensor,
                            save_invstd: Tensor, training: bool, axis: int, virtual_batch_size: int = 0,
                            output: Tensor | None = None,
                            residual: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual): with ``output`` (the forward's, when it applied
    relu) grad_output is masked where it is > 0; grad_residual (that masked gradient) is empty unless
    ``residual``."""
    if not virtual_batch_size and output is None and not residual:
        fast = _F._batch_norm_backward_small(grad_output, input, weight, save_mean, save_invstd, training, axis)
        if fast is not None:
            return (*fast, fast[0].new_empty((0,)))
    grads = _F.batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training=training, axis=axis,
                                   virtual_batch_size=virtual_batch_size or None,
                                   activation=None if output is None else "relu", output=output, residual=residual)
    return (*grads, grads[0].new_empty((0,))) if not residual else grads


@_batch_norm_backward_op.register_fake
def _(grad_output, input, weight, save_mean, save_invstd, training, axis, virtual_batch_size=0, output=None,
      residual=False):
    dres = torch.empty_like(input, memory_format=torch.preserve_format) if residual else input.new_empty((0,))
    return (*_fake_backward(input, weight), dres)


@torch.library.custom_op("bncore::batch_renorm", mutates_args=(), tags=_ANY_LAYOUT)
def _batch_renorm_op(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                     running_var: Tensor, training: bool, momentum: float, eps: float, rmax: float, dmax: float,
                     axis: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd, r, d, new_running_mean, new_running_var): in training r and d (per
    channel) are what the backward needs and the running statistics are updated into copies; in eval
    (batch norm's) r, d and the statistics are empty tensors."""
    rm, rv = _updated(running_mean, training), _updated(running_var, training)
    y, mean, invstd, r, d = _F.batch_renorm_forward(input, rm if training else running_mean,
                                                    rv if training else running_var, weight, bias, training,
                                                    momentum, eps, rmax=rmax, dmax=dmax, axis=axis)
    return y, mean, invstd, _returned(input, r), _returned(input, d), _returned(input, rm), _returned(input, rv)


@_batch_renorm_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, rmax, dmax, axis):
    channels = (input.shape[axis],)
    y, mean, invstd, *rd = _fake_forward(input, channels, 4 if training else 2, weight=weight, bias=bias,
                                         running_mean=running_mean, running_var=running_var)
    if not training:
        rd = [input.new_empty((0,), dtype=_stat_dtype(input)) for _ in range(2)]
    return (y, mean, invstd, *rd, _fake_running(input, running_mean, training),
            _fake_running(input, running_var, training))


@torch.library.custom_op("bncore::batch_renorm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _batch_renorm_backward_op(grad_output: Tensor, input: Tensor, weight: Tensor, save_mean: Tensor,
                              save_invstd: Tensor, r: Tensor, d: Tensor, training: bool,
                              axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias): r and d are constants (training); eval is batch norm's."""
    return _F.batch_renorm_backward(grad_output, input, weight, save_mean, save_invstd, r if training else None,
                                    d if training else None, training=training, axis=axis)


@_batch_renorm_backward_op.register_fake
def _(grad_output, input, weight, save_mean, save_invstd, r, d, training, axis):
    return _fake_backward(input, weight)


@torch.library.custom_op("bncore::instance_norm", mutates_args=(), tags=_ANY_LAYOUT)
def _instance_norm_op(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, use_input_stats: bool, momentum: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd, new_running_mean, new_running_var), the statistics of shape (N, C);
    the running statistics, when use_input_stats and given, updated into copies (else empty tensors)."""
    rm, rv = _updated(running_mean, use_input_stats), _updated(running_var, use_input_stats)
    y, mean, invstd = _F.instance_norm_forward(input, rm if use_input_stats else running_mean,
                                               rv if use_input_stats else running_var, weight, bias,
                                               use_input_stats, momentum, eps)
    return y, mean, invstd, _returned(input, rm), _returned(input, rv)


@_instance_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    return (*_fake_forward(input, input.shape[:2], weight=weight, bias=bias, running_mean=running_mean,
                           running_var=running_var), _fake_running(input, running_mean, use_input_stats),
            _fake_running(input, running_var, use_input_stats))


@torch.library.custom_op("bncore::instance_norm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _instance_norm_backward_op(grad_output: Tensor, input: Tensor, weight: Tensor, save_mean: Tensor,
                               save_invstd: Tensor, use_input_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _F.instance_norm_backward(grad_output, input, weight, save_mean, save_invstd,
                                     use_input_stats=use_input_stats)


@_instance_norm_backward_op.register_fake
def _(grad_output, input, weight, save_mean, save_invstd, use_input_stats):
    return _fake_backward(input, weight)


@torch.library.custom_op("bncore::layer_norm", mutates_args=(), tags=_ANY_LAYOUT)
def _layer_norm_op(input: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_rstd), the statistics of shape input.shape[:-len(normalized_shape)]."""
    return _F.layer_norm_forward(input, normalized_shape, weight, bias, eps)


@_layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps):
    return _fake_forward(input, input.shape[:input.dim() - len(normalized_shape)], weight=weight, bias=bias)


@torch.library.custom_op("bncore::layer_norm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _layer_norm_backward_op(grad_output: Tensor, input: Tensor, normalized_shape: list[int], weight: Tensor,
                            save_mean: Tensor, save_rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _F.layer_norm_backward(grad_output, input, normalized_shape, weight, save_mean, save_rstd)


@_layer_norm_backward_op.register_fake
def _(grad_output, input, normalized_shape, weight, save_mean, save_rstd):
    return _fake_backward(input, weight)


@torch.library.custom_op("bncore::group_norm", mutates_args=(), tags=_ANY_LAYOUT)
def _group_norm_op(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_rstd) of shape (N, num_groups)."""
    return _F.group_norm_forward(input, num_groups, weight, bias, eps)


@_group_norm_op.register_fake
def _(input, num_groups, weight, bias, eps):
    return _fake_forward(input, (input.shape[0], num_groups), weight=weight, bias=bias)


@torch.library.custom_op("bncore::group_norm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _group_norm_backward_op(grad_output: Tensor, input: Tensor, num_groups: int, weight: Tensor, save_mean: Tensor,
                            save_rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _F.group_norm_backward(grad_output, input, num_groups, weight, save_mean, save_rstd)


@_group_norm_backward_op.register_fake
def _(grad_output, input, num_groups, weight, save_mean, save_rstd):
    return _fake_backward(input, weight)


@torch.library.custom_op("bncore::rms_norm", mutates_args=(), tags=_ANY_LAYOUT)
def _rms_norm_op(input: Tensor, normalized_shape: list[int], weight: Tensor | None,
                 eps: float | None) -> tuple[Tensor, Tensor]:
    """(output, save_rstd); eps None is the machine epsilon of the compute type."""
    return _F.rms_norm_forward(input, normalized_shape, weight, eps)


@_rms_norm_op.register_fake
def _(input, normalized_shape, weight, eps):
    return _fake_forward(input, input.shape[:input.dim() - len(normalized_shape)], n_stats=1, weight=weight)


@torch.library.custom_op("bncore::rms_norm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _rms_norm_backward_op(grad_output: Tensor, input: Tensor, normalized_shape: list[int], weight: Tensor,
                          save_rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_weight)."""
    grad_input, grad_weight, _ = _F.rms_norm_backward(grad_output, input, normalized_shape, weight, save_rstd)
    return grad_input, grad_weight


@_rms_norm_backward_op.register_fake
def _(grad_output, input, normalized_shape, weight, save_rstd):
    return _fake_backward(input, weight, n_param_grads=1)


@torch.library.custom_op("bncore::normalize", mutates_args=(), tags=_ANY_LAYOUT)
def _normalize_op(input: Tensor, axes: list[int], weight: Tensor | None, bias: Tensor | None,
                  affine_axes: list[int], eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_rstd): statistics over `axes`, parameters over `affine_axes`."""
    return _F.normalize_forward(input, axes, weight, bias, affine_axes=affine_axes, eps=eps, rms=rms)


def _kept_shape(x: Tensor, axes: Sequence[int]) -> list[Any]:
    reduced = {a % x.dim() for a in axes}
    return [x.shape[a] for a in range(x.dim()) if a not in reduced]


@_normalize_op.register_fake
def _(input, axes, weight, bias, affine_axes, eps, rms):
    return _fake_forward(input, _kept_shape(input, axes), weight=weight, bias=bias)


@torch.library.custom_op("bncore::normalize_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _normalize_backward_op(grad_output: Tensor, input: Tensor, axes: list[int], weight: Tensor, save_mean: Tensor,
                           save_rstd: Tensor, affine_axes: list[int], rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    grad_input, grad_weight, grad_bias = _F.normalize_backward(grad_output, input, axes, weight, save_mean, save_rstd,
                                                               affine_axes=affine_axes, rms=rms)
    # RMS has no bias: its place holds zeros, so that the op has one signature for both
    return grad_input, grad_weight, grad_bias if grad_bias is not None else torch.zeros_like(grad_weight)


@_normalize_backward_op.register_fake
def _(grad_output, input, axes, weight, save_mean, save_rstd, affine_axes, rms):
    return _fake_backward(input, weight)


# ---------------------------------------------------------------- autograd
#
# One formula for every forward op: the input's, weight's and bias's gradients come from the
# variant's backward op, fed what the forward saved; the statistics it returns are not differentiable
# (their gradients are ignored) and the running statistics and scalars get none. bncore computes
# grad_bias only alongside grad_weight: without a weight the backward is given ones, which leave
# y = xhat * 1 + bias exactly as it is.


def _ones_weight(x: Tensor, bias: Tensor | None, shape: Sequence[Any]) -> Tensor:
    return x.new_ones(tuple(shape), dtype=bias.dtype if bias is not None else x.dtype)


def _save(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, param_shape: Sequence[Any],
          stats: Sequence[Tensor], output: Tensor | None = None) -> None:
    """Saves x, the weight (ones when there is none), the statistics and, when the backward needs it
    (a fused relu masks by it), the forward's output."""
    ctx.weight_given, ctx.bias_given = weight is not None, bias is not None
    if weight is None:
        weight = _ones_weight(x, bias, param_shape)
    ctx.save_for_backward(x, weight, *stats, *(() if output is None else (output,)))
    ctx.mark_non_differentiable(*stats)


def _grads(ctx: Any, grads: Sequence[Tensor], weight_at: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias), None where no gradient is needed; `weight_at` is the
    weight's place among the op's inputs (the bias follows it)."""
    need = ctx.needs_input_grad
    dx = grads[0] if need[0] else None
    dw = grads[1] if ctx.weight_given and need[weight_at] else None
    db = grads[2] if ctx.bias_given and len(grads) > 2 and need[weight_at + 1] else None
    return dx, dw, db


def _batch_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, _, _, axis, ghost, activation, residual = inputs
    ctx.training, ctx.axis = training or (running_mean is None and running_var is None), axis
    ctx.ghost, ctx.relu, ctx.residual_given = ghost, activation == "relu", residual is not None
    _save(ctx, x, weight, bias, (x.shape[axis],), output[1:3], output[0] if activation == "relu" else None)
    ctx.mark_non_differentiable(*output[3:])


def _batch_backward(ctx, grad_output, *_grad_statistics):
    x, weight, mean, invstd, *y = ctx.saved_tensors
    need_residual = ctx.residual_given and ctx.needs_input_grad[11]
    grads = _call(_batch_norm_backward_op, grad_output, x, weight, mean, invstd, ctx.training, ctx.axis, ctx.ghost,
                  y[0] if ctx.relu else None, need_residual)
    dx, dw, db = _grads(ctx, grads, 1)
    return dx, dw, db, None, None, None, None, None, None, None, None, grads[3] if need_residual else None


def _renorm_setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, _, _, _, _, axis = inputs
    ctx.training, ctx.axis = training, axis
    _save(ctx, x, weight, bias, (x.shape[axis],), output[1:5])
    ctx.mark_non_differentiable(*output[5:])


def _renorm_backward(ctx, grad_output, *_grad_statistics):
    x, weight, mean, invstd, r, d = ctx.saved_tensors
    grads = _call(_batch_renorm_backward_op, grad_output, x, weight, mean, invstd, r, d, ctx.training, ctx.axis)
    dx, dw, db = _grads(ctx, grads, 1)
    return dx, dw, db, None, None, None, None, None, None, None, None


def _instance_setup_context(ctx, inputs, output):
    x, weight, bias, _, _, use_input_stats, _, _ = inputs
    ctx.use_input_stats = use_input_stats
    _save(ctx, x, weight, bias, (x.shape[1],), output[1:3])
    ctx.mark_non_differentiable(*output[3:])


def _instance_backward(ctx, grad_output, *_grad_statistics):
    x, weight, mean, invstd = ctx.saved_tensors
    grads = _call(_instance_norm_backward_op, grad_output, x, weight, mean, invstd, ctx.use_input_stats)
    dx, dw, db = _grads(ctx, grads, 1)
    return dx, dw, db, None, None, None, None, None


def _layer_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    ctx.normalized_shape = normalized_shape
    _save(ctx, x, weight, bias, x.shape[x.dim() - len(normalized_shape):], output[1:])


def _layer_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grads = _call(_layer_norm_backward_op, grad_output, x, ctx.normalized_shape, weight, mean, rstd)
    dx, dw, db = _grads(ctx, grads, 2)
    return dx, None, dw, db, None


def _group_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _ = inputs
    ctx.num_groups = num_groups
    _save(ctx, x, weight, bias, (x.shape[1],), output[1:])


def _group_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _grads(ctx, _call(_group_norm_backward_op, grad_output, x, ctx.num_groups, weight, mean, rstd), 2)
    return dx, None, dw, db, None


def _rms_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, _ = inputs
    ctx.normalized_shape = normalized_shape
    _save(ctx, x, weight, None, x.shape[x.dim() - len(normalized_shape):], output[1:])


def _rms_backward(ctx, grad_output, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw, _ = _grads(ctx, _call(_rms_norm_backward_op, grad_output, x, ctx.normalized_shape, weight, rstd), 2)
    return dx, None, dw, None


def _normalize_setup_context(ctx, inputs, output):
    x, axes, weight, bias, affine_axes, _, rms = inputs
    ctx.axes, ctx.affine_axes, ctx.rms = axes, affine_axes, rms
    _save(ctx, x, weight, bias, [x.shape[a] for a in affine_axes], output[1:])


def _normalize_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grads = _call(_normalize_backward_op, grad_output, x, ctx.axes, weight, mean, rstd, ctx.affine_axes, ctx.rms)
    dx, dw, db = _grads(ctx, grads, 2)
    return dx, None, dw, db, None, None, None


def _functorch_function(op: Any, backward: Any, setup_context: Any) -> type[torch.autograd.Function]:
    """The same formula as an autograd.Function, for torch.func's transforms: the Function that
    register_autograd generates has no setup_context staticmethod, which torch.func requires
    (pytorch/pytorch#168393), so under a transform the wrappers apply this one. Its forward is the op
    itself (vmapped by the op's own rule), its backward the op's registered formula."""

    def forward(*args):
        return op(*args)

    return type(f"{op._name}_function", (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context), "backward": staticmethod(backward)})


_FUNCTORCH: dict[Any, Any] = {}
for _op, _backward, _setup in (
        (_batch_norm_op, _batch_backward, _batch_setup_context),
        (_batch_renorm_op, _renorm_backward, _renorm_setup_context),
        (_instance_norm_op, _instance_backward, _instance_setup_context),
        (_layer_norm_op, _layer_backward, _layer_setup_context),
        (_group_norm_op, _group_backward, _group_setup_context),
        (_rms_norm_op, _rms_backward, _rms_setup_context),
        (_normalize_op, _normalize_backward, _normalize_setup_context)):
    _op.register_autograd(_backward, setup_context=_setup)
    _FUNCTORCH[_op] = _functorch_function(_op, _backward, _setup).apply


def _no_double_backward(ctx, *grads):
    raise RuntimeError("bncore: the backward ops have no derivative (double backward is not supported)")


def _no_context(ctx, inputs, output):
    pass


for _op in (_batch_norm_backward_op, _batch_renorm_backward_op, _instance_norm_backward_op, _layer_norm_backward_op,
            _group_norm_backward_op, _rms_norm_backward_op, _normalize_backward_op):
    _FUNCTORCH[_op] = _functorch_function(_op, _no_double_backward, _no_context).apply


def _call(op: Any, *args: Any) -> Any:
    """The op, or under a torch.func transform its autograd.Function twin (same op, same formula)."""
    if not torch.compiler.is_compiling() and _functorch_active():
        return _FUNCTORCH[op](*args)
    return op(*args)


# ---------------------------------------------------------------- vmap
#
# One rule for every op: the op once per index of the vmapped dimension, outputs stacked (the
# normalizations are independent per vmapped index; bncore's kernels then run on each slice, any
# strides, no copy in). Updated running statistics come out vmapped, so writing them into one
# shared buffer fails with torch's own vmap error, as torch.nn.functional.batch_norm does.


def _loop_rule(op: Any) -> Any:
    def rule(info, in_dims, *args):
        results = []
        for b in range(info.batch_size):
            sliced = [a.select(d, b) if isinstance(a, Tensor) and d is not None else a for a, d in zip(args, in_dims)]
            results.append(op(*sliced))
        outputs = tuple(torch.stack(parts) for parts in zip(*results))
        return outputs, (0,) * len(outputs)
    return rule


for _op in (_batch_norm_op, _batch_norm_backward_op, _batch_renorm_op, _batch_renorm_backward_op, _instance_norm_op,
            _instance_norm_backward_op, _layer_norm_op, _layer_norm_backward_op, _group_norm_op,
            _group_norm_backward_op, _rms_norm_op, _rms_norm_backward_op, _normalize_op, _normalize_backward_op):
    torch.library.register_vmap(_op, _loop_rule(_op))


# ---------------------------------------------------------------- when torch must see the op


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def needs_op(input: Any, *others: Any) -> bool:
    """Whether a call on these tensors must go through the registered op: under torch.compile or
    torch.export, while torch.jit.trace records, inside a torch.func transform, for tensor
    subclasses (FakeTensor, functional tensors) or non-CPU tensors (meta), and whenever grad mode is
    on and one of them requires grad. Otherwise (a plain eager call that needs no gradient) bncore's
    plain function computes the same bits with less overhead."""
    # the cheapest tests first: a small call counts every 100 ns
    if torch.compiler.is_compiling() or type(input) is not Tensor or not input.is_cpu:
        return True
    if _tracing_state() is not None or _interpreter_stack() is not None:
        return True
    # torch's own C test (None and non-tensors count as not requiring grad): a generator over the
    # arguments cost a small call 1.2 us of its 8
    return _grad_enabled() and _any_requires_grad(input, *others)


_tracing_state = torch._C._get_tracing_state
_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_grad_enabled = torch._C.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad


def _all_torch(*tensors: Any) -> bool:
    """The op's schema takes torch tensors only: other arrays (a NumPy running_var with a torch
    input) go to bncore's plain path, which reads any DLPack tensor or explains what is wrong."""
    return all(t is None or isinstance(t, torch.Tensor) for t in tensors)


# ---------------------------------------------------------------- wrappers: the output, through the op when needed
#
# The scalars are checked first by bncore's own checks, so that a bad one gets bncore's message naming
# it (the op's schema would refuse a wrong type with a message about the schema).


def _check_writable(running_mean: Tensor | None, running_var: Tensor | None, writes: bool) -> None:
    """Autograd's in-place rules for the buffers the call will write, applied first, with bncore's
    message naming the buffer (the write-back's copy_ would raise torch's, naming none)."""
    if writes:
        check_torch_write(running_mean, "running_mean")
        check_torch_write(running_var, "running_var")


def _write_back(running_mean: Tensor | None, running_var: Tensor | None, new_mean: Tensor, new_var: Tensor,
                writes: bool) -> None:
    """The op's updated running statistics into the caller's buffers: an in-place copy, which autograd
    counts and functionalization (torch.compile, torch.export) sees as the buffers' mutation."""
    if writes and running_mean is not None and running_var is not None:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
               bias: Tensor | None, training: bool, momentum: Any, eps: Any, axis: Any = 1,
               virtual_batch_size: Any = None, activation: Any = None, residual: Tensor | None = None) -> Tensor:
    if (needs_op(input, weight, bias, running_mean, running_var, residual)
            and _all_torch(running_mean, running_var, residual)):
        eps = check_eps(eps)
        check_momentum_type(momentum)
        axis = check_int(axis, "axis")
        training = bool(training)
        act = "none" if activation is None else activation
        _F._check_activation(activation)
        ghost = 0
        if virtual_batch_size is not None and input.dim() >= 2:  # bncore's check and message, before the op's
            batch_stats = training or (running_mean is None and running_var is None)
            ghost = _F._check_virtual_batch(virtual_batch_size, tuple(input.shape),
                                            check_axis(axis, input.dim(), "axis"), used=batch_stats)
        _check_writable(running_mean, running_var, training)
        y, _, _, rm, rv = _call(_batch_norm_op, input, weight, bias, running_mean, running_var, training,
                                float(momentum), eps, axis, ghost, act, residual)
        _write_back(running_mean, running_var, rm, rv, training)
        return y
    return _F._batch_norm_plain(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                                virtual_batch_size, activation, residual)


def batch_renorm(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                 bias: Tensor | None, training: bool, momentum: Any, eps: Any, rmax: Any, dmax: Any,
                 axis: Any = 1) -> Tensor:
    if (needs_op(input, weight, bias, running_mean, running_var) and running_mean is not None
            and running_var is not None and _all_torch(running_mean, running_var)):
        eps = check_eps(eps)
        check_momentum_type(momentum)
        rmax, dmax = _F._check_bound(rmax, "rmax", 1.0), _F._check_bound(dmax, "dmax", 0.0)
        axis = check_int(axis, "axis")
        training = bool(training)
        _check_writable(running_mean, running_var, training)
        out = _call(_batch_renorm_op, input, weight, bias, running_mean, running_var, training, float(momentum),
                    eps, rmax, dmax, axis)
        _write_back(running_mean, running_var, out[5], out[6], training)
        return out[0]
    return _F.batch_renorm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   rmax=rmax, dmax=dmax, axis=axis, _want_stats=False)[0]


def instance_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, use_input_stats: bool, momentum: Any, eps: Any) -> Tensor:
    if needs_op(input, weight, bias, running_mean, running_var) and _all_torch(running_mean, running_var):
        eps = check_eps(eps)
        check_momentum_type(momentum)
        use_input_stats = bool(use_input_stats)
        _check_writable(running_mean, running_var, use_input_stats)
        y, _, _, rm, rv = _call(_instance_norm_op, input, weight, bias, running_mean, running_var, use_input_stats,
                                            float(momentum), eps)
        _write_back(running_mean, running_var, rm, rv, use_input_stats)
        return y
    return _F._instance_norm_plain(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def layer_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None, bias: Tensor | None, eps: Any) -> Tensor:
    if needs_op(input, weight, bias):
        shape = list(as_tuple(normalized_shape, "normalized_shape"))
        return _call(_layer_norm_op, input, shape, weight, bias, check_eps(eps))[0]
    return _F._layer_norm_plain(input, normalized_shape, weight, bias, eps)


def group_norm(input: Tensor, num_groups: Any, weight: Tensor | None, bias: Tensor | None, eps: Any) -> Tensor:
    if needs_op(input, weight, bias):
        groups = check_positive_int(num_groups, "num_groups")
        return _call(_group_norm_op, input, groups, weight, bias, check_eps(eps))[0]
    return _F._group_norm_plain(input, num_groups, weight, bias, eps)


def rms_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None, eps: Any) -> Tensor:
    if needs_op(input, weight):
        shape = list(as_tuple(normalized_shape, "normalized_shape"))
        return _call(_rms_norm_op, input, shape, weight, None if eps is None else check_eps(eps))[0]
    return _F._rms_norm_plain(input, normalized_shape, weight, eps)


def normalize(input: Tensor, axes: Any, weight: Tensor | None, bias: Tensor | None, affine_axes: Any, eps: Any,
              rms: bool) -> Tensor:
    if needs_op(input, weight, bias):
        ndim = input.dim()
        red = list(check_axes(axes, ndim, "axes"))
        aff = red if affine_axes is None else list(check_axes(affine_axes, ndim, "affine_axes"))
        return _call(_normalize_op, input, red, weight, bias, aff, check_eps(eps), bool(rms))[0]
    return _F._normalize_plain(input, axes, weight, bias, affine_axes, eps, rms)
