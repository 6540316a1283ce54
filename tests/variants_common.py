"""Shared pieces of the variant tests (layer, instance, group, RMS norm and `normalize`).

One table describes each variant as its bncore calls, its PyTorch call and its
float64 reference (tests/reference.py), so that every test can run the same
problem three ways. Nothing here asserts.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

import bncore
from bncore.reference import (group_norm_backward_ref, group_norm_ref, instance_norm_backward_ref, instance_norm_ref,
                       instance_norm_running_ref, layer_norm_backward_ref, layer_norm_ref)

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
    """One variant problem: `kind` is 'layer', 'rms', 'group' or 'instance'."""

    name: str
    kind: str
    shape: tuple
    normalized_shape: tuple = ()
    num_groups: int = 0
    eps: float | None = 1e-5
    extra: dict = field(default_factory=dict)

    @property
    def param_shape(self):
        return self.normalized_shape if self.kind in ("layer", "rms") else (self.shape[1],)

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
    return instance_norm_backward_ref(dy, x, w, eps, **stats)


def ref_running(case, x, rm, rv, momentum):
    assert case.kind == "instance"
    return instance_norm_running_ref(x, rm, rv, momentum)


# ---------------------------------------------------------------- the cases

CASES = [
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


def params(rng, shape, dtype, bias=True):
    """weight in +-[0.5, 2], bias N(0, 1), as NumPy arrays of `dtype` (a NumPy dtype name)."""
    w = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    b = rng.normal(size=shape) if bias else None
    return w.astype(dtype), (None if b is None else b.astype(dtype))


def data(rng, shape, offset_axis=1):
    """float64 O(1) data with a non-zero mean varying along `offset_axis`: 1.5 * N(0, 1) + offset."""
    x = 1.5 * rng.normal(size=shape)
    view = [1] * len(shape)
    view[offset_axis] = shape[offset_axis]
    return x + rng.uniform(-2, 2, size=shape[offset_axis]).reshape(view)
