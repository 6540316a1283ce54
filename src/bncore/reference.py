"""bncore.reference: one plain float64 NumPy reference for every normalization variant.

Everything bncore computes is checked against the two functions here, by the
test suite and by ``python -m bncore bench`` alike (shipped so that both, and
downstream users, read the same formulas). They are
written for clarity, not speed, in float64, from the formulas of bncore.h:

    forward:   y = (x - mean_g) * rstd_g * weight[p] + bias[p],  rstd_g = 1 / sqrt(var_g + eps)
    backward:  dx      = rstd_g * (dy*w - mean_g(dy*w) - xhat * mean_g(dy*w*xhat))   (batch statistics)
               dx      = rstd_g * dy * w                                           (given statistics)
               dweight = sum(dy * xhat),  dbias = sum(dy)   over the elements of each parameter index

A statistic group is the set of elements whose indices agree on every axis NOT
in `reduce_axes`; `weight` / `bias` (and given statistics) are indexed by the
axes in `affine_axes` (any subset of the axes), row-major over them in axis order.

The variants are one-line calls:

    batch norm     normalize_ref(x, all_but(ndim, c), (c,), w, b)
    layer norm     normalize_ref(x, trailing(ndim, k), trailing(ndim, k), w, b)
    instance norm  normalize_ref(x, tuple(range(2, ndim)), (1,), w, b)
    RMS norm       normalize_ref(x, trailing(ndim, k), trailing(ndim, k), w, rms=True)
    group norm     reshape (N, C, *) to (N, G, C/G, *) first, then as instance norm over (2, 3, ...)

Every function computes in float64 unless given ``dtype=`` (keyword only): the bench
evaluates these same formulas at the input's dtype (float32) as its plain-NumPy
contender, so that there is one copy of them, not a reference and a contender.
"""
from __future__ import annotations

import numpy as np


def _axes(axes, ndim):
    """Axes as a sorted tuple of non-negative ints (negative ones count from the end)."""
    if isinstance(axes, (int, np.integer)):
        axes = (axes,)
    out = sorted({int(a) % ndim for a in axes})
    return tuple(out)


def all_but(ndim, axis):
    """Every axis of an ndim-dimensional tensor except `axis` (batch norm's reduce axes)."""
    axis %= ndim
    return tuple(d for d in range(ndim) if d != axis)


def trailing(ndim, k):
    """The last k axes (layer / RMS norm)."""
    return tuple(range(ndim - k, ndim))


def _param_view(p, shape, affine_axes, dtype=np.float64):
    """A per-parameter-index array broadcast against x: the affine axes keep their size, others are 1."""
    bshape = [shape[d] if d in affine_axes else 1 for d in range(len(shape))]
    return np.asarray(p, dtype=dtype).reshape(bshape)


def _group_shape(shape, reduce_axes):
    """x's shape with each reduce axis kept as 1: the shape of per-group statistics, broadcast against x."""
    return [1 if d in reduce_axes else s for d, s in enumerate(shape)]


def _stats(x, reduce_axes, eps, rms):
    """Biased mean and variance of each group (keepdims), and rstd, in x's dtype."""
    if rms:
        mean = np.zeros(_group_shape(x.shape, reduce_axes), dtype=x.dtype)
        var = np.mean(x * x, axis=reduce_axes, keepdims=True)
    else:
        mean = np.mean(x, axis=reduce_axes, keepdims=True)
        var = np.mean((x - mean) ** 2, axis=reduce_axes, keepdims=True)  # two-pass: exact enough in float64
    rstd = 1.0 / np.sqrt(var + eps)
    return mean, var, rstd


def _given_stats(shape, affine_axes, mean, var, eps, dtype=np.float64):
    mean = _param_view(mean, shape, affine_axes, dtype)
    var = _param_view(var, shape, affine_axes, dtype)
    return mean, var, 1.0 / np.sqrt(var + eps)


