"""bncore: normalization layers on one C core, for any DLPack tensor.

    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
    >>> y = bncore.batch_norm(x, training=True)          # NumPy in, NumPy out
"""
from __future__ import annotations

import os as _os

from . import _core, cuda
from ._core import get_num_threads, set_num_threads
from .errors import (BncoreError, InternalError, InvalidArgumentError, MissingRunningStatsError, OutOfMemoryError,
                     OverlapError, ShapeMismatchError, UnsupportedDeviceError, UnsupportedDtypeError)
from .functional import (batch_norm, batch_norm_backward, batch_norm_forward, batch_renorm, batch_renorm_backward,
                         batch_renorm_forward, fold, group_norm, group_norm_backward, group_norm_forward,
                         instance_norm, instance_norm_backward, instance_norm_forward, layer_norm, layer_norm_backward,
                         layer_norm_forward, normalize, normalize_backward, normalize_forward, renorm_schedule,
                         rms_norm, rms_norm_backward, rms_norm_forward)
from .layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from .pool import empty_cache, pool_stats, set_pool
from .state import Moments, RunningStats, precise_stats
from .sync import SyncBatchNorm  # synchronized across processes: bncore.sync

__version__ = _core.version_string()

__all__ = [
    "BatchNorm", "BncoreError", "GroupNorm", "InstanceNorm", "InternalError", "InvalidArgumentError", "LayerNorm",
    "MissingRunningStatsError", "Moments", "OutOfMemoryError", "OverlapError", "RMSNorm", "RunningStats",
    "ShapeMismatchError", "SyncBatchNorm", "UnsupportedDeviceError", "UnsupportedDtypeError", "__version__",
    "batch_norm", "batch_norm_backward", "batch_norm_forward", "batch_renorm", "batch_renorm_backward",
    "batch_renorm_forward", "build_info", "cuda", "cuda_available", "empty_cache", "fold", "get_cmake_dir",
    "get_cython_include", "get_include",
    "get_library", "get_num_threads", "get_pkgconfig_dir", "group_norm", "group_norm_backward",
    "group_norm_forward", "instance_norm", "instance_norm_backward", "instance_norm_forward", "layer_norm",
    "layer_norm_backward", "layer_norm_forward", "normalize", "normalize_backward", "normalize_forward",
    "pool_stats", "precise_stats", "renorm_schedule", "rms_norm", "rms_norm_backward", "rms_norm_forward",
    "set_num_threads", "set_pool",
]


def _package_dir() -> str:
    # the compiled parts' folder: in an editable install it differs from this file's
    return _os.path.dirname(_os.path.abspath(_core.__file__))


def get_include() -> str:
    """The folder holding bncore/bncore.h and dlpack/dlpack.h, for C and C++ builds."""
    return _os.path.join(_package_dir(), "include")


def get_library() -> str:
    """The path of the installed C shared library."""
    here = _package_dir()
    for name in sorted(_os.listdir(here)):
        if name.startswith("libbncore") and (".so" in name or name.endswith(".dylib")):
            return _os.path.join(here, name)
    raise FileNotFoundError(f"no libbncore shared library in {here}")


def get_cython_include() -> str:
    """The folder to pass to ``cython -I`` so that ``from bncore cimport capi`` finds the
    installed declarations of the C API (bncore/capi.pxd)."""
    return _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


def get_cmake_dir() -> str:
    """The folder of bncoreConfig.cmake: pass it as -Dbncore_DIR to find_package(bncore CONFIG)."""
    return _os.path.join(_package_dir(), "cmake")


def get_pkgconfig_dir() -> str:
    """The folder of bncore.pc: add it to PKG_CONFIG_PATH."""
    return _os.path.join(_package_dir(), "pkgconfig")


def build_info() -> dict[str, object]:
    """What the loaded C library was built with: "version", "cuda" (the CUDA backend compiled
    in), "cuda_architectures" (CMake's list, "" without CUDA) and "openmp"; and "cpu_kernel_level",
    the CPU kernels this process runs ("baseline", "x86-64-v3" or "x86-64-v4", chosen at load by
    the CPU and BNCORE_CPU_LEVEL)."""
    has_cuda, has_openmp, archs = _core.build_features()
    return {"version": __version__, "cuda": bool(has_cuda), "cuda_architectures": str(archs),
            "openmp": bool(has_openmp), "cpu_kernel_level": _core.cpu_kernel_level()}


def cuda_available() -> bool:
    """True when the CUDA backend is compiled in and a CUDA device is present (no driver: False)."""
    return cuda.available()
