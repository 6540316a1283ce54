"""A drop-in PyTorch backend: torch.nn normalization modules that compute with bncore.

    >>> import bncore.torch
    >>> model = bncore.torch.convert(model)      # every torch.nn norm layer now runs on bncore

Each class here subclasses its torch.nn namesake, so constructor arguments,
attributes, parameters, buffers, ``state_dict`` keys and ``isinstance`` checks are
PyTorch's own (the repr's class name says ``bncore.``). Only ``forward`` differs: it
follows the torch.nn module's logic for the running statistics, then calls bncore's
custom operators (`bncore._torch_ops`: ``torch.ops.bncore.*``, with fake kernels,
autograd and vmap rules, so torch.compile, torch.export, torch.func and jit.trace
see one op), whose kernels hand the tensors to bncore through DLPack. No number is
computed here. `convert` swaps bncore's modules into a model and reports what it did.

One deliberate difference: PyTorch counts a batch (``num_batches_tracked``)
before it normalizes; here the count moves only after bncore has succeeded, so a
forward that raises leaves every buffer exactly as it was.

Importing ``bncore`` never imports torch; importing ``bncore.torch`` does.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from . import _torch_ops as _ops
from . import functional as _F
from ._checks import check_channels
from .errors import ShapeMismatchError

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d", "ConvertReport", "LayerNorm", "RMSNorm", "SyncBatchNorm", "as_bncore", "convert", "fold",
    "fuse", "register",
]


class _BncoreModule:
    """What every bncore module adds to its torch.nn base: a repr that says it is bncore's
    (``bncore.BatchNorm2d(16, eps=1e-05, ...)``), and a clear refusal of torch.jit.script, which cannot
    compile a forward that calls into bncore through Python (torch.jit.script calls
    ``__prepare_scriptable__`` on every module before it compiles)."""

    def _get_name(self):
        return f"bncore.{type(self).__name__}"

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
    _LayerNormBase = torch.nn.LayerNorm
    _GroupNormBase = torch.nn.GroupNorm
    _RMSNormBase = torch.nn.RMSNorm
    _ModuleBase = torch.nn.Module
    _InstanceNormBase = torch.nn.modules.instancenorm._InstanceNorm
else:
    _BatchNormBase = _InstanceNormBase = _LayerNormBase = _GroupNormBase = _RMSNormBase = _ModuleBase = object


def _blame_input_channels(input: torch.Tensor, num_features: int) -> None:
    """After a forward failed on a shape: raises the input's error (in place of the weight's or the
    running statistics') when the input's channels are the cause."""
    try:
        check_channels(input.shape, 1, num_features)
    except ShapeMismatchError as wrong:
        raise wrong from None


class _BatchNormForward(_BncoreModule, _BatchNormBase):
    """torch.nn's _BatchNorm.forward, with the batch counted only once bncore has succeeded."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        with _buffers_lock(self, self.training and self.track_running_stats):
            return self._batch_norm(input)

    def _batch_norm(self, input: torch.Tensor, activation: str | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
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
                                     exponential_average_factor, self.eps, 1,
                                     getattr(self, "virtual_batch_size", None), activation, residual)
        except ShapeMismatchError:
            _blame_input_channels(input, self.num_features)
            raise
        if counter is not None:
            counter.add_(1)
        return output


def _check_virtual_batch_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"virtual_batch_size: expected None or a positive int, got {value!r}")
    return value


