"""bncore.sync: batch norm whose statistics span every process of a group.

Training forward, on each rank: the rank's per-channel moments (count, mean, m2)
(`bncore.steps.stats`) go into the rank's own row of a zeroed world x (2C+1) float64
buffer; ONE all-reduce (sum) of that buffer is an exact all-gather, since x + 0 + ... + 0
is x in any summation order; every rank then merges the rows by Chan's formula in C
(`bncore.steps.merge`) in one fixed pairwise tree, so that every rank holds bitwise
the same statistics, and normalizes with them (`bncore.steps.forward`, which also
updates the running statistics from the global mean and unbiased variance).
Backward: the rank's (sum dy, sum dy*xhat) (`bncore.steps.backward_reduce`), ONE
all-reduce of those 2C values (and 2 failure-agreement values), then grad_input from
the global sums and count (`bncore.steps.backward_apply`). grad_weight and grad_bias
are each rank's own contribution (a data-parallel wrapper sums or averages them).

Failure agreement: a rank whose local work fails before a collective (a bad input, a
failing step) still joins that collective, with a failure marker (a NaN count in its
row; a failure count in the backward buffer). Afterwards every rank raises: the
failing rank its own error, the others a `SyncError` naming it. Nobody is left
waiting in a collective, and no rank changes its state.

A collective is anything with ``rank``, ``world_size`` and ``allreduce(buffer)``, an
in-place elementwise sum over every rank of a C-contiguous float64 NumPy buffer of
the same shape on every rank: `Collective` wraps such a callable, `Collective.from_mpi`
an mpi4py communicator; ``bncore.torch.SyncBatchNorm`` plugs in torch.distributed.
docs/sync_batch_norm.md has the algorithm, the sizes and the precision argument.
"""
from __future__ import annotations

import numpy as np

from . import steps
from .layers import BatchNorm


class SyncError(RuntimeError):
    """Raised on every rank that did nothing wrong when another rank failed before a
    collective. ``failed_ranks``: the failing ranks (a tuple), or None when more than one
    failed in a backward (their count is in the message)."""

    def __init__(self, message, failed_ranks):
        super().__init__(message)
        self.failed_ranks = failed_ranks


class Collective:
    """What synchronized batch norm needs from a process group.

    ``allreduce(buffer)`` sums a C-contiguous float64 NumPy array elementwise over every
    rank, in place; every rank passes an array of the same shape, in the same order of
    calls. ``rank`` is this process's index in ``[0, world_size)``.
    """

    def __init__(self, allreduce, rank, world_size):
        if not callable(allreduce):
            raise TypeError(f"allreduce: expected a callable, got {type(allreduce).__name__}")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.allreduce = allreduce
        self.rank = int(rank)
        self.world_size = int(world_size)

    @classmethod
    def from_mpi(cls, comm):
        """An mpi4py communicator's ``Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)``."""
        from mpi4py import MPI

        def allreduce(buffer):
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

        return cls(allreduce, comm.Get_rank(), comm.Get_size())

    def __repr__(self):
        return f"Collective(rank={self.rank}, world_size={self.world_size})"


def as_collective(comm) -> Collective:
    """A `Collective`, or an mpi4py communicator wrapped in one."""
    if isinstance(comm, Collective):
        return comm
    if all(hasattr(comm, name) for name in ("Allreduce", "Get_rank", "Get_size")):
        return Collective.from_mpi(comm)
    raise TypeError(f"comm: expected an mpi4py communicator or a bncore.sync.Collective, "
                    f"got {type(comm).__module__}.{type(comm).__qualname__}")


class SyncSaved:
    """What the synchronized backward needs from its forward: the input, the statistics used
    (save_mean, save_rstd, in the input's array type), the global count, the channel axis."""

    __slots__ = ("axis", "count", "input", "num_features", "save_mean", "save_rstd")

    def __init__(self, input, save_mean, save_rstd, count, axis, num_features):
        self.input, self.save_mean, self.save_rstd = input, save_mean, save_rstd
        self.count, self.axis, self.num_features = int(count), axis, int(num_features)


