"""Tensors in, the caller's own array type out.

Inputs are imported through DLPack by `bncore._core.import_tensor`. Outputs are
allocated by the library the input came from (NumPy, PyTorch, CuPy) so that the
caller gets its own type back, on its device, in its layout; frameworks without
a writable `empty` (JAX) receive a bncore-owned buffer through DLPack instead.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _core

# any object with __dlpack__ / __dlpack_device__ (or a DLPack capsule); results come back as the caller's type
Array = Any

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF_DTYPES = ("float16", "bfloat16")


def family_of(obj: Any) -> str:
    """Which library made `obj`: 'numpy', 'torch', 'cupy', 'jax' or 'other'."""
    root = type(obj).__module__.split(".")[0]
    if root in ("numpy", "torch", "cupy"):
        return root
    if root in ("jax", "jaxlib"):
        return "jax"
    return "other"


def detach(obj: Any) -> Any:
    """A PyTorch tensor that requires grad cannot be exported; its data can."""
    if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
        return obj.detach()
    return obj


def to_numpy(value: Any, what: str) -> np.ndarray:
    """A NumPy copy of any DLPack tensor (or array-like), for loading state."""
    value = detach(value)
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        try:
            return np.array(np.from_dlpack(value), copy=True)
        except (TypeError, BufferError, RuntimeError) as exc:
            raise TypeError(f"{what}: cannot read it through DLPack ({exc})") from exc
    return np.array(value, copy=True)


def is_torch(obj: Any) -> bool:
    """Whether `obj` is a PyTorch tensor (known by its type's module, so that torch is never imported)."""
    tp = type(obj)
    known = _IS_TORCH.get(tp)
    if known is None:
        known = _IS_TORCH[tp] = tp.__module__.split(".")[0] == "torch"
    return known


_IS_TORCH: dict[type, bool] = {}


def check_torch_write(obj: Any, what: str) -> Any:
    """Autograd's rule for a write into `obj`, applied before bncore writes: a PyTorch leaf that
    requires grad (or a view of one) is refused while grad mode is on, as torch refuses an in-place
    op on it. Returns the tensor whose version counter `bump_versions` must advance after the
    write (any other PyTorch tensor), or None for other libraries."""
    if not is_torch(obj):
        return None
    if obj.requires_grad and sys.modules["torch"].is_grad_enabled():
        if obj.is_leaf:
            raise RuntimeError(f"{what}: a leaf Variable that requires grad is being used in an in-place operation.")
        base = obj._base
        if base is not None and base.is_leaf and base.requires_grad:
            raise RuntimeError(f"{what}: a view of a leaf Variable that requires grad is being used in an in-place "
                               "operation.")
    return obj


def bump_versions(written: Sequence[Any]) -> None:
    """Tells autograd that bncore wrote into these PyTorch tensors (as any in-place op does), so a
    backward that saved one of them raises torch's "modified by an inplace operation" error."""
    if written:
        # what torch.autograd.graph.increment_version runs, without its Python wrapper (it takes a
        # sequence); found once, as torch is imported by then
        if not _INCREMENT_VERSION:
            _INCREMENT_VERSION.append(sys.modules["torch"]._C._increment_version)
        _INCREMENT_VERSION[0](written)


_INCREMENT_VERSION: list[Callable[[Sequence[Any]], None]] = []


def import_tensor(obj: Any, what: str, writable: bool = False) -> _core.Tensor | None:
    if obj is None:
        return None
    return _core.import_tensor(obj, what, writable)


class Call:
    """The imported tensors of one call, handed back to their producers at the end (a context manager).

    Every tensor bncore writes into is imported here with ``writable=True``: this is the one place
    where autograd's in-place rules are applied (`check_torch_write`) and where, when the call
    succeeds, the version counters of the PyTorch tensors written are advanced (`bump_versions`)."""

    def __init__(self) -> None:
        self.tensors: list[_core.Tensor] = []
        self.written: list[Any] = []

    def add(self, obj: Any, what: str, writable: bool = False) -> _core.Tensor | None:
        """Imports an optional tensor (None stays None)."""
        if obj is None:
            return None
        return self.need(obj, what, writable)

    def need(self, obj: Any, what: str, writable: bool = False) -> _core.Tensor:
        """Imports a required tensor."""
        if obj is None:
            raise TypeError(f"{what}: expected a tensor that supports DLPack (NumPy, PyTorch, JAX, ...), got None")
        written = check_torch_write(obj, what) if writable else None
        t = _core.import_tensor(obj, what, writable)
        self.tensors.append(t)
        if written is not None:
            self.written.append(written)
        return t

    def __enter__(self) -> Call:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for t in self.tensors:
            t.release()
        if exc_type is None:
            bump_versions(self.written)


_EMPTY_LIKE: dict[type, Callable[[Any], Any] | None] = {}  # tensor type -> its library's empty_like


def empty_like_of(obj: Any) -> Callable[[Any], Any] | None:
    """The `empty_like` of the library that made `obj` (it keeps strides, so channels-last stays
    channels-last), or None for a library without one. For PyTorch it takes large CPU outputs from
    bncore's buffer cache (`bncore.pool`) and calls torch.empty_like for the rest."""
    tp = type(obj)
    if tp not in _EMPTY_LIKE:
        fam = family_of(obj)
        module = sys.modules.get(fam) if fam in ("numpy", "torch", "cupy") else None
        empty_like = getattr(module, "empty_like", None)
        if fam == "torch" and empty_like is not None:
            empty_like = _core.PooledEmptyLike(empty_like, module.from_dlpack)  # type: ignore[union-attr]
        _EMPTY_LIKE[tp] = empty_like
    return _EMPTY_LIKE[tp]


class Allocator:
    """Allocates outputs in the family of a reference tensor `like` (the input)."""

    def __init__(self, like: Any, like_tensor: _core.Tensor) -> None:
        self.like = like
        self.like_tensor = like_tensor
        self.family = family_of(like)
        self.device = like_tensor.device
        self._pending: list[_core.Buffer] = []  # bncore Buffers to hand over to a framework at the end

    def empty(self, shape: Sequence[int], dtype: str, like_layout: Any = None) -> Any:
        """A writable tensor of `shape` and `dtype`; `like_layout` (an input) gives its strides.
        Large NumPy and PyTorch CPU outputs come from bncore's buffer cache (`bncore.pool`): the
        same type, layout and behaviour as the library's own empty / empty_like."""
        fam = self.family
        if fam in ("numpy", "torch") and self.device == (1, 0):
            pooled = self._pooled(shape, dtype, like_layout)
            if pooled is not None:
                return pooled
        if fam == "numpy":
            if like_layout is not None and like_layout.dtype.name == dtype:
                return np.empty_like(like_layout)
            return np.empty(shape, dtype=numpy_dtype(dtype))
        if fam == "torch":
            torch = sys.modules["torch"]
            tdtype = getattr(torch, dtype)
            if like_layout is not None and like_layout.dtype == tdtype:
                return torch.empty_like(like_layout, memory_format=torch.preserve_format)
            return torch.empty(tuple(shape), dtype=tdtype, device=self.like.device)
        if fam == "cupy":
            cupy = sys.modules["cupy"]
            if self.device[0] in (2, 13):  # CUDA memory: on x's device, not CuPy's current one
                with cupy.cuda.Device(self.device[1]):
                    return cupy.empty(tuple(shape), dtype=dtype)
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

    def _pooled(self, shape: Sequence[int], dtype: str, like_layout: Any) -> Any:
        """The output from the buffer cache, or None where the cache does not take it (then the
        library allocates). `like_layout` keeps its strides as empty_like would: only the input
        itself (whose strides the imported tensor holds) of the same dtype; other layouts go to
        the library."""
        if self.family == "numpy" and dtype not in ("float16", "float32", "float64"):
            return None  # NumPy imports no bfloat16 through DLPack: ml_dtypes' arrays are numpy.empty's
        strides = None
        if like_layout is not None:
            if like_layout is not self.like or self.like_tensor.dtype != dtype:
                return None
            strides = self.like_tensor.strides
        consumer = np.from_dlpack if self.family == "numpy" else sys.modules["torch"].from_dlpack
        return _core.pool_array(tuple(shape), strides, dtype, consumer)

    def finish(self, obj: Any) -> Any:
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


def numpy_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a bncore dtype name; bfloat16 is ml_dtypes' (loaded: the input was one)."""
    if dtype == "bfloat16":
        ml_dtypes: Any = sys.modules.get("ml_dtypes")
        if ml_dtypes is None:  # a bfloat16 operand from another library (a torch weight with NumPy x, say)
            try:
                import ml_dtypes
            except ImportError:
                raise _core.UnsupportedDtypeError(
                    "a NumPy output of bfloat16 (for a bfloat16 operand) needs ml_dtypes, which is not installed: "
                    "pip install ml_dtypes, or pass operands of one library and dtype") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def stat_dtype(dtype: str) -> str:
    """Saved statistics are float32 for half inputs, else the input's dtype."""
    return "float32" if dtype in HALF_DTYPES else dtype


# cpu, cuda_host (pinned), cuda_managed: memory the CPU reads, one place for the C core (bn_is_host)
HOST_DEVICE_TYPES = (1, 3, 13)


def place(dev: tuple[int, int]) -> object:
    """Where a (device type, id) pair computes: every kind of host memory is one place."""
    return "host" if dev[0] in HOST_DEVICE_TYPES else dev


_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 10: "rocm", 13: "cuda_managed"}


def describe_device(dev: tuple[int, int]) -> str:
    kind, idx = dev
    return f"{_DEVICE_NAMES.get(kind, f'device type {kind}')}:{idx}"
