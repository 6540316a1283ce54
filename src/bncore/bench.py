"""`python -m bncore bench`: bncore against PyTorch and plain NumPy, and against the memory system.

Normalization is memory bound: a forward pass reads x and writes y, a backward
pass reads x and dy and writes dx, and the arithmetic in between is cheap. So
besides timing bncore, PyTorch (when installed) and a plain NumPy implementation
of each case, the bench measures the machine's copy bandwidth first and reports
each bncore time as GB/s under that minimal byte model and as a percentage of
the copy bandwidth out of DRAM.

How it times: all contenders of a case run in the same loop; each repeat runs
every contender once, in an order rotated from repeat to repeat, so that drift
(frequency, other load) hits all of them alike. The reported time is the median
over the repeats, after warm-up rounds. The garbage collector is off while
timing; a contender's result is released after its clock stops.

What each contender does:

* bncore: the functional API on the same torch tensors (torch in, torch out; on
  NumPy arrays when PyTorch is absent); forward writes into a preallocated
  ``out=``, backward allocates its gradients.
* bncore_alloc ("alloc ms"): bncore's forward without ``out=``, allocating its
  output as PyTorch does. The difference matters: glibc serves an allocation
  above its mmap threshold (at most 32 MiB) with fresh pages that are faulted in
  on every call, which can cost more than the kernel itself.
* PyTorch: ``torch.nn.functional`` forward (which allocates its output: it has no
  ``out=``); backward through ``torch.ops.aten.native_*_backward`` called
  directly, which runs only the backward kernel: no autograd graph, no engine,
  nothing of the forward pass. ``torch.set_num_threads`` gets the bench's thread
  count.
* NumPy: the textbook formulas on the same memory, single-threaded (NumPy's
  element-wise operations and reductions do not use threads); skipped ("-") for
  bfloat16, which NumPy has no type for.

bfloat16 cases keep their weight, bias and running statistics in float32 (the
mixed-precision setup), which both libraries accept.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

import bncore

EPS = 1e-5
MOMENTUM = 0.1
MIB = 2 ** 20
# bncore_alloc: bncore's forward without out= (allocating its output as PyTorch does); backward only
# has the allocating form, so the "bncore" contender of a backward case already allocates
CONTENDERS = ("bncore", "bncore_alloc", "torch", "numpy")


# ----------------------------------------------------------------------------- the suites

@dataclass(frozen=True)
class Case:
    op: str           # batch_norm, layer_norm, instance_norm, group_norm
    kind: str         # fwd-train, fwd-eval, fwd, bwd
    shape: tuple
    dtype: str = "float32"
    layout: str = ""  # NCHW, NHWC (channels-last), NCDHW, NC, rows
    groups: int = 0   # group norm only

    @property
    def name(self) -> str:
        return f"{self.op} {self.kind}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def bytes(self) -> int:
        """The minimal traffic: forward reads x and writes y; backward reads x, dy and writes dx
        (the per-channel / per-feature parameter vectors are ignored)."""
        return (3 if self.kind == "bwd" else 2) * self.numel * self.itemsize

    def label(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        return f"{self.name} {shape} {self.dtype} {self.layout}"


def _batch_cases(shape, layout, dtype="float32"):
    return [Case("batch_norm", kind, shape, dtype, layout) for kind in ("fwd-train", "fwd-eval", "bwd")]


def _layer_cases(shape, dtype="float32"):
    return [Case("layer_norm", kind, shape, dtype, "rows") for kind in ("fwd", "bwd")]


def _group_cases(shape, groups):
    return [Case("group_norm", kind, shape, "float32", "NCHW", groups) for kind in ("fwd", "bwd")]


@dataclass
class Suite:
    cases: list
    dram_bytes: int = 256 * MIB   # the copy-bandwidth array (each of source and destination)
    cache_bytes: int = 8 * MIB    # the in-cache copy: source + destination = 16 MiB
    overhead_shape: tuple = (16, 32)
    overhead_blocks: tuple = (200, 50)  # blocks of calls timed: (full, quick)
    notes: list = field(default_factory=list)


def full_suite() -> Suite:
    cases = (_batch_cases((32, 64, 56, 56), "NCHW") + _batch_cases((32, 64, 56, 56), "NHWC")
             + _batch_cases((64, 256, 28, 28), "NCHW") + _batch_cases((256, 1024), "NC")
             + _batch_cases((8, 32, 16, 32, 32), "NCDHW") + _batch_cases((32, 64, 56, 56), "NCHW", "bfloat16")
             + _layer_cases((8192, 1024)) + _layer_cases((8192, 768)) + _layer_cases((8192, 1024), "bfloat16")
             + [Case("instance_norm", "fwd", (16, 64, 64, 64), "float32", "NCHW")]
             + _group_cases((32, 64, 56, 56), 32))
    return Suite(cases)


def tiny_suite() -> Suite:
    """Every op, pass, dtype and layout of the full suite on small shapes: a smoke test."""
    cases = (_batch_cases((4, 8, 6, 6), "NCHW") + _batch_cases((4, 8, 6, 6), "NHWC") + _batch_cases((16, 8), "NC")
             + _batch_cases((2, 4, 3, 4, 5), "NCDHW") + _batch_cases((4, 8, 6, 6), "NCHW", "bfloat16")
             + _layer_cases((16, 32)) + _layer_cases((16, 32), "bfloat16")
             + [Case("instance_norm", "fwd", (2, 4, 5, 5), "float32", "NCHW")]
             + _group_cases((2, 8, 4, 4), 4))
    return Suite(cases, dram_bytes=4 * MIB, cache_bytes=1 * MIB, overhead_blocks=(10, 5))


SUITES = {"full": full_suite, "tiny": tiny_suite}


@dataclass(frozen=True)
class Repeats:
    """How many timed repeats a case gets: as many as fit in `budget_s` (judged from the
    warm-up), but at least `least` and at most `most`."""
    warmup: int
    budget_s: float
    least: int
    most: int
    copies_dram: int
    copies_cache: int

    def count(self, round_s: float) -> int:
        fit = int(self.budget_s / round_s) if round_s > 0 else self.most
        return max(self.least, min(self.most, fit))


FULL = Repeats(warmup=2, budget_s=3.0, least=15, most=200, copies_dram=15, copies_cache=100)
QUICK = Repeats(warmup=1, budget_s=0.4, least=5, most=30, copies_dram=5, copies_cache=25)


# ----------------------------------------------------------------------------- copy bandwidth

def _copy_rate(nbytes: int, threads: int, repeats: int, inner: int):
    """Bytes read + written per second by np.copyto of a float32 array of `nbytes`, split
    into `threads` slices copied in parallel (NumPy releases the GIL while copying); each
    timed sample is `inner` back-to-back copies. Returns (median GB/s, samples GB/s)."""
    n = max(1, nbytes // 4)
    src = np.arange(n, dtype=np.float32)
    dst = np.empty_like(src)
    srcs, dsts = np.array_split(src, threads), np.array_split(dst, threads)

    def copy(d, s):
        for _ in range(inner):
            np.copyto(d, s)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        def once():
            if threads == 1:
                copy(dst, src)
            else:
                list(pool.map(copy, dsts, srcs))

        once()  # first touch of the destination's pages
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            rates.append(2 * src.nbytes * inner / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), rates


def measure_bandwidth(suite: Suite, threads: int, reps: Repeats) -> dict:
    out = {"threads": threads, "unit": "GB/s (1e9 bytes read + written per second)"}
    counts = sorted({threads, 1}, reverse=True)
    for t in counts:
        key = "" if t == threads else "_1_thread"
        dram, dram_s = _copy_rate(suite.dram_bytes, t, reps.copies_dram, 1)
        cache, cache_s = _copy_rate(suite.cache_bytes, t, reps.copies_cache // 5 or 1, 5)
        out["dram" + key] = {"array_bytes": suite.dram_bytes, "gbps": dram, "samples": dram_s}
        out["cache" + key] = {"array_bytes": suite.cache_bytes, "gbps": cache, "samples": cache_s}
    return out


# ----------------------------------------------------------------------------- NumPy contenders

def _bshape(ndim, axis):
    s = [1] * ndim
    s[axis] = -1
    return s


def np_batch_norm_train(x, rm, rv, w, b, axis, momentum=MOMENTUM, eps=EPS):
    axis %= x.ndim
    red = tuple(d for d in range(x.ndim) if d != axis)
    s = _bshape(x.ndim, axis)
    mean = x.mean(axis=red)
    var = x.var(axis=red)
    n = x.size // x.shape[axis]
    rm *= 1 - momentum
    rm += momentum * mean
    rv *= 1 - momentum
    rv += momentum * var * (n / (n - 1))
    return (x - mean.reshape(s)) / np.sqrt(var.reshape(s) + eps) * w.reshape(s) + b.reshape(s)


def np_batch_norm_eval(x, rm, rv, w, b, axis, eps=EPS):
    s = _bshape(x.ndim, axis)
    return (x - rm.reshape(s)) / np.sqrt(rv.reshape(s) + eps) * w.reshape(s) + b.reshape(s)


def np_batch_norm_backward(dy, x, w, mean, invstd, axis):
    axis %= x.ndim
    red = tuple(d for d in range(x.ndim) if d != axis)
    s = _bshape(x.ndim, axis)
    n = x.size // x.shape[axis]
    xhat = (x - mean.reshape(s)) * invstd.reshape(s)
    db = dy.sum(axis=red)
    dw = (dy * xhat).sum(axis=red)
    dx = (w * invstd).reshape(s) * (dy - (db / n).reshape(s) - xhat * (dw / n).reshape(s))
    return dx, dw, db


def np_layer_norm(x, w, b, eps=EPS):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def np_layer_norm_backward(dy, x, w, mean, rstd):
    mean, rstd = mean.reshape(-1, 1), rstd.reshape(-1, 1)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def np_instance_norm(x, w, b, eps=EPS):
    red = tuple(range(2, x.ndim))
    s = _bshape(x.ndim, 1)
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w.reshape(s) + b.reshape(s)


def np_group_norm(x, groups, w, b, eps=EPS):
    s = _bshape(x.ndim, 1)
    xg = x.reshape(x.shape[0], groups, -1)
    mean = xg.mean(axis=-1, keepdims=True)
    var = xg.var(axis=-1, keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * w.reshape(s) + b.reshape(s)


def np_group_norm_backward(dy, x, groups, w, mean, rstd):
    s = _bshape(x.ndim, 1)
    red = (0,) + tuple(range(2, x.ndim))
    n = x.shape[0]
    mean, rstd = mean.reshape(n, groups, 1), rstd.reshape(n, groups, 1)
    xhat = (x.reshape(n, groups, -1) - mean) * rstd
    g = (dy * w.reshape(s)).reshape(n, groups, -1)
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx.reshape(x.shape), (dy * xhat.reshape(x.shape)).sum(axis=red), dy.sum(axis=red)


# ----------------------------------------------------------------------------- building a case

def _first(r):
    return r[0] if isinstance(r, tuple) else r


class _Data:
    """A case's tensors: `x`, `dy` (for bncore and PyTorch: torch tensors when torch is
    used, else NumPy arrays) and `xn`, `dyn`, the NumPy views of the same memory in the
    layout a NumPy user would hold (NHWC for channels-last, channel axis `np_axis`)."""

    def __init__(self, case: Case, torch, seed=0):
        rng = np.random.default_rng(seed)
        shape = case.shape
        nhwc = case.layout == "NHWC"
        # generated in the physical order (N, H, W, C for channels-last), seen as (N, C, H, W)
        phys = (shape[0],) + shape[2:] + (shape[1],) if nhwc else shape
        xp = rng.standard_normal(phys, dtype=np.float32) * 2 + 0.5
        dyp = rng.standard_normal(phys, dtype=np.float32)
        c = shape[-1] if case.op == "layer_norm" else shape[1]
        params = dict(w=1 + 0.1 * rng.standard_normal(c, dtype=np.float32),
                      b=0.1 * rng.standard_normal(c, dtype=np.float32),
                      rm=0.1 * rng.standard_normal(c, dtype=np.float32),
                      rv=1 + 0.1 * rng.random(c, dtype=np.float32))
        self.np_axis = -1 if nhwc else 1
        self.torch = torch
        if torch is not None:
            tdtype = getattr(torch, case.dtype)
            xt, dyt = torch.from_numpy(xp).to(tdtype), torch.from_numpy(dyp).to(tdtype)
            self.x, self.dy = (xt.movedim(-1, 1), dyt.movedim(-1, 1)) if nhwc else (xt, dyt)
            self.p = {k: torch.from_numpy(v) for k, v in params.items()}
            self.empty_like = lambda t: torch.empty_like(t, memory_format=torch.preserve_format)
        else:
            self.x, self.dy = (np.moveaxis(xp, -1, 1), np.moveaxis(dyp, -1, 1)) if nhwc else (xp, dyp)
            self.p = params
            self.empty_like = lambda a: np.empty_like(a)
        self.numpy_ok = case.dtype == "float32"
        if self.numpy_ok:
            # same memory as x / dy, in the physical (NumPy-natural) layout
            self.xn = self.x.numpy() if torch is not None else self.x
            self.dyn = self.dy.numpy() if torch is not None else self.dy
            if case.layout == "NHWC":
                self.xn, self.dyn = np.moveaxis(self.xn, 1, -1), np.moveaxis(self.dyn, 1, -1)
            self.pn = {k: (v.numpy() if torch is not None else v) for k, v in self.p.items()}

    def param(self, name):
        """A fresh copy of a parameter (running statistics are updated in place)."""
        v = self.p[name]
        return v.clone() if self.torch is not None else v.copy()

    def np_param(self, name):
        return self.pn[name].copy()


def _as_np32(t):
    if t is None:
        return None
    if hasattr(t, "detach"):
        return t.detach().float().numpy()
    return np.asarray(t, dtype=np.float32)


def build(case: Case, torch):
    """The contenders of `case`: {name: callable returning the case's main output (y or dx)},
    and a short description of what the PyTorch contender calls."""
    d = _Data(case, torch)
    F = torch.nn.functional if torch is not None else None
    aten = torch.ops.aten if torch is not None else None
    x, dy, w, b = d.x, d.dy, d.p["w"], d.p["b"]
    fns, torch_call = {}, None
    if d.numpy_ok:
        xn, dyn, wn, bn = d.xn, d.dyn, d.pn["w"], d.pn["b"]
    out = d.empty_like(x)
    shape = case.shape

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
            if d.numpy_ok:
                rm_n, rv_n = d.np_param("rm"), d.np_param("rv")
                fns["numpy"] = lambda: np_batch_norm_train(xn, rm_n, rv_n, wn, bn, d.np_axis)
        elif case.kind == "fwd-eval":
            rm, rv = d.p["rm"], d.p["rv"]
            fns["bncore"] = lambda: bncore.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)
                torch_call = "F.batch_norm(training=False)"
            if d.numpy_ok:
                rmn, rvn = d.pn["rm"], d.pn["rv"]
                fns["numpy"] = lambda: np_batch_norm_eval(xn, rmn, rvn, wn, bn, d.np_axis)
        else:
            _, sm, si = bncore.batch_norm_forward(x, None, None, w, b, True, eps=EPS)
            fns["bncore"] = lambda: bncore.batch_norm_backward(dy, x, w, sm, si, training=True)
            if torch is not None:
                mask = [True, True, True]
                fns["torch"] = lambda: aten.native_batch_norm_backward(dy, x, w, None, None, sm, si, True, EPS, mask)
                torch_call = "aten.native_batch_norm_backward (kernel only)"
            if d.numpy_ok:
                smn, sin = _as_np32(sm), _as_np32(si)
                fns["numpy"] = lambda: np_batch_norm_backward(dyn, xn, wn, smn, sin, d.np_axis)

    elif case.op == "layer_norm":
        ns = (shape[-1],)
        if case.kind == "fwd":
            fns["bncore"] = lambda: bncore.layer_norm(x, ns, w, b, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.layer_norm(x, ns, w, b, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.layer_norm(x, ns, w, b, EPS)
                torch_call = "F.layer_norm"
            if d.numpy_ok:
                fns["numpy"] = lambda: np_layer_norm(xn, wn, bn)
        else:
            _, sm, sr = bncore.layer_norm_forward(x, ns, w, b, EPS)
            fns["bncore"] = lambda: bncore.layer_norm_backward(dy, x, ns, w, sm, sr)
            if torch is not None:
                smt, srt = sm.reshape(-1, 1), sr.reshape(-1, 1)  # PyTorch keeps them (N, 1)
                mask = [True, True, True]
                fns["torch"] = lambda: aten.native_layer_norm_backward(dy, x, list(ns), smt, srt, w, b, mask)
                torch_call = "aten.native_layer_norm_backward (kernel only)"
            if d.numpy_ok:
                smn, srn = _as_np32(sm), _as_np32(sr)
                fns["numpy"] = lambda: np_layer_norm_backward(dyn, xn, wn, smn, srn)

    elif case.op == "instance_norm":
        fns["bncore"] = lambda: bncore.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS, out=out)
        fns["bncore_alloc"] = lambda: bncore.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS)
        if torch is not None:
            fns["torch"] = lambda: F.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS)
            torch_call = "F.instance_norm(use_input_stats=True)"
        if d.numpy_ok:
            fns["numpy"] = lambda: np_instance_norm(xn, wn, bn)

    elif case.op == "group_norm":
        g = case.groups
        if case.kind == "fwd":
            fns["bncore"] = lambda: bncore.group_norm(x, g, w, b, EPS, out=out)
            fns["bncore_alloc"] = lambda: bncore.group_norm(x, g, w, b, EPS)
            if torch is not None:
                fns["torch"] = lambda: F.group_norm(x, g, w, b, EPS)
                torch_call = f"F.group_norm({g} groups)"
            if d.numpy_ok:
                fns["numpy"] = lambda: np_group_norm(xn, g, wn, bn)
        else:
            _, sm, sr = bncore.group_norm_forward(x, g, w, b, EPS)
            fns["bncore"] = lambda: bncore.group_norm_backward(dy, x, g, w, sm, sr)
            if torch is not None:
                n, c, hw = shape[0], shape[1], math.prod(shape[2:])
                mask = [True, True, True]
                fns["torch"] = lambda: aten.native_group_norm_backward(dy, x, sm, sr, w, n, c, hw, g, mask)
                torch_call = "aten.native_group_norm_backward (kernel only)"
            if d.numpy_ok:
                smn, srn = _as_np32(sm), _as_np32(sr)
                fns["numpy"] = lambda: np_group_norm_backward(dyn, xn, g, wn, smn, srn)
    else:
        raise ValueError(f"unknown op {case.op!r}")

    def to_ref(name, r):
        """A contender's main output as float32 NumPy, in the logical (N, C, ...) order."""
        a = _as_np32(_first(r))
        if name == "numpy" and case.layout == "NHWC":
            a = np.moveaxis(a, -1, 1)
        return a

    return fns, torch_call, to_ref


# ----------------------------------------------------------------------------- timing

def time_contenders(fns: dict, reps: Repeats):
    """Warm-up rounds, then repeats in which every contender runs once, the order rotated
    each repeat. Returns ({name: seconds of each repeat}, repeats, {name: first result})."""
    names = list(fns)
    first = {}
    round_s = 0.0
    for i in range(max(1, reps.warmup)):
        t_round = time.perf_counter()
        for name in names:
            r = fns[name]()
            if i == 0:
                first[name] = r
            r = None
        round_s = time.perf_counter() - t_round
    repeats = reps.count(round_s)
    samples = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for k in range(repeats):
            j = k % len(names)
            for name in names[j:] + names[:j]:
                fn = fns[name]
                t0 = time.perf_counter()
                r = fn()
                samples[name].append(time.perf_counter() - t0)
                r = None  # noqa: F841 -- the result is freed outside the clock
    finally:
        if enabled:
            gc.enable()
    return samples, repeats, first


def _tolerance(case: Case) -> float:
    return 0.1 if case.dtype == "bfloat16" else 2e-3


def run_case(case: Case, torch, reps: Repeats, dram_gbps: float, llc_bytes=None) -> dict:
    fns, torch_call, to_ref = build(case, torch)
    samples, repeats, first = time_contenders(fns, reps)
    med = {name: statistics.median(v) for name, v in samples.items()}
    ref = to_ref("bncore", first["bncore"])
    diffs = {}
    for name in first:
        if name != "bncore":
            diffs[name] = float(np.max(np.abs(to_ref(name, first[name]) - ref))) if ref.size else 0.0
    first = None
    ms = {name: (med[name] * 1e3 if name in med else None) for name in CONTENDERS}
    gbps = {name: (case.bytes / med[name] / 1e9 if name in med else None) for name in CONTENDERS}
    return {
        "op": case.op, "pass": case.kind, "name": case.name, "shape": list(case.shape), "dtype": case.dtype,
        "layout": case.layout, "groups": case.groups or None, "bytes": case.bytes, "repeats": repeats,
        "ms": ms, "gbps": gbps,
        "ms_min": {name: (min(samples[name]) * 1e3 if name in samples else None) for name in CONTENDERS},
        "samples_ms": {name: [round(t * 1e3, 6) for t in v] for name, v in samples.items()},
        "pct_of_dram_copy": {n: (100 * g / dram_gbps if g is not None else None) for n, g in gbps.items()},
        "speedup_vs_torch": (ms["torch"] / ms["bncore"]) if ms["torch"] is not None else None,
        # both allocating their output: bncore without out= in forward
        "speedup_vs_torch_allocating": (ms["torch"] / (ms["bncore_alloc"] or ms["bncore"]))
        if ms["torch"] is not None else None,
        "speedup_vs_numpy": (ms["numpy"] / ms["bncore"]) if ms["numpy"] is not None else None,
        "torch_call": torch_call,
        "max_abs_diff_vs_bncore": diffs,
        "agrees": all(v <= _tolerance(case) for v in diffs.values()),
        # the working set (the bytes counted) fits in the last-level cache: repeats may run from it
        "fits_llc": bool(llc_bytes) and case.bytes <= llc_bytes,
    }


def measure_overhead(suite: Suite, torch, quick: bool) -> dict:
    """One small batch norm call (training, running stats, weight, bias) of a (16, 32) tensor:
    median per-call time over blocks of calls, the contenders alternating by block."""
    shape = suite.overhead_shape
    c = shape[1]
    per_block = 50
    blocks = suite.overhead_blocks[1 if quick else 0]
    if torch is not None:
        F = torch.nn.functional
        x = torch.randn(shape)
        w, b = torch.ones(c), torch.zeros(c)
        rms = [(torch.zeros(c), torch.ones(c)) for _ in range(2)]
        fns = {"bncore": lambda: bncore.batch_norm(x, rms[0][0], rms[0][1], w, b, True, MOMENTUM, EPS),
               "torch": lambda: F.batch_norm(x, rms[1][0], rms[1][1], w, b, True, MOMENTUM, EPS)}
        kind = "torch"
    else:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        w, b, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
        fns = {"bncore": lambda: bncore.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)}
        kind = "numpy"
    names = list(fns)
    for name in names:
        for _ in range(per_block):
            fns[name]()
    samples = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for k in range(blocks):
            j = k % len(names)
            for name in names[j:] + names[:j]:
                fn = fns[name]
                t0 = time.perf_counter()
                for _ in range(per_block):
                    fn()
                samples[name].append((time.perf_counter() - t0) / per_block)
    finally:
        if enabled:
            gc.enable()
    us = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
    return {"shape": list(shape), "input": kind, "call": "batch_norm(training=True, running stats, weight, bias)",
            "calls": blocks * per_block, "us": {"bncore": us["bncore"], "torch": us.get("torch")}}