def _check_input(input, num_features, axis, params=()):
    """The local checks of what the steps after the collective read (the C steps check the
    rest): a rank must not fail alone after the others have moved on."""
    for name, p in params:
        if p is not None and tuple(getattr(p, "shape", (num_features,))) != (num_features,):
            raise ValueError(f"{name}: expected shape ({num_features},) (one value per channel), "
                             f"got {tuple(p.shape)}")
    shape = getattr(input, "shape", None)
    if shape is None:
        return
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got {ndim} (shape {tuple(shape)})")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an axis in [{-ndim}, {ndim}) for a {ndim}-dimensional input, got {axis}")
    if shape[axis] != num_features:
        raise ValueError(f"input: expected {num_features} channels at axis {axis}, got {shape[axis]} "
                         f"(shape {tuple(shape)})")


def _merge_tree(rows, channels):
    """Chan's merge of every rank's row, in one fixed pairwise tree (the same on every rank).
    rows: world x (2C+1), each [count, mean[C], m2[C]]. Returns (count, mean, m2)."""
    counts = np.repeat(rows[:, :1], channels, axis=1)  # bn_moments_merge takes one count per entry
    means, m2s = rows[:, 1:1 + channels], rows[:, 1 + channels:]
    while counts.shape[0] > 1:
        pairs = counts.shape[0] // 2
        merged = [np.empty((pairs, channels)) for _ in range(3)]
        a, b = slice(0, 2 * pairs, 2), slice(1, 2 * pairs, 2)
        steps.merge(counts[a], means[a], m2s[a], counts[b], means[b], m2s[b], *merged)
        if counts.shape[0] % 2:  # the odd row out joins the next level unchanged
            merged = [np.concatenate([m, last[-1:]]) for m, last in zip(merged, (counts, means, m2s))]
        counts, means, m2s = merged
    return int(counts[0, 0]), np.ascontiguousarray(means[0]), np.ascontiguousarray(m2s[0])


def global_moments(input, comm, *, num_features, axis=1, params=()):
    """This rank's moments, combined with every other rank's by one all-reduce of
    world x (2C+1) float64 values: returns ``(count, mean, m2)`` over the whole group
    (count an int, mean and m2 float64 arrays of C values), bitwise the same on every
    rank. ``params``: (name, tensor or None) pairs of per-channel tensors that the caller
    will use next, checked among the local work whose failure every rank agrees on."""
    collective = as_collective(comm)
    channels = int(num_features)
    rows = np.zeros((collective.world_size, 1 + 2 * channels))
    row = rows[collective.rank]
    failure = None
    try:
        _check_input(input, channels, axis, params)
        row[0] = steps.stats(input, row[1:1 + channels], row[1 + channels:], axis=axis)
    except Exception as exc:  # noqa: BLE001 - every failure must still join the collective: the others wait in it
        failure = exc
        row[:] = 0.0
        row[0] = np.nan
    collective.allreduce(rows)
    counts = rows[:, 0]
    failed = tuple(int(r) for r in np.flatnonzero(~(np.isfinite(counts) & (counts >= 0))))
    if failure is not None:
        raise failure
    if failed:
        raise SyncError(f"synchronized batch norm: rank{'s' if len(failed) > 1 else ''} "
                        f"{', '.join(map(str, failed))} of {collective.world_size} failed before the "
                        f"statistics were combined (see the error raised there); nothing was computed or "
                        f"updated on this rank", failed)
    return _merge_tree(rows, channels)


def sync_batch_norm_forward(input, weight=None, bias=None, *, comm, num_features, eps=1e-5, axis=1,
                            running_mean=None, running_var=None, momentum=0.1, stats=None, out=None):
    """Training-mode batch norm of ``input`` with the statistics of every rank's input
    (one all-reduce). Running statistics, when given (``running_mean`` / ``running_var``
    with ``momentum``, or a ``bncore.RunningStats`` as ``stats``), are updated from the
    global mean and unbiased variance, identically on every rank. Returns
    ``(output, saved)``; ``saved`` (a `SyncSaved`) is for `sync_batch_norm_backward`.
    ``comm``: a `Collective` or an mpi4py communicator."""
    collective = as_collective(comm)
    params = (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var))
    count, mean, m2 = global_moments(input, collective, num_features=num_features, axis=axis, params=params)
    if count == 1:  # the same on every rank, so every rank raises here and none waits in the backward
        raise ValueError(f"Expected more than 1 value per channel when training, got 1 over all "
                         f"{collective.world_size} ranks")
    y, save_mean, save_rstd = steps.forward(input, mean, m2, count, weight, bias, eps=eps, axis=axis,
                                            running_mean=running_mean, running_var=running_var,
                                            momentum=momentum, stats=stats, out=out)
    return y, SyncSaved(input, save_mean, save_rstd, count, axis, num_features)


