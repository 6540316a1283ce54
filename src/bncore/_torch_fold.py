"""`bncore.torch.fold(model)`: every eval-mode batch norm that directly follows a Conv, ConvTranspose
or Linear folded into that layer's weight and bias (by `bncore.fold`), the batch norm removed.

"Directly follows" is found two ways: by tracing the model with ``torch.fx`` (any model fx can
trace: the batch norm's only input is the layer's output, and nothing else reads that output), and
otherwise in ``nn.Sequential`` containers (the batch norm is the next module after the layer). A
batch norm that neither finds a foldable producer for is refused with a message naming it.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from . import functional as _F
from .torch import _BncoreModule

_PRODUCERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
              torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)  # bncore's subclass them


def fold(model: torch.nn.Module, *, inplace: bool = False) -> torch.nn.Module:
    """An eval-mode model with every batch norm that directly follows a Conv1d/2d/3d, ConvTranspose1d/2d/3d
    or Linear folded into it: ``w' = w * gamma / sqrt(var + eps)`` along the output channels,
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (computed in float64), and the batch norm
    replaced by ``nn.Identity`` (or, for a traced model, removed from the graph). Outputs equal the
    unfolded model's in eval mode to float rounding.

    The model is copied unless ``inplace`` (then the model itself is folded too, and a traced model's
    result is a new GraphModule sharing its layers). Raises ValueError, changing nothing, when a batch norm has
    no producer to fold into (it follows another kind of layer, its producer's output is used
    elsewhere too, or it has no running statistics), naming every such batch norm."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")
    target = model if inplace else copy.deepcopy(model)
    pairs, traced = _pairs_by_fx(target)
    if pairs is None:
        pairs = _pairs_in_sequentials(target)
    folded = {bn for _, bn, _ in pairs}
    refused = [f"{name or 'model'} ({type(module).__name__}): {_why(traced)}"
               for name, module in target.named_modules()
               if isinstance(module, _NORMS) and name not in folded]
    for _, bn_name, _ in pairs:
        bn = target.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            refused.append(f"{bn_name} ({type(bn).__name__}): it has no running statistics "
                           f"(track_running_stats=False normalizes by batch statistics even in eval mode)")
    if refused:
        raise ValueError("fold: cannot fold these batch norms, so nothing was changed:\n  " + "\n  ".join(refused))
    target.eval()
    root = traced if traced is not None else target  # a GraphModule holds the model's own submodules
    with torch.no_grad():
        for producer_name, bn_name, _ in pairs:
            _fold_pair(root.get_submodule(producer_name), root.get_submodule(bn_name))
    for _, bn_name, _ in pairs:  # the model itself stays consistent (it shares its producers with the graph)
        _set_submodule(target, bn_name, torch.nn.Identity())
    if traced is not None:
        for node in list(traced.graph.nodes):
            if node.op == "call_module" and node.target in folded:
                node.replace_all_uses_with(node.args[0])
                traced.graph.erase_node(node)
        traced.graph.lint()
        traced.delete_all_unused_submodules()
        traced.recompile()
        return traced.eval()
    return target


def trace(model: torch.nn.Module) -> torch.fx.GraphModule | None:
    """The model traced by torch.fx (its own submodules in the graph), or None when fx cannot trace it
    (fold and fuse then look in its nn.Sequential containers instead)."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # any tracing failure: the caller's Sequential walk takes over
        return None
    name = model.__class__.__name__ if isinstance(model, torch.nn.Module) else "GraphModule"
    return torch.fx.GraphModule(model, graph, name)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with bncore's modules as leaves like torch.nn's own (fx would otherwise trace
    into their forward, which inspects the input and cannot be traced)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BncoreModule) or super().is_leaf_module(m, module_qualified_name)


def _pairs_by_fx(model: torch.nn.Module) -> tuple[list[tuple[Any, Any, Any]] | None, Any]:
    """(producer, batch norm) pairs of the traced graph, and the GraphModule; (None, None) when fx cannot
    trace the model."""
    traced = trace(model)
    if traced is None:
        return None, None
    modules = dict(traced.named_modules())
    pairs: list[tuple[Any, Any, Any]] = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), _PRODUCERS) and len(src.users) == 1):
            pairs.append((src.target, node.target, None))
    # a module called at several places of the graph is folded only if every call is such a pair
    calls: dict[Any, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = [p for p in pairs if calls[p[0]] == 1 and calls[p[1]] == 1]
    return pairs, traced


def _pairs_in_sequentials(model: torch.nn.Module) -> list[tuple[str, str, Any]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, _PRODUCERS) and isinstance(b, _NORMS):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name, None))
    return pairs


def _why(traced: Any) -> str:
    if traced is None:
        return ("the model cannot be traced by torch.fx and this batch norm is not right after a Conv, "
                "ConvTranspose or Linear in an nn.Sequential")
    return ("it does not directly follow a Conv, ConvTranspose or Linear whose output only it reads "
            "(in the traced graph)")


def _fold_pair(producer: Any, bn: Any) -> None:
    weight = producer.weight
    transposed = isinstance(producer, torch.nn.modules.conv._ConvTransposeNd)
    groups = getattr(producer, "groups", 1)
    channels = producer.out_channels if hasattr(producer, "out_channels") else producer.out_features
    if channels != bn.num_features:
        raise ValueError(f"fold: {type(producer).__name__} gives {channels} channels but the batch norm after it "
                         f"has num_features={bn.num_features}")
    w = weight.detach()
    if transposed and groups > 1:
        # (in, out/groups, k...): output channel g*(out/groups) + j of weight[g*(in/groups) + i, j]
        k = w.shape[2:]
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], *k).transpose(0, 1).reshape(
            w.shape[0] // groups, channels, *k)
    bias = producer.bias.detach() if producer.bias is not None else None
    gamma = bn.weight.detach() if bn.weight is not None else None
    beta = bn.bias.detach() if bn.bias is not None else None
    fw, fb = _F.fold(w, bias, bn.running_mean, bn.running_var, gamma, beta, bn.eps, axis=1 if transposed else 0)
    if transposed and groups > 1:
        k = fw.shape[2:]
        fw = fw.reshape(fw.shape[0], groups, channels // groups, *k).transpose(0, 1).reshape(weight.shape)
    weight.data = fw.to(weight.dtype).contiguous()
    if producer.bias is None:
        producer.bias = torch.nn.Parameter(fb.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        producer.bias.data = fb.to(producer.bias.dtype)


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
