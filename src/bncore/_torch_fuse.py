"""`bncore.torch.fuse(model)`: every batch norm followed by a ReLU, or by an add then a ReLU (a residual
block's ``relu(bn(conv(x)) + identity)``), becomes one `bncore.torch.BatchNormReLU*d` that computes
``relu(bn(x) + residual)`` in one pass over memory.

Patterns are found as `fold` finds its pairs: by tracing with ``torch.fx`` (any model fx can trace;
the batch norm's output must be read by the ReLU or the add only, and the add's by the ReLU only),
and otherwise in ``nn.Sequential`` containers (a batch norm right before an ``nn.ReLU``).
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch

from ._torch_fold import _set_submodule, trace
from .torch import (BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, ConvertReport, _BatchNormForward,
                    _BatchRenormForward, _class_name)

_FUSED = {torch.nn.BatchNorm1d: BatchNormReLU1d, torch.nn.BatchNorm2d: BatchNormReLU2d,
          torch.nn.BatchNorm3d: BatchNormReLU3d}
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def fuse(model: torch.nn.Module, *, report: bool = False) -> Any:
    """`model` with every batch norm (torch.nn's or bncore's BatchNorm1d/2d/3d) that is followed by a
    ReLU, or by an add then a ReLU, replaced by a fused `bncore.torch.BatchNormReLU1d/2d/3d` (the same
    parameters and buffers; training mode kept). Outputs and gradients equal the unfused model's in
    training and eval mode, to float rounding (the fused module computes with bncore).

    Not fused, and reported with the reason: a batch norm whose output is read elsewhere too (then
    it must exist unrectified), one called at several places, batch renormalization, SyncBatchNorm,
    lazy modules and subclasses that override forward. A traced model comes back as a
    ``torch.fx.GraphModule``; otherwise the batch norms and ReLUs of its ``nn.Sequential`` containers
    are fused (the ReLU becomes ``nn.Identity``). The model itself is left as it was: the result is
    built from a copy. With ``report=True``, returns ``(model, ConvertReport)``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")
    target = copy.deepcopy(model)
    found = ConvertReport("fuse")
    traced = trace(target)
    output = _fuse_graph(traced, found) if traced is not None else _fuse_sequentials(target, found)
    return (output, found) if report else output


def _unfusable(module: Any) -> str | None:
    """Why this batch norm (any torch.nn _BatchNorm) cannot become a fused one, or None."""
    if not isinstance(module, tuple(_FUSED)):
        return f"only BatchNorm1d/2d/3d are fused, not {type(module).__name__}"
    if isinstance(module, _BatchRenormForward):
        return "batch renormalization has no fused epilogue"
    base: Any = next(cls for cls in _FUSED if isinstance(module, cls))
    forward = getattr(type(module), "forward")  # noqa: B009  (mypy types the module as object here)
    if forward is not base.forward and forward is not getattr(_BatchNormForward, "forward"):  # noqa: B009
        return f"it overrides forward ({type(module).__qualname__}.forward)"
    return None


_BATCH_NORMS = torch.nn.modules.batchnorm._BatchNorm


def _fused_from(bn: torch.nn.Module) -> torch.nn.Module:
    base = next(cls for cls in _FUSED if isinstance(bn, cls))
    fused = _FUSED[base](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         virtual_batch_size=getattr(bn, "virtual_batch_size", None))
    for name in ("weight", "bias"):
        setattr(fused, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        fused.register_buffer(name, getattr(bn, name))
    return fused.train(bn.training)


def _is_relu(node: Any, modules: dict[str, Any], source: Any) -> bool:
    """Whether `node` is a ReLU of `source` (module, function or method spelling, in place or not)."""
    if not node.args or node.args[0] is not source or len(node.args) > 1:
        return False
    if node.op == "call_module":
        return type(modules.get(node.target)) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs


def _residual_of(node: Any, source: Any) -> Any:
    """The other operand when `node` adds `source` and one other tensor (no alpha; an in-place add
    must write into `source`, never into the residual), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        in_place = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        in_place = node.target == "add_"
    else:
        return None
    if a is source and b is not source:
        other = b
    elif b is source and a is not source and not in_place:
        other = a
    else:
        return None
    return other if isinstance(other, torch.fx.Node) else None


def _fuse_graph(traced: torch.fx.GraphModule, found: ConvertReport) -> torch.fx.GraphModule:
    modules = dict(traced.named_modules())
    calls: dict[Any, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(traced.graph.nodes):
        if node.op != "call_module":
            continue
        bn = modules.get(node.target)
        if not isinstance(bn, _BATCH_NORMS):
            continue
        why = _unfusable(bn)
        if why is None:
            why, pattern = _pattern(node, modules, calls)
        if why is not None:
            found.skipped.append((node.target, _class_name(type(bn)), why))
            continue
        add, relu, residual = pattern
        fused = _fused_from(bn)
        _set_submodule(traced, node.target, fused)
        with traced.graph.inserting_after(relu):
            call = traced.graph.call_module(node.target, (node.args[0],) if residual is None
                                            else (node.args[0], residual))
        relu.replace_all_uses_with(call)
        for dead in (relu, add, node):
            if dead is not None:
                traced.graph.erase_node(dead)
        found.replaced.append((node.target, _class_name(type(bn)) + (" + add + ReLU" if add is not None else
                                                                       " + ReLU"),
                               f"bncore.{type(fused).__name__}"))
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _pattern(node: Any, modules: dict[str, Any], calls: dict[Any, int]) -> tuple[str | None, Any]:
    """(None, (add or None, relu, residual or None)) for a batch norm node that can be fused, else
    (why not, None)."""
    if calls[node.target] != 1:
        return f"the module is called at {calls[node.target]} places of the graph", None
    if len(node.args) != 1 or node.kwargs:
        return "it is called with more than the input", None
    users = list(node.users)
    if len(users) != 1:
        return f"its output is read by {len(users)} operations, not by a ReLU only", None
    user = users[0]
    if _is_relu(user, modules, node):
        return None, (None, user, None)
    residual = _residual_of(user, node)
    if residual is not None and len(user.users) == 1:
        relu = next(iter(user.users))
        if _is_relu(relu, modules, user):
            return None, (user, relu, residual)
    return "it is not followed by a ReLU, or by an add of one other tensor and then a ReLU", None


def _fuse_sequentials(model: torch.nn.Module, found: ConvertReport) -> torch.nn.Module:
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            prefix = f"{name}." if name else ""
            if not isinstance(a, _BATCH_NORMS):
                continue
            why = _unfusable(a)
            if why is None and type(b) is not torch.nn.ReLU:
                why = ("the model cannot be traced by torch.fx, and in its nn.Sequential the batch norm is not "
                       "followed by an nn.ReLU")
            if why is not None:
                found.skipped.append((prefix + a_name, _class_name(type(a)), why))
                continue
            fused = _fused_from(a)
            _set_submodule(model, prefix + a_name, fused)
            _set_submodule(model, prefix + b_name, torch.nn.Identity())
            found.replaced.append((prefix + a_name, _class_name(type(a)) + " + ReLU", f"bncore.{type(fused).__name__}"))
    return model
