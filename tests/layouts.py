"""Memory layouts for the tests: the same logical values in other strides (slices, transposes,
negative strides, permutations, channels-last torch tensors), and half tensors (torch for bfloat16,
which NumPy cannot export). Nothing here asserts about bncore."""
from __future__ import annotations

import numpy as np
import pytest


def nonzero_data(rng, shape, dtype=np.float64, axis=1):
    """O(1) data, non-zero mean, different per channel: 1.5 * N(0, 1) + channel offset."""
    x = 1.5 * rng.normal(size=shape)
    if len(shape) and x.size:
        offsets = rng.uniform(-2.0, 2.0, size=shape[axis])
        view = [1] * len(shape)
        view[axis] = shape[axis]
        x = x + offsets.reshape(view)
    return x.astype(dtype)


def with_layout(x, layout, rng=None):
    """`x`'s values in a new array of the same logical shape but another memory layout."""
    if layout == "contiguous":
        return np.ascontiguousarray(x)
    if layout == "sliced":  # every other element of a bigger buffer, with an offset
        big = np.zeros(tuple(2 * s + 1 for s in x.shape), x.dtype)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in x.shape)]
        view[...] = x
        assert not view.flags.c_contiguous or x.size <= 1
        return view
    if layout == "transposed":  # Fortran order: a transposed view of a C array
        t = np.ascontiguousarray(x.T).T
        assert t.flags.f_contiguous
        return t
    if layout == "reversed":  # negative strides on the first and last axes
        r = np.ascontiguousarray(x[::-1, ..., ::-1])[::-1, ..., ::-1]
        assert r.strides[0] < 0 or x.shape[0] <= 1
        return r
    if layout == "permuted":  # a random axis permutation of a C array
        perm = (rng or np.random.default_rng(0)).permutation(x.ndim)
        p = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
        return p
    raise ValueError(layout)


LAYOUTS = ["contiguous", "sliced", "transposed", "reversed", "permuted"]


def strided(rng, shape, perm, steps, dtype, values=None):
    """An array of logical shape `shape` whose memory has axis order `perm` and steps `steps`
    (negative: reversed) inside a larger buffer; `values` (float64, of `shape`) fills it."""
    phys = [shape[p] * abs(s) for p, s in zip(perm, steps)]
    base = rng.normal(size=phys).astype(dtype)
    view = base[tuple(slice(None, None, s) for s in steps)]
    view = view[tuple(slice(0, shape[p]) for p in perm)]
    out = view.transpose(np.argsort(perm))
    assert out.shape == tuple(shape)
    if values is not None:
        out[...] = values
    return out


def to_layout(values, layout, dtype, rng):
    """`values` (float64) as a tensor of `dtype` in one of the drawn layouts:
    ('numpy', perm, steps) or ('torch', perm, steps, channels_last)."""
    if layout[0] == "numpy":
        return strided(rng, values.shape, layout[1], layout[2], dtype, values)
    torch = pytest.importorskip("torch", reason="torch is needed for this layout")
    _, perm, steps, channels_last = layout
    arr = strided(rng, values.shape, perm, [abs(s) for s in steps], dtype, values)  # torch: no negative strides
    t = torch.from_numpy(arr)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)
    return t


FIXED_LAYOUTS = {
    "transposed": lambda a: np.ascontiguousarray(a.T).T,
    "reversed": lambda a: np.ascontiguousarray(a[::-1, ..., ::-1])[::-1, ..., ::-1],
    "sliced": lambda a: sliced(a),
    "inner-reversed": lambda a: np.ascontiguousarray(a[..., ::-1])[..., ::-1],
}


def sliced(a):
    big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
    view = big[tuple(slice(1, 1 + 2 * s, 2) for s in a.shape)]
    view[...] = a
    return view


def half_or_numpy(values, dtype):
    """float64 values as a tensor of dtype: NumPy for float16/32/64, torch for bfloat16."""
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch", reason="torch is needed for this layout")
        return torch.from_numpy(values).to(torch.bfloat16)
    return values.astype(dtype)