def normalize_ref(x, reduce_axes, affine_axes, weight=None, bias=None, eps=1e-5, rms=False, *,
                  running_mean=None, running_var=None, dtype=np.float64):
    """Forward reference. Returns ``(y, mean, rstd)`` in float64 (or in ``dtype``).

    ``mean`` / ``rstd`` are per statistic group: x's shape with the reduce axes removed
    (with given statistics: per parameter index, the affine axes' shape).
    ``running_mean`` / ``running_var`` (indexed like weight) replace the batch
    statistics when given (evaluation mode).
    """
    x = np.asarray(x, dtype=dtype)
    reduce_axes = _axes(reduce_axes, x.ndim)
    affine_axes = _axes(affine_axes, x.ndim)
    if running_mean is not None:
        mean, _, rstd = _given_stats(x.shape, affine_axes, running_mean, running_var, eps, dtype)
        squeeze = tuple(d for d in range(x.ndim) if d not in affine_axes)
    else:
        mean, _, rstd = _stats(x, reduce_axes, eps, rms)
        squeeze = reduce_axes
    y = (x - mean) * rstd
    if weight is not None:
        y = y * _param_view(weight, x.shape, affine_axes, dtype)
    if bias is not None:
        y = y + _param_view(bias, x.shape, affine_axes, dtype)
    return y, np.squeeze(mean, axis=squeeze), np.squeeze(rstd, axis=squeeze)


def normalize_backward_ref(dy, x, reduce_axes, affine_axes, weight=None, eps=1e-5, rms=False, *,
                           running_mean=None, running_var=None, saved_mean=None, saved_rstd=None,
                           dtype=np.float64):
    """Backward reference. Returns ``(dx, dweight, dbias)`` in float64 (or in ``dtype``).

    With ``running_mean`` / ``running_var`` the statistics are constants (eval mode).
    ``saved_mean`` / ``saved_rstd`` (both or neither; per statistic group, shaped as
    normalize_ref returns them) are the batch statistics the forward saved: used
    instead of recomputing them from x, as a framework's backward kernel does.
    ``dweight`` / ``dbias`` have the shape of the affine axes (``(C,)`` for batch norm).
    """
    x = np.asarray(x, dtype=dtype)
    dy = np.asarray(dy, dtype=dtype)
    reduce_axes = _axes(reduce_axes, x.ndim)
    affine_axes = _axes(affine_axes, x.ndim)
    w = 1.0 if weight is None else _param_view(weight, x.shape, affine_axes, dtype)
    if running_mean is not None:
        mean, _, rstd = _given_stats(x.shape, affine_axes, running_mean, running_var, eps, dtype)
    elif saved_mean is not None:
        group = _group_shape(x.shape, reduce_axes)
        mean = np.asarray(saved_mean, dtype=dtype).reshape(group)
        rstd = np.asarray(saved_rstd, dtype=dtype).reshape(group)
    else:
        mean, _, rstd = _stats(x, reduce_axes, eps, rms)
    xhat = (x - mean) * rstd
    g = dy * w
    if running_mean is not None:
        dx = rstd * g
    else:
        dx = g - xhat * np.mean(g * xhat, axis=reduce_axes, keepdims=True)
        if not rms:
            dx = dx - np.mean(g, axis=reduce_axes, keepdims=True)
        dx = rstd * dx
    sum_axes = tuple(d for d in range(x.ndim) if d not in affine_axes)
    pshape = tuple(x.shape[d] for d in affine_axes)
    dweight = np.sum(dy * xhat, axis=sum_axes).reshape(pshape)
    dbias = np.sum(dy, axis=sum_axes).reshape(pshape)
    return dx, dweight, dbias


