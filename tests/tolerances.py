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


def assert_close(actual, expected, dtype, kind: str = "value", scale: float = 1.0, err_msg: str = ""):
    """Asserts `actual` matches `expected` within the tolerance of `dtype` for `kind` ('value' or 'grad'),
    both tolerances multiplied by `scale`."""
    t = tol(dtype, kind)
    np.testing.assert_allclose(to_numpy64(actual), to_numpy64(expected), rtol=t.rtol * scale,
                               atol=t.atol * scale, err_msg=err_msg)
