"""Keras 3's BatchNormalization computed by bncore.

    >>> from bncore.keras import BatchNormalization
    >>> model = keras.Sequential([keras.layers.Dense(64), BatchNormalization(axis=1), keras.layers.ReLU()])

`BatchNormalization` subclasses ``keras.layers.BatchNormalization``: its arguments (axis, momentum,
epsilon, center, scale, the initializers, regularizers and constraints, renorm, renorm_clipping,
renorm_momentum, synchronized), its weights (gamma, beta, moving_mean, moving_variance, and with
renorm moving_stddev, renorm_mean, renorm_stddev), ``get_config`` and ``get_weights`` are Keras's
own, so weights interchange with Keras's layer both ways. It is registered for Keras serialization
as ``bncore>BatchNormalization``.

Only ``call`` differs. On the torch, jax and numpy backends the passes over the data (the batch's
statistics and the normalization in training, the normalization with the moving statistics in
inference) are one bncore call, differentiable: ``bncore.batch_norm`` on torch tensors (through the
registered PyTorch operators) and ``bncore.jax.batch_norm`` on JAX arrays (an XLA custom call with a
custom VJP, so ``jit`` and ``grad`` work). The per-channel bookkeeping (the moving statistics'
updates, renorm's r and d and its moving mean and standard deviation) is Keras's own code, run on
the batch's statistics that bncore returns, so the numbers are Keras's to float32 rounding.

Keras's own computation runs instead, for these cases only: a ``mask`` (bncore has no masked
statistics), a batch with one value per channel (Keras normalizes it to ``beta``; bncore's batch
norm, PyTorch's convention, refuses it), and other backends (TensorFlow).
"""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

from . import functional as _F

__all__ = ["BatchNormalization"]

_BACKENDS = ("torch", "jax", "numpy")


@keras.saving.register_keras_serializable(package="bncore")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization``, argument for argument, computed by bncore."""

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        backend = keras.backend.backend()
        ndim = len(inputs.shape)
        axis = self.axis % ndim
        channels = inputs.shape[axis]
        per_channel = 1
        for d, size in enumerate(inputs.shape):
            if d != axis:
                per_channel *= size
        batch_statistics = bool(training) and self.trainable
        if mask is not None or backend not in _BACKENDS or (batch_statistics and per_channel == 1):
            return super().call(inputs, training=training, mask=mask)

        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")  # Keras's upcast of half inputs
        x = ops.cast(inputs, compute_dtype)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None

        if not batch_statistics:
            mean = ops.cast(self.moving_mean, compute_dtype)
            variance = ops.cast(self.moving_variance, compute_dtype)
            y = _batch_norm(backend, x, mean, variance, gamma, beta, False, self.epsilon, axis)[0]
            return ops.cast(y, self.compute_dtype)

        if not self.renorm:
            y, mean, variance = _batch_norm(backend, x, None, None, gamma, beta, True, self.epsilon, axis)
            variance = _biased(variance, per_channel)
            moving_mean = ops.cast(self.moving_mean, compute_dtype)
            moving_variance = ops.cast(self.moving_variance, compute_dtype)
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return ops.cast(y, self.compute_dtype)

        # renorm: x_hat from bncore, then Keras's (x_hat * r + d) * gamma + beta with r, d constants
        x_hat, mean, variance = _batch_norm(backend, x, None, None, None, None, True, self.epsilon, axis)
        variance = _biased(variance, per_channel)
        r, d, mean, variance = self._renorm_correction_and_moments(mean, variance)
        scale, offset = self._compose_transforms(r, d, gamma, beta, compute_dtype)
        self._update_renorm_statistics(mean, variance)
        shape = [1] * ndim
        shape[axis] = channels
        y = x_hat * ops.reshape(scale, shape) + ops.reshape(offset, shape)
        return ops.cast(y, self.compute_dtype)


def _biased(unbiased: Any, n: int) -> Any:
    """The biased variance (Keras's moving variance) from the unbiased one bncore's rule returns."""
    return ops.stop_gradient(unbiased * ((n - 1) / n))


def _batch_norm(backend: str, x: Any, mean: Any, variance: Any, gamma: Any, beta: Any, training: bool,
                eps: float, axis: int) -> tuple[Any, Any, Any]:
    """One bncore batch norm on the backend's tensors. Training: returns (y, batch mean, unbiased batch
    variance), read from running statistics updated with momentum 1 (which keeps the batch's own
    exactly). Inference: `mean` / `variance` normalize; returns (y, None, None)."""
    if backend == "jax":
        from . import jax as _jax

        if training:
            channels = x.shape[axis]
            y, mean, variance = _jax.batch_norm(x, ops.zeros((channels,), x.dtype), ops.ones((channels,), x.dtype),
                                                gamma, beta, training=True, momentum=1.0, eps=eps, axis=axis)
            return y, ops.stop_gradient(mean), ops.stop_gradient(variance)
        return _jax.batch_norm(x, mean, variance, gamma, beta, training=False, eps=eps, axis=axis)[0], None, None
    if training:
        channels = x.shape[axis]
        mean, variance = ops.zeros((channels,), x.dtype), ops.ones((channels,), x.dtype)
        y = _F.batch_norm(x, mean, variance, gamma, beta, training=True, momentum=1.0, eps=eps, axis=axis)
        return y, mean, variance
    return _F.batch_norm(x, mean, variance, gamma, beta, training=False, eps=eps, axis=axis), None, None