def normalize_backward_bounds(dy, x, reduce_axes, affine_axes, weight=None, eps=1e-5, rms=False, *,
                              running_mean=None, running_var=None):
    """The sums of absolute values behind each backward result: ``(dx_bound, dweight_bound, dbias_bound)``,
    shaped as ``normalize_backward_ref``'s results.

    A computed sum of terms t_i errs by about eps_dtype * sum |t_i| (the standard summation bound),
    however much the terms cancel: these are the magnitudes a tolerance is relative to. For dx:
    rstd * (|g| + mean|g| + |xhat| * mean|g * xhat|), g = dy * weight (rstd * |g| with given statistics).
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.abs(np.asarray(dy, dtype=np.float64))
    reduce_axes = _axes(reduce_axes, x.ndim)
    affine_axes = _axes(affine_axes, x.ndim)
    w = 1.0 if weight is None else np.abs(_param_view(weight, x.shape, affine_axes))
    if running_mean is not None:
        mean, _, rstd = _given_stats(x.shape, affine_axes, running_mean, running_var, eps)
    else:
        mean, _, rstd = _stats(x, reduce_axes, eps, rms)
    xhat = np.abs((x - mean) * rstd)
    g = dy * w
    if running_mean is not None:
        dx = rstd * g
    else:
        dx = g + xhat * np.mean(g * xhat, axis=reduce_axes, keepdims=True)
        if not rms:
            dx = dx + np.mean(g, axis=reduce_axes, keepdims=True)
        dx = rstd * dx
    sum_axes = tuple(d for d in range(x.ndim) if d not in affine_axes)
    pshape = tuple(x.shape[d] for d in affine_axes)
    return dx, np.sum(dy * xhat, axis=sum_axes).reshape(pshape), np.sum(dy, axis=sum_axes).reshape(pshape)


def running_stats_ref(x, reduce_axes, affine_axes, running_mean, running_var, momentum, unbiased=True, *,
                      dtype=np.float64):
    """The running statistics after one training step: r = (1 - momentum) * r + momentum * batch,
    the batch value of a parameter index being the average over the statistic groups mapped to it;
    running_var receives the unbiased variance (n / (n - 1)) unless ``unbiased=False``.
    Empty groups leave the statistics untouched. Returns new float64 (or ``dtype``) arrays."""
    x = np.asarray(x, dtype=dtype)
    reduce_axes = _axes(reduce_axes, x.ndim)
    affine_axes = _axes(affine_axes, x.ndim)
    rm = np.asarray(running_mean, dtype=dtype).copy()
    rv = np.asarray(running_var, dtype=dtype).copy()
    n = int(np.prod([x.shape[d] for d in reduce_axes]))
    if x.size == 0 or n == 0:
        return rm, rv
    mean, var, _ = _stats(x, reduce_axes, 0.0, False)
    if unbiased:
        var = var * n / (n - 1) if n > 1 else var
    # per group: x's shape without the reduce axes; average the groups sharing a parameter index
    kept = [d for d in range(x.ndim) if d not in reduce_axes]
    assert set(affine_axes) <= set(kept), "running statistics need the affine axes to separate groups"
    between = tuple(i for i, d in enumerate(kept) if d not in affine_axes)
    mean_g = np.squeeze(mean, axis=reduce_axes)
    var_g = np.squeeze(var, axis=reduce_axes)
    mean_p = (np.mean(mean_g, axis=between) if between else mean_g).reshape(rm.shape)
    var_p = (np.mean(var_g, axis=between) if between else var_g).reshape(rv.shape)
    return (1 - momentum) * rm + momentum * mean_p, (1 - momentum) * rv + momentum * var_p


# ---------------------------------------------------------------- batch norm: one-line calls


def batch_norm_ref(x, weight=None, bias=None, eps=1e-5, axis=1, **stats):
    return normalize_ref(x, all_but(np.ndim(x), axis), (axis,), weight, bias, eps, **stats)


def batch_norm_backward_ref(dy, x, weight=None, eps=1e-5, axis=1, **stats):
    return normalize_backward_ref(dy, x, all_but(np.ndim(x), axis), (axis,), weight, eps, **stats)


def batch_norm_running_ref(x, running_mean, running_var, momentum, axis=1, *, dtype=np.float64):
    return running_stats_ref(x, all_but(np.ndim(x), axis), (axis,), running_mean, running_var, momentum,
                             dtype=dtype)


# ---------------------------------------------------------------- the other variants: one-line calls


def layer_norm_ref(x, k, weight=None, bias=None, eps=1e-5, rms=False, *, dtype=np.float64):
    """Layer norm (or RMS norm) over the last k axes; weight / bias have the shape of those axes."""
    ax = trailing(np.ndim(x), k)
    return normalize_ref(x, ax, ax, weight, bias, eps, rms, dtype=dtype)


def layer_norm_backward_ref(dy, x, k, weight=None, eps=1e-5, rms=False, **stats):
    ax = trailing(np.ndim(x), k)
    return normalize_backward_ref(dy, x, ax, ax, weight, eps, rms, **stats)


def instance_norm_ref(x, weight=None, bias=None, eps=1e-5, **stats):
    """Instance norm of (N, C, *): statistics per (n, c) (or the running ones, per channel)."""
    return normalize_ref(x, tuple(range(2, np.ndim(x))), (1,), weight, bias, eps, **stats)


def instance_norm_backward_ref(dy, x, weight=None, eps=1e-5, **stats):
    return normalize_backward_ref(dy, x, tuple(range(2, np.ndim(x))), (1,), weight, eps, **stats)


def instance_norm_running_ref(x, running_mean, running_var, momentum, *, dtype=np.float64):
    """PyTorch's rule: the batch average of the instances' mean and unbiased variance."""
    return running_stats_ref(x, tuple(range(2, np.ndim(x))), (1,), running_mean, running_var, momentum,
                             dtype=dtype)


def _grouped(x, num_groups, dtype=np.float64):
    """(N, C, *) -> (N, G, C/G, *): statistics over axes 2.., parameters over axes (1, 2)."""
    x = np.asarray(x, dtype=dtype)
    n, c = x.shape[:2]
    return x.reshape((n, num_groups, c // num_groups) + x.shape[2:])


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5, *, dtype=np.float64):
    """Group norm; returns (y, mean, rstd) with mean / rstd of shape (N, num_groups)."""
    xg = _grouped(x, num_groups, dtype)
    pshape = xg.shape[1:3]
    w = None if weight is None else np.reshape(weight, pshape)
    b = None if bias is None else np.reshape(bias, pshape)
    y, mean, rstd = normalize_ref(xg, tuple(range(2, xg.ndim)), (1, 2), w, b, eps, dtype=dtype)
    return y.reshape(np.shape(x)), mean, rstd


def group_norm_backward_ref(dy, x, num_groups, weight=None, eps=1e-5, *, dtype=np.float64, **stats):
    """Group norm's backward; saved statistics (``saved_mean`` / ``saved_rstd``) are (N, num_groups)."""
    xg = _grouped(x, num_groups, dtype)
    dyg = _grouped(dy, num_groups, dtype)
    w = None if weight is None else np.reshape(weight, xg.shape[1:3])
    dx, dw, db = normalize_backward_ref(dyg, xg, tuple(range(2, xg.ndim)), (1, 2), w, eps, dtype=dtype, **stats)
    c = xg.shape[1] * xg.shape[2]
    return dx.reshape(np.shape(x)), dw.reshape(c), db.reshape(c)


