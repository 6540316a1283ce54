"""bncore.torch.SyncBatchNorm: torch.nn.SyncBatchNorm computed by bncore, on CPU tensors too.

A subclass of torch.nn.modules.batchnorm._BatchNorm with torch.nn.SyncBatchNorm's
constructor, parameters, buffers, state_dict keys, input checks and
``convert_sync_batchnorm``. Not a subclass of torch.nn.SyncBatchNorm itself:
DistributedDataParallel refuses every CPU module holding one ("SyncBatchNorm layers
only work with GPU modules"), which is the case this class exists for. In training with an initialized
process group of more than one rank, the forward and backward run bncore's
synchronized steps (`bncore.sync`) inside a ``torch.autograd.Function``, whose
collectives are ``torch.distributed.all_reduce`` over the module's process group:
one all-reduce of world x (2C+1) float64 values forward, one of 2C+2 backward, so it
works over gloo (CPU tensors, which torch's own refuses) as over any backend whose
all-reduce takes CPU tensors. Otherwise (evaluation, no process group, one rank) it is
bncore's plain batch norm, `bncore.torch.BatchNorm2d`'s forward.

As torch's: running statistics are updated from the global mean and unbiased variance
(identically on every rank), ``momentum=None`` is the cumulative average, grad_input is
the gradient of the loss summed over every rank, and grad_weight / grad_bias are each
rank's own contribution (DistributedDataParallel reduces them). As bncore.torch's other
layers: ``num_batches_tracked`` moves only after bncore has succeeded, and a rank whose
input is bad raises its own error while the others raise `bncore.sync.SyncError`,
instead of hanging in a collective. No number is computed here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import sync as _sync
from .torch import _BatchNormForward


def _collective(group) -> _sync.Collective:
    """torch.distributed's all-reduce of a NumPy buffer, through a CPU tensor sharing its memory."""

    def allreduce(buffer):
        dist.all_reduce(torch.from_numpy(buffer), op=dist.ReduceOp.SUM, group=group)

    return _sync.Collective(allreduce, dist.get_rank(group), dist.get_world_size(group))


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = sync_batch_norm(x; weight, bias); running statistics, when given, updated in the forward."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, collective, num_features):
        y, saved = _sync.sync_batch_norm_forward(input, weight, bias, comm=collective, num_features=num_features,
                                                 eps=eps, running_mean=running_mean, running_var=running_var,
                                                 momentum=momentum)
        ctx.collective, ctx.count, ctx.num_features = collective, saved.count, num_features
        ctx.save_for_backward(input, weight, saved.save_mean, saved.save_rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, save_mean, save_rstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        saved = _sync.SyncSaved(input, save_mean, save_rstd, ctx.count, 1, ctx.num_features)
        grad_input, grad_weight, grad_bias = _sync.sync_batch_norm_backward(
            grad_output, saved, comm=ctx.collective, weight=weight, input_grad=need_input)
        return (grad_input,
                _as_param_grad(grad_weight, weight) if need_weight else None,
                _as_param_grad(grad_bias, weight) if need_bias else None,
                None, None, None, None, None, None)


def _as_param_grad(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(values).to(dtype=like.dtype, device=like.device)


class SyncBatchNorm(_BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm computed by bncore: (N, C, *) inputs of any rank >= 2, contiguous or
    channels-last, on CPU over gloo. Same constructor (num_features, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True, process_group=None, device=None, dtype=None, *, bias=True)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):  # torch.nn.SyncBatchNorm's checks and messages
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _syncs(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self._group()) > 1

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not self._syncs():
            return super().forward(input)  # bncore.torch's plain batch norm forward
        if self.eps <= 0.0:  # torch.nn.functional.batch_norm's check in training
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        batches = self.num_batches_tracked if self.track_running_stats else None
        factor = 0.0 if self.momentum is None else self.momentum
        if batches is not None and self.momentum is None:  # the cumulative average, over this batch included
            factor = 1.0 / float(batches + 1)
        tracked = self.track_running_stats
        output = _SyncBatchNormFunction.apply(input, self.weight, self.bias,
                                              self.running_mean if tracked else None,
                                              self.running_var if tracked else None,
                                              float(self.eps), float(factor), _collective(self._group()),
                                              self.num_features)
        if batches is not None:
            batches.add_(1)
        return output

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, making bncore's SyncBatchNorm: every
        batch norm layer in `module` (any torch.nn.modules.batchnorm._BatchNorm) is replaced,
        recursively; the new layers hold the same Parameter and buffer objects and the same
        training mode (and qconfig). Returns `module`, or its replacement when it is itself one."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # built on the meta device (no allocation): every tensor is the original's own
            output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, device="meta", bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output
