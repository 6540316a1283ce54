"""A drop-in PyTorch backend: torch.nn normalization modules that compute with bncore.

    >>> import bncore.torch
    >>> model = bncore.torch.convert(model)      # every torch.nn norm layer now runs on bncore

Each class here subclasses its torch.nn namesake, so constructor arguments,
attributes, parameters, buffers, ``state_dict`` keys, ``repr`` and ``isinstance``
checks are PyTorch's own. Only ``forward`` differs: it follows the torch.nn
module's logic for the running statistics, then hands the tensors to bncore
through DLPack inside a ``torch.autograd.Function`` whose backward calls bncore's
``*_backward``. No number is computed here.

One deliberate difference: PyTorch counts a batch (``num_batches_tracked``)
before it normalizes; here the count moves only after bncore has succeeded, so a
forward that raises leaves every buffer exactly as it was.

Importing ``bncore`` never imports torch; importing ``bncore.torch`` does.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from . import _torch_ops as _ops
from ._checks import check_channels
from .errors import ShapeMismatchError

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "RMSNorm", "SyncBatchNorm", "convert",
]


def _bump_versions(*tensors):
    """bncore writes buffers through DLPack, which autograd cannot see: tell it, as an in-place op would."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


class _NotScriptable:
    """torch.jit.script cannot compile a forward that calls into bncore through Python: refuse it with
    the way that works (torch.jit.script calls this hook on every module before it compiles)."""

    def __prepare_scriptable__(self):
        raise TypeError(f"torch.jit.script: {type(self).__module__}.{type(self).__qualname__} calls bncore's "
                        "custom operators from Python, which TorchScript cannot compile; use torch.compile, "
                        "torch.export.export or torch.jit.trace instead")


# module -> the lock that serializes its buffer updates; kept outside the module so that it still
# copies and pickles (a lock does neither); entries go with their module
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _buffers_lock(module: Any, writes: bool) -> Any:
    """The module's own lock when this call writes its buffers (running statistics and batch counter:
    read, updated by bncore, counted), so that two threads calling one module update them one after
    the other as the C state's lock does for bncore's own layers; a no-op context otherwise, so that
    evaluation still runs in parallel."""
    if not writes or torch.compiler.is_compiling():  # a compiled graph holds no Python lock
        return contextlib.nullcontext()
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.Lock()
    return lock


# ---------------------------------------------------------------- batch norm


if TYPE_CHECKING:  # the mixins below are only ever combined with these torch.nn bases
    _BatchNormBase = torch.nn.modules.batchnorm._BatchNorm
    _InstanceNormBase = torch.nn.modules.instancenorm._InstanceNorm
else:
    _BatchNormBase = _InstanceNormBase = object


def _blame_input_channels(input: torch.Tensor, num_features: int) -> None:
    """After a forward failed on a shape: raises the input's error (in place of the weight's or the
    running statistics') when the input's channels are the cause."""
    try:
        check_channels(input.shape, 1, num_features)
    except ShapeMismatchError as wrong:
        raise wrong from None


class _BatchNormForward(_NotScriptable, _BatchNormBase):
    """torch.nn's _BatchNorm.forward, with the batch counted only once bncore has succeeded."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        with _buffers_lock(self, self.training and self.track_running_stats):
            return self._batch_norm(input)

    def _batch_norm(self, input: torch.Tensor) -> torch.Tensor:
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        # the batch counter that this call advances (training with tracked statistics), else None
        counter = self.num_batches_tracked if self.training and self.track_running_stats else None
        if counter is not None and self.momentum is None:  # the cumulative moving average, this batch included
            exponential_average_factor = 1.0 / float(counter + 1)
        # batch statistics in training mode, and in eval mode when there are no running statistics
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if bn_training and self.eps <= 0.0:  # torch.nn.functional.batch_norm's checks
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        # the buffers are passed when they are updated (training, tracked) or used (eval)
        pass_buffers = not self.training or self.track_running_stats
        try:
            output = _ops.batch_norm(input, self.running_mean if pass_buffers else None,
                                     self.running_var if pass_buffers else None, self.weight, self.bias, bn_training,
                                     exponential_average_factor, self.eps)
        except ShapeMismatchError:
            _blame_input_channels(input, self.num_features)
            raise
        if counter is not None:
            counter.add_(1)
        return output


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bncore: (N, C) or (N, C, L) inputs."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bncore: (N, C, H, W) inputs, NCHW or channels-last."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bncore: (N, C, D, H, W) inputs, NCDHW or channels-last."""


