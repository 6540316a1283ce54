"""Layers: parameters, running statistics and the forward/backward protocol.

A layer owns its state as NumPy arrays (viewable by any framework through
DLPack) and runs on whatever tensor type it is called with. `layer(x)` runs the
forward and remembers what the backward needs; `layer.backward(grad_output)`
returns grad_input and stores `weight_grad` / `bias_grad`. The state changes
only when a call succeeds.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from . import _keras
from . import functional as F
from ._arrays import Array, Call, to_numpy
from ._checks import (CONVENTIONS, check_axis, check_channels, check_choice, check_eps, check_groups_divide,
                      check_positive_int, check_shape, check_state_count, check_state_dtype, check_state_float,
                      check_state_shape)
from .errors import InvalidArgumentError, ShapeMismatchError
from .state import RunningStats

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

_PARAMETERS = " for the parameters"
_L = TypeVar("_L", bound="_Layer")


class _Layer:
    """What every layer shares: mode, the state dict with PyTorch's keys, the saved forward."""

    training = True
    dtype: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    weight_grad: np.ndarray | None
    bias_grad: np.ndarray | None
    _saved: Any

    def train(self: _L, mode: bool = True) -> _L:
        self.training = bool(mode)
        return self

    def eval(self: _L) -> _L:
        return self.train(False)

    def _state_keys(self) -> list[tuple[str, tuple[int, ...] | None]]:
        """(key, shape) of each state entry, in PyTorch's order; shape None for a count."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """PyTorch's keys and shapes, as NumPy copies."""
        return {key: getattr(self, key).copy() for key, _ in self._state_keys()}

    def load_state_dict(self: _L, state: Mapping[str, Any], strict: bool = True) -> _L:
        """Loads a dict with PyTorch's keys (NumPy arrays, torch tensors, any DLPack tensor).
        Every value is checked before any is stored, so a failing load changes nothing."""
        keys = self._state_keys()
        names = [k for k, _ in keys]
        missing = [k for k in names if k not in state]
        unexpected = [k for k in state if k not in names]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        staged: dict[str, Any] = {}
        for key, shape in keys:
            if key not in state:
                continue
            value = to_numpy(state[key], key)
            if shape is None:
                staged[key] = check_state_count(value, key)
                continue
            check_state_shape(value, key, shape)
            check_state_float(value, key)
            staged[key] = value.astype(self.dtype)
        self._store_state(staged)
        return self

    def _store_state(self, staged: dict[str, Any]) -> None:
        """Stores checked values (key -> array, or int for a count); only the last step may fail."""
        for key, value in staged.items():
            setattr(self, key, value)

    def _store_grads(self, dw: Array | None, db: Array | None) -> None:
        self.weight_grad = None if dw is None else to_numpy(dw, "grad_weight")
        self.bias_grad = None if db is None else to_numpy(db, "grad_bias")

    def _saved_or_raise(self) -> Any:
        if self._saved is None:
            raise RuntimeError("backward: call the layer on an input first")
        return self._saved

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def __call__(self, x: Array) -> Array:
        return self.forward(x)


def _blame_input_channels(x: Array, axis: int, num_features: int) -> None:
    """After a forward failed on a shape: raises the input's error (in place of the weight's or the
    running statistics') when the input's channels are the cause."""
    try:
        with Call() as call:
            t = call.need(x, "input")
            check_channels(t.shape, check_axis(axis, t.ndim, "axis"), num_features)
    except ShapeMismatchError as wrong:
        raise wrong from None