class _GhostBatchNorm(_BatchNormForward):
    """Batch norm with an optional ``virtual_batch_size`` (ghost batch norm, training only): the batch
    is split along axis 0 into consecutive virtual batches of that size, each normalized by its own
    statistics, in one bncore call; the running statistics receive the mean of the virtual batches'
    means and of their unbiased variances (docs/ghost_batch_norm.md). Eval ignores it."""

    def __init__(self, *args: Any, virtual_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.virtual_batch_size = _check_virtual_batch_size(virtual_batch_size)

    def extra_repr(self) -> str:
        ghost = getattr(self, "virtual_batch_size", None)
        return super().extra_repr() + (f", virtual_batch_size={ghost}" if ghost is not None else "")


class BatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bncore: (N, C) or (N, C, L) inputs; ``virtual_batch_size=``
    for ghost batch norm."""


class BatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bncore: (N, C, H, W) inputs, NCHW or channels-last;
    ``virtual_batch_size=`` for ghost batch norm."""


class BatchNorm3d(_GhostBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bncore: (N, C, D, H, W) inputs, NCDHW or channels-last;
    ``virtual_batch_size=`` for ghost batch norm."""


def _with_virtual_batch_size(cls: type, base: type) -> None:
    """`cls`'s signature: torch.nn's `base`'s (whatever the installed torch takes) and the keyword-only
    virtual_batch_size, which the constructor adds."""
    sig = inspect.signature(base)
    extra = inspect.Parameter("virtual_batch_size", inspect.Parameter.KEYWORD_ONLY, default=None)
    setattr(cls, "__signature__", sig.replace(parameters=[*sig.parameters.values(), extra]))  # noqa: B010


_SIGNED: tuple[tuple[type, type], ...] = ((BatchNorm1d, torch.nn.BatchNorm1d), (BatchNorm2d, torch.nn.BatchNorm2d),
                                          (BatchNorm3d, torch.nn.BatchNorm3d))
for _cls, _base in _SIGNED:
    _with_virtual_batch_size(_cls, _base)


# ---------------------------------------------------------------- fused batch norm + relu


class _BatchNormReLU(_GhostBatchNorm):
    """``relu(batch_norm(input) + residual)`` in one bncore pass (the residual is optional): the
    add and the ReLU happen as the output is written, and the backward masks the gradient by the
    output (docs/fused.md). The module is a batch norm (same arguments, parameters, buffers and
    state_dict keys) whose forward takes the residual; `fuse` puts it in place of a batch norm
    followed by a ReLU. A residual of another shape or dtype than the input (a broadcast add) is
    added after bncore's batch norm, unfused, as the unfused model did."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
            return torch.relu(self._locked_batch_norm(input, None, None) + residual)
        return self._locked_batch_norm(input, "relu", residual)

    def _locked_batch_norm(self, input: torch.Tensor, activation: str | None,
                           residual: torch.Tensor | None) -> torch.Tensor:
        with _buffers_lock(self, self.training and self.track_running_stats):
            return self._batch_norm(input, activation, residual)


class BatchNormReLU1d(_BatchNormReLU, torch.nn.BatchNorm1d):
    """bncore.torch.BatchNorm1d followed by a ReLU, fused; ``forward(input, residual=None)``."""


class BatchNormReLU2d(_BatchNormReLU, torch.nn.BatchNorm2d):
    """bncore.torch.BatchNorm2d followed by a ReLU, fused; ``forward(input, residual=None)``."""


class BatchNormReLU3d(_BatchNormReLU, torch.nn.BatchNorm3d):
    """bncore.torch.BatchNorm3d followed by a ReLU, fused; ``forward(input, residual=None)``."""


_SIGNED = ((BatchNormReLU1d, torch.nn.BatchNorm1d), (BatchNormReLU2d, torch.nn.BatchNorm2d),
           (BatchNormReLU3d, torch.nn.BatchNorm3d))
for _cls, _base in _SIGNED:
    _with_virtual_batch_size(_cls, _base)


# ---------------------------------------------------------------- batch renormalization


class _BatchRenormForward(_BncoreModule, _BatchNormBase):
    """Batch renormalization (Ioffe 2017) with torch.nn's batch norm machinery: in training,
    ``y = ((x - mu_B) / sigma_B * r + d) * weight + bias`` with ``r = clip(sigma_B / sigma, 1/rmax,
    rmax)`` and ``d = clip((mu_B - mu) / sigma, -dmax, dmax)`` from the running statistics (constants
    for the gradient), which are then updated as batch norm's; eval is batch norm's eval. ``rmax`` and
    ``dmax`` are plain attributes, to be raised during training (`bncore.renorm_schedule`)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True, *,
                 rmax: float = 3.0, dmax: float = 5.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.rmax = _F._check_bound(rmax, "rmax", 1.0)
        self.dmax = _F._check_bound(dmax, "dmax", 0.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{type(self).__name__}: batch renormalization compares the batch with the running "
                             "statistics, so track_running_stats must stay True")
        if self.eps <= 0.0:
            raise ValueError(f"batch_renorm eps must be positive, but got {self.eps}")
        counter = self.num_batches_tracked
        assert counter is not None  # track_running_stats is True, checked above
        with _buffers_lock(self, self.training):
            factor = 0.0 if self.momentum is None else self.momentum
            if self.training and self.momentum is None:  # the cumulative moving average, this batch included
                factor = 1.0 / float(counter + 1)
            try:
                output = _ops.batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, factor, self.eps, self.rmax, self.dmax)
            except ShapeMismatchError:
                _blame_input_channels(input, self.num_features)
                raise
            if self.training:
                counter.add_(1)
            return output

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}"


class BatchRenorm1d(_BatchRenormForward, torch.nn.BatchNorm1d):
    """Batch renormalization of (N, C) or (N, C, L) inputs."""


class BatchRenorm2d(_BatchRenormForward, torch.nn.BatchNorm2d):
    """Batch renormalization of (N, C, H, W) inputs, NCHW or channels-last."""


class BatchRenorm3d(_BatchRenormForward, torch.nn.BatchNorm3d):
    """Batch renormalization of (N, C, D, H, W) inputs, NCDHW or channels-last."""


# ---------------------------------------------------------------- instance norm


class _InstanceNormForward(_BncoreModule, _InstanceNormBase):
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


class _LayerNormForward(_BncoreModule, _LayerNormBase):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _GroupNormForward(_BncoreModule, _GroupNormBase):
    """torch.nn.GroupNorm's forward, with torch.nn.functional.group_norm's input checks."""

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


class _RMSNormForward(_BncoreModule, _RMSNormBase):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm(_LayerNormForward, torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by bncore."""


class GroupNorm(_GroupNormForward, torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by bncore, with torch.nn.functional.group_norm's input checks."""


class RMSNorm(_RMSNormForward, torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by bncore (eps=None: the machine epsilon of the compute type, float32's
    for half inputs, as PyTorch)."""


class _Float32RMSNormForward(_BncoreModule, _ModuleBase):
    """The forward of the RMS norms of Llama, Mistral, Qwen and most transformers models:
    ``weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)``, with the epsilon in
    ``variance_epsilon`` (transformers) or ``eps``. bncore accumulates half inputs in float32 and
    rounds once to the input's dtype, which is that cast back; the weight then multiplies in the
    promoted dtype, as the original does. Where the cast back is exact (the weight's dtype is the
    input's, float32 or float64), bncore applies the weight in the same pass."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = getattr(self, "eps")  # noqa: B009  (one of the two is there: convert checked it)
        weight: torch.Tensor = getattr(self, "weight")  # noqa: B009
        if hidden_states.dtype == weight.dtype and hidden_states.dtype in (torch.float32, torch.float64):
            return _ops.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, float(eps))
        normalized = _ops.rms_norm(hidden_states, (hidden_states.shape[-1],), None, float(eps))
        return weight * normalized


# ---------------------------------------------------------------- convert

_log = logging.getLogger("bncore.torch")

# torch.nn's norm classes: bncore's class for each, and the forward that bncore's twin of a subclass takes
_TORCH_NORMS: dict[type, tuple[type, type]] = {
    torch.nn.BatchNorm1d: (BatchNorm1d, _BatchNormForward), torch.nn.BatchNorm2d: (BatchNorm2d, _BatchNormForward),
    torch.nn.BatchNorm3d: (BatchNorm3d, _BatchNormForward),
    torch.nn.InstanceNorm1d: (InstanceNorm1d, _InstanceNormForward),
    torch.nn.InstanceNorm2d: (InstanceNorm2d, _InstanceNormForward),
    torch.nn.InstanceNorm3d: (InstanceNorm3d, _InstanceNormForward),
    torch.nn.LayerNorm: (LayerNorm, _LayerNormForward), torch.nn.GroupNorm: (GroupNorm, _GroupNormForward),
    torch.nn.RMSNorm: (RMSNorm, _RMSNormForward),
}

Factory = Callable[[torch.nn.Module], torch.nn.Module]
Probe = Callable[[torch.nn.Module], torch.Tensor]
_REGISTRY: dict[type, tuple[Factory, Probe | None]] = {}


def register(cls: type, factory: Factory, *, probe: Probe | None = None) -> None:
    """Teaches `convert` a normalization class of your own (or of a library): each module of exactly
    `cls` is replaced by ``factory(module)``, once the replacement has given the original's output on a
    probe input: ``probe(module)`` when given, else a random (2, 3, *weight.shape) input in the
    weight's dtype. A replacement that differs, or raises, is not swapped in, and the report says why.
    `as_bncore(module, forward)` makes the usual replacement: the module itself, under a subclass of
    its class whose forward is `forward`'s. A later registration of `cls` replaces the earlier one."""
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise TypeError(f"cls: expected a torch.nn.Module subclass, got {cls!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable (module -> replacement module), got {type(factory).__name__}")
    if probe is not None and not callable(probe):
        raise TypeError(f"probe: expected a callable (module -> input tensor) or None, got {type(probe).__name__}")
    _REGISTRY[cls] = (factory, probe)


_TWINS: dict[tuple[type, type], type] = {}


def _twin(cls: type, forward: type) -> type:
    """`cls` with bncore's forward (the mixin `forward` first in its MRO): bncore's class for torch.nn's
    own, else one made once per class, named as `cls` (the repr shows bncore.<name>)."""
    for torch_cls, (ours, mixin) in _TORCH_NORMS.items():
        if cls is torch_cls and forward is mixin:
            return ours
    twin = _TWINS.get((cls, forward))
    if twin is None:
        twin = _TWINS[(cls, forward)] = type(cls.__name__, (forward, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__module__}.{cls.__qualname__} computed by bncore."})
    return twin


def as_bncore(module: torch.nn.Module, forward: type) -> torch.nn.Module:
    """`module` as an instance of its class with `forward`'s forward (a bncore mixin): the same
    Parameter and buffer objects, attributes, training mode and hooks (forward, forward-pre,
    backward, state_dict); the original is left as it was."""
    twin = _twin(type(module), forward)
    replacement: torch.nn.Module = object.__new__(twin)  # torch.nn.Module has no __new__ of its own
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(state[key])
    state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
    replacement.__dict__.update(state)  # the hook dictionaries are shared, so the handles still remove them
    return replacement


def _torch_base(cls: type) -> type | None:
    for base in cls.__mro__:
        if base in _TORCH_NORMS:
            return base
    return None


def _looks_like_float32_rms(module: torch.nn.Module) -> bool:
    """transformers' LlamaRMSNorm and its many copies (Mistral, Qwen2, ...): a class named *RMSNorm
    with a 1-D ``weight`` and a float ``variance_epsilon`` or ``eps``. The probe decides the rest."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter)
            and weight.dim() == 1 and isinstance(eps, float))


def _default_probe(module: torch.nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError("it has no weight to shape a probe input from; pass probe= to bncore.torch.register")
    gen = torch.Generator(device=weight.device).manual_seed(0)
    return torch.randn((2, 3, *weight.shape), generator=gen, device=weight.device, dtype=weight.dtype)


def _probe_mismatch(original: torch.nn.Module, replacement: torch.nn.Module, probe: Probe | None) -> str | None:
    """Why `replacement` may not stand in for `original` (None: their outputs agree on a probe input,
    within torch.testing's tolerance for the dtype). Deep copies run it, with no hooks, so that no
    state moves."""
    if any(t.device.type == "meta" for t in original.parameters()):
        return "its parameters are on the meta device, so no probe input can check the replacement"
    try:
        x = (probe or _default_probe)(original)
        with torch.no_grad():
            expected = copy.deepcopy(original).forward(x)
            got = copy.deepcopy(replacement).forward(x)
        torch.testing.assert_close(got, expected)
    except Exception as exc:  # noqa: BLE001  (any failure means: do not swap; the report says which)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"its bncore replacement does not match it on a probe input ({first})"
    return None


class ConvertReport:
    """What `convert` did: ``replaced`` lists (module name, original class, bncore class), ``skipped``
    lists (module name, class, reason) for every normalization it found and left alone."""

    def __init__(self, action: str = "convert") -> None:
        self.action = action  # the function that reports: convert, or fuse (which uses the same report)
        self.replaced: list[tuple[str, str, str]] = []
        self.skipped: list[tuple[str, str, str]] = []

    def __str__(self) -> str:
        lines = [f"bncore.torch.{self.action}: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {name}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  skipped  {name}: {cls}: {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)

    __repr__ = __str__


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_NORM_BASES = (torch.nn.modules.batchnorm._NormBase, torch.nn.LocalResponseNorm, torch.nn.CrossMapLRN2d)


def _convert_one(module: torch.nn.Module) -> tuple[torch.nn.Module | None, str | None]:
    """(replacement, None), (None, why it is skipped), or (None, None) for a module that is no norm."""
    cls = type(module)
    if isinstance(module, _BncoreModule):
        return None, "already bncore's"
    if cls in _REGISTRY:
        factory, probe = _REGISTRY[cls]
        try:
            replacement = factory(module)
        except Exception as exc:  # noqa: BLE001  (the registered factory refused: report it, change nothing)
            return None, f"its registered factory raised {type(exc).__name__}: {exc}"
        why = _probe_mismatch(module, replacement, probe)
        return (None, why) if why else (replacement, None)
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and isinstance(module, _NORM_BASES):
        become = getattr(module, "cls_to_become", None)
        return None, ("a lazy module: convert it after its first forward, which makes it a "
                      f"{getattr(become, '__name__', 'torch.nn norm')}")
    base = _torch_base(cls)
    if base is not None:
        if getattr(cls, "forward") is not getattr(base, "forward"):  # noqa: B009
            return None, (f"it overrides forward ({cls.__qualname__}.forward), so bncore cannot know what it "
                          "computes; teach convert with bncore.torch.register")
        return as_bncore(module, _TORCH_NORMS[base][1]), None
    if isinstance(module, torch.nn.SyncBatchNorm):
        return None, "torch.nn.SyncBatchNorm: bncore.torch.SyncBatchNorm.convert_sync_batchnorm converts it"
    if _looks_like_float32_rms(module):
        replacement = as_bncore(module, _Float32RMSNormForward)
        why = _probe_mismatch(module, replacement, None)
        return (None, why) if why else (replacement, None)
    if isinstance(module, _NORM_BASES) or "Norm" in cls.__name__:
        return None, "bncore knows no equivalent; teach convert with bncore.torch.register"
    return None, None


def _walk(module: torch.nn.Module, name: str, report: ConvertReport) -> torch.nn.Module:
    replacement, why = _convert_one(module)
    label = name or "(the model itself)"
    if replacement is not None:
        report.replaced.append((label, _class_name(type(module)), f"bncore.{type(replacement).__name__}"))
        output = replacement
    else:
        if why is not None:
            report.skipped.append((label, _class_name(type(module)), why))
        output = module
    for child_name, child in module.named_children():
        output.add_module(child_name, _walk(child, f"{name}.{child_name}" if name else child_name, report))
    return output


def convert(module: torch.nn.Module, *, report: bool = False) -> Any:
    """Replaces every normalization layer in `module`, recursively, with bncore's, and says what it did.

    Converted: torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm and RMSNorm,
    and their subclasses whose forward is torch's own (each becomes a subclass of its own class with
    bncore's forward); the RMS norms of transformers models (LlamaRMSNorm and the like: a class named
    *RMSNorm with ``weight`` and ``variance_epsilon`` or ``eps``, computing in float32 and casting
    back), once a probe input gives the same output; classes taught with `register`. Skipped, with
    the reason: subclasses that override forward, lazy modules, torch's SyncBatchNorm, other
    norms bncore does not know.

    A replacement holds the same Parameter and buffer objects (devices, dtypes and optimizer state
    carry over), attributes, training mode and hooks (forward, forward-pre, backward). Containers are
    changed in place. Returns `module` (or its replacement when it is itself a norm); with
    ``report=True``, ``(module, ConvertReport)``. Every replacement and skip is logged at INFO on the
    ``bncore.torch`` logger.
    """
    found = ConvertReport()
    output = _walk(module, "", found)
    _log.info("%s", found)
    return (output, found) if report else output


from ._torch_sync import SyncBatchNorm  # noqa: E402
from ._torch_fold import fold  # noqa: E402
from ._torch_fuse import fuse  # noqa: E402
