"""Every argument check of the Python layer, in one place.

Each check names the argument, says what was expected and what was given, and raises the class
the C core raises for the same condition (`bncore.errors`): a shape that does not fit is a
`ShapeMismatchError`, a dtype bncore does not take an `UnsupportedDtypeError`, a value out of range
an `InvalidArgumentError`; a Python value of the wrong type is a plain `TypeError`. Every path (the
functions, the small-call fast path, state objects, layers, adapters) uses these and no others.

Tensor checks take anything with ``shape``, ``ndim``, ``dtype`` (a name) and ``device`` (a DLPack
device pair), as `bncore._core.Tensor` has.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from . import _core
from ._arrays import FLOAT_DTYPES, describe_device, place
from .errors import (InvalidArgumentError, MissingRunningStatsError, ShapeMismatchError, UnsupportedDeviceError,
                     UnsupportedDtypeError)

CONVENTIONS: tuple[str, ...] = ("torch", "keras")
NAN_POLICIES: tuple[str, ...] = ("propagate", "skip")
STATE_DTYPES: tuple[str, ...] = ("float32", "float64")


class TensorFacts(Protocol):
    """What the tensor checks read of an imported tensor."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> str: ...

    @property
    def device(self) -> tuple[int, int]: ...


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ---------------------------------------------------------------- scalars


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.floating))


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_eps(eps: Any) -> float:
    """eps: a finite number >= 0; returns it as a float."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # the common case first: small calls count every 100 ns
        return eps
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise InvalidArgumentError(f"eps: expected a finite number >= 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum: Any, none_ok: bool = False) -> float:
    """momentum: a number in [0, 1] (the functions' momentum and the state's); returns it as a float.
    `none_ok` only words the message: the caller handles None (the cumulative average) itself."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if not _is_real(momentum):
        raise TypeError(f"momentum: expected a float{' or None' if none_ok else ''}, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise InvalidArgumentError(f"momentum: expected a value in [0, 1], got {momentum}")
    return float(momentum)


def check_momentum_type(momentum: Any) -> None:
    """The functions' momentum is a number even where it is not used (eval mode, no running
    statistics), as torch.nn.functional's is: None or a bool raises TypeError."""
    if type(momentum) is not float and not _is_real(momentum):
        raise TypeError(f"momentum: expected a float, got {type(momentum).__name__}")


def check_int(value: Any, what: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{what}: expected an int, got {type(value).__name__}")
    return int(value)


def check_positive_int(value: Any, what: str) -> int:
    if not _is_int(value) or value < 1:
        raise InvalidArgumentError(f"{what}: expected a positive int, got {value!r}")
    return int(value)


def check_count(value: Any, what: str = "count") -> int:
    """A batch count: an int in [0, 2**63)."""
    if not _is_int(value) or not 0 <= value < 2**63:
        raise InvalidArgumentError(f"{what}: expected an int in [0, 2**63), got {value!r}")
    return int(value)


def check_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise InvalidArgumentError(f"{what}: expected {expected}, got {value!r}")
    return str(value)


def check_state_dtype(dtype: Any, purpose: str = "") -> str:
    """The dtype of bncore-owned state and parameters: 'float32' or 'float64'."""
    if dtype not in STATE_DTYPES:
        raise UnsupportedDtypeError(f"dtype: expected 'float32' or 'float64'{purpose}, got {dtype!r}")
    return str(dtype)


def as_tuple(value: Any, what: str) -> tuple:
    """An axes or shape argument, one int or a sequence, as a tuple (its items unchecked); one that is
    neither an int nor iterable raises a TypeError naming `what`."""
    try:
        return (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int or a sequence of ints, got {type(value).__name__} {value!r}") \
            from None


def check_axis(axis: Any, ndim: int, what: str) -> int:
    """One axis of an `ndim`-dimensional tensor, wrapped into [0, ndim)."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if not _is_int(axis):
        raise TypeError(f"{what}: expected an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise InvalidArgumentError(f"{what}: expected an axis in [{-ndim}, {ndim}) for a {ndim}-dimensional input, "
                                   f"got {axis}")
    return int(axis) % ndim


def check_axes(axes: Any, ndim: int, what: str) -> tuple[int, ...]:
    """A sorted tuple of distinct axes; `axes` may be one int or a sequence."""
    seq = as_tuple(axes, what)
    if not seq:
        raise InvalidArgumentError(f"{what}: expected at least one axis, got none")
    out = [check_axis(a, ndim, what) for a in seq]
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"{what}: expected distinct axes, got {tuple(seq)} (repeated after wrapping: "
                                   f"{tuple(out)})")
    return tuple(sorted(out))


def check_shape(shape: Any, what: str = "normalized_shape") -> tuple[int, ...]:
    """A layer's normalized_shape: one positive int or a non-empty sequence of them."""
    dims = as_tuple(shape, what)
    if not dims:
        raise InvalidArgumentError(f"{what}: expected at least one dimension, got an empty shape")
    return tuple(check_positive_int(s, what) for s in dims)


def check_groups_divide(num_groups: int, num_channels: int) -> None:
    """A layer's channels split into equal groups."""
    if num_channels % num_groups:
        raise ShapeMismatchError(f"num_channels: expected a multiple of num_groups, got num_channels={num_channels} "
                                 f"and num_groups={num_groups}")


# ---------------------------------------------------------------- tensors


def check_float(t: TensorFacts, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"{what}: expected a floating dtype (float16, bfloat16, float32 or float64), "
                                    f"got {t.dtype}")


def check_same_device(tensors: Iterable[tuple[str, TensorFacts | None]]) -> None:
    """tensors: (name, imported tensor or None) pairs; all must share a device (host memory is one)."""
    first = None
    for name, t in tensors:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif place(t.device) != place(first[1]):
            raise UnsupportedDeviceError(f"{name}: expected a tensor on the device of {first[0]} "
                                         f"{describe_device(first[1])}, got one on {describe_device(t.device)}")


def check_ndim(shape: Sequence[int], what: str, min_ndim: int, layout: str) -> None:
    if len(shape) < min_ndim:
        raise InvalidArgumentError(f"{what}: expected at least {min_ndim} dimensions {layout}, got {len(shape)} "
                                   f"(shape {shape_text(shape)})")


def check_input(x: TensorFacts, what: str, min_ndim: int, layout: str) -> None:
    check_float(x, what)
    check_ndim(x.shape, what, min_ndim, layout)


def check_not_scalar(t: TensorFacts, what: str) -> None:
    if t.ndim < 1:
        raise InvalidArgumentError(f"{what}: expected at least 1 dimension, got a scalar")


def check_param(t: TensorFacts | None, what: str, shape: Sequence[int], per: str) -> None:
    """A parameter or statistic tensor (None passes): floating, exactly `shape`."""
    if t is None:
        return
    check_float(t, what)
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(f"{what}: expected shape {shape_text(shape)} (one value per {per}), "
                                 f"got {shape_text(t.shape)}")


def check_like_input(t: TensorFacts, x: TensorFacts, what: str) -> None:
    """A tensor of the input's shape and dtype (an output, grad_output)."""
    if tuple(t.shape) != tuple(x.shape):
        raise ShapeMismatchError(f"{what}: expected the input's shape {shape_text(x.shape)}, "
                                 f"got {shape_text(t.shape)}")
    if t.dtype != x.dtype:
        raise UnsupportedDtypeError(f"{what}: expected the input's dtype {x.dtype}, got {t.dtype}")


def check_saved(t: TensorFacts | None, what: str, shape: Sequence[int]) -> None:
    """A statistic the forward saved for the backward: required, floating, exactly `shape`."""
    if t is None:
        raise InvalidArgumentError(f"{what}: required for the backward pass, got None")
    check_param(t, what, shape, "statistic group")


def check_normalized_shape(normalized_shape: Any, x: TensorFacts, what: str = "normalized_shape") -> tuple[int, ...]:
    """Checks that normalized_shape is the input's trailing dims; returns it as a tuple."""
    shape = as_tuple(normalized_shape, what)
    if not shape:
        raise InvalidArgumentError(f"{what}: expected at least one dimension, got an empty shape")
    k = len(shape)
    if k > x.ndim or tuple(x.shape[x.ndim - k:]) != tuple(int(s) for s in shape):
        raise ShapeMismatchError(f"{what}: expected the input's trailing dimensions; given normalized_shape="
                                 f"{list(shape)}, the input must have shape [*, {', '.join(str(s) for s in shape)}], "
                                 f"but got input of size {list(x.shape)}")
    return tuple(int(s) for s in shape)


def check_channels(shape: Sequence[int], axis: int, num_features: int) -> None:
    """A layer's input: `num_features` channels along its (wrapped) channel axis. The layers run it only
    where a forward failed on a shape, so that an input with other channels is named as the cause
    rather than the layer's own weight or running statistics."""
    if shape[axis] != num_features:
        raise ShapeMismatchError(f"input: expected {num_features} channels at axis {axis} (the layer's num_features), "
                                 f"got {shape[axis]} (input shape {shape_text(shape)})")


def check_num_groups(num_groups: Any, x: TensorFacts) -> int:
    """Group norm's num_groups: a positive int that divides the channels (axis 1) of x."""
    if not _is_int(num_groups) or num_groups < 1:
        raise InvalidArgumentError(f"num_groups: expected a positive int, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ShapeMismatchError(f"num_groups: expected the number of channels in input ({channels}) to be divisible "
                                 f"by num_groups, but got num_groups={num_groups} (input shape {shape_text(x.shape)})")
    return int(num_groups)


# ---------------------------------------------------------------- running statistics


def check_running_pair(running_mean: object, running_var: object) -> None:
    if (running_mean is None) != (running_var is None):
        raise InvalidArgumentError("running_mean and running_var: pass both or neither")


def is_running_stats(stats: object) -> bool:
    """A bncore.RunningStats, known by the C state it holds (so that this module needs no `state`)."""
    return isinstance(getattr(stats, "_handle", None), _core.RunningStatsHandle)


def check_stats(stats: Any, running_mean: object, channels: int) -> None:
    """A RunningStats passed as `stats=` replaces running_mean / running_var."""
    if stats is None:
        return
    if not is_running_stats(stats):
        raise TypeError(f"stats: expected a bncore.RunningStats, got {type(stats).__name__}")
    if running_mean is not None:
        raise InvalidArgumentError("stats: pass either running_mean/running_var or stats, not both")
    if stats.num_features != channels:
        raise ShapeMismatchError(f"stats: expected running statistics of {channels} channels, got {stats.num_features}")


def check_has_running_stats(has_running: bool, message: str) -> None:
    if not has_running:
        raise MissingRunningStatsError(message)


def check_batch_values(shape: tuple[int, ...], reduce_from: int, keep_axis: int, message: str) -> None:
    """PyTorch refuses batch statistics of one value per group (its unbiased variance would divide by 0).
    A group spans the axes from `reduce_from` on, except `keep_axis` (-1: none)."""
    n = math.prod(shape[reduce_from:keep_axis] + shape[keep_axis + 1:] if keep_axis >= 0 else shape[reduce_from:])
    if n == 1:
        raise InvalidArgumentError(f"{message}, got input size {shape_text(shape)}")


def check_state_shape(value: np.ndarray, what: str, shape: Sequence[int]) -> None:
    """A value loaded into a state object or layer: exactly `shape`."""
    if value.shape != tuple(shape):
        raise ShapeMismatchError(f"{what}: expected shape {tuple(shape)}, got {value.shape}")


def check_state_real(value: np.ndarray, what: str) -> None:
    """A value loaded into state must not be complex (NumPy would drop the imaginary part with a warning)."""
    if value.dtype.kind == "c":
        raise TypeError(f"{what}: expected real values, got a complex array ({value.dtype})")


def check_state_float(value: np.ndarray, what: str) -> None:
    check_state_real(value, what)
    if value.dtype.name not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"{what}: expected a floating dtype, got {value.dtype}")


def check_state_count(value: np.ndarray, what: str) -> int:
    """A loaded num_batches_tracked: one integer in [0, 2**63) (an int64 counter; a uint64 of 2**63 or
    more would wrap to a negative count)."""
    if value.size != 1 or not np.issubdtype(value.dtype, np.integer) or not 0 <= int(value.reshape(())) < 2**63:
        raise InvalidArgumentError(f"{what}: expected one integer in [0, 2**63), got {value!r}")
    return int(value.reshape(()))
