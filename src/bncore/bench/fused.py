"""The fused-epilogue case of the bench: batch norm + ReLU in one pass against batch norm followed by
a separate ReLU pass, in bncore and in PyTorch.

Contenders, on the same tensors (torch tensors when PyTorch is present, else NumPy arrays), batch
norm in training with running statistics updated, output written in place where the API allows:

* fused: ``bncore.batch_norm(..., activation="relu", out=y)``: one read of x, one write of y.
* unfused: ``bncore.batch_norm(..., out=y)`` then ReLU in place on y (``torch.relu_`` /
  ``np.maximum(y, 0, out=y)``): the ReLU reads y back and writes it again.
* torch: ``F.relu(F.batch_norm(...), inplace=True)`` (PyTorch's BN allocates its output).
* fused_alloc and torch_alloc, like for like with both allocating every output:
  ``bncore.batch_norm(..., activation="relu")`` (what `bncore.torch.BatchNormReLU` runs) against
  ``F.relu(F.batch_norm(...))``, PyTorch's BN then its ReLU, each allocating.

Each repeat runs every contender once, the order rotated per repeat; times are medians. Every
output is checked against bncore.reference in float64.
"""
from __future__ import annotations

import statistics
from typing import Any

import numpy as np

import bncore
from bncore import reference as R

from .cases import EPS, MOMENTUM
from .timing import FULL, QUICK, time_contenders

FUSED_SHAPE = (32, 64, 56, 56)


def build(shape: tuple, torch) -> tuple[dict, Any]:
    """({name: callable returning the output}, the float64 expected output)."""
    rng = np.random.default_rng(0)
    c = shape[1]
    x = (rng.standard_normal(shape, dtype=np.float32) * 1.5 + 0.25).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32) * 0.5
    expected = np.maximum(R.batch_norm_ref(x, w, b, EPS)[0], 0.0)
    fns: dict = {}
    if torch is not None:
        F = torch.nn.functional
        x, w, b = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)

        def stats():
            return torch.zeros(c), torch.ones(c)

        y_fused, y_plain = torch.empty_like(x), torch.empty_like(x)
        relu_ = torch.relu_
    else:
        def stats():
            return np.zeros(c, np.float32), np.ones(c, np.float32)

        y_fused, y_plain = np.empty_like(x), np.empty_like(x)

        def relu_(y):
            return np.maximum(y, 0, out=y)
    rm_f, rv_f = stats()
    fns["fused"] = lambda: bncore.batch_norm(x, rm_f, rv_f, w, b, True, MOMENTUM, EPS, activation="relu",
                                             out=y_fused)
    rm_u, rv_u = stats()
    fns["unfused"] = lambda: relu_(bncore.batch_norm(x, rm_u, rv_u, w, b, True, MOMENTUM, EPS, out=y_plain))
    if torch is not None:
        rm_t, rv_t = stats()
        fns["torch"] = lambda: F.relu(F.batch_norm(x, rm_t, rv_t, w, b, True, MOMENTUM, EPS), inplace=True)
        rm_fa, rv_fa = stats()
        fns["fused_alloc"] = lambda: bncore.batch_norm(x, rm_fa, rv_fa, w, b, True, MOMENTUM, EPS, activation="relu")
        rm_ta, rv_ta = stats()
        fns["torch_alloc"] = lambda: F.relu(F.batch_norm(x, rm_ta, rv_ta, w, b, True, MOMENTUM, EPS))
    return fns, expected


def run(shape: tuple = FUSED_SHAPE, quick: bool = False, torch=None) -> dict:
    """Times the contenders; returns {"shape", "ms": {name: median}, "speedup_fused_vs_unfused",
    "speedup_fused_vs_torch", "speedup_fused_vs_torch_allocating" (fused_alloc against torch_alloc),
    "max_error_vs_reference": {name: ...}, "repeats"}."""
    fns, expected = build(shape, torch)
    samples, repeats, first = time_contenders(fns, QUICK if quick else FULL)
    scale = max(1.0, float(np.max(np.abs(expected))))
    errors = {}
    for name, y in first.items():
        got = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
        errors[name] = float(np.max(np.abs(got.astype(np.float64) - expected))) / scale
    ms = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    return {"shape": list(shape), "dtype": "float32", "repeats": repeats, "ms": ms,
            "samples_ms": {name: [round(t * 1e3, 6) for t in v] for name, v in samples.items()},
            "speedup_fused_vs_unfused": ms["unfused"] / ms["fused"],
            "speedup_fused_vs_torch": ms["torch"] / ms["fused"] if "torch" in ms else None,
            "speedup_fused_vs_torch_allocating": ms["torch_alloc"] / ms["fused_alloc"] if "torch_alloc" in ms else None,
            "max_error_vs_reference": errors, "agrees": all(e <= 1e-4 for e in errors.values())}


def report(r: dict) -> str:
    shape = "x".join(str(s) for s in r["shape"])
    lines = [f"batch norm + ReLU, training, {shape} float32 (medians of {r['repeats']} alternated repeats):"]
    for name, label in (("fused", "bncore fused (activation='relu')"), ("unfused", "bncore, then ReLU in place"),
                        ("torch", "torch F.batch_norm, then F.relu(inplace=True)"),
                        ("fused_alloc", "bncore fused, allocating its output"),
                        ("torch_alloc", "torch F.batch_norm, then F.relu, both allocating")):
        if name in r["ms"]:
            lines.append(f"  {label:<48} {r['ms'][name]:9.3f} ms")
    lines.append(f"  fused vs unfused: {r['speedup_fused_vs_unfused']:.2f}x" +
                 (f"; fused vs torch: {r['speedup_fused_vs_torch']:.2f}x" if r["speedup_fused_vs_torch"] else "") +
                 (f"; allocating, fused vs torch BN + ReLU: {r['speedup_fused_vs_torch_allocating']:.2f}x"
                  if r.get("speedup_fused_vs_torch_allocating") else ""))
    return "\n".join(lines)