class _RunningStatsLayer(_Layer):
    """Batch and instance norm: per-channel parameters and optional running statistics,
    kept in a `bncore.RunningStats` (``self.stats``)."""

    stats: RunningStats | None

    def _init_channels(self, num_features: int, eps: float, momentum: float | None, weight: bool, bias: bool,
                       track_running_stats: bool, dtype: str, convention: str, nan_policy: str) -> None:
        self.num_features = check_positive_int(num_features, "num_features")
        check_state_dtype(dtype, _PARAMETERS)
        self.eps = check_eps(eps)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.convention = convention
        self.nan_policy = nan_policy
        self.training = True
        self.weight = np.ones(self.num_features, dtype) if weight else None
        self.bias = np.zeros(self.num_features, dtype) if bias else None
        self.weight_grad = self.bias_grad = None
        # the state is made even without tracking so that the arguments are checked alike
        stats = RunningStats(self.num_features, momentum, convention=convention, dtype=dtype, nan_policy=nan_policy)
        self.stats = stats if self.track_running_stats else None
        self._momentum = stats.momentum
        self._saved = None

    @property
    def affine(self) -> bool:
        return self.weight is not None or self.bias is not None

    @property
    def momentum(self) -> float | None:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        if self.stats is not None:
            self.stats.momentum = value
        self._momentum = value

    def _tracked(self) -> RunningStats:
        if self.stats is None:
            raise AttributeError("this layer keeps no running statistics (track_running_stats=False)")
        return self.stats

    @property
    def running_mean(self) -> np.ndarray | None:
        return None if self.stats is None else self.stats.mean

    @running_mean.setter
    def running_mean(self, value: Any) -> None:
        np.copyto(self._tracked().mean, value, casting="unsafe")

    @property
    def running_var(self) -> np.ndarray | None:
        return None if self.stats is None else self.stats.var

    @running_var.setter
    def running_var(self, value: Any) -> None:
        np.copyto(self._tracked().var, value, casting="unsafe")

    @property
    def num_batches_tracked(self) -> np.ndarray | None:
        return None if self.stats is None else np.array(self.stats.count, np.int64)

    @num_batches_tracked.setter
    def num_batches_tracked(self, value: Any) -> None:
        self._tracked().count = int(np.asarray(value).reshape(()))

    @property
    def skipped_updates(self) -> int:
        """Batches whose statistics were not finite and left the running statistics alone
        (nan_policy='skip')."""
        return 0 if self.stats is None else self.stats.skipped

    def _state_keys(self) -> list[tuple[str, tuple[int, ...] | None]]:
        keys: list[tuple[str, tuple[int, ...] | None]] = [
            (k, (self.num_features,)) for k in ("weight", "bias") if getattr(self, k) is not None]
        if self.track_running_stats:
            keys += [("running_mean", (self.num_features,)), ("running_var", (self.num_features,)),
                     ("num_batches_tracked", None)]
        return keys

    def load_state_dict(self: _L, state: Mapping[str, Any], strict: bool = True) -> _L:
        """Loads a dict with PyTorch's keys; every value is checked before any is stored."""
        return super().load_state_dict(state, strict)

    def _store_state(self, staged: dict[str, Any]) -> None:
        """The running statistics go in first, in one C call under the state's lock
        (bn_running_stats_load, all or nothing); weight and bias, plain attributes, after it."""
        running = {k: staged.pop(k) for k in ("running_mean", "running_var", "num_batches_tracked") if k in staged}
        if running:
            stats = self._tracked()
            stats._replace(running.get("running_mean", stats.mean), running.get("running_var", stats.var),
                           running.get("num_batches_tracked"), None)
        super()._store_state(staged)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats


_DEFAULT: Any = object()


