"""bncore.steps: batch norm's composable steps over any DLPack tensor.

One forward is ``stats`` -> (combine the moments: ``merge``, a collective) ->
``forward`` with the combined statistics; one backward is ``backward_reduce`` ->
(sum the sums) -> ``backward_apply`` with the combined count. Between the steps the
caller may move numbers between processes (see `bncore.sync`); composed on one
tensor, they give bitwise the numbers of ``bncore.batch_norm_forward`` /
``batch_norm_backward`` (``tests/c/test_steps.c`` proves it for the C steps).

Each function is one call of the C ABI (``bn_norm_stats``, ``bn_moments_merge``,
``bn_norm_forward`` with ``BN_FLAG_GIVEN_STATS``, ``bn_norm_backward_reduce``,
``bn_norm_backward_apply``): argument marshalling only, every number is computed in
C, which also checks shapes, dtypes, devices and overlaps and names the argument
at fault. Statistic arguments are per channel of ``axis`` (C values); outputs that
the caller passes are written in place (any float dtype; float64 keeps every digit
the C core computed), outputs that it does not pass come back in the input's array
type.
"""
from __future__ import annotations

from . import _core
from ._arrays import Allocator, stat_dtype
from ._arrays import Call as _Call


def _desc(x, axis, eps=0.0, flags=0, momentum=0.0):
    return _core.Desc.batch(x.ndim, axis, float(eps)).with_options(flags, momentum)


def _output(call, obj, what):
    """Imports a required output tensor (writable)."""
    if obj is None:
        raise TypeError(f"{what}: expected a writable tensor that supports DLPack, got None")
    return call.add(obj, what, True)


def stats(input, mean, m2, *, axis=1) -> int:
    """Step 1: each channel's mean and m2 (the sum of squared deviations from the mean)
    over every axis but ``axis``, written into ``mean`` and ``m2`` (writable tensors of C
    values); returns the number of elements behind each channel (0 for an empty input,
    whose moments are zeros). The very numbers the one-call forward computes."""
    with _Call() as call:
        x = call.need(input, "input")
        return _core.norm_stats(_desc(x, axis), x, _output(call, mean, "mean"), _output(call, m2, "m2"))


def merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b, count, mean, m2) -> None:
    """Step 2: Chan's merge of two sets of moments, elementwise (counts: one value per entry,
    or one for all). ``count`` may be None; each output may be its own a- or b-side input."""
    with _Call() as call:
        ca, ma, qa, cb, mb, qb = [call.need(t, name) for t, name in (
            (count_a, "count_a"), (mean_a, "mean_a"), (m2_a, "m2_a"),
            (count_b, "count_b"), (mean_b, "mean_b"), (m2_b, "m2_b"))]
        _core.moments_merge(ca, ma, qa, cb, mb, qb, call.add(count, "count", True), _output(call, mean, "mean"),
                            _output(call, m2, "m2"))


def forward(input, mean, m2, count, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
            running_var=None, momentum=0.1, stats=None, out=None):
    """Step 3: batch norm of ``input`` with given statistics: ``mean`` and ``m2`` per channel over
    ``count`` elements (var = m2 / count). Running statistics, when given, are updated from
    them: ``running_mean`` / ``running_var`` in place with ``momentum`` (the unbiased variance
    m2 / (count - 1)), or a ``bncore.RunningStats`` (``stats``) by its own rule. Returns
    ``(output, save_mean, save_rstd)`` in the input's array type; ``out`` may receive the output.
    """
    with _Call() as call:
        x = call.need(input, "input")
        flags = _core.FLAG_GIVEN_STATS
        updates = stats is not None or running_mean is not None or running_var is not None
        if updates:
            flags |= _core.FLAG_UPDATE_RUNNING_STATS
        desc = _desc(x, axis, eps, flags, float(momentum) if updates and stats is None else 0.0)
        channels = x.shape[axis]
        alloc = Allocator(input, x)
        y_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
        sm_obj, sr_obj = alloc.empty((channels,), stat_dtype(x.dtype)), alloc.empty((channels,), stat_dtype(x.dtype))
        w, b = call.add(weight, "weight"), call.add(bias, "bias")
        gm, gq = call.need(mean, "mean"), call.need(m2, "m2")
        y = call.add(y_obj, "out", True)
        sm, sr = call.add(sm_obj, "save_mean", True), call.add(sr_obj, "save_rstd", True)
        if stats is not None:
            _core.norm_forward_stats(desc, x, w, b, stats._handle, y, sm, sr, gm, gq, int(count))
        else:
            rm, rv = call.add(running_mean, "running_mean", True), call.add(running_var, "running_var", True)
            _core.norm_forward(desc, x, w, b, rm, rv, y, sm, sr, gm, gq, int(count))
        return alloc.finish(y_obj), alloc.finish(sm_obj), alloc.finish(sr_obj)


def backward_reduce(grad_output, input, save_mean, save_rstd, sum_dy, sum_dy_xhat, *, axis=1) -> None:
    """Backward step 1: per channel ``sum_dy = sum(dy)`` and ``sum_dy_xhat = sum(dy * xhat)``
    (grad_bias and grad_weight of this input), written into the given tensors (either may be None)."""
    with _Call() as call:
        x = call.need(input, "input")
        _core.norm_backward_reduce(_desc(x, axis), x, call.need(grad_output, "grad_output"),
                                   call.need(save_mean, "save_mean"), call.need(save_rstd, "save_rstd"),
                                   call.add(sum_dy, "sum_dy", True), call.add(sum_dy_xhat, "sum_dy_xhat", True))


def backward_apply(grad_output, input, weight, save_mean, save_rstd, sum_dy, sum_dy_xhat, count, *, axis=1,
                   out=None):
    """Backward step 2: grad_input from the (combined) sums of step 1 and the number of elements
    behind them, ``dx = rstd * w * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``. Returns
    grad_input in the input's array type (``out`` may receive it; it may be ``grad_output``)."""
    with _Call() as call:
        x = call.need(input, "input")
        alloc = Allocator(input, x)
        dx_obj = out if out is not None else alloc.empty(x.shape, x.dtype, like_layout=input)
        _core.norm_backward_apply(_desc(x, axis), x, call.need(grad_output, "grad_output"), call.add(weight, "weight"),
                                  call.need(save_mean, "save_mean"), call.need(save_rstd, "save_rstd"),
                                  call.need(sum_dy, "sum_dy"), call.need(sum_dy_xhat, "sum_dy_xhat"), int(count),
                                  call.add(dx_obj, "out", True))
        return alloc.finish(dx_obj)
