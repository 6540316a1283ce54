"""Who is timed on each case, and the one float64 reference every contender is checked against.

* bncore: the functional API on the same torch tensors (torch in, torch out; on NumPy arrays when
  PyTorch is absent); the forward writes y, the backward dx, into a preallocated ``out=`` (the
  backward allocates only the small dweight and dbias).
* bncore_alloc ("alloc"): the same call without ``out=``, allocating y or dx as PyTorch does. A
  fresh allocation above glibc's mmap threshold (at most 32 MiB) is faulted in page by page on every
  call, which can cost more than the kernel; bncore takes these outputs from its cache of freed
  buffers (`bncore.pool`), and the table's alloc / out= column shows what allocating still costs.
* torch: ``torch.nn.functional`` forward (which allocates its output: it has no ``out=``);
  backward through ``torch.ops.aten.native_*_backward`` called directly, which runs only the
  backward kernel: no autograd graph, no engine, nothing of the forward pass.
* numpy: :mod:`bncore.reference` itself, evaluated at the input's dtype (float32) on the same
  memory in the layout a NumPy user holds (NHWC for channels-last); single-threaded, as NumPy's
  element-wise operations and reductions are. Its backward takes the statistics the forward saved,
  as the other backward kernels do; its training forward updates the running statistics through
  the reference's own function (so it computes the batch statistics twice). Skipped for the half
  types (NumPy has no bfloat16, and its float16 arithmetic is not what a NumPy user would time).

Every contender's outputs (y; or dx, dweight, dbias) are compared with the same reference in
float64, computed from the same (bfloat16-rounded, where so) inputs.

bfloat16 and float16 cases keep their weight, bias and running statistics in float32 (the mixed-precision
setup), which both libraries accept.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import bncore
from bncore import reference as R

from .cases import EPS, MOMENTUM, Case, Suite

CONTENDERS = ("bncore", "bncore_alloc", "torch", "numpy")

# The largest error a contender may have against the float64 reference, relative to the largest
# magnitude of the expected output (so that sums such as dweight are judged at their own scale).
# Looser than the tests' table: the bench's groups hold up to 10^5 random elements, and a backward
# gets the statistics its forward saved, rounded. On the full suite bncore stays below 3e-7
# (float32) and 3e-3 (bfloat16, the output's rounding); the loosest float32 contender, 1e-5.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}


def tolerance(case: Case) -> float:
    return TOLERANCE[case.dtype]


class Tensors:
    """A case's tensors: `x`, `dy` and parameters `p` for bncore and PyTorch (torch tensors when
    torch is used, else NumPy arrays), and for the NumPy contender `xn`, `dyn`, `pn`: NumPy views of
    the same memory in the layout a NumPy user would hold (NHWC for channels-last), whose channel
    axis is `np_axis`."""

    def __init__(self, case: Case, torch, seed=0):
        rng = np.random.default_rng(seed)
        shape = case.shape
        nhwc = case.layout == "NHWC"
        # generated in the physical order (N, H, W, C for channels-last), seen as (N, C, H, W)
        phys = (shape[0],) + shape[2:] + (shape[1],) if nhwc else shape
        xp = rng.standard_normal(phys, dtype=np.float32) * 2 + 0.5
        dyp = rng.standard_normal(phys, dtype=np.float32)
        c = shape[-1] if case.op in ("layer_norm", "rms_norm") else shape[1]
        params = {"w": 1 + 0.1 * rng.standard_normal(c, dtype=np.float32),
                  "b": 0.1 * rng.standard_normal(c, dtype=np.float32),
                  "rm": 0.1 * rng.standard_normal(c, dtype=np.float32),
                  "rv": 1 + 0.1 * rng.random(c, dtype=np.float32)}
        self.np_axis = -1 if nhwc else 1
        self.nhwc = nhwc
        self.torch = torch
        if torch is not None:
            tdtype = getattr(torch, case.dtype)
            xt, dyt = torch.from_numpy(xp).to(tdtype), torch.from_numpy(dyp).to(tdtype)
            self.x, self.dy = (xt.movedim(-1, 1), dyt.movedim(-1, 1)) if nhwc else (xt, dyt)
            self.p = {k: torch.from_numpy(v) for k, v in params.items()}
        else:
            self.x, self.dy = (np.moveaxis(xp, -1, 1), np.moveaxis(dyp, -1, 1)) if nhwc else (xp, dyp)
            self.p = params
        self.pn = params
        self.numpy_ok = case.dtype == "float32"
        if self.numpy_ok:
            # in float32, x and dy are views of these: the same memory, in the physical layout
            self.xn, self.dyn = xp, dyp

    def empty_like(self, t):
        if self.torch is not None:
            return self.torch.empty_like(t, memory_format=self.torch.preserve_format)
        return np.empty_like(t)

    def param(self, name):
        """A fresh copy of a parameter (running statistics are updated in place)."""
        v = self.p[name]
        return v.clone() if self.torch is not None else v.copy()


def to_float64(t):
    """A float64 NumPy copy of a torch tensor or NumPy array."""
    if hasattr(t, "detach"):
        return t.detach().double().numpy()
    return np.asarray(t, dtype=np.float64)


def _float32(t):
    return t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)


def reference(case: Case, x, dy, p, *, axis=1, saved=None, running=None, dtype=np.float64):
    """The case's outputs by bncore.reference, computed in `dtype`: (y,) for a forward, (dx, dweight,
    dbias) for a backward. `x`, `dy` are NumPy arrays whose channel axis is `axis` (batch norm);
    `p` the parameters; `saved` the forward's (mean, rstd) for a backward, None to recompute them;
    `running` the (running_mean, running_var) arrays a training forward updates in place, or None."""
    w, b = p["w"], p["b"]
    stats = {} if saved is None else {"saved_mean": saved[0], "saved_rstd": saved[1]}
    if case.op == "batch_norm":
        if case.kind == "fwd-train":
            if running is not None:
                rm, rv = running
                rm[...], rv[...] = R.batch_norm_running_ref(x, rm, rv, MOMENTUM, axis, dtype=dtype)
            return R.batch_norm_ref(x, w, b, EPS, axis, dtype=dtype)[:1]
        if case.kind == "fwd-eval":
            return R.batch_norm_ref(x, w, b, EPS, axis, running_mean=p["rm"], running_var=p["rv"], dtype=dtype)[:1]
        return R.batch_norm_backward_ref(dy, x, w, EPS, axis, dtype=dtype, **stats)
    if case.op == "layer_norm":
        if case.kind == "fwd":
            return R.layer_norm_ref(x, 1, w, b, EPS, dtype=dtype)[:1]
        return R.layer_norm_backward_ref(dy, x, 1, w, EPS, dtype=dtype, **stats)
    if case.op == "rms_norm":  # no bias, no mean: (y,) or (dx, dweight)
        if case.kind == "fwd":
            return R.layer_norm_ref(x, 1, w, None, EPS, rms=True, dtype=dtype)[:1]
        if saved is not None:
            stats = {"saved_mean": np.zeros_like(np.asarray(saved[1])), "saved_rstd": saved[1]}
        return R.layer_norm_backward_ref(dy, x, 1, w, EPS, rms=True, dtype=dtype, **stats)[:2]
    if case.op == "instance_norm":
        return R.instance_norm_ref(x, w, b, EPS, dtype=dtype)[:1]
    if case.op == "group_norm":
        if case.kind == "fwd":
            return R.group_norm_ref(x, case.groups, w, b, EPS, dtype=dtype)[:1]
        return R.group_norm_backward_ref(dy, x, case.groups, w, EPS, dtype=dtype, **stats)
    raise ValueError(f"unknown op {case.op!r}")


def build(case: Case, torch):
    """The contenders of `case`: ({name: callable returning the case's outputs}, a short description
    of what the PyTorch contender calls, the case's Tensors)."""
    d = Tensors(case, torch)
    # used only where torch is not None
    F: Any = torch.nn.functional if torch is not None else None
    aten: Any = torch.ops.aten if torch is not None else None
    x, dy, w, b = d.x, d.dy, d.p["w"], d.p["b"]
    fns, torch_call = {}, None
    out = d.empty_like(x)
    shape = case.shape
    mask = [True, True, True]  # the backward kernels compute dx, dweight and dbias

    saved = None  # the forward's statistics, given to every backward contender
    if case.op == "batch_norm":
        if case.kind == "fwd-train":
            rm_c, rv_c = d.param("rm"), d.param("rv")
            fns["bncore"] = lambda: bncore.batch_norm(x, rm_c, rv_c, w, b, True, MOMENTUM, EPS, out=out)
            rm_a, rv_a = d.param("rm"), d.param("rv")
            fns["bncore_alloc"] = lambda: bncore.batch_norm(x, rm_a, rv_a, w, b, True, MOMENTUM, EPS)
            if torch is not None:
                rm_t, rv_t = d.param("rm"), d.param("rv")
                fns["torch"] = lambda: F.batch_norm(x, rm_t, rv_t, w, b, True, MOMENTUM, EPS)
                torch_call = "F.batch_norm(training=True, running stats updated)"
        elif case.kind == "fwd-eval":
            rm, rv = d.p["rm"], d.p["rv"]
            fns["bncore"] = lambda: bncore.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)
                torch_call = "F.batch_norm(training=False)"
        else:
            _, sm, si = bncore.batch_norm_forward(x, None, None, w, b, True, eps=EPS)
            saved = sm, si
            fns["bncore"] = lambda: bncore.batch_norm_backward(dy, x, w, sm, si, training=True, out=out)
            fns["bncore_alloc"] = lambda: bncore.batch_norm_backward(dy, x, w, sm, si, training=True)
            if torch is not None:
                fns["torch"] = lambda: aten.native_batch_norm_backward(dy, x, w, None, None, sm, si, True, EPS, mask)
                torch_call = "aten.native_batch_norm_backward (kernel only)"

    elif case.op == "layer_norm":
        ns = (shape[-1],)
        if case.kind == "fwd":
            fns["bncore"] = lambda: bncore.layer_norm(x, ns, w, b, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.layer_norm(x, ns, w, b, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.layer_norm(x, ns, w, b, EPS)
                torch_call = "F.layer_norm"
        else:
            _, sm, sr = bncore.layer_norm_forward(x, ns, w, b, EPS)
            saved = sm, sr
            fns["bncore"] = lambda: bncore.layer_norm_backward(dy, x, ns, w, sm, sr, out=out)
            fns["bncore_alloc"] = lambda: bncore.layer_norm_backward(dy, x, ns, w, sm, sr)
            if torch is not None:
                smt, srt = sm.reshape(-1, 1), sr.reshape(-1, 1)  # PyTorch keeps them (N, 1)
                fns["torch"] = lambda: aten.native_layer_norm_backward(dy, x, list(ns), smt, srt, w, b, mask)
                torch_call = "aten.native_layer_norm_backward (kernel only)"

    elif case.op == "rms_norm":
        ns = (shape[-1],)
        if case.kind == "fwd":
            fns["bncore"] = lambda: bncore.rms_norm(x, ns, w, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.rms_norm(x, ns, w, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.rms_norm(x, ns, w, EPS)
                torch_call = "F.rms_norm"
        else:
            _, sr = bncore.rms_norm_forward(x, ns, w, EPS)
            saved = None, sr
            fns["bncore"] = lambda: bncore.rms_norm_backward(dy, x, ns, w, sr, out=out)[:2]
            fns["bncore_alloc"] = lambda: bncore.rms_norm_backward(dy, x, ns, w, sr)[:2]
            if torch is not None:
                # PyTorch has no CPU kernel for it (aten._fused_rms_norm_backward is CUDA's only):
                # F.rms_norm is composite on the CPU, so its backward is autograd's over those ops,
                # timed alone on a graph recorded once (retain_graph)
                xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
                yg = F.rms_norm(xg, ns, wg, EPS)
                fns["torch"] = lambda: torch.autograd.grad(yg, (xg, wg), dy, retain_graph=True)
                torch_call = "autograd backward of F.rms_norm (no CPU kernel)"

    elif case.op == "instance_norm":
        fns["bncore"] = lambda: bncore.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS, out=out)
        fns["bncore_alloc"] = lambda: bncore.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS)
        if torch is not None:
            fns["torch"] = lambda: F.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS)
            torch_call = "F.instance_norm(use_input_stats=True)"

    elif case.op == "group_norm":
        g = case.groups
        if case.kind == "fwd":
            fns["bncore"] = lambda: bncore.group_norm(x, g, w, b, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.group_norm(x, g, w, b, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.group_norm(x, g, w, b, EPS)
                torch_call = f"F.group_norm({g} groups)"
        else:
            _, sm, sr = bncore.group_norm_forward(x, g, w, b, EPS)
            saved = sm, sr
            fns["bncore"] = lambda: bncore.group_norm_backward(dy, x, g, w, sm, sr, out=out)
            fns["bncore_alloc"] = lambda: bncore.group_norm_backward(dy, x, g, w, sm, sr)
            if torch is not None:
                n, c, hw = shape[0], shape[1], math.prod(shape[2:])
                fns["torch"] = lambda: aten.native_group_norm_backward(dy, x, sm, sr, w, n, c, hw, g, mask)
                torch_call = "aten.native_group_norm_backward (kernel only)"
    else:
        raise ValueError(f"unknown op {case.op!r}")

    if d.numpy_ok:
        np_saved = None if saved is None else tuple(None if s is None else _float32(s) for s in saved)
        running = (d.pn["rm"].copy(), d.pn["rv"].copy()) if case.kind == "fwd-train" else None
        fns["numpy"] = lambda: reference(case, d.xn, d.dyn, d.pn, axis=d.np_axis, saved=np_saved, running=running,
                                         dtype=np.float32)
    return fns, torch_call, d


def errors(case: Case, d: Tensors, results: dict) -> dict:
    """{name: the largest error of that contender's outputs against the float64 reference, relative to
    the largest magnitude of the expected output} for `results` ({name: what its callable returned})."""
    p64 = {k: to_float64(v) for k, v in d.p.items()}
    expected = reference(case, to_float64(d.x), to_float64(d.dy), p64)
    out = {}
    for name, r in results.items():
        got = r if isinstance(r, tuple) else (r,)
        worst = 0.0
        for i, (a, e) in enumerate(zip(got, expected)):
            a = to_float64(a)
            if name == "numpy" and d.nhwc and i == 0:
                a = np.moveaxis(a, -1, 1)  # the NumPy contender works in the physical layout
            if e.size:
                worst = max(worst, float(np.max(np.abs(a.reshape(e.shape) - e))) / max(1.0, float(np.max(np.abs(e)))))
        out[name] = worst
    return out


def overhead_contenders(suite: Suite, torch):
    """One small batch norm call (training, running stats, weight, bias) in bncore and PyTorch:
    ({name: callable}, the input's kind)."""
    shape = suite.overhead_shape
    c = shape[1]
    if torch is not None:
        F = torch.nn.functional
        x = torch.randn(shape)
        w, b = torch.ones(c), torch.zeros(c)
        rms = [(torch.zeros(c), torch.ones(c)) for _ in range(2)]
        return {"bncore": lambda: bncore.batch_norm(x, rms[0][0], rms[0][1], w, b, True, MOMENTUM, EPS),
                "torch": lambda: F.batch_norm(x, rms[1][0], rms[1][1], w, b, True, MOMENTUM, EPS)}, "torch"
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    w, b, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
    return {"bncore": lambda: bncore.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)}, "numpy"