# ---------------------------------------------------------------- batch renormalization, ghost batch norm, fused


def _channel_view(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def batch_renorm_ref(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, rmax=3.0, dmax=5.0, axis=1):
    """Batch renormalization (Ioffe 2017) in training, in float64: returns ``(y, mean, rstd, r, d)``.

    mu_B, var_B: the batch mean and biased variance per channel; sigma_B = sqrt(var_B + eps),
    sigma = sqrt(running_var + eps); r = clip(sigma_B / sigma, 1/rmax, rmax),
    d = clip((mu_B - running_mean) / sigma, -dmax, dmax);
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias."""
    x = np.asarray(x, dtype=np.float64)
    axes = all_but(x.ndim, axis)
    mu_b = x.mean(axis=axes)
    sigma_b = np.sqrt(x.var(axis=axes) + eps)
    sigma = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mu_b - np.asarray(running_mean, dtype=np.float64)) / sigma, -dmax, dmax)
    view = lambda v: _channel_view(v, x.ndim, axis)  # noqa: E731
    y = ((x - view(mu_b)) / view(sigma_b) * view(r) + view(d))
    if weight is not None:
        y = y * view(weight)
    if bias is not None:
        y = y + view(bias)
    return y, mu_b, 1.0 / sigma_b, r, d


