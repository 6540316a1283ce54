# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""The thin layer between Python and bncore's C ABI.

It imports DLPack tensors from any producer (zero-copy), exports bncore-owned
buffers, maps C statuses onto exception classes and calls the C library with
the GIL released. It holds no math: every number is computed behind the C ABI.
"""
from cpython.pycapsule cimport (PyCapsule_CheckExact, PyCapsule_GetName, PyCapsule_GetPointer,
                                PyCapsule_IsValid, PyCapsule_New, PyCapsule_SetName)
from cpython.exc cimport PyErr_Clear
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.stdlib cimport posix_memalign

from bncore.capi cimport *

# ---------------------------------------------------------------- statuses -> exceptions


from bncore.errors import (STATUS_ERRORS, BncoreError, InternalError, InvalidArgumentError, OutOfMemoryError,
                           OverlapError, ShapeMismatchError, UnsupportedDeviceError, UnsupportedDtypeError)

# the classes live in bncore.errors (pure Python); their codes must be this library's
if STATUS_ERRORS != {BN_STATUS_INVALID_ARGUMENT: InvalidArgumentError, BN_STATUS_SHAPE_MISMATCH: ShapeMismatchError,
                     BN_STATUS_UNSUPPORTED_DTYPE: UnsupportedDtypeError,
                     BN_STATUS_UNSUPPORTED_DEVICE: UnsupportedDeviceError, BN_STATUS_OVERLAP: OverlapError,
                     BN_STATUS_OUT_OF_MEMORY: OutOfMemoryError, BN_STATUS_INTERNAL: InternalError}:
    raise ImportError("bncore.errors.STATUS_ERRORS does not match the C library's bn_status_t codes")
STATUS_COUNT = BN_STATUS_COUNT


def status_string(int status):
    """The C library's static description of a status code."""
    return bn_status_string(<bn_status_t>status).decode()


def error_for_status(int status, str message):
    """The exception instance bncore raises for `status` (None for success)."""
    if status == BN_STATUS_SUCCESS:
        return None
    cls = STATUS_ERRORS.get(status, InternalError)
    return cls(f"{message} [{status_string(status)}]")


cdef int check(bn_status_t status) except -1:
    if status == BN_STATUS_SUCCESS:
        return 0
    raise error_for_status(status, bn_last_error().decode("utf-8", "replace"))


# ---------------------------------------------------------------- library facts


def version_string():
    """The version of the loaded C library."""
    return bn_version_string().decode()


def version():
    """BN_VERSION of the loaded C library: major * 10000 + minor * 100 + patch."""
    return bn_version()


def build_features():
    """(cuda compiled in, openmp compiled in, the CUDA architectures string) of the loaded C library."""
    cdef uint32_t features = 0
    cdef const char *archs = NULL
    check(bn_build_features(&features, &archs))
    return (features & BN_BUILD_CUDA) != 0, (features & BN_BUILD_OPENMP) != 0, archs.decode()


def cpu_kernel_level():
    """The CPU kernels' level this process runs: "baseline", "x86-64-v3" or "x86-64-v4"."""
    return bn_cpu_kernel_level().decode()


def cuda_device_count():
    """CUDA devices this process can use now: 0 without CUDA in the build, a driver or a device."""
    cdef int32_t n = 0
    check(bn_cuda_device_count(&n))
    return n


def set_num_threads(int n):
    """Threads bncore's kernels use (n <= 0: the OpenMP default). Results do not depend on it."""
    check(bn_set_num_threads(n))


def get_num_threads():
    return bn_get_num_threads()


MAX_NDIM = BN_MAX_NDIM
FLAG_RMS = BN_FLAG_RMS
FLAG_USE_RUNNING_STATS = BN_FLAG_USE_RUNNING_STATS
FLAG_UPDATE_RUNNING_STATS = BN_FLAG_UPDATE_RUNNING_STATS
FLAG_RUNNING_VAR_BIASED = BN_FLAG_RUNNING_VAR_BIASED
FLAG_GIVEN_STATS = BN_FLAG_GIVEN_STATS
FLAG_RENORM = BN_FLAG_RENORM
ACTIVATION_NONE = BN_ACTIVATION_NONE
ACTIVATION_RELU = BN_ACTIVATION_RELU

# ---------------------------------------------------------------- DLPack import

_DTYPE_NAMES = {(0, 8): "int8", (0, 16): "int16", (0, 32): "int32", (0, 64): "int64",
                (1, 8): "uint8", (1, 16): "uint16", (1, 32): "uint32", (1, 64): "uint64",
                (2, 16): "float16", (2, 32): "float32", (2, 64): "float64", (4, 16): "bfloat16",
                (5, 64): "complex64", (5, 128): "complex128", (6, 8): "bool"}
_DTYPE_CODES = {v: k for k, v in _DTYPE_NAMES.items()}
_IMMUTABLE_MODULES = ("jax", "jaxlib", "tensorflow")


cdef extern from "dlpack/dlpack.h" nogil:
    uint64_t DLPACK_FLAG_BITMASK_IS_COPIED
    uint64_t DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED

# The C core's bound on elements and on the reach of strides (BN_MAX_NUMEL in internal.h):
# below it every element count, stride product and byte extent fits in 64 bits.
cdef int64_t _MAX_NUMEL = (<int64_t>1) << 56
# The highest address an element may have: C forms data + byte_offset + extent as a pointer,
# and a pointer index past INTPTR_MAX is no address (no OS maps user memory up there).
cdef uint64_t _MAX_ADDRESS = (<uint64_t>1 << 63) - 1
cdef uint64_t _KNOWN_FLAGS = (DLPACK_FLAG_BITMASK_READ_ONLY | DLPACK_FLAG_BITMASK_IS_COPIED
                              | DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED)


cdef str _ints_text(const int64_t *values, int32_t n):
    return "(" + ", ".join([str(values[i]) for i in range(n)]) + ("," if n == 1 else "") + ")"


cdef inline bint _is_computed_dtype(DLDataType d) noexcept:
    """float16, bfloat16, float32, float64: the dtypes the C core loads, as C objects (aligned)."""
    return d.lanes == 1 and ((d.code == 2 and (d.bits == 16 or d.bits == 32 or d.bits == 64))
                             or (d.code == 4 and d.bits == 16))


