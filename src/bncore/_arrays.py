"""Tensors in, the caller's own array type out.

Inputs are imported through DLPack by `bncore._core.import_tensor`. Outputs are
allocated by the library the input came from (NumPy, PyTorch, CuPy) so that the
caller gets its own type back, on its device, in its layout; frameworks without
a writable `empty` (JAX) receive a bncore-owned buffer through DLPack instead.
"""
from __future__ import annotations

import sys

import numpy as np

from . import _core

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF_DTYPES = ("float16", "bfloat16")


def family_of(obj) -> str:
    """Which library made `obj`: 'numpy', 'torch', 'cupy', 'jax' or 'other'."""
    root = type(obj).__module__.split(".")[0]
    if root in ("numpy", "torch", "cupy"):
        return root
    if root in ("jax", "jaxlib"):
        return "jax"
    return "other"


def detach(obj):
    """A PyTorch tensor that requires grad cannot be exported; its data can."""
    if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
        return obj.detach()
    return obj


def import_tensor(obj, what: str, writable: bool = False):
    if obj is None:
        return None
    return _core.import_tensor(obj, what, writable)


class Allocator:
    """Allocates outputs in the family of a reference tensor `like` (the input)."""

    def __init__(self, like, like_tensor):
        self.like = like
        self.family = family_of(like)
        self.device = like_tensor.device
        self._pending = []  # bncore Buffers to hand over to a framework at the end

    def empty(self, shape, dtype: str, like_layout=None):
        """A writable tensor of `shape` and `dtype`; `like_layout` (an input) gives its strides."""
        fam = self.family
        if fam == "numpy":
            if like_layout is not None and like_layout.dtype.name == dtype:
                return np.empty_like(like_layout)
            return np.empty(shape, dtype=np.dtype(dtype))
        if fam == "torch":
            torch = sys.modules["torch"]
            tdtype = getattr(torch, dtype)
            if like_layout is not None and like_layout.dtype == tdtype:
                return torch.empty_like(like_layout, memory_format=torch.preserve_format)
            return torch.empty(tuple(shape), dtype=tdtype, device=self.like.device)
        if fam == "cupy":
            cupy = sys.modules["cupy"]
            return cupy.empty(tuple(shape), dtype=dtype)
        if self.device[0] not in HOST_DEVICE_TYPES:
            raise _core.UnsupportedDeviceError(
                f"input: expected a tensor in host memory (cpu, cuda_host, cuda_managed), got a "
                f"{type(self.like).__module__}.{type(self.like).__qualname__} on {describe_device(self.device)}; "
                f"bncore allocates outputs for it only in host memory, so pass the framework's tensor "
                f"(PyTorch, CuPy) instead of a raw capsule")
        if dtype == "bfloat16" and self._to_numpy():
            raise _core.UnsupportedDtypeError(
                f"input: a {type(self.like).__module__}.{type(self.like).__qualname__} of bfloat16 gets NumPy "
                f"arrays back, and NumPy has no bfloat16 that DLPack can fill; pass the framework's tensor "
                f"(PyTorch, JAX) instead of a raw capsule")
        buf = _core.Buffer(shape, dtype)
        self._pending.append(buf)
        return buf

    def finish(self, obj):
        """The caller-facing form of a tensor made by `empty`."""
        if obj is None or not isinstance(obj, _core.Buffer):
            return obj
        if self.family == "jax":
            import jax.numpy as jnp

            return jnp.from_dlpack(obj)
        if not self._to_numpy():
            return self.like.__array_namespace__().from_dlpack(obj)
        return np.from_dlpack(obj)

    def _to_numpy(self) -> bool:
        """Whether `finish` hands bncore's buffers back as NumPy arrays."""
        return self.family != "jax" and not (self.family == "other" and hasattr(self.like, "__array_namespace__"))


def stat_dtype(dtype: str) -> str:
    """Saved statistics are float32 for half inputs, else the input's dtype."""
    return "float32" if dtype in HALF_DTYPES else dtype


def check_float(t, what: str):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: expected a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")


def check_same_device(tensors):
    """tensors: (name, imported tensor or None) pairs; all must share a device (host memory is one)."""
    first = None
    for name, t in tensors:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif _place(t.device) != _place(first[1]):
            raise _core.UnsupportedDeviceError(f"{name}: expected a tensor on the device of {first[0]} {describe_device(first[1])}, "
                             f"got one on {describe_device(t.device)}")


# cpu, cuda_host (pinned), cuda_managed: memory the CPU reads, one place for the C core (bn_is_host)
HOST_DEVICE_TYPES = (1, 3, 13)


def _place(dev):
    return "host" if dev[0] in HOST_DEVICE_TYPES else dev


_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 10: "rocm", 13: "cuda_managed"}


def describe_device(dev) -> str:
    kind, idx = dev
    return f"{_DEVICE_NAMES.get(kind, f'device type {kind}')}:{idx}"
