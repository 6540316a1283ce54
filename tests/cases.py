"""The case table shared by the tests of every variant (batch, layer, instance, group, RMS norm).

One table describes each variant as its bncore calls, its PyTorch call and its
float64 reference (bncore.reference), so that every test can run the same
problem three ways. Nothing here asserts.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

import bncore
from bncore.reference import (batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref,
                              group_norm_backward_ref, group_norm_ref, instance_norm_backward_ref, instance_norm_ref,
                              instance_norm_running_ref, layer_norm_backward_ref, layer_norm_ref, all_but,
                              normalize_backward_bounds, trailing)

F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)


def seed_of(*args) -> int:
    """A seed that depends on the test case only (str hashes change between processes)."""
    return zlib.crc32(repr(args).encode())


def rms_default_eps(dtype: str) -> float:
    """eps=None in RMS norm: the machine epsilon of the compute type (float32's for half inputs)."""
    return F64_EPS if dtype == "float64" else F32_EPS


@dataclass
class Case:
    """One variant problem: `kind` is 'batch', 'layer', 'rms', 'group' or 'instance'; `axis` is batch
    norm's channel axis."""

    name: str
    kind: str
    shape: tuple
    normalized_shape: tuple = ()
    num_groups: int = 0
    eps: float | None = 1e-5
    axis: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def channel_axis(self):
        return self.axis % len(self.shape) if self.kind == "batch" else 1

    @property
    def param_shape(self):
        return self.normalized_shape if self.kind in ("layer", "rms") else (self.shape[self.channel_axis],)

    @property
    def has_running_stats(self):
        return self.kind in ("batch", "instance")

    @property
    def has_bias(self):
        return self.kind != "rms"

    @property
    def stat_shape(self):
        """Shape of the saved statistics bncore returns."""
        if self.kind in ("layer", "rms"):
            return self.shape[:len(self.shape) - len(self.normalized_shape)]
        if self.kind == "group":
            return (self.shape[0], self.num_groups)
        if self.kind == "batch":
            return (self.shape[self.channel_axis],)
        return self.shape[:2]

    def eps_for(self, dtype):
        if self.kind == "rms" and self.eps is None:
            return rms_default_eps(dtype)
        return self.eps

    def __repr__(self):
        return self.name


# ---------------------------------------------------------------- the three ways to run a case


def bncore_forward(case, x, w=None, b=None, rm=None, rv=None, use_input_stats=True, momentum=0.1, out=None):
    """bncore's forward: (y, saved) with saved = (mean, rstd) or (None, rstd) for RMS norm."""
    k = case.kind
    if k == "layer":
        y, m, r = bncore.layer_norm_forward(x, case.normalized_shape, w, b, case.eps, out=out)
        return y, (m, r)
    if k == "rms":
        y, r = bncore.rms_norm_forward(x, case.normalized_shape, w, case.eps, out=out)
        return y, (None, r)
    if k == "group":
        y, m, r = bncore.group_norm_forward(x, case.num_groups, w, b, case.eps, out=out)
        return y, (m, r)
    if k == "batch":
        y, m, r = bncore.batch_norm_forward(x, rm, rv, w, b, use_input_stats, momentum, case.eps, axis=case.axis,
                                            out=out)
        return y, (m, r)
    y, m, r = bncore.instance_norm_forward(x, rm, rv, w, b, use_input_stats, momentum, case.eps, out=out)
    return y, (m, r)


def bncore_backward(case, dy, x, w, saved, use_input_stats=True):
    """bncore's backward: (dx, dw, db); db None for RMS norm, dw / db None without weight."""
    m, r = saved
    k = case.kind
    if k == "layer":
        return bncore.layer_norm_backward(dy, x, case.normalized_shape, w, m, r)
    if k == "rms":
        return bncore.rms_norm_backward(dy, x, case.normalized_shape, w, r)
    if k == "group":
        return bncore.group_norm_backward(dy, x, case.num_groups, w, m, r)
    if k == "batch":
        return bncore.batch_norm_backward(dy, x, w, m, r, training=use_input_stats, axis=case.axis)
    return bncore.instance_norm_backward(dy, x, w, m, r, use_input_stats=use_input_stats)


def torch_forward(case, x, w=None, b=None, rm=None, rv=None, use_input_stats=True, momentum=0.1):
    import torch

    F = torch.nn.functional
    k = case.kind
    if k == "layer":
        return F.layer_norm(x, case.normalized_shape, w, b, case.eps)
    if k == "rms":
        return F.rms_norm(x, case.normalized_shape, w, case.eps)
    if k == "group":
        return F.group_norm(x, case.num_groups, w, b, case.eps)
    if k == "batch":  # torch's channels are dim 1: move bncore's channel axis there and back
        xt = x.movedim(case.channel_axis, 1)
        return F.batch_norm(xt, rm, rv, w, b, use_input_stats, momentum, case.eps).movedim(1, case.channel_axis)
    return F.instance_norm(x, rm, rv, w, b, use_input_stats, momentum, case.eps)


def ref_forward(case, x, w=None, b=None, rm=None, rv=None, use_input_stats=True, dtype="float64"):
    """float64 reference: (y, mean, rstd); mean is None for RMS norm."""
    k = case.kind
    eps = case.eps_for(dtype)
    if k in ("layer", "rms"):
        y, m, r = layer_norm_ref(x, len(case.normalized_shape), w, b if k == "layer" else None, eps, k == "rms")
        return y, (None if k == "rms" else m), r
    if k == "group":
        return group_norm_ref(x, case.num_groups, w, b, eps)
    stats = {} if use_input_stats else {"running_mean": rm, "running_var": rv}
    if k == "batch":
        return batch_norm_ref(x, w, b, eps, case.channel_axis, **stats)
    y, m, r = instance_norm_ref(x, w, b, eps, **stats)
    if not use_input_stats:  # saved statistics are per (n, c): the running ones broadcast
        n = np.shape(x)[0]
        m, r = np.broadcast_to(m, (n,) + m.shape), np.broadcast_to(r, (n,) + r.shape)
    return y, m, r


def ref_backward(case, dy, x, w=None, rm=None, rv=None, use_input_stats=True, dtype="float64"):
    k = case.kind
    eps = case.eps_for(dtype)
    if k in ("layer", "rms"):
        return layer_norm_backward_ref(dy, x, len(case.normalized_shape), w, eps, k == "rms")
    if k == "group":
        return group_norm_backward_ref(dy, x, case.num_groups, w, eps)
    stats = {} if use_input_stats else {"running_mean": rm, "running_var": rv}
    if k == "batch":
        return batch_norm_backward_ref(dy, x, w, eps, case.channel_axis, **stats)
    return instance_norm_backward_ref(dy, x, w, eps, **stats)


def ref_backward_bounds(case, dy, x, w=None, rm=None, rv=None, use_input_stats=True, dtype="float64"):
    """The magnitudes (sums of absolute terms) behind ref_backward's results, for tolerances."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    k, nd = case.kind, x.ndim
    eps = case.eps_for(dtype)
    stats = {} if use_input_stats or k not in ("batch", "instance") else {"running_mean": rm, "running_var": rv}
    if k in ("layer", "rms"):
        ax = trailing(nd, len(case.normalized_shape))
        return normalize_backward_bounds(dy, x, ax, ax, w, eps, k == "rms")
    if k == "batch":
        return normalize_backward_bounds(dy, x, all_but(nd, case.channel_axis), (case.channel_axis,), w, eps, **stats)
    if k == "instance":
        return normalize_backward_bounds(dy, x, tuple(range(2, nd)), (1,), w, eps, **stats)
    n, c = x.shape[:2]
    g = case.num_groups
    xg, dyg = (a.reshape((n, g, c // g) + x.shape[2:]) for a in (x, dy))
    wg = None if w is None else np.reshape(w, (g, c // g))
    dx, dw, db = normalize_backward_bounds(dyg, xg, tuple(range(2, xg.ndim)), (1, 2), wg, eps)
    return dx.reshape(x.shape), dw.reshape(c), db.reshape(c)


def ref_running(case, x, rm, rv, momentum):
    if case.kind == "batch":
        return batch_norm_running_ref(x, rm, rv, momentum, case.channel_axis)
    assert case.kind == "instance"
    return instance_norm_running_ref(x, rm, rv, momentum)


# ---------------------------------------------------------------- the cases

CASES = [
    Case("batch-2d", "batch", (16, 3)),
    Case("batch-4d", "batch", (4, 3, 5, 6)),
    Case("batch-5d", "batch", (2, 3, 3, 4, 5), eps=1e-3),
    Case("batch-axis-last", "batch", (4, 5, 6, 3), axis=-1, eps=1e-4),
    Case("layer-last", "layer", (8, 33), normalized_shape=(33,)),
    Case("layer-two-dims", "layer", (4, 6, 10), normalized_shape=(6, 10)),
    Case("layer-3d-all", "layer", (3, 4, 5, 6), normalized_shape=(4, 5, 6), eps=1e-3),
    Case("rms-default-eps", "rms", (4, 6, 10), normalized_shape=(10,), eps=None),
    Case("rms-two-dims", "rms", (5, 3, 4, 7), normalized_shape=(4, 7), eps=1e-3),
    Case("group-4d", "group", (3, 6, 5, 4), num_groups=3),
    Case("group-3d", "group", (4, 8, 7), num_groups=4),
    Case("group-5d", "group", (2, 6, 2, 3, 4), num_groups=2, eps=1e-4),
    Case("instance-1d", "instance", (4, 3, 9)),
    Case("instance-2d", "instance", (3, 4, 5, 6)),
    Case("instance-3d", "instance", (2, 3, 3, 4, 5), eps=1e-3),
]


# ---------------------------------------------------------------- batch norm alone: (shape, channel axis)

# (shape, axis): 2-D to 5-D, channel axis 1, -1 and others
BN_CASES = [
    ((16, 3), 1),
    ((16, 3), -1),
    ((5, 7), 0),
    ((4, 3, 9), 1),
    ((4, 9, 3), -1),
    ((3, 4, 5), 2),
    ((4, 3, 5, 6), 1),
    ((4, 5, 6, 3), -1),
    ((2, 5, 3, 4), 2),
    ((3, 4, 5, 2), 0),
    ((2, 3, 3, 4, 5), 1),
    ((2, 3, 4, 5, 3), -1),
    ((2, 3, 4, 5, 3), 3),
]



DTYPES = [np.float32, np.float64]



def case_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"



def bn_params(rng, c, dtype):
    w = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1.0, 1.0], size=c)
    b = rng.normal(size=c)
    return w.astype(dtype), b.astype(dtype)




def params(rng, shape, dtype, bias=True):
    """weight in +-[0.5, 2], bias N(0, 1), as NumPy arrays of `dtype` (a NumPy dtype name)."""
    w = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    b = rng.normal(size=shape) if bias else None
    return w.astype(dtype), (None if b is None else b.astype(dtype))


VARIANT_CASES = [c for c in CASES if c.kind != "batch"]  # tests whose grouping logic is per sample


def data(rng, shape, offset_axis=1):
    """float64 O(1) data with a non-zero mean varying along `offset_axis`: 1.5 * N(0, 1) + offset."""
    x = 1.5 * rng.normal(size=shape)
    view = [1] * len(shape)
    view[offset_axis] = shape[offset_axis]
    return x + rng.uniform(-2, 2, size=shape[offset_axis]).reshape(view)