def batch_renorm_backward_ref(dy, x, r, d, weight=None, eps=1e-5, axis=1):
    """Backward of batch renormalization with r and d constants: ``(dx, dweight, dbias)``.
    y = xhat * (weight * r) + (bias + weight * d): dx is batch norm's with weight * r,
    dweight = sum(dy * (xhat * r + d)) = r * sum(dy * xhat) + d * sum(dy), dbias = sum(dy)."""
    r = np.asarray(r, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    w = np.ones_like(r) if weight is None else np.asarray(weight, dtype=np.float64)
    dx, _, _ = batch_norm_backward_ref(dy, x, w * r, eps, axis)
    _, sum_dy_xhat, sum_dy = batch_norm_backward_ref(dy, x, None, eps, axis)
    return dx, r * sum_dy_xhat + d * sum_dy, sum_dy


def ghost_batch_norm_ref(x, virtual_batch_size, weight=None, bias=None, eps=1e-5, axis=1):
    """Ghost batch norm in training: the concatenation along axis 0 of batch norm of each
    consecutive chunk of `virtual_batch_size` samples. Returns ``(y, mean, rstd)``, mean and
    rstd of shape (N / virtual_batch_size, C)."""
    x = np.asarray(x, dtype=np.float64)
    parts = [batch_norm_ref(x[i:i + virtual_batch_size], weight, bias, eps, axis)
             for i in range(0, x.shape[0], virtual_batch_size)]
    return (np.concatenate([p[0] for p in parts]), np.stack([p[1] for p in parts]),
            np.stack([p[2] for p in parts]))


def ghost_batch_norm_backward_ref(dy, x, virtual_batch_size, weight=None, eps=1e-5, axis=1):
    """Backward of ghost batch norm: each chunk's batch-norm backward; dx concatenated, the
    parameter gradients summed over chunks."""
    v = virtual_batch_size
    parts = [batch_norm_backward_ref(dy[i:i + v], x[i:i + v], weight, eps, axis) for i in range(0, x.shape[0], v)]
    return np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts), sum(p[2] for p in parts)


def ghost_running_ref(x, virtual_batch_size, running_mean, running_var, momentum, axis=1):
    """Running statistics after one ghost-batch-norm step: the mean over the virtual batches of
    their means and of their unbiased variances, folded in with `momentum`."""
    x = np.asarray(x, dtype=np.float64)
    axes = all_but(x.ndim, axis)
    chunks = [x[i:i + virtual_batch_size] for i in range(0, x.shape[0], virtual_batch_size)]
    mean = np.mean([c.mean(axis=axes) for c in chunks], axis=0)
    var = np.mean([c.var(axis=axes, ddof=1) for c in chunks], axis=0)
    return ((1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean,
            (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var)


def fused_batch_norm_ref(x, weight=None, bias=None, eps=1e-5, axis=1, residual=None, activation=None, **stats):
    """y = act(bn(x) + residual): ``(y, mean, rstd)``; activation None or "relu"."""
    y, mean, rstd = batch_norm_ref(x, weight, bias, eps, axis, **stats)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean, rstd


def fused_batch_norm_backward_ref(dy, x, y, weight=None, eps=1e-5, axis=1, activation=None, **stats):
    """Backward of the fused forward: g = dy masked where y > 0 (relu); ``(dx, dweight, dbias, dresidual)``
    with dx, dweight, dbias batch norm's backward of g and dresidual = g."""
    g = np.asarray(dy, dtype=np.float64)
    if activation == "relu":
        g = np.where(np.asarray(y, dtype=np.float64) > 0, g, 0.0)
    dx, dw, db = batch_norm_backward_ref(g, x, weight, eps, axis, **stats)
    return dx, dw, db, g


def fold_ref(weight, bias, running_mean, running_var, gamma, beta, eps=1e-5, axis=0):
    """Folding an eval-mode batch norm into the preceding layer, in float64:
    w' = w * gamma / sqrt(var + eps) along `axis`, b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    w = np.asarray(weight, dtype=np.float64)
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(running_var, np.float64) + eps)
    b = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    return (w * _channel_view(scale, w.ndim, axis),
            (b - np.asarray(running_mean, np.float64)) * scale + np.asarray(beta, np.float64))