class BatchNorm(_RunningStatsLayer):
    """Batch normalization over the channel axis ``axis``, as ``torch.nn.BatchNorm{1,2,3}d``.

    State: ``weight``, ``bias`` (when affine), ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (when track_running_stats), NumPy arrays of ``dtype``; the
    running statistics live in ``self.stats``, a `bncore.RunningStats`.
    ``momentum=None`` gives the cumulative moving average, as PyTorch does.

    ``convention="keras"`` takes Keras's defaults and rules instead (momentum 0.99 with
    ``new = m * old + (1 - m) * batch``, biased variance stored, epsilon 1e-3, axis -1,
    ``center`` / ``scale`` for the bias / weight); see `keras_weights`.
    ``nan_policy="skip"`` leaves the running statistics untouched for a batch whose
    statistics are not finite and counts it in ``skipped_updates``.

    ``renorm=True``: batch renormalization in training (``rmax``, ``dmax``: attributes
    that may change between calls, e.g. from `bncore.renorm_schedule`); it needs
    track_running_stats. ``virtual_batch_size``: ghost batch norm in training (not
    together with renorm).
    """

    def __init__(self, num_features: int, eps: float = _DEFAULT, momentum: float | None = _DEFAULT,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = _DEFAULT,
                 dtype: str = "float32", convention: str = "torch", center: bool | None = None,
                 scale: bool | None = None, nan_policy: str = "propagate", renorm: bool = False,
                 rmax: float = 3.0, dmax: float = 5.0, virtual_batch_size: int | None = None) -> None:
        defaults = _keras.LAYER_DEFAULTS[check_choice(convention, "convention", CONVENTIONS)]
        eps = defaults["eps"] if eps is _DEFAULT else eps
        momentum = defaults["momentum"] if momentum is _DEFAULT else momentum
        self.axis = defaults["axis"] if axis is _DEFAULT else axis
        scale = affine if scale is None else scale
        center = affine if center is None else center
        self.renorm = bool(renorm)
        self.rmax = F._check_bound(rmax, "rmax", 1.0)
        self.dmax = F._check_bound(dmax, "dmax", 0.0)
        self.virtual_batch_size = (None if virtual_batch_size is None
                                   else check_positive_int(virtual_batch_size, "virtual_batch_size"))
        if self.renorm and not track_running_stats:
            raise InvalidArgumentError("renorm: batch renormalization needs the running statistics "
                                       "(track_running_stats=True)")
        if self.renorm and self.virtual_batch_size is not None:
            raise InvalidArgumentError("renorm, virtual_batch_size: batch renormalization with virtual batches is "
                                       "not supported")
        self._init_channels(num_features, eps, momentum, bool(scale), bool(center), track_running_stats, dtype,
                            convention, nan_policy)

    def forward(self, x: Array) -> Array:
        """Normalizes ``x`` (any DLPack tensor); returns the caller's array type."""
        batch_stats = self._uses_batch_stats()
        r = d = None
        # eval with tracking, or training with tracking: the state is read or updated
        try:
            if self.renorm and batch_stats:
                y, mean, invstd, r, d = F.batch_renorm_forward(x, None, None, self.weight, self.bias, training=True,
                                                               eps=self.eps, rmax=self.rmax, dmax=self.dmax,
                                                               axis=self.axis, stats=self.stats)
            else:
                y, mean, invstd = F.batch_norm_forward(
                    x, None, None, self.weight, self.bias, training=batch_stats, eps=self.eps, axis=self.axis,
                    stats=self.stats, virtual_batch_size=self.virtual_batch_size if batch_stats else None)
        except ShapeMismatchError:
            _blame_input_channels(x, self.axis, self.num_features)
            raise
        self._saved = (x, mean, invstd, batch_stats, r, d)
        return y

    def backward(self, grad_output: Array) -> Array:
        """Gradient of the last forward: returns grad_input; sets weight_grad and bias_grad."""
        x, mean, invstd, batch_stats, r, d = self._saved_or_raise()
        if r is not None:
            dx, dw, db = F.batch_renorm_backward(grad_output, x, self._weight_or_ones(), mean, invstd, r, d,
                                                 axis=self.axis)
        else:
            dx, dw, db = F.batch_norm_backward(
                grad_output, x, self._weight_or_ones(), mean, invstd, training=batch_stats, axis=self.axis,
                virtual_batch_size=self.virtual_batch_size if batch_stats else None)
        self._store_grads(dw if self.weight is not None else None, db if self.bias is not None else None)
        return dx

    def _weight_or_ones(self) -> np.ndarray | None:
        # a bias without a weight (Keras: center without scale) still needs grad_bias
        if self.weight is None and self.bias is not None:
            return np.ones(self.num_features, self.dtype)
        return self.weight

    # ------------------------------------------------------------- Keras

    def keras_weights(self) -> dict[str, np.ndarray]:
        """Keras's names: gamma (if scale), beta (if center), moving_mean, moving_variance.
        The variance is the one stored by this layer's convention."""
        return _keras.keras_weights(self)

    def load_keras_weights(self, weights: Mapping[str, Any] | Iterable[Any]) -> BatchNorm:
        """Takes `keras_weights()`'s dict or the list `keras_layer.get_weights()` returns
        (gamma, beta, moving_mean, moving_variance, without those the layer lacks)."""
        _keras.load_keras_weights(self, weights)
        return self

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype!r}, "
                f"convention={self.convention!r}" + (f", renorm=True, rmax={self.rmax}, dmax={self.dmax}"
                                                     if self.renorm else "")
                + (f", virtual_batch_size={self.virtual_batch_size}" if self.virtual_batch_size else "") + ")")


