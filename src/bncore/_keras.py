"""The two conventions for running statistics and batch-norm layers: PyTorch's and Keras's.

PyTorch: momentum 0.1, ``new = (1 - m) * old + m * batch``, the unbiased variance stored,
eps 1e-5, channels at axis 1. Keras: momentum 0.99, ``new = m * old + (1 - m) * batch``, the
biased variance stored, epsilon 1e-3, channels last, and the weights named gamma, beta,
moving_mean and moving_variance. `state.RunningStats` and `layers.BatchNorm` take their defaults
and rules from here; this module holds no layer and imports none.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ._arrays import to_numpy
from ._checks import CONVENTIONS, check_momentum, check_state_real, check_state_shape

__all__ = ["DEFAULT_MOMENTUM", "LAYER_DEFAULTS", "keras_weights", "load_keras_weights", "update_factor"]

# convention -> the default momentum of its running statistics
DEFAULT_MOMENTUM: dict[str, float] = {"torch": 0.1, "keras": 0.99}

# convention -> a batch-norm layer's defaults
LAYER_DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"eps": 1e-5, "momentum": 0.1, "axis": 1},
    "keras": {"eps": 1e-3, "momentum": 0.99, "axis": -1},
}

assert set(DEFAULT_MOMENTUM) == set(LAYER_DEFAULTS) == set(CONVENTIONS)

# Keras's weight name -> the bncore layer's attribute, in Keras's order (get_weights())
_KERAS_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def update_factor(convention: str, momentum: Any) -> float:
    """The factor f of ``stored = (1 - f) * stored + f * batch``: the momentum in PyTorch's convention,
    one minus it (the decay) in Keras's."""
    m = check_momentum(momentum, none_ok=convention == "torch")
    return m if convention == "torch" else 1.0 - m


def biased_variance(convention: str) -> bool:
    """Whether the convention stores the biased variance (Keras) rather than the unbiased one (PyTorch)."""
    return convention == "keras"


def keras_weights(layer: Any) -> dict[str, np.ndarray]:
    """Keras's names for a bncore BatchNorm's state: gamma (if scale), beta (if center), moving_mean,
    moving_variance (if it tracks running statistics); copies."""
    out = {}
    for name, attr in _KERAS_NAMES.items():
        value = getattr(layer, attr)
        if value is not None:
            out[name] = value.copy()
    return out


def load_keras_weights(layer: Any, weights: Mapping[str, Any] | Iterable[Any]) -> None:
    """Loads `keras_weights()`'s dict, or the list ``keras_layer.get_weights()`` returns, into `layer`:
    every value is checked before any is stored."""
    names = list(keras_weights(layer).keys())
    if isinstance(weights, Mapping):
        missing = [k for k in names if k not in weights]
        if missing or set(weights) - set(names):
            raise KeyError(f"weights: expected keys {names}, got {sorted(weights)}")
        values = [weights[k] for k in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise ValueError(f"weights: expected {len(names)} arrays ({', '.join(names)}), "
                             f"got {len(values)}")
    staged = {}
    for name, value in zip(names, values):
        a = to_numpy(value, name)
        check_state_real(a, name)
        check_state_shape(a, name, (layer.num_features,))
        staged[_KERAS_NAMES[name]] = a.astype(layer.dtype)
    layer._store_state(staged)  # the running statistics in one C call, then gamma and beta
