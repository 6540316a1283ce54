"""bncore on CUDA devices: what the build holds, and the stream calls run on.

CUDA tensors (PyTorch, CuPy, any DLPack producer of kDLCUDA memory) are computed on their
device and returned as the caller's type there. By default a call runs on the current
stream of the tensor's library (``torch.cuda.current_stream()``, CuPy's current stream; the
legacy default stream for other producers) and never waits for it on the host, except where
docs/cuda.md says so. ``with bncore.cuda.stream(s):`` runs this thread's calls on `s`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import _core

__all__ = ["available", "device_count", "stream"]


def device_count() -> int:
    """CUDA devices bncore can use now: 0 without CUDA in the build, a driver or a device."""
    return int(_core.cuda_device_count())


def available() -> bool:
    """Whether the CUDA backend is compiled in and a device is present."""
    return bool(_core.build_features()[0]) and device_count() > 0


@contextlib.contextmanager
def stream(s: Any) -> Iterator[None]:
    """Runs this thread's bncore calls on CUDA stream `s` (a ``torch.cuda.Stream``, a
    ``cupy.cuda.Stream`` or an int ``cudaStream_t``) inside the block; producers are asked
    for their data on it (``__dlpack__(stream=...)``)."""
    previous = _core.set_stream(s)
    try:
        yield
    finally:
        _core.set_stream(previous)