def sync_batch_norm_backward(grad_output, saved, *, comm, weight=None, input_grad=True, out=None):
    """Backward of `sync_batch_norm_forward`: one all-reduce of (sum dy, sum dy*xhat) and two
    failure-agreement values (2C + 2 float64), skipped when ``input_grad`` is False (as every
    rank must decide alike). Returns ``(grad_input, grad_weight, grad_bias)``: grad_input (None
    without ``input_grad``) is the gradient of the loss summed over every rank; grad_weight and
    grad_bias are this rank's own contribution, float64 NumPy arrays."""
    collective = as_collective(comm)
    channels = saved.num_features
    sums = np.zeros(2 * channels + 2)
    sum_dy, sum_dy_xhat = sums[:channels], sums[channels:2 * channels]
    failure = None
    try:
        steps.backward_reduce(grad_output, saved.input, saved.save_mean, saved.save_rstd, sum_dy, sum_dy_xhat,
                              axis=saved.axis)
    except Exception as exc:  # noqa: BLE001 - as in the forward: join the collective, then raise
        failure = exc
        sums[:] = 0.0
        sums[2 * channels:] = (1.0, float(collective.rank))
    grad_bias, grad_weight = sum_dy.copy(), sum_dy_xhat.copy()
    if not input_grad:
        if failure is not None:
            raise failure
        return None, grad_weight, grad_bias
    collective.allreduce(sums)
    if failure is not None:
        raise failure
    failed = int(sums[2 * channels])
    if failed:
        ranks = (int(sums[2 * channels + 1]),) if failed == 1 else None
        who = f"rank {ranks[0]}" if ranks else f"{failed} ranks"
        raise SyncError(f"synchronized batch norm backward: {who} of {collective.world_size} failed before the "
                        f"gradient sums were combined (see the error raised there)", ranks)
    grad_input = steps.backward_apply(grad_output, saved.input, weight, saved.save_mean, saved.save_rstd, sum_dy,
                                      sum_dy_xhat, saved.count, axis=saved.axis, out=out)
    return grad_input, grad_weight, grad_bias


class SyncBatchNorm(BatchNorm):
    """`bncore.BatchNorm` whose training statistics span every rank of ``comm`` (an mpi4py
    communicator or a `Collective`): ``layer(x)``, ``layer.backward(dy)``, ``weight_grad`` /
    ``bias_grad`` (this rank's own contribution: sum or average them across ranks as the
    optimizer needs), ``state_dict`` / ``load_state_dict``, ``train`` / ``eval``, as BatchNorm.
    One all-reduce per training forward, one per backward; evaluation makes none. Every rank
    must call forward and backward alike (a rank with an empty batch too)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *, comm,
                 axis=1, dtype="float32"):
        self.comm = as_collective(comm)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis, dtype=dtype)
        self._sync_saved = None

    def forward(self, x):
        if not self.training:  # running statistics (or this rank's batch without them): no collective
            y = super().forward(x)
            self._sync_saved = None
            return y
        y, saved = sync_batch_norm_forward(x, self.weight, self.bias, comm=self.comm, num_features=self.num_features,
                                           eps=self.eps, axis=self.axis, stats=self.stats)
        self._sync_saved = saved
        return y

    def backward(self, grad_output):
        """Gradient of the last forward: returns grad_input (of the loss summed over every rank);
        sets weight_grad and bias_grad to this rank's contribution."""
        if self._sync_saved is None:
            return super().backward(grad_output)
        dx, dw, db = sync_batch_norm_backward(grad_output, self._sync_saved, comm=self.comm,
                                              weight=self.weight)
        self.weight_grad = None if self.weight is None else dw.astype(self.dtype)
        self.bias_grad = None if self.bias is None else db.astype(self.dtype)
        return dx

    def __repr__(self):
        return (f"SyncBatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, comm={self.comm!r})")
