"""State that outlives a call: running statistics and mergeable moments.

`RunningStats` wraps the C library's running-statistics state (bn_running_stats_t):
its mean and variance are NumPy views of C memory that any framework can view
through DLPack without a copy, and every update is all-or-nothing in C.

`Moments` holds exact per-channel (count, mean, m2) in float64 and merges them
with Chan's formula, so statistics of many batches (or of many processes) combine
into the statistics of all the data.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _core
from ._arrays import Array, Call, import_tensor
from ._checks import (CONVENTIONS, NAN_POLICIES, check_axis, check_choice, check_count, check_int, check_not_scalar,
                      check_positive_int, check_state_dtype, check_state_real, check_state_shape)
from ._keras import DEFAULT_MOMENTUM, biased_variance, update_factor
from .errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["Moments", "RunningStats", "precise_stats"]

_DEFAULT: Any = object()


def kept_or(value: int | None, current: int) -> int:
    return current if value is None else value


class RunningStats:
    """Running mean and variance of ``num_features`` channels.

    ``convention="torch"``: default momentum 0.1, ``new = (1 - m) * old + m * batch``, the
    unbiased variance ``var * n / (n - 1)`` is stored, ``momentum=None`` gives the
    cumulative average. ``convention="keras"``: default momentum 0.99,
    ``new = m * old + (1 - m) * batch``, the biased variance is stored.
    ``nan_policy="skip"`` leaves the statistics untouched when a batch's statistics
    are not finite and counts it in ``skipped``.
    """

    def __init__(self, num_features: int, momentum: float | None = _DEFAULT, *, convention: str = "torch",
                 dtype: str = "float32", nan_policy: str = "propagate") -> None:
        check_choice(convention, "convention", CONVENTIONS)
        check_state_dtype(dtype)
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        num_features = check_positive_int(num_features, "num_features")
        if momentum is _DEFAULT:
            momentum = DEFAULT_MOMENTUM[convention]
        if momentum is None and convention != "torch":
            raise InvalidArgumentError("momentum: None (the cumulative average) exists only in the torch convention")
        flags = 0
        if biased_variance(convention):
            flags |= _core.STATS_BIASED_VAR
        if momentum is None:
            flags |= _core.STATS_CUMULATIVE
        if nan_policy == "skip":
            flags |= _core.STATS_SKIP_NONFINITE
        factor = 0.0 if momentum is None else update_factor(convention, momentum)
        self._handle = _core.RunningStatsHandle(num_features, dtype, factor, flags)
        self.num_features = num_features
        self.convention = convention
        self.dtype = dtype
        self.nan_policy = nan_policy
        self._momentum = momentum

    # ------------------------------------------------------------- the state

    @property
    def mean(self) -> np.ndarray:
        """The running mean: a NumPy view of the C state (writable, zero-copy)."""
        return self._handle.mean

    @property
    def var(self) -> np.ndarray:
        """The running variance (unbiased for torch, biased for keras): a view of the C state."""
        return self._handle.var

    @property
    def count(self) -> int:
        """Batches folded in (PyTorch's num_batches_tracked)."""
        return self._handle.counts[0]

    @count.setter
    def count(self, value: int) -> None:
        self._handle.set_counts(int(value), self.skipped)

    @property
    def skipped(self) -> int:
        """Batches left out because their statistics were not finite (nan_policy='skip')."""
        return self._handle.counts[1]

    @property
    def momentum(self) -> float | None:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        if value is None or self._momentum is None:
            raise InvalidArgumentError("momentum: switching to or from the cumulative average (None) needs a new "
                                       "RunningStats")
        self._handle.set_factor(update_factor(self.convention, value))
        self._momentum = value

    # ------------------------------------------------------------- updates

    def update(self, batch_mean: Array, batch_var: Array, n: int) -> None:
        """Folds in one batch: ``batch_var`` is the biased variance of the ``n`` values
        behind it (any DLPack tensor or array). All or nothing."""
        n = check_int(n, "n")
        m = import_tensor(np.asarray(batch_mean) if isinstance(batch_mean, (list, tuple)) else batch_mean,
                          "batch_mean")
        v = import_tensor(np.asarray(batch_var) if isinstance(batch_var, (list, tuple)) else batch_var, "batch_var")
        if m is None or v is None:
            raise TypeError("batch_mean, batch_var: expected tensors, got None")
        try:
            self._handle.update(m, v, n)
        finally:
            m.release()
            v.release()

    def load(self, mean: Any, var: Any, count: int | None = None) -> None:
        """Replaces the state: every value is checked, then one C call (``bn_running_stats_load``,
        under the state's lock) writes them all, so a failing load changes nothing."""
        staged = []
        for name, value in (("mean", mean), ("var", var)):
            a = np.asarray(value)
            check_state_real(a, name)
            a = np.asarray(a, dtype=np.float64)
            check_state_shape(a, name, (self.num_features,))
            staged.append(a)
        if count is not None:
            count = check_count(count)
        self._replace(staged[0], staged[1], count, None)

    def _replace(self, mean: np.ndarray, var: np.ndarray, count: int | None, skipped: int | None) -> None:
        """Writes checked values in one call under the state's lock; None keeps a counter as it is."""
        updates, kept = self._handle.counts
        m = import_tensor(mean, "mean")
        v = import_tensor(var, "var")
        assert m is not None and v is not None
        try:
            self._handle.load(m, v, kept_or(count, updates), kept_or(skipped, kept))
        finally:
            m.release()
            v.release()

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise TypeError("RunningStats holds two arrays: export .mean or .var")

    def __dlpack_device__(self) -> tuple[int, int]:
        raise TypeError("RunningStats holds two arrays: export .mean or .var")

    def __repr__(self) -> str:
        return (f"RunningStats({self.num_features}, momentum={self._momentum}, convention={self.convention!r}, "
                f"dtype={self.dtype!r}, count={self.count}, skipped={self.skipped})")


class Moments:
    """Exact per-channel moments in float64: ``count``, ``mean`` and ``m2`` (the sum of
    squared deviations from the mean). Merging is Chan's formula, exact for empty parts
    and parts of very different sizes."""

    def __init__(self, count: Any, mean: Any, m2: Any) -> None:
        self.count = np.asarray(count, dtype=np.float64).copy()
        self.mean = np.asarray(mean, dtype=np.float64).copy()
        self.m2 = np.asarray(m2, dtype=np.float64).copy()
        if not (self.count.shape == self.mean.shape == self.m2.shape) or self.count.ndim != 1:
            raise ShapeMismatchError(f"count, mean, m2: expected equal 1-D shapes, got {self.count.shape}, "
                                     f"{self.mean.shape}, {self.m2.shape}")

    @classmethod
    def empty(cls, num_features: int) -> Moments:
        z = np.zeros(int(num_features))
        return cls(z, z, z)

    @classmethod
    def from_batch(cls, x: Array, axis: int = 1) -> Moments:
        """Moments of each index of ``axis`` over all other axes of ``x`` (any DLPack tensor): the
        numbers the forward itself computes (``bn_norm_stats``: a corrected two-pass sum per piece
        of 2048 elements in the compute type, float64 for float64 input, pieces merged by Chan's
        formula in double)."""
        with Call() as call:
            xt = call.need(x, "x")
            check_not_scalar(xt, "x")
            ax = check_axis(axis, xt.ndim, "axis")
            channels = xt.shape[ax]
            mean, m2 = np.empty(channels), np.empty(channels)
            if xt.ndim == 1:
                desc = _core.Desc.axes(0, 1, 0.0)
            else:
                desc = _core.Desc.batch(xt.ndim, ax, 0.0)
            count = _core.norm_stats(desc, xt, call.add(mean, "mean", True), call.add(m2, "m2", True))
        return cls(np.full(channels, float(count)), mean, m2)

    def merge(self, other: Moments) -> Moments:
        """The moments of both parts' data together (Chan's formula, in C: ``bn_moments_merge``)."""
        if not isinstance(other, Moments):
            raise TypeError(f"other: expected a bncore.Moments, got {type(other).__name__}")
        if self.mean.shape != other.mean.shape:
            raise ShapeMismatchError(f"other: expected moments of {self.mean.shape[0]} channels, "
                                     f"got {other.mean.shape[0]}")
        count, mean, m2 = np.empty_like(self.count), np.empty_like(self.mean), np.empty_like(self.m2)
        with Call() as call:
            _core.moments_merge(*[call.need(a, name, writable) for a, name, writable in (
                (self.count, "count", False), (self.mean, "mean", False), (self.m2, "m2", False),
                (other.count, "other.count", False), (other.mean, "other.mean", False), (other.m2, "other.m2", False),
                (count, "count", True), (mean, "mean", True), (m2, "m2", True))])
        return Moments(count, mean, m2)

    @staticmethod
    def merge_all(parts: Iterable[Moments]) -> Moments:
        """Merges a sequence of Moments in order."""
        parts = list(parts)
        if not parts:
            raise InvalidArgumentError("merge_all: expected at least one Moments")
        total = parts[0]
        for p in parts[1:]:
            total = total.merge(p)
        return total

    def var(self, unbiased: bool = False) -> np.ndarray:
        """Per-channel variance: m2 / n, or m2 / (n - 1) with ``unbiased``."""
        d = self.count - (1.0 if unbiased else 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, self.m2 / np.where(d > 0, d, 1.0), np.nan)

    def __repr__(self) -> str:
        return f"Moments(channels={self.mean.shape[0]}, count={self.count.tolist()})"


def precise_stats(layer: Any, batches: Iterable[Array]) -> Moments:
    """Recomputes a layer's running mean and variance exactly over ``batches``: the pooled
    statistics of all their data (unbiased variance for the torch convention, biased for
    keras), not an average of batch variances. ``layer``: a bncore BatchNorm or a
    torch.nn.BatchNorm*d. Returns the merged Moments."""
    axis = getattr(layer, "axis", 1)
    total = Moments.merge_all(Moments.from_batch(b, axis=axis) for b in batches)
    convention = getattr(layer, "convention", "torch")
    var = total.var(unbiased=not biased_variance(convention))
    stats = getattr(layer, "stats", None)
    if isinstance(stats, RunningStats):
        stats.load(total.mean, var)
    else:  # a torch module: copy into its buffers
        import torch

        with torch.no_grad():
            layer.running_mean.copy_(torch.from_numpy(total.mean))
            layer.running_var.copy_(torch.from_numpy(var))
    return total
