"""Every exception bncore raises, and the table from C status codes to classes.

One class per C status (``bn_status_t`` in ``bncore/bncore.h``), each also deriving from the
builtin that fits, so ``except ValueError`` keeps working. An error found in Python has the class
the C core would give the same condition: a shape that does not fit is a `ShapeMismatchError`
wherever it is found. This module imports nothing of bncore; ``_core`` checks at import that the
codes below agree with the C library's.
"""
from __future__ import annotations

__all__ = [
    "BncoreError", "InternalError", "InvalidArgumentError", "MissingRunningStatsError", "OutOfMemoryError",
    "OverlapError", "STATUS_ERRORS", "ShapeMismatchError", "UnsupportedDeviceError", "UnsupportedDtypeError",
]


class BncoreError(Exception):
    """Base class of every error bncore raises for a C status. `status` is the C code."""

    status: int | None = None


class InvalidArgumentError(BncoreError, ValueError):
    status = 1  # BN_STATUS_INVALID_ARGUMENT


class ShapeMismatchError(BncoreError, ValueError):
    status = 2  # BN_STATUS_SHAPE_MISMATCH


class UnsupportedDtypeError(BncoreError, TypeError):
    status = 3  # BN_STATUS_UNSUPPORTED_DTYPE


class UnsupportedDeviceError(BncoreError, ValueError):
    status = 4  # BN_STATUS_UNSUPPORTED_DEVICE


class OverlapError(BncoreError, ValueError):
    status = 5  # BN_STATUS_OVERLAP


class OutOfMemoryError(BncoreError, MemoryError):
    status = 6  # BN_STATUS_OUT_OF_MEMORY


class InternalError(BncoreError, RuntimeError):
    status = 7  # BN_STATUS_INTERNAL


class MissingRunningStatsError(InvalidArgumentError, RuntimeError):
    """Evaluation mode needs running statistics (PyTorch raises RuntimeError here)."""


STATUS_ERRORS: dict[int, type[BncoreError]] = {
    cls.status: cls
    for cls in (InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError, UnsupportedDeviceError,
                OverlapError, OutOfMemoryError, InternalError)
    if cls.status is not None
}