# ----------------------------------------------------------------------------- output

COLUMNS = [("op", 20, "<"), ("shape", 19, "<"), ("dtype", 8, "<"), ("layout", 6, "<"),
           ("bncore ms", 9, ">"), ("alloc ms", 8, ">"), ("torch ms", 8, ">"), ("numpy ms", 8, ">"),
           ("speed-up", 8, ">"), ("alloc x", 7, ">"), ("GB/s", 5, ">"), ("% copy", 7, ">")]


def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}"


def _fmt_rate(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def _row(cells):
    return "  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS)).rstrip()


def header() -> str:
    line = _row([name for name, _, _ in COLUMNS])
    return line + "\n" + "-" * len(line)


def format_row(r: dict) -> str:
    shape = "(" + ", ".join(str(s) for s in r["shape"]) + ")"
    su, sa = r["speedup_vs_torch"], r["speedup_vs_torch_allocating"]
    g, p = r["gbps"]["bncore"], r["pct_of_dram_copy"]["bncore"]
    ms = r["ms"]
    line = _row([r["name"], shape, r["dtype"], r["layout"], _fmt_ms(ms["bncore"]), _fmt_ms(ms["bncore_alloc"]),
                 _fmt_ms(ms["torch"]), _fmt_ms(ms["numpy"]), "-" if su is None else f"{su:.2f}x",
                 "-" if sa is None or ms["bncore_alloc"] is None else f"{sa:.2f}x", _fmt_rate(g),
                 f"{p:.0f}%" + ("*" if r["fits_llc"] else " ")])
    return line if r["agrees"] else line + "  !"


def _llc_bytes():
    """The size of the largest (last-level) CPU cache from Linux's sysfs, or None."""
    best = (0, None)
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/level") as f:
                    level = int(f.read())
                with open(f"{base}/{entry}/size") as f:
                    text = f.read().strip()
            except (OSError, ValueError):
                continue
            scale = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
            if level > best[0]:
                best = (level, size)
    except (OSError, ValueError):
        pass
    return best[1]


def _loadavg():
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_info(threads: int, torch) -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"bncore": bncore.__version__, "numpy": np.__version__, "python": platform.python_version()}
    if torch is not None:
        versions["torch"] = torch.__version__
    try:
        import matplotlib

        versions["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "usable_cpus": usable, "threads": threads,
            "llc_bytes": _llc_bytes(), "loadavg_start": _loadavg(),
            "platform": platform.platform(), "machine": platform.machine(), "versions": versions,
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES") if k in os.environ}}


def write_plot(path: str, results: list) -> str:
    """A horizontal bar chart of bncore's speed-up over PyTorch per case; returns a message."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return f"--plot {path}: not written, matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in results if r["speedup_vs_torch"] is not None]
    if not rows:
        return f"--plot {path}: not written, there are no speed-ups over PyTorch to plot (PyTorch not installed)"
    labels = [f"{r['name']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}" for r in rows]
    values = [r["speedup_vs_torch"] for r in rows]
    fig = Figure(figsize=(10, 0.32 * len(rows) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ypos = list(range(len(rows)))[::-1]
    # bars grow from 1 (parity) to the speed-up, on a log scale: 2x faster and 2x slower look alike
    ax.barh(ypos, [v - 1 for v in values], left=1, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    lo, hi = min(min(values), 1) / 1.5, max(max(values), 1) * 1.5
    ax.set_xlim(lo, hi)
    ax.set_xticks([2.0 ** k for k in range(-12, 13) if lo <= 2.0 ** k <= hi])  # ..., 0.5x, 1x, 2x, 4x, ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:.2f}x ", va="center", ha="left" if v >= 1 else "right", fontsize=7)
    ax.set_xlabel("speed-up of bncore over PyTorch (PyTorch time / bncore time, log scale; > 1: bncore faster)")
    ax.set_title("bncore vs PyTorch, median times (bncore forward writes into out=; PyTorch allocates)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def _import_torch(disabled: bool):
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def run(suite: Suite, threads=None, quick=False, torch=None, echo=print) -> dict:
    """Runs the bench; `echo` receives each line as it is printed. Returns the JSON-able report."""
    reps = QUICK if quick else FULL
    prev_threads = bncore.get_num_threads()
    prev_torch = torch.get_num_threads() if torch is not None else None
    if threads is not None:
        bncore.set_num_threads(threads)
    n = bncore.get_num_threads()
    if torch is not None:
        torch.set_num_threads(n)
    try:
        info = machine_info(n, torch)
        echo(f"bncore bench: {info['cpu'] or 'unknown CPU'}, {info['usable_cpus']} CPUs, {n} thread(s) for bncore"
             + (" and PyTorch" if torch is not None else "") + "; NumPy single-threaded"
             + (" (quick: fewer repeats)" if quick else ""))
        echo("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        load = info["loadavg_start"]
        if load is not None:
            echo(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
                 + (" (something ran in the last minute: if it still runs, times are noisy)" if load[0] >= 0.5
                    else ""))
        if torch is None:
            echo("PyTorch is not installed: no PyTorch column, no bfloat16 cases, bncore runs on NumPy arrays")
        bw = measure_bandwidth(suite, n, reps)
        dram = bw["dram"]["gbps"]
        echo(f"copy bandwidth (np.copyto float32, bytes read + written per second, median; {n} thread(s)):")
        echo(f"  DRAM     {suite.dram_bytes // MIB:>4} MiB array: {dram:7.1f} GB/s")
        echo(f"  in-cache {suite.cache_bytes // MIB:>4} MiB array: {bw['cache']['gbps']:7.1f} GB/s"
             f" ({2 * suite.cache_bytes // MIB} MiB source + destination)")
        if "dram_1_thread" in bw:
            echo(f"  1 thread: DRAM {bw['dram_1_thread']['gbps']:.1f} GB/s, in-cache "
                 f"{bw['cache_1_thread']['gbps']:.1f} GB/s")
        echo("")
        echo("median ms per call. bncore ms: forward into a preallocated out=, backward allocating dx, dw, db; "
             "alloc ms: bncore forward")
        echo("without out= (allocating y, as PyTorch does). speed-up = torch ms / bncore ms; alloc x = torch ms / "
             "alloc ms. GB/s: bncore")
        echo("under the minimal byte model (forward: read x + write y; backward: read x, dy + write dx); % copy: "
             "of the DRAM copy bandwidth")
        echo(header())
        results = []
        skipped = []
        for case in suite.cases:
            if case.dtype == "bfloat16" and torch is None:
                skipped.append(case.label())
                continue
            r = run_case(case, torch, reps, dram, info["llc_bytes"])
            results.append(r)
            echo(format_row(r))
        if any(r["fits_llc"] for r in results):
            echo(f"* the case's bytes fit in the {info['llc_bytes'] / MIB:.0f} MiB last-level cache: repeats may run "
                 "from cache, above the DRAM copy bandwidth")
        if skipped:
            echo(f"skipped without PyTorch: {len(skipped)} bfloat16 case(s)")
        if not all(r["agrees"] for r in results):
            echo("! the contenders' outputs differ by more than the tolerance (see max_abs_diff_vs_bncore in --json)")
        echo("")
        overhead = measure_overhead(suite, torch, quick)
        us = overhead["us"]
        line = (f"Python overhead, batch norm of a {tuple(overhead['shape'])} {overhead['input']} tensor "
                f"(training, median of {overhead['calls']} calls): bncore.batch_norm {us['bncore']:.1f} us")
        if us["torch"] is not None:
            line += f", torch.nn.functional.batch_norm {us['torch']:.1f} us ({us['bncore'] / us['torch']:.2f}x)"
        echo(line)
        notes = [
            "bncore forward writes into a preallocated out=; PyTorch's functional forward allocates its output "
            "(it has no out=); both backward passes allocate their gradients. bncore_alloc is bncore's forward "
            "without out=. A fresh allocation above glibc's mmap threshold (at most 32 MiB) is page-faulted in "
            "on every call, which can dominate the time of a memory-bound kernel.",
            "PyTorch backward: torch.ops.aten.native_{batch,layer,group}_norm_backward called directly with "
            "output_mask [True, True, True]: only the backward kernel, no autograd graph or engine.",
            "Each repeat runs every contender once, the order rotated per repeat; times are medians after warm-up.",
            "bfloat16 cases keep weight, bias and running statistics in float32; NumPy has no bfloat16 ('-').",
        ]
        settings = {"threads": n, "quick": quick, "eps": EPS, "momentum": MOMENTUM, "warmup_rounds": reps.warmup,
                    "repeat_budget_s": reps.budget_s, "repeats_min": reps.least, "repeats_max": reps.most,
                    "byte_model": "forward: read x + write y; backward: read x, dy + write dx; "
                                  "parameter vectors ignored",
                    "gb": 1e9}
        return {"machine": info, "settings": settings, "loadavg_end": _loadavg(), "bandwidth": bw,
                "cases": results, "skipped": skipped, "overhead": overhead, "notes": notes}
    finally:
        bncore.set_num_threads(prev_threads)
        if torch is not None:
            torch.set_num_threads(prev_torch)


def main(args) -> int:
    if args.threads is not None and args.threads < 1:
        print(f"bncore bench: --threads: expected a positive number, got {args.threads}", file=sys.stderr)
        return 2
    torch = _import_torch(getattr(args, "no_torch", False))
    suite = SUITES[getattr(args, "suite", "full")]()
    t0 = time.perf_counter()
    report = run(suite, args.threads, args.quick, torch, echo=lambda s: print(s, flush=True))
    report["settings"]["suite"] = getattr(args, "suite", "full")
    report["settings"]["wall_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        print(write_plot(args.plot, report["cases"]))
    print(f"({report['settings']['wall_s']:.0f} s)")
    return 0
