"""Layers: parameters, running statistics and the forward/backward protocol.

A layer owns its state as NumPy arrays (viewable by any framework through
DLPack) and runs on whatever tensor type it is called with. `layer(x)` runs the
forward and remembers what the backward needs; `layer.backward(grad_output)`
returns grad_input and stores `weight_grad` / `bias_grad`. The state changes
only when a call succeeds.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from ._arrays import FLOAT_DTYPES


def _to_numpy(value, what: str) -> np.ndarray:
    """A NumPy copy of any DLPack tensor (or array-like) for state loading."""
    from ._arrays import detach

    value = detach(value)
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        try:
            return np.array(np.from_dlpack(value), copy=True)
        except (TypeError, BufferError, RuntimeError) as exc:
            raise TypeError(f"{what}: cannot read it through DLPack ({exc})") from exc
    return np.array(value, copy=True)


class BatchNorm:
    """Batch normalization over the channel axis ``axis``, as ``torch.nn.BatchNorm{1,2,3}d``.

    State: ``weight``, ``bias`` (when affine), ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (when track_running_stats), NumPy arrays of ``dtype``.
    ``momentum=None`` gives the cumulative moving average, as PyTorch does.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *, axis=1,
                 dtype="float32"):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if dtype not in ("float32", "float64"):
            raise TypeError(f"dtype: expected 'float32' or 'float64' for the parameters, got {dtype!r}")
        F._check_eps(eps)
        if momentum is not None:
            F._check_momentum(momentum)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = dtype
        self.training = True
        self.weight = np.ones(self.num_features, dtype) if affine else None
        self.bias = np.zeros(self.num_features, dtype) if affine else None
        self.weight_grad = None
        self.bias_grad = None
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, dtype)
            self.running_var = np.ones(self.num_features, dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None

    # ------------------------------------------------------------- mode

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # ------------------------------------------------------------- forward / backward

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def forward(self, x):
        """Normalizes ``x`` (any DLPack tensor); returns the caller's array type."""
        momentum = 0.0
        update = self.training and self.track_running_stats
        if update:
            # PyTorch's rule: count first, then momentum None means the cumulative average
            momentum = 1.0 / float(self.num_batches_tracked + 1) if self.momentum is None else self.momentum
        # the running statistics go in only when they are used or updated
        pass_running = self.running_mean is not None and (update or not self.training)
        y, mean, invstd = F.batch_norm_forward(
            x, self.running_mean if pass_running else None, self.running_var if pass_running else None,
            self.weight, self.bias, training=self._uses_batch_stats(), momentum=momentum, eps=self.eps,
            axis=self.axis)
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, self._uses_batch_stats())
        return y

    __call__ = forward

    def backward(self, grad_output):
        """Gradient of the last forward: returns grad_input; sets weight_grad and bias_grad."""
        if self._saved is None:
            raise RuntimeError("backward: call the layer on an input first")
        x, mean, invstd, batch_stats = self._saved
        dx, dw, db = F.batch_norm_backward(grad_output, x, self.weight, mean, invstd, training=batch_stats,
                                           axis=self.axis)
        if self.affine:
            self.weight_grad = _to_numpy(dw, "grad_weight")
            self.bias_grad = _to_numpy(db, "grad_bias")
        return dx

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """PyTorch's keys: weight, bias, running_mean, running_var, num_batches_tracked (copies)."""
        out = {}
        if self.affine:
            out["weight"] = self.weight.copy()
            out["bias"] = self.bias.copy()
        if self.track_running_stats:
            out["running_mean"] = self.running_mean.copy()
            out["running_var"] = self.running_var.copy()
            out["num_batches_tracked"] = self.num_batches_tracked.copy()
        return out

    def load_state_dict(self, state: dict, strict: bool = True):
        """Loads a dict with PyTorch's keys (NumPy arrays, torch tensors, any DLPack tensor).
        Every value is checked before any is stored."""
        expected = list(self.state_dict().keys())
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for key in expected:
            if key not in state:
                continue
            value = _to_numpy(state[key], key)
            if key == "num_batches_tracked":
                if value.size != 1:
                    raise ValueError(f"num_batches_tracked: expected one value, got shape {value.shape}")
                staged[key] = np.asarray(value.reshape(()), np.int64)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(f"{key}: expected shape ({self.num_features},), got {value.shape}")
            if value.dtype.name not in FLOAT_DTYPES:
                raise TypeError(f"{key}: expected a floating dtype, got {value.dtype}")
            staged[key] = value.astype(self.dtype)
        for key, value in staged.items():
            setattr(self, key, value)
        return self

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype!r})")