class InstanceNorm(_RunningStatsLayer):
    """Instance normalization of (N, C, *) inputs, as ``torch.nn.InstanceNorm{1,2,3}d``
    (affine and running statistics off by default). As in PyTorch, the running
    statistics move by ``momentum`` each training call (``None`` means 0: they stay) and
    ``num_batches_tracked`` is kept in the state dict but not advanced."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, *, dtype: str = "float32") -> None:
        self._init_channels(num_features, eps, 0.0 if momentum is None else momentum, affine, affine,
                            track_running_stats, dtype, "torch", "propagate")
        self._momentum = momentum

    def forward(self, x: Array) -> Array:
        batch_stats = self._uses_batch_stats()
        rm, rv = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        y, mean, invstd = F.instance_norm_forward(x, rm, rv, self.weight, self.bias, use_input_stats=batch_stats,
                                                  momentum=0.0 if self.momentum is None else self.momentum,
                                                  eps=self.eps)
        self._saved = (x, mean, invstd, batch_stats)
        return y

    def backward(self, grad_output: Array) -> Array:
        x, mean, invstd, batch_stats = self._saved_or_raise()
        dx, dw, db = F.instance_norm_backward(grad_output, x, self.weight, mean, invstd,
                                              use_input_stats=batch_stats)
        self._store_grads(dw, db)
        return dx

    def __repr__(self) -> str:
        return (f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")


class LayerNorm(_Layer):
    """Layer normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.LayerNorm``."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, dtype: str = "float32") -> None:
        self.normalized_shape = check_shape(normalized_shape)
        self.eps = check_eps(eps)
        check_state_dtype(dtype, _PARAMETERS)
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = dtype
        self.weight = np.ones(self.normalized_shape, dtype) if elementwise_affine else None
        self.bias = np.zeros(self.normalized_shape, dtype) if elementwise_affine and bias else None
        self.weight_grad = self.bias_grad = None
        self._saved = None

    def _state_keys(self) -> list[tuple[str, tuple[int, ...] | None]]:
        return [(k, self.normalized_shape) for k in ("weight", "bias") if getattr(self, k) is not None]

    def forward(self, x: Array) -> Array:
        y, mean, rstd = F.layer_norm_forward(x, self.normalized_shape, self.weight, self.bias, self.eps)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, grad_output: Array) -> Array:
        x, mean, rstd = self._saved_or_raise()
        dx, dw, db = F.layer_norm_backward(grad_output, x, self.normalized_shape, self.weight, mean, rstd)
        self._store_grads(dw, db if self.bias is not None else None)
        return dx

    def __repr__(self) -> str:
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None})")


class GroupNorm(_Layer):
    """Group normalization, as ``torch.nn.GroupNorm``: ``num_channels`` split into ``num_groups``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 dtype: str = "float32") -> None:
        self.num_groups = check_positive_int(num_groups, "num_groups")
        self.num_channels = check_positive_int(num_channels, "num_channels")
        check_groups_divide(self.num_groups, self.num_channels)
        self.eps = check_eps(eps)
        check_state_dtype(dtype, _PARAMETERS)
        self.affine = bool(affine)
        self.dtype = dtype
        self.weight = np.ones(self.num_channels, dtype) if affine else None
        self.bias = np.zeros(self.num_channels, dtype) if affine else None
        self.weight_grad = self.bias_grad = None
        self._saved = None

    def _state_keys(self) -> list[tuple[str, tuple[int, ...] | None]]:
        return [(k, (self.num_channels,)) for k in ("weight", "bias")] if self.affine else []

    def forward(self, x: Array) -> Array:
        y, mean, rstd = F.group_norm_forward(x, self.num_groups, self.weight, self.bias, self.eps)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, grad_output: Array) -> Array:
        x, mean, rstd = self._saved_or_raise()
        dx, dw, db = F.group_norm_backward(grad_output, x, self.num_groups, self.weight, mean, rstd)
        self._store_grads(dw, db)
        return dx

    def __repr__(self) -> str:
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine})"


class RMSNorm(_Layer):
    """RMS normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.RMSNorm``
    (``eps=None``: the machine epsilon of the compute type)."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, *, dtype: str = "float32") -> None:
        self.normalized_shape = check_shape(normalized_shape)
        if eps is not None:
            check_eps(eps)
        check_state_dtype(dtype, _PARAMETERS)
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = dtype
        self.weight = np.ones(self.normalized_shape, dtype) if elementwise_affine else None
        self.weight_grad = self.bias_grad = None
        self._saved = None

    def _state_keys(self) -> list[tuple[str, tuple[int, ...] | None]]:
        return [("weight", self.normalized_shape)] if self.elementwise_affine else []

    def forward(self, x: Array) -> Array:
        y, rstd = F.rms_norm_forward(x, self.normalized_shape, self.weight, self.eps)
        self._saved = (x, rstd)
        return y

    def backward(self, grad_output: Array) -> Array:
        x, rstd = self._saved_or_raise()
        dx, dw, _ = F.rms_norm_backward(grad_output, x, self.normalized_shape, self.weight, rstd)
        self._store_grads(dw, None)
        return dx

    def __repr__(self) -> str:
        return f"RMSNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine})"
