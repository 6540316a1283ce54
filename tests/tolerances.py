"""Per-dtype tolerances for comparing bncore against the float64 reference (and PyTorch).

`value` is for forward results (outputs, saved statistics, running statistics);
`grad` for backward results (grad_input, grad_weight, grad_bias), which go
through one more reduction and so lose a little more. Values are relative
(rtol) with an absolute floor (atol) for elements near zero; data are O(1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


@dataclass(frozen=True)
class DtypeTol:
    value: Tol
    grad: Tol


TOLERANCES = {
    "float16": DtypeTol(value=Tol(rtol=5e-3, atol=5e-3), grad=Tol(rtol=1e-2, atol=1e-2)),
    "bfloat16": DtypeTol(value=Tol(rtol=3e-2, atol=3e-2), grad=Tol(rtol=6e-2, atol=6e-2)),
    "float32": DtypeTol(value=Tol(rtol=1e-5, atol=1e-5), grad=Tol(rtol=5e-5, atol=5e-5)),
    "float64": DtypeTol(value=Tol(rtol=1e-12, atol=1e-12), grad=Tol(rtol=1e-10, atol=1e-10)),
}


def dtype_name(a) -> str:
    """'float32' etc. for a NumPy array, a torch tensor, a dtype or a name."""
    if isinstance(a, str):
        return a
    if isinstance(a, type) and issubclass(a, np.generic):  # np.float32
        return np.dtype(a).name
    dt = getattr(a, "dtype", a)
    if isinstance(dt, np.dtype):
        return dt.name
    return str(dt).split(".")[-1]  # torch.float32 -> float32


def tol(dtype, kind: str = "value") -> Tol:
    return getattr(TOLERANCES[dtype_name(dtype)], kind)


def to_numpy64(a) -> np.ndarray:
    """A float64 NumPy copy of a NumPy array, torch tensor or any DLPack tensor."""
    if hasattr(a, "detach"):  # torch
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def assert_close(actual, expected, dtype, kind: str = "value", scale: float = 1.0, err_msg: str = "",
                 magnitude=None):
    """Asserts `actual` matches `expected` within the tolerance of `dtype` for `kind` ('value' or 'grad'),
    both tolerances multiplied by `scale`.

    `magnitude` (broadcast against `expected`): the sum of absolute values of the terms a result
    sums (see bncore.reference.normalize_backward_bounds). A sum errs by about eps * that magnitude
    however much its terms cancel, so rtol is then relative to max(|expected|, magnitude): the
    error model of summation, not a factor of the element count."""
    t = tol(dtype, kind)
    a, e = to_numpy64(actual), to_numpy64(expected)
    if magnitude is None:
        np.testing.assert_allclose(a, e, rtol=t.rtol * scale, atol=t.atol * scale, err_msg=err_msg)
        return
    ref = np.maximum(np.abs(e), np.asarray(magnitude, dtype=np.float64))
    bound = t.atol * scale + t.rtol * scale * ref
    bad = ~(np.abs(a - e) <= bound)
    if np.any(bad):
        worst = np.unravel_index(np.argmax(np.where(bad, np.abs(a - e) / bound, 0)), np.shape(e)) if np.ndim(e) else ()
        raise AssertionError(f"{err_msg}: {int(np.sum(bad))} of {np.size(e)} elements outside "
                             f"{t.atol * scale:g} + {t.rtol * scale:g} * max(|expected|, magnitude); worst at "
                             f"{worst}: actual {a[worst]!r}, expected {e[worst]!r}, "
                             f"magnitude {np.broadcast_to(ref, np.shape(e))[worst]!r}")
