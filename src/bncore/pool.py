"""The cache of large output buffers: outputs without ``out=`` at the cost of ``out=``.

Above glibc's mmap threshold (at most 32 MiB) every allocation is a fresh mapping, so a call that
allocates its output page-faults all of it in again: for a layer norm of (8192, 1024) float32 that
cost more than the kernel. So the NumPy arrays and PyTorch tensors that bncore allocates itself
(outputs, gradients and saved statistics of at least ``min_bytes``, on the CPU) take their memory
from a small cache of recently freed buffers, handed out through DLPack: the array is an ordinary
``numpy.ndarray`` or ``torch.Tensor`` whose DLPack deleter gives the memory back to the cache when
the array is freed, and only then. Memory still referenced is never handed out again.

Defaults: at most 16 buffers and 256 MiB held, for requests of 1 MiB and more; buffers of 2 MiB
and more are backed by transparent huge pages where the kernel allows it (``madvise`` mode).
``BNCORE_POOL=0`` in the environment turns the cache off at import, ``BNCORE_POOL_MAX_BYTES``
sets its byte limit; `set_pool` changes both at run time and `empty_cache` gives the held memory
back to the system. Thread-safe; after ``fork()`` the child has its own copy of the cache.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from . import _core

__all__ = ["empty_cache", "pool_stats", "set_pool"]

DEFAULT_MAX_BYTES = 256 * 2 ** 20
DEFAULT_MAX_BUFFERS = 16
DEFAULT_MIN_BYTES = 2 ** 20


def set_pool(enabled: bool | None = None, max_bytes: int | None = None, max_buffers: int | None = None,
             min_bytes: int | None = None) -> dict[str, Any]:
    """Changes the cache's settings (None keeps one) and returns them as they were.

    ``enabled=False`` empties the cache and makes every later output an ordinary allocation of its
    library (``numpy.empty``, ``torch.empty_like``); buffers in use stay valid and are unmapped when
    freed. Lowering ``max_bytes`` or ``max_buffers`` unmaps, oldest first, what no longer fits.
    ``max_buffers`` is at most 64."""
    before = pool_stats()
    for name, value in (("max_bytes", max_bytes), ("max_buffers", max_buffers), ("min_bytes", min_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"set_pool: expected {name} to be an int >= 0 or None, got {value!r}")
    if max_buffers is not None and max_buffers > _core.POOL_MAX_BUFFERS:
        raise ValueError(f"set_pool: expected max_buffers <= {_core.POOL_MAX_BUFFERS}, got {max_buffers}")
    _core.pool_configure(-1 if enabled is None else int(bool(enabled)), -1 if max_bytes is None else max_bytes,
                         -1 if max_buffers is None else max_buffers, -1 if min_bytes is None else min_bytes)
    return {k: before[k] for k in ("enabled", "max_bytes", "max_buffers", "min_bytes")}


def empty_cache() -> None:
    """Gives every buffer the cache holds back to the system (arrays in use are not affected)."""
    _core.pool_empty()


def pool_stats() -> dict[str, Any]:
    """The cache's settings and counters: held_bytes / held_buffers (cached now), live_bytes /
    live_buffers (handed out, not yet freed), hits and misses (requests served from the cache, and
    requests that mapped new memory)."""
    return _core.pool_stats()


def _bytes_from_env(name: str, text: str) -> int:
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}: expected a number of bytes (optionally with K, M or G), got {text!r}")
    return value


def _configure_from_env() -> None:
    """BNCORE_POOL and BNCORE_POOL_MAX_BYTES; a value that cannot be read is reported with a warning
    and the default kept (a typo in the environment should not make `import bncore` fail)."""
    enabled = os.environ.get("BNCORE_POOL", "").strip()
    max_bytes = os.environ.get("BNCORE_POOL_MAX_BYTES", "").strip()
    limit = None
    if max_bytes:
        try:
            limit = _bytes_from_env("BNCORE_POOL_MAX_BYTES", max_bytes)
        except ValueError as exc:
            warnings.warn(f"{exc}; keeping {DEFAULT_MAX_BYTES} bytes", RuntimeWarning, stacklevel=2)
    set_pool(enabled=None if not enabled else enabled.lower() not in ("0", "off", "false", "no"), max_bytes=limit)


_configure_from_env()