cdef int _check_dltensor(const DLTensor *t, str what) except -1:
    """Every field of a producer's DLTensor, before anything reads through its pointers or
    multiplies its numbers: ndim, the shape and strides pointers, sizes, element count,
    the reach of the strides, the dtype, the alignment of the data (of the dtypes the C
    core computes) and the address range the elements span."""
    cdef int32_t d, ndim = t.ndim
    cdef int64_t n, s, a, count = 1, reach = 0, below = 0, above = 0
    cdef bint empty = False
    cdef uint64_t esize, base, low_bytes, high_bytes
    if ndim < 0 or ndim > BN_MAX_NDIM:
        raise InvalidArgumentError(f"{what}: expected a DLPack tensor of 0 to {BN_MAX_NDIM} dimensions, "
                                   f"got ndim {ndim}")
    if ndim > 0 and t.shape is NULL:
        raise InvalidArgumentError(f"{what}: expected a DLPack tensor with a shape, got ndim {ndim} and a NULL "
                                   f"shape pointer")
    if t.dtype.bits == 0 or t.dtype.bits % 8 or t.dtype.lanes == 0:
        raise UnsupportedDtypeError(f"{what}: expected a DLPack dtype of whole bytes with at least one lane, got "
                                    f"code {t.dtype.code}, bits {t.dtype.bits}, lanes {t.dtype.lanes}")
    for d in range(ndim):
        n = t.shape[d]
        if n < 0:
            raise InvalidArgumentError(f"{what}: expected sizes >= 0, got {n} at axis {d} "
                                       f"(shape {_ints_text(t.shape, ndim)})")
        if n == 0:
            empty = True
        elif count > _MAX_NUMEL // n:
            raise InvalidArgumentError(f"{what}: expected at most 2**56 elements, got shape "
                                       f"{_ints_text(t.shape, ndim)}")
        else:
            count *= n
    if t.strides is not NULL:
        for d in range(ndim):
            n, s = t.shape[d], t.strides[d]
            # a stride of a size 0 or 1 axis never moves, but the C plan multiplies it all the same
            if n <= 1 and -_MAX_NUMEL <= s <= _MAX_NUMEL:
                continue
            a = _MAX_NUMEL + 1 if s < -_MAX_NUMEL or s > _MAX_NUMEL else (-s if s < 0 else s)
            if n <= 1 or a > (_MAX_NUMEL - reach) // (n - 1):
                raise InvalidArgumentError(
                    f"{what}: expected strides that stay within 2**56 elements, got stride {s} at axis {d} "
                    f"(shape {_ints_text(t.shape, ndim)}, strides {_ints_text(t.strides, ndim)})")
            reach += a * (n - 1)
            if s < 0:
                below += a * (n - 1)
            else:
                above += a * (n - 1)
    elif not empty:
        above = count - 1
    base = <uint64_t><size_t>t.data
    if base > _MAX_ADDRESS or t.byte_offset > _MAX_ADDRESS - base or (t.data is NULL and t.byte_offset):
        raise InvalidArgumentError(f"{what}: expected a byte_offset that keeps data + byte_offset an address "
                                   f"(0 with NULL data), got data {base:#x} + byte_offset {t.byte_offset}")
    if empty:
        return 0  # no element: data is never read
    if t.data is NULL:
        raise InvalidArgumentError(f"{what}: expected a data pointer, got NULL for a non-empty tensor of shape "
                                   f"{_ints_text(t.shape, ndim)}")
    # bytes of one element <= 31 * 65535 < 2**21, reach <= 2**56: both products fit in 64 bits
    esize = (t.dtype.bits // 8) * <uint64_t>t.dtype.lanes
    if _is_computed_dtype(t.dtype) and (base + t.byte_offset) % esize:
        raise InvalidArgumentError(
            f"{what}: expected data aligned to its {esize}-byte elements, got address "
            f"{base + t.byte_offset:#x} (data {base:#x} + byte_offset {t.byte_offset}); pass an aligned copy "
            f"(numpy.require(a, requirements='A'))")
    low_bytes = <uint64_t>below * esize
    high_bytes = <uint64_t>above * esize + esize
    if (low_bytes > base + t.byte_offset
            or high_bytes > _MAX_ADDRESS - (base + t.byte_offset)):
        raise InvalidArgumentError(
            f"{what}: expected elements inside the address space, got data {base:#x} + byte_offset "
            f"{t.byte_offset} with {low_bytes} bytes below and {high_bytes} bytes from there on (shape "
            f"{_ints_text(t.shape, ndim)})")
    return 0


cdef class Tensor:
    """A tensor imported through DLPack. It owns the producer's managed tensor until
    `release()` (or garbage collection) calls the producer's deleter, exactly once; or,
    imported through a framework's C exchange API, it is a borrowed view that keeps the
    framework's tensor object alive. Its fields were checked on import (`_check_dltensor`)."""
    cdef DLTensor *t
    cdef DLTensor view
    cdef DLManagedTensorVersioned *managed_v
    cdef DLManagedTensor *managed
    cdef readonly bint read_only
    cdef readonly object source
    cdef readonly size_t stream  # CUDA tensors: the stream bncore computes on (0: the legacy default)

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self.managed_v is not NULL:
            if self.managed_v.deleter is not NULL:
                self.managed_v.deleter(self.managed_v)
            self.managed_v = NULL
        if self.managed is not NULL:
            if self.managed.deleter is not NULL:
                self.managed.deleter(self.managed)
            self.managed = NULL
        self.t = NULL

    def release(self):
        """Gives the tensor back to its producer now."""
        self._release()
        self.source = None

    cdef DLTensor *_live(self) except NULL:
        if self.t is NULL:
            raise ValueError("this imported tensor was already given back to its producer (released)")
        return self.t

    @property
    def shape(self):
        cdef DLTensor *t = self._live()
        return tuple(t.shape[i] for i in range(t.ndim))

    @property
    def strides(self):
        """Strides in elements (compact row-major when the producer gave none)."""
        cdef DLTensor *t = self._live()
        if t.strides is not NULL:
            return tuple(t.strides[i] for i in range(t.ndim))
        out, s = [], 1
        for i in reversed(range(t.ndim)):
            out.append(s)
            s *= t.shape[i]
        return tuple(reversed(out))

    @property
    def ndim(self):
        return self._live().ndim

    @property
    def dtype(self):
        cdef DLTensor *t = self._live()
        key = (t.dtype.code, t.dtype.bits)
        name = _DTYPE_NAMES.get(key, f"code{key[0]}/{key[1]}bits")
        return name if t.dtype.lanes == 1 else f"{name}x{t.dtype.lanes}"

    @property
    def device(self):
        """(DLDeviceType, device id) as DLPack numbers them: (1, 0) is the CPU."""
        cdef DLTensor *t = self._live()
        return (<int>t.device.device_type, t.device.device_id)

    @property
    def data_ptr(self):
        cdef DLTensor *t = self._live()
        return <size_t>t.data + t.byte_offset


cdef str _kind(object obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


cdef object _export_refused(object obj, str what, BaseException exc):
    """The bncore error for a producer that refused to export `obj` (its BufferError)."""
    device = getattr(obj, "device", None)
    layout = getattr(obj, "layout", None)
    if getattr(device, "type", None) == "meta" or getattr(obj, "is_meta", False) is True:
        return UnsupportedDeviceError(f"{what}: expected a tensor with data in memory, got a {_kind(obj)} on the "
                                      f"meta device (shape only, no data)")
    dtype = getattr(obj, "dtype", None)
    if type(obj).__module__ == "numpy" and getattr(dtype, "kind", None) == "V":  # a dtype DLPack has no code for
        return UnsupportedDtypeError(f"{what}: expected a floating dtype (float16, bfloat16, float32 or float64), "
                                     f"got a numpy.ndarray of {dtype}")
    if layout is not None and str(layout) not in ("torch.strided", "strided"):
        return InvalidArgumentError(f"{what}: expected a dense (strided) tensor, got a {_kind(obj)} with layout "
                                    f"{layout}; convert it with .to_dense()")
    return InvalidArgumentError(f"{what}: the {_kind(obj)} refused to export itself through DLPack: {exc}")


# ---------------------------------------------------------------- CUDA streams

import threading as _threading

_stream_choice = _threading.local()  # .stream: the stream of bncore.cuda.stream(...) blocks, or absent


def set_stream(object stream):
    """The stream CUDA calls of this thread run on (an int cudaStream_t, or an object with
    `.cuda_stream` (torch) or `.ptr` (CuPy)); None: each producer's current stream. Returns the previous."""
    previous = getattr(_stream_choice, "stream", None)
    _stream_choice.stream = _stream_handle(stream) if stream is not None else None
    return previous


cdef object _stream_handle(object stream):
    for name in ("cuda_stream", "ptr"):
        if hasattr(stream, name):
            return int(getattr(stream, name))
    return int(stream)


cdef size_t _cuda_stream_for(object obj, int device_id) except? 0:
    """The stream bncore computes on for a CUDA tensor `obj`: the thread's choice, else the current
    stream of obj's library on its device (torch, CuPy), else the legacy default stream (0)."""
    chosen = getattr(_stream_choice, "stream", None)
    if chosen is not None:
        return <size_t>chosen
    root = type(obj).__module__.split(".")[0]
    if root == "torch":
        import torch
        return <size_t>torch.cuda.current_stream(device_id).cuda_stream
    if root == "cupy":
        import cupy
        with cupy.cuda.Device(device_id):
            return <size_t>cupy.cuda.get_current_stream().ptr
    return 0


cdef bint _is_cuda_device(int device_type) noexcept:
    return device_type == kDLCUDA or device_type == kDLCUDAManaged


cdef object _producer_device(object obj):
    """obj.__dlpack_device__() as (type, id), or None when it has none or it fails."""
    probe = getattr(obj, "__dlpack_device__", None)
    if probe is None:
        return None
    try:
        kind, index = probe()
        return int(kind), int(index)
    except Exception:
        return None


cdef class _CallContext:
    """The C context of one call on x: NULL (the default) on the CPU; on a CUDA device, one that
    carries the stream x was imported for. Where no context can be made (no device, no driver)
    it stays NULL and the C call itself refuses x with the reason."""
    cdef bn_context_t *c

    def __cinit__(self, Tensor x):
        self.c = NULL
        if x is None or not _is_cuda_device(x.t.device.device_type):
            return
        if bn_context_create(x.t.device, &self.c) != BN_STATUS_SUCCESS:
            self.c = NULL
            return
        if bn_context_set_stream(self.c, <void *>x.stream) != BN_STATUS_SUCCESS:
            bn_context_destroy(self.c)
            self.c = NULL

    def __dealloc__(self):
        if self.c is not NULL:
            bn_context_destroy(self.c)


cdef object _capsule_of(object obj, str what, object stream=None):
    if PyCapsule_CheckExact(obj):
        return obj
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{what}: expected a tensor that supports DLPack (NumPy, PyTorch, JAX, CuPy, ...), "
                        f"got {_kind(obj)}")
    try:
        try:
            if stream is not None:  # a CUDA producer: its data, ready on the stream bncore computes on
                return obj.__dlpack__(stream=stream, max_version=(DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION))
            return obj.__dlpack__(max_version=(DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION))
        except TypeError:
            return obj.__dlpack__()  # a producer older than DLPack 1.0 takes no max_version
    except BufferError as exc:
        raise _export_refused(obj, what, exc) from exc


cdef bint _is_numpy_bfloat16(object obj):
    """Whether `obj` is a NumPy array of ml_dtypes' bfloat16 (a 2-byte dtype that ml_dtypes defines)."""
    if type(obj).__module__ != "numpy":
        return False
    dtype = getattr(obj, "dtype", None)
    return (dtype is not None and type(dtype).__module__ == "ml_dtypes" and dtype.name == "bfloat16"
            and dtype.itemsize == 2)


cdef dict _exchange_apis = {}  # tensor type -> address of its DLPackExchangeAPI table, or 0


cdef DLPackExchangeAPI *_exchange_api(object obj):
    """The DLPack 1.x C exchange table of obj's type (PyTorch publishes one), or NULL."""
    tp = type(obj)
    address = _exchange_apis.get(tp)
    cdef DLPackExchangeAPI *api = NULL
    if address is None:
        address = 0
        capsule = getattr(tp, "__dlpack_c_exchange_api__", None)
        if capsule is not None and PyCapsule_IsValid(capsule, b"dlpack_exchange_api"):
            api = <DLPackExchangeAPI *>PyCapsule_GetPointer(capsule, b"dlpack_exchange_api")
            if api.header.version.major == DLPACK_MAJOR_VERSION and api.dltensor_from_py_object_no_sync is not NULL:
                address = <size_t>api
        _exchange_apis[tp] = address
    return <DLPackExchangeAPI *><size_t>address


def import_tensor(object obj, str what, bint writable=False):
    """Imports `obj` (a DLPack producer or a DLPack capsule) without copying.

    A framework's C exchange API is used when its tensor type offers one (a borrowed
    view, no capsule); otherwise `__dlpack__`. A raw capsule is consumed: a second
    import of it fails. `writable` refuses read-only tensors (read-only NumPy arrays,
    JAX arrays). Every DLTensor field is checked here (`_check_dltensor`), and a
    consumed capsule whose tensor is refused goes back to its producer (its deleter
    runs once) before the error is raised; a versioned capsule of another major
    version is refused without being consumed (its layout is not ours to read)."""
    cdef Tensor t = Tensor.__new__(Tensor)
    cdef DLManagedTensorVersioned *mv
    cdef DLPackExchangeAPI *api = _exchange_api(obj)
    if api is not NULL:
        if api.dltensor_from_py_object_no_sync(<void *>obj, &t.view) == 0:
            _check_dltensor(&t.view, what)
            t.t = &t.view
            t.source = obj
            t.read_only = False
            if _is_cuda_device(t.view.device.device_type):  # no sync needed: bncore runs on torch's stream
                t.stream = _cuda_stream_for(obj, t.view.device.device_id)
            return t
        PyErr_Clear()  # the table declined (say, an unusual tensor): go through __dlpack__
    if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
        obj = obj.detach()  # PyTorch exports the data of a tensor that requires grad only detached
    cdef bint bfloat16_bits = _is_numpy_bfloat16(obj)
    # NumPy refuses to export ml_dtypes' bfloat16 through DLPack: export the same buffer as uint16
    # (a view, no copy) and read it as bfloat16, the format ml_dtypes stores
    # NumPy arrays are host memory: no device query on the CPU path's most common producer
    dev = None if PyCapsule_CheckExact(obj) or type(obj).__module__ == "numpy" else _producer_device(obj)
    stream = None
    if dev is not None and _is_cuda_device(dev[0]):
        t.stream = _cuda_stream_for(obj, dev[1])
        stream = t.stream if t.stream != 0 else 1  # DLPack spells the legacy default stream 1 (0 is invalid)
    capsule = _capsule_of(obj.view("uint16") if bfloat16_bits else obj, what, stream)
    if PyCapsule_IsValid(capsule, b"dltensor_versioned"):
        mv = <DLManagedTensorVersioned *>PyCapsule_GetPointer(capsule, b"dltensor_versioned")
        if mv.version.major != DLPACK_MAJOR_VERSION:
            raise BufferError(f"{what}: expected a DLPack {DLPACK_MAJOR_VERSION}.x tensor, got version "
                              f"{mv.version.major}.{mv.version.minor}")
        PyCapsule_SetName(capsule, b"used_dltensor_versioned")
        t.managed_v = mv
        t.t = &mv.dl_tensor
        t.read_only = (mv.flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0
        if mv.flags & ~_KNOWN_FLAGS and mv.version.minor <= DLPACK_MINOR_VERSION:
            t._release()
            raise InvalidArgumentError(f"{what}: expected DLPack flags of version {mv.version.major}."
                                       f"{mv.version.minor} (bits {_KNOWN_FLAGS:#x}), got {mv.flags:#x}")
    elif PyCapsule_IsValid(capsule, b"dltensor"):
        t.managed = <DLManagedTensor *>PyCapsule_GetPointer(capsule, b"dltensor")
        PyCapsule_SetName(capsule, b"used_dltensor")
        t.t = &t.managed.dl_tensor
        t.read_only = False
    else:
        name = PyCapsule_GetName(capsule) if PyCapsule_CheckExact(capsule) else None
        if name is not None and name.startswith(b"used_"):
            raise ValueError(f"{what}: this DLPack capsule was already consumed; a capsule can be read only "
                             f"once, so pass the tensor itself or a fresh capsule")
        raise TypeError(f"{what}: expected a DLPack capsule named 'dltensor' or 'dltensor_versioned', "
                        f"got {name!r}")
    if bfloat16_bits:
        t.t.dtype.code = 4  # kDLBfloat
    try:
        _check_dltensor(t.t, what)
    except BaseException:
        t._release()
        raise
    t.source = obj
    if type(obj).__module__.split(".")[0] in _IMMUTABLE_MODULES:
        t.read_only = True
    if writable and t.read_only:
        kind = _kind(obj)
        t._release()
        raise ValueError(f"{what}: the tensor is read-only ({kind}) and bncore writes into it in place; "
                         f"pass a writable NumPy array or PyTorch tensor, or keep the statistics in "
                         f"bncore's own state objects (bncore.BatchNorm)")
    return t


# ---------------------------------------------------------------- bncore-owned buffers (DLPack export)


cdef void _buffer_capsule_deleter(object capsule) noexcept:
    # A capsule never consumed still owns its managed tensor.
    if PyCapsule_IsValid(capsule, b"dltensor_versioned"):
        mv = <DLManagedTensorVersioned *>PyCapsule_GetPointer(capsule, b"dltensor_versioned")
        mv.deleter(mv)
    elif PyCapsule_IsValid(capsule, b"dltensor"):
        mu = <DLManagedTensor *>PyCapsule_GetPointer(capsule, b"dltensor")
        mu.deleter(mu)


cdef struct _Export:
    DLManagedTensorVersioned v
    DLManagedTensor u
    int64_t shape[16]
    int64_t strides[16]
    void *owner


cdef void _export_release(_Export *e) noexcept with gil:
    Py_DECREF(<object>e.owner)
    free(e)


cdef void _delete_versioned(DLManagedTensorVersioned *self) noexcept with gil:
    _export_release(<_Export *>self.manager_ctx)


cdef void _delete_unversioned(DLManagedTensor *self) noexcept with gil:
    _export_release(<_Export *>self.manager_ctx)


cdef object _export(object owner, void *data, tuple shape, DLDataType dtype, object max_version):
    """A DLPack capsule over `data` (compact row-major `shape`) that keeps `owner` alive."""
    cdef _Export *e = <_Export *>malloc(sizeof(_Export))
    if e is NULL:
        raise MemoryError("cannot allocate a DLPack export")
    Py_INCREF(owner)
    e.owner = <void *>owner
    cdef DLTensor *t
    cdef int i
    cdef int64_t s = 1
    for i in reversed(range(len(shape))):
        e.shape[i] = shape[i]
        e.strides[i] = s
        s *= shape[i]
    versioned = max_version is not None and max_version[0] >= 1
    if versioned:
        e.v.version.major = DLPACK_MAJOR_VERSION
        e.v.version.minor = DLPACK_MINOR_VERSION
        e.v.manager_ctx = e
        e.v.deleter = _delete_versioned
        e.v.flags = 0
        t = &e.v.dl_tensor
    else:
        e.u.manager_ctx = e
        e.u.deleter = _delete_unversioned
        t = &e.u.dl_tensor
    t.data = data
    t.device.device_type = kDLCPU
    t.device.device_id = 0
    t.ndim = len(shape)
    t.dtype = dtype
    t.shape = e.shape
    t.strides = e.strides
    t.byte_offset = 0
    if versioned:
        return PyCapsule_New(&e.v, b"dltensor_versioned", _buffer_capsule_deleter)
    return PyCapsule_New(&e.u, b"dltensor", _buffer_capsule_deleter)


cdef DLDataType _dl_dtype(str dtype) except *:
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"unknown dtype {dtype!r}")
    cdef DLDataType d
    d.code, d.bits = _DTYPE_CODES[dtype]
    d.lanes = 1
    return d


cdef class Buffer:
    """Compact row-major memory owned by bncore, 64-byte aligned, exported through
    DLPack. It lets frameworks without a writable empty() (JAX) receive bncore's
    results, in every dtype bncore computes (bfloat16 included), without a copy."""
    cdef void *data
    cdef readonly tuple shape
    cdef readonly str dtype
    cdef DLDataType dl_dtype

    def __cinit__(self, shape, str dtype):
        self.dl_dtype = _dl_dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) > BN_MAX_NDIM:
            raise InvalidArgumentError(f"Buffer: expected at most {BN_MAX_NDIM} dimensions, got shape {self.shape}")
        self.dtype = dtype
        count = 1
        for s in self.shape:
            if s < 0:
                raise InvalidArgumentError(f"Buffer: expected sizes >= 0, got shape {self.shape}")
            count *= s
        if count > _MAX_NUMEL:
            raise InvalidArgumentError(f"Buffer: expected at most 2**56 elements, got shape {self.shape} "
                                       f"({count} elements)")
        cdef size_t nbytes = <size_t>count * (self.dl_dtype.bits // 8)  # <= 2**59: no wrap
        if posix_memalign(&self.data, 64, nbytes if nbytes > 0 else 64) != 0:
            self.data = NULL
            raise OutOfMemoryError(f"Buffer: cannot allocate {nbytes} bytes for shape {self.shape} of {dtype}")
        memset(self.data, 0, nbytes)

    def __dealloc__(self):
        free(self.data)

    def __dlpack_device__(self):
        return (<int>kDLCPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("Buffer: copy=True is not supported")
        return _export(self, self.data, self.shape, self.dl_dtype, max_version)


# ---------------------------------------------------------------- the buffer cache (_pool.h)


cdef extern from "_pool.h" nogil:
    ctypedef struct bnpool_stats_t:
        int enabled
        size_t max_bytes
        size_t max_buffers
        size_t min_bytes
        size_t held_bytes
        size_t held_buffers
        size_t live_bytes
        size_t live_buffers
        uint64_t hits
        uint64_t misses
    ctypedef struct bnpool_tensor_t:
        DLManagedTensorVersioned versioned
        DLManagedTensor unversioned
    int BNPOOL_MAX_NDIM
    int BNPOOL_MAX_SLOTS
    int bnpool_wants(size_t nbytes)
    void bnpool_empty()
    void bnpool_configure(int enabled, int64_t max_bytes, int64_t max_buffers, int64_t min_bytes)
    void bnpool_get_stats(bnpool_stats_t *out)
    bnpool_tensor_t *bnpool_tensor_new(int32_t ndim, const int64_t *shape, const int64_t *strides, DLDataType dtype,
                                       size_t nbytes)
    void bnpool_tensor_free(bnpool_tensor_t *t)


POOL_MAX_BUFFERS = BNPOOL_MAX_SLOTS


def pool_configure(int enabled=-1, int64_t max_bytes=-1, int64_t max_buffers=-1, int64_t min_bytes=-1):
    """Sets the buffer cache's limits (-1 keeps one); what no longer fits is unmapped now."""
    with nogil:
        bnpool_configure(enabled, max_bytes, max_buffers, min_bytes)


def pool_empty():
    """Unmaps every buffer the cache holds; buffers in use stay valid."""
    with nogil:
        bnpool_empty()


def pool_stats():
    cdef bnpool_stats_t s
    with nogil:
        bnpool_get_stats(&s)
    return {"enabled": bool(s.enabled), "max_bytes": s.max_bytes, "max_buffers": s.max_buffers,
            "min_bytes": s.min_bytes, "held_bytes": s.held_bytes, "held_buffers": s.held_buffers,
            "live_bytes": s.live_bytes, "live_buffers": s.live_buffers, "hits": s.hits, "misses": s.misses}


cdef class PoolBuffer:
    """Memory from the buffer cache, exported once through DLPack: from then on the consumer's
    array owns it, and that array's DLPack deleter (plain C, no GIL) gives it back to the cache.
    Not exported, it goes back when this object is collected."""
    cdef bnpool_tensor_t *t

    def __dealloc__(self):
        bnpool_tensor_free(self.t)

    def __dlpack_device__(self):
        return (<int>kDLCPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("PoolBuffer: copy=True is not supported")
        if self.t is NULL:
            raise BufferError("PoolBuffer: already exported; its memory belongs to the array made from it")
        if max_version is not None and max_version[0] >= 1:
            capsule = PyCapsule_New(&self.t.versioned, b"dltensor_versioned", _buffer_capsule_deleter)
        else:
            capsule = PyCapsule_New(&self.t.unversioned, b"dltensor", _buffer_capsule_deleter)
        self.t = NULL  # the capsule (then its consumer) owns the memory
        return capsule


cdef object _pool_array(int32_t ndim, const int64_t *shape, const int64_t *strides, DLDataType dtype,
                        object consumer):
    """consumer(a PoolBuffer of this layout), or None when the cache does not take it: disabled, fewer
    than min_bytes, strides that are not a dense non-overlapping layout, more than BNPOOL_MAX_NDIM
    dimensions, or no memory (the caller then allocates as it would without the cache)."""
    cdef int64_t numel = 1, expected = 1, best
    cdef int32_t i, j, k
    cdef bint used[16]
    if ndim > BNPOOL_MAX_NDIM or dtype.lanes != 1 or dtype.bits % 8:
        return None
    for i in range(ndim):
        if shape[i] <= 0:
            return None  # nothing to cache
        numel *= shape[i]
        used[i] = shape[i] == 1  # a stride of a size-1 axis never moves: any value is dense
    cdef size_t nbytes = <size_t>numel * (dtype.bits // 8)
    if not bnpool_wants(nbytes):
        return None
    if strides is not NULL:
        # dense and non-overlapping: ordered by stride, each is the product of the sizes below it
        for k in range(ndim):
            j = -1
            for i in range(ndim):
                if not used[i] and (j < 0 or strides[i] < strides[j]):
                    j = i
            if j < 0:
                break
            if strides[j] != expected:
                return None
            used[j] = True
            expected *= shape[j]
    cdef bnpool_tensor_t *t
    with nogil:
        t = bnpool_tensor_new(ndim, shape, strides, dtype, nbytes)
    if t is NULL:
        return None
    cdef PoolBuffer buf = PoolBuffer.__new__(PoolBuffer)
    buf.t = t
    return consumer(buf)


def pool_array(tuple shape, object strides, str dtype, object consumer):
    """`consumer(buffer)` (numpy.from_dlpack, torch.from_dlpack) over memory from the buffer cache,
    with `shape` and `strides` in elements (None: compact row-major), or None when the cache does
    not take the request (see _pool_array)."""
    cdef int64_t cshape[16]
    cdef int64_t cstrides[16]
    cdef int32_t i, ndim = len(shape)
    if ndim > BNPOOL_MAX_NDIM or (strides is not None and len(strides) != ndim):
        return None
    for i in range(ndim):
        cshape[i] = shape[i]
        if strides is not None:
            cstrides[i] = strides[i]
    return _pool_array(ndim, cshape, NULL if strides is None else cstrides, _dl_dtype(dtype), consumer)


cdef class PooledEmptyLike:
    """`empty_like` for CPU tensors of a library with a DLPack C exchange table (PyTorch): the
    same strides from the buffer cache where it takes the request, else `fallback(x)`."""
    cdef object fallback
    cdef object consumer

    def __cinit__(self, fallback, consumer):
        self.fallback = fallback
        self.consumer = consumer

    def __call__(self, x):
        cdef DLPackExchangeAPI *api = _exchange_api(x)
        cdef DLTensor t
        if api is not NULL:
            if api.dltensor_from_py_object_no_sync(<void *>x, &t) != 0:
                PyErr_Clear()
            elif t.device.device_type == kDLCPU:
                y = _pool_array(t.ndim, t.shape, t.strides, t.dtype, self.consumer)
                if y is not None:
                    return y
        return self.fallback(x)


cdef class _StateArray:
    """One array of a RunningStatsHandle, exported through DLPack; keeps the state alive."""
    cdef object owner
    cdef void *data
    cdef tuple shape
    cdef DLDataType dtype

    def __dlpack_device__(self):
        return (<int>kDLCPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("copy=True is not supported")
        return _export(self.owner, self.data, self.shape, self.dtype, max_version)


cdef class RunningStatsHandle:
    """bn_running_stats_t: running mean and variance owned by the C library.
    `mean` and `var` are NumPy views of its memory (zero-copy)."""
    cdef bn_running_stats_t *s
    cdef readonly object mean
    cdef readonly object var

    def __cinit__(self, int64_t num_features, str dtype, double factor, unsigned int flags):
        import numpy
        check(bn_running_stats_create(num_features, _dl_dtype(dtype), factor, flags, &self.s))
        cdef DLTensor tm, tv
        check(bn_running_stats_tensors(self.s, &tm, &tv))
        self.mean = numpy.from_dlpack(self._array(tm))
        self.var = numpy.from_dlpack(self._array(tv))

    cdef _StateArray _array(self, DLTensor t):
        cdef _StateArray a = _StateArray.__new__(_StateArray)
        a.owner = self
        a.data = t.data
        a.shape = (t.shape[0],)
        a.dtype = t.dtype
        return a

    def __dealloc__(self):
        bn_running_stats_destroy(self.s)

    @property
    def counts(self):
        """(updates, skipped)."""
        cdef int64_t u, k
        cdef bn_status_t st
        with nogil:  # the state's lock may be held by a call in another thread
            st = bn_running_stats_counts(self.s, &u, &k)
        check(st)
        return u, k

    def set_counts(self, int64_t updates, int64_t skipped):
        cdef bn_status_t st
        with nogil:
            st = bn_running_stats_set_counts(self.s, updates, skipped)
        check(st)

    def set_factor(self, double factor):
        cdef bn_status_t st
        with nogil:
            st = bn_running_stats_set_factor(self.s, factor)
        check(st)

    def load(self, Tensor mean, Tensor var, int64_t updates, int64_t skipped):
        """bn_running_stats_load: replaces the whole state under its lock, all or nothing."""
        cdef bn_status_t st
        cdef DLTensor *pm = mean.t
        cdef DLTensor *pv = var.t
        with nogil:
            st = bn_running_stats_load(self.s, pm, pv, updates, skipped)
        check(st)

    def update(self, Tensor batch_mean, Tensor batch_var, int64_t n):
        cdef bn_status_t st
        cdef DLTensor *pm = batch_mean.t
        cdef DLTensor *pv = batch_var.t
        with nogil:
            st = bn_running_stats_update(self.s, pm, pv, n)
        check(st)


STATS_BIASED_VAR = BN_STATS_BIASED_VAR
STATS_CUMULATIVE = BN_STATS_CUMULATIVE
STATS_SKIP_NONFINITE = BN_STATS_SKIP_NONFINITE
FLAG_SKIP_NONFINITE = BN_FLAG_SKIP_NONFINITE


# ---------------------------------------------------------------- problem descriptions


cdef class Desc:
    """bn_norm_desc_t: what to normalize (see bncore.h)."""
    cdef bn_norm_desc_t d

    @staticmethod
    def batch(int ndim, int axis, double eps):
        cdef Desc s = Desc.__new__(Desc)
        check(bn_norm_desc_init_batch(&s.d, ndim, axis, eps))
        return s

    @staticmethod
    def layer(int ndim, int normalized_ndim, double eps):
        cdef Desc s = Desc.__new__(Desc)
        check(bn_norm_desc_init_layer(&s.d, ndim, normalized_ndim, eps))
        return s

    @staticmethod
    def rms(int ndim, int normalized_ndim, double eps):
        cdef Desc s = Desc.__new__(Desc)
        check(bn_norm_desc_init_rms(&s.d, ndim, normalized_ndim, eps))
        return s

    @staticmethod
    def instance(int ndim, double eps):
        cdef Desc s = Desc.__new__(Desc)
        check(bn_norm_desc_init_instance(&s.d, ndim, eps))
        return s

    @staticmethod
    def group(int ndim, int64_t num_groups, double eps):
        cdef Desc s = Desc.__new__(Desc)
        check(bn_norm_desc_init_group(&s.d, ndim, num_groups, eps))
        return s

    @staticmethod
    def axes(uint64_t reduce_axes, uint64_t param_axes, double eps, unsigned int flags=0):
        cdef Desc s = Desc.__new__(Desc)
        s.d.struct_size = sizeof(bn_norm_desc_t)
        s.d.reduce_axes = reduce_axes
        s.d.param_axes = param_axes
        s.d.split_axis = -1
        s.d.reserved = 0
        s.d.num_groups = 0
        s.d.eps = eps
        s.d.momentum = 0.0
        s.d.flags = flags
        s.d.reserved2 = 0
        s.d.virtual_batch_size = 0
        s.d.rmax = 0.0
        s.d.dmax = 0.0
        s.d.activation = BN_ACTIVATION_NONE
        s.d.reserved3 = 0
        return s

    def with_options(self, unsigned int flags, double momentum=0.0):
        """A copy with `flags` added and `momentum` set."""
        cdef Desc s = Desc.__new__(Desc)
        s.d = self.d
        s.d.flags = self.d.flags | flags
        s.d.momentum = momentum
        return s

    def with_extensions(self, int64_t virtual_batch_size=0, double rmax=0.0, double dmax=0.0,
                        unsigned int activation=BN_ACTIVATION_NONE):
        """A copy with the V2 fields set: virtual batches, renormalization bounds, the epilogue."""
        cdef Desc s = Desc.__new__(Desc)
        s.d = self.d
        s.d.virtual_batch_size = virtual_batch_size
        s.d.rmax = rmax
        s.d.dmax = dmax
        s.d.activation = activation
        return s

    @property
    def virtual_batch_size(self):
        return self.d.virtual_batch_size

    @property
    def activation(self):
        return self.d.activation

    @property
    def reduce_axes(self):
        return self.d.reduce_axes

    @property
    def param_axes(self):
        return self.d.param_axes

    @property
    def flags(self):
        return self.d.flags

    @property
    def eps(self):
        return self.d.eps

    def __repr__(self):
        return (f"Desc(reduce_axes={self.d.reduce_axes:#x}, param_axes={self.d.param_axes:#x}, "
                f"split_axis={self.d.split_axis}, num_groups={self.d.num_groups}, eps={self.d.eps}, "
                f"momentum={self.d.momentum}, flags={self.d.flags:#x}, "
                f"virtual_batch_size={self.d.virtual_batch_size}, rmax={self.d.rmax}, dmax={self.d.dmax}, "
                f"activation={self.d.activation})")


# ---------------------------------------------------------------- calls


cdef inline DLTensor *_ptr(Tensor t):
    return NULL if t is None else t.t


def norm_forward(Desc desc, Tensor x, Tensor weight, Tensor bias, Tensor running_mean,
                 Tensor running_var, Tensor y, Tensor save_mean, Tensor save_rstd,
                 Tensor stats_mean=None, Tensor stats_m2=None, int64_t stats_count=0, Tensor residual=None,
                 Tensor save_r=None, Tensor save_d=None):
    """bn_norm_forward_ex over imported tensors (None for an absent one); the given statistics
    (stats_mean, stats_m2, stats_count) go with FLAG_GIVEN_STATS, save_r / save_d with FLAG_RENORM."""
    cdef bn_status_t st
    cdef _CallContext cx = _CallContext(x)
    cdef bn_context_t *ctx = cx.c
    cdef DLTensor *pres = _ptr(residual)
    cdef DLTensor *pr = _ptr(save_r)
    cdef DLTensor *pd = _ptr(save_d)
    cdef DLTensor *px = _ptr(x)
    cdef DLTensor *pw = _ptr(weight)
    cdef DLTensor *pb = _ptr(bias)
    cdef DLTensor *pgm = _ptr(stats_mean)
    cdef DLTensor *pgq = _ptr(stats_m2)
    cdef DLTensor *prm = _ptr(running_mean)
    cdef DLTensor *prv = _ptr(running_var)
    cdef DLTensor *py = _ptr(y)
    cdef DLTensor *psm = _ptr(save_mean)
    cdef DLTensor *psr = _ptr(save_rstd)
    with nogil:
        st = bn_norm_forward_ex(ctx, &desc.d, px, pw, pb, pres, pgm, pgq, stats_count, prm, prv, py, psm, psr,
                                pr, pd)
    check(st)


def norm_backward(Desc desc, Tensor x, Tensor dy, Tensor weight, Tensor save_mean, Tensor save_rstd,
                  Tensor dx, Tensor dweight, Tensor dbias, Tensor y=None, Tensor save_r=None,
                  Tensor save_d=None, Tensor dresidual=None):
    """bn_norm_backward_ex over imported tensors (None for an absent one)."""
    cdef bn_status_t st
    cdef _CallContext cx = _CallContext(x)
    cdef bn_context_t *ctx = cx.c
    cdef DLTensor *pyy = _ptr(y)
    cdef DLTensor *pr = _ptr(save_r)
    cdef DLTensor *pd = _ptr(save_d)
    cdef DLTensor *pdres = _ptr(dresidual)
    cdef DLTensor *px = _ptr(x)
    cdef DLTensor *pdy = _ptr(dy)
    cdef DLTensor *pw = _ptr(weight)
    cdef DLTensor *psm = _ptr(save_mean)
    cdef DLTensor *psr = _ptr(save_rstd)
    cdef DLTensor *pdx = _ptr(dx)
    cdef DLTensor *pdw = _ptr(dweight)
    cdef DLTensor *pdb = _ptr(dbias)
    with nogil:
        st = bn_norm_backward_ex(ctx, &desc.d, px, pdy, pw, psm, psr, pyy, pr, pd, pdx, pdw, pdb, pdres)
    check(st)


def norm_backward_reduce(Desc desc, Tensor x, Tensor dy, Tensor save_mean, Tensor save_rstd,
                         Tensor sum_dy, Tensor sum_dy_xhat):
    """bn_norm_backward_reduce: per-parameter sums of dy and dy * xhat."""
    cdef bn_status_t st
    cdef _CallContext cx = _CallContext(x)
    cdef bn_context_t *ctx = cx.c
    cdef DLTensor *px = _ptr(x)
    cdef DLTensor *pdy = _ptr(dy)
    cdef DLTensor *psm = _ptr(save_mean)
    cdef DLTensor *psr = _ptr(save_rstd)
    cdef DLTensor *ps1 = _ptr(sum_dy)
    cdef DLTensor *ps2 = _ptr(sum_dy_xhat)
    with nogil:
        st = bn_norm_backward_reduce(ctx, &desc.d, px, pdy, psm, psr, ps1, ps2)
    check(st)


def norm_backward_apply(Desc desc, Tensor x, Tensor dy, Tensor weight, Tensor save_mean, Tensor save_rstd,
                        Tensor sum_dy, Tensor sum_dy_xhat, int64_t count, Tensor dx):
    """bn_norm_backward_apply: grad_input from the (all-reduced) sums and their count."""
    cdef bn_status_t st
    cdef _CallContext cx = _CallContext(x)
    cdef bn_context_t *ctx = cx.c
    cdef DLTensor *px = _ptr(x)
    cdef DLTensor *pdy = _ptr(dy)
    cdef DLTensor *pw = _ptr(weight)
    cdef DLTensor *psm = _ptr(save_mean)
    cdef DLTensor *psr = _ptr(save_rstd)
    cdef DLTensor *ps1 = _ptr(sum_dy)
    cdef DLTensor *ps2 = _ptr(sum_dy_xhat)
    cdef DLTensor *pdx = _ptr(dx)
    with nogil:
        st = bn_norm_backward_apply(ctx, &desc.d, px, pdy, pw, psm, psr, ps1, ps2, count, pdx)
    check(st)


def norm_forward_stats(Desc desc, Tensor x, Tensor weight, Tensor bias, RunningStatsHandle stats, Tensor y,
                       Tensor save_mean, Tensor save_rstd, Tensor stats_mean=None, Tensor stats_m2=None,
                       int64_t stats_count=0, Tensor residual=None, Tensor save_r=None, Tensor save_d=None):
    """bn_norm_forward_stats_ex: the forward with running statistics kept in a state."""
    cdef bn_status_t st
    cdef _CallContext cx = _CallContext(x)
    cdef bn_context_t *ctx = cx.c
    cdef DLTensor *pres = _ptr(residual)
    cdef DLTensor *pr = _ptr(save_r)
    cdef DLTensor *pd = _ptr(save_d)
    cdef DLTensor *px = _ptr(x)
    cdef DLTensor *pw = _ptr(weight)
    cdef DLTensor *pb = _ptr(bias)
    cdef DLTensor *pgm = _ptr(stats_mean)
    cdef DLTensor *pgq = _ptr(stats_m2)
    cdef DLTensor *py = _ptr(y)
    cdef DLTensor *psm = _ptr(save_mean)
    cdef DLTensor *psr = _ptr(save_rstd)
    with nogil:
        st = bn_norm_forward_stats_ex(ctx, &desc.d, px, pw, pb, pres, pgm, pgq, stats_count, stats.s, py, psm,
                                      psr, pr, pd)
    check(st)


def norm_stats(Desc desc, Tensor x, Tensor mean, Tensor m2):
    """bn_norm_stats: per-group mean and m2 (the forward's own numbers); returns the elements per group."""
    cdef bn_status_t st
    cdef _CallContext cx = _CallContext(x)
    cdef bn_context_t *ctx = cx.c
    cdef int64_t count = 0
    cdef DLTensor *px = _ptr(x)
    cdef DLTensor *pm = _ptr(mean)
    cdef DLTensor *pm2 = _ptr(m2)
    with nogil:
        st = bn_norm_stats(ctx, &desc.d, px, pm, pm2, &count)
    check(st)
    return count


def moments_merge(Tensor count_a, Tensor mean_a, Tensor m2_a, Tensor count_b, Tensor mean_b, Tensor m2_b,
                  Tensor count, Tensor mean, Tensor m2):
    """bn_moments_merge: Chan's merge of two sets of (count, mean, m2), elementwise."""
    cdef bn_status_t st
    cdef DLTensor *pca = _ptr(count_a)
    cdef DLTensor *pma = _ptr(mean_a)
    cdef DLTensor *pqa = _ptr(m2_a)
    cdef DLTensor *pcb = _ptr(count_b)
    cdef DLTensor *pmb = _ptr(mean_b)
    cdef DLTensor *pqb = _ptr(m2_b)
    cdef DLTensor *pc = _ptr(count)
    cdef DLTensor *pm = _ptr(mean)
    cdef DLTensor *pq = _ptr(m2)
    with nogil:
        st = bn_moments_merge(NULL, pca, pma, pqa, pcb, pmb, pqb, pc, pm, pq)
    check(st)


# ---------------------------------------------------------------- the small-call fast path
#
# Marshalling only, for any library whose tensor type publishes a DLPack C exchange table (PyTorch
# does): borrowed views without capsules, the output made by the caller's `empty_like`, one C call.
# Which calls may take it, the checks and the description are bncore.functional's (_batch_norm_small).


cdef int _view(object obj, DLPackExchangeAPI *api, DLTensor *out) except -1:
    """0 and a borrowed view when obj is a CPU tensor with the exchange table `api`, else 1."""
    if _exchange_api(obj) is not api:
        return 1
    if api.dltensor_from_py_object_no_sync(<void *>obj, out) != 0:
        PyErr_Clear()
        return 1
    return 0 if out.device.device_type == kDLCPU else 1


cdef int _view_optional(object obj, DLPackExchangeAPI *api, DLTensor *view, DLTensor **out) except -1:
    """As _view, for a per-channel tensor (weight, bias, statistics): 1 unless it is 1-D, the checked
    path's rule (the C core checks only the element count); None gives NULL."""
    if obj is None:
        out[0] = NULL
        return 0
    out[0] = view
    return _view(obj, api, view) or view.ndim != 1


def exchange_shape(object obj):
    """obj's shape when obj is a CPU tensor whose type has a DLPack C exchange table, else None."""
    cdef DLPackExchangeAPI *api = _exchange_api(obj)
    cdef DLTensor t
    cdef int i
    if api is NULL or _view(obj, api, &t):
        return None
    return tuple([t.shape[i] for i in range(t.ndim)])


def exchange_forward(Desc desc, object empty_like, object x, object weight, object bias, object running_mean,
                     object running_var, object save_mean=None, object save_rstd=None):
    """bn_norm_forward over borrowed views of CPU tensors whose type has a DLPack C exchange table, x's
    type for all; the output is `empty_like(x)`, the saved statistics (when the caller wants them) go
    into the given save_mean / save_rstd. Returns the output, or None when a tensor is of another type
    or device or the C core refuses the call: the C core validates before it writes, so a call that
    returns None changed nothing."""
    cdef DLPackExchangeAPI *api = _exchange_api(x)
    cdef DLTensor tx, ty, tw, tb, trm, trv, tsm, tsr
    cdef DLTensor *pw
    cdef DLTensor *pb
    cdef DLTensor *prm
    cdef DLTensor *prv
    cdef DLTensor *psm
    cdef DLTensor *psr
    cdef bn_status_t st
    if (api is NULL or _view(x, api, &tx) or _view_optional(weight, api, &tw, &pw)
            or _view_optional(bias, api, &tb, &pb) or _view_optional(running_mean, api, &trm, &prm)
            or _view_optional(running_var, api, &trv, &prv) or _view_optional(save_mean, api, &tsm, &psm)
            or _view_optional(save_rstd, api, &tsr, &psr)):
        return None
    y = empty_like(x)
    if _view(y, api, &ty):
        return None
    with nogil:
        st = bn_norm_forward(NULL, &desc.d, &tx, pw, pb, NULL, NULL, 0, prm, prv, &ty, psm, psr)
    return y if st == BN_STATUS_SUCCESS else None


def exchange_backward(Desc desc, object empty_like, object x, object dy, object weight, object save_mean,
                      object save_rstd, object dweight, object dbias):
    """bn_norm_backward over borrowed views, as exchange_forward: grad_input is `empty_like(x)`,
    grad_weight and grad_bias go into the given dweight / dbias (None: not computed). Returns
    grad_input, or None when a tensor is of another type or device or the C core refuses the call."""
    cdef DLPackExchangeAPI *api = _exchange_api(x)
    cdef DLTensor tx, tdy, tdx, tw, tsm, tsr, tdw, tdb
    cdef DLTensor *pw
    cdef DLTensor *psm
    cdef DLTensor *psr
    cdef DLTensor *pdw
    cdef DLTensor *pdb
    cdef bn_status_t st
    if (api is NULL or _view(x, api, &tx) or _view(dy, api, &tdy) or _view_optional(weight, api, &tw, &pw)
            or _view_optional(save_mean, api, &tsm, &psm) or save_rstd is None
            or _view_optional(save_rstd, api, &tsr, &psr)
            or _view_optional(dweight, api, &tdw, &pdw) or _view_optional(dbias, api, &tdb, &pdb)):
        return None
    dx = empty_like(x)
    if _view(dx, api, &tdx):
        return None
    with nogil:
        st = bn_norm_backward(NULL, &desc.d, &tx, &tdy, pw, psm, psr, &tdx, pdw, pdb)
    return dx if st == BN_STATUS_SUCCESS else None