# ---------------------------------------------------------------- instance norm


class _InstanceNormForward(_NotScriptable, _InstanceNormBase):
    """torch.nn's _InstanceNorm.forward: unbatched inputs get a batch dim of 1; running statistics, when
    tracked, are updated in training mode and normalize in eval mode; momentum None updates nothing."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                                 f" ({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. "
                          "You can silence this warning by not passing in num_features, "
                          "which is not used because affine=False", stacklevel=2)
        if input.dim() == self._get_no_batch_dim():
            return self._instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._instance_norm(input)

    def _instance_norm(self, input):
        writes = (self.training or not self.track_running_stats) and self.running_mean is not None
        with _buffers_lock(self, writes):
            return self._instance_norm_locked(input)

    def _instance_norm_locked(self, input):
        return _ops.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                  self.training or not self.track_running_stats,
                                  self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormForward, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by bncore: (N, C, L) or unbatched (C, L) inputs."""


class InstanceNorm2d(_InstanceNormForward, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by bncore: (N, C, H, W) or unbatched (C, H, W) inputs."""


class InstanceNorm3d(_InstanceNormForward, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by bncore: (N, C, D, H, W) or unbatched (C, D, H, W) inputs."""


# ---------------------------------------------------------------- layer, group and RMS norm


class LayerNorm(_NotScriptable, torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by bncore."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(_NotScriptable, torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by bncore, with torch.nn.functional.group_norm's input checks."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
        size = [input.size(0) * input.size(1) // self.num_groups, self.num_groups] + list(input.size()[2:])
        if size[0] * _product(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        return _ops.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def _product(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


class RMSNorm(_NotScriptable, torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by bncore (eps=None: the machine epsilon of the compute type, float32's
    for half inputs, as PyTorch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)


# ---------------------------------------------------------------- convert


def _hyperparameters(module):
    """The constructor arguments that rebuild `module` (its tensors are moved over separately)."""
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):  # batch and instance norm
        return (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    if isinstance(module, torch.nn.GroupNorm):
        return (module.num_groups, module.num_channels, module.eps, module.affine)
    return (module.normalized_shape, module.eps, module.elementwise_affine)  # LayerNorm, RMSNorm


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.InstanceNorm1d: InstanceNorm1d, torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d, torch.nn.LayerNorm: LayerNorm, torch.nn.GroupNorm: GroupNorm,
    torch.nn.RMSNorm: RMSNorm,
}


def _replace(module):
    # built on the meta device (no allocation), then given the original's own tensors
    replacement = _REPLACEMENTS[type(module)](*_hyperparameters(module), device="meta")
    replacement._parameters.update(module._parameters)
    replacement._buffers.update(module._buffers)
    replacement._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    replacement.training = module.training
    if hasattr(module, "qconfig"):
        replacement.qconfig = module.qconfig
    return replacement


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Replaces every torch.nn normalization layer in `module` (BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d,
    LayerNorm, GroupNorm, RMSNorm: those exact classes, not subclasses such as SyncBatchNorm or the lazy
    ones), recursively, with bncore's, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    The new layers hold the same Parameter objects and buffers (so devices, dtypes and optimizer state
    carry over) and the same training mode. Containers are changed in place; returns `module`, or its
    replacement when `module` is itself a normalization layer. Hooks on a replaced layer are not carried
    over (as with convert_sync_batchnorm).
    """
    output = _replace(module) if type(module) in _REPLACEMENTS else module
    for name, child in module.named_children():
        output.add_module(name, convert(child))
    return output


from ._torch_sync import SyncBatchNorm  # noqa: E402
