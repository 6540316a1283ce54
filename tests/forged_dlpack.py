"""Hand-made DLPack capsules (ctypes), for the forged-capsule tests and tools/fuzz_dlpack.py.

A `Forged` owns everything a capsule points at (the managed struct, shape, strides and
data) and counts how often its deleter runs. It keeps the capsules it made; `settle()`
then plays the part of a capsule destructor (the DLPack rule: a capsule that no consumer
renamed hands the tensor back itself) for those still unconsumed, so that on every path,
consumed or not, the deleter must have run exactly once; `deleted` says how often it did.
(A real destructor, written in Python through ctypes, cannot keep an exception that is
pending while the capsule dies; settling after the call needs none.)
"""
from __future__ import annotations

import ctypes

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
KDL_INT, KDL_UINT, KDL_FLOAT, KDL_BFLOAT = 0, 1, 2, 4
FLAG_READ_ONLY, FLAG_IS_COPIED, FLAG_SUBBYTE_PADDED = 1, 2, 4


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

_live = {}  # address of a managed struct -> its Forged (the deleter's way back)


@_DELETER
def _deleter(address):
    forged = _live.get(address)
    if forged is not None:
        forged.deleted += 1


def _int64_array(values):
    return (ctypes.c_int64 * max(1, len(values)))(*values)


class Forged:
    """One forged tensor. `shape` / `strides`: sequences, or None for a NULL pointer (the
    declared ndim is `ndim`, len(shape) by default); `data`: an address, or a ctypes
    buffer kept alive here, or (address, buffer that holds it), or None; `version`: (major, minor) for a versioned
    capsule,
    None for a legacy one."""

    def __init__(self, shape=(2, 3), strides=None, *, ndim=None, dtype=(KDL_FLOAT, 32, 1), device=(KDL_CPU, 0),
                 data="auto", byte_offset=0, version=(1, 1), flags=0, deleter_null=False):
        self.deleted = 0
        self._capsules = []
        self.capsules_made = 0  # each must be handed back once: the deleter runs once per capsule
        self.unconsumed = 0  # capsules destroyed without a consumer
        self.deleter_null = deleter_null
        self._shape = None if shape is None else _int64_array(list(shape))
        self._strides = None if strides is None else _int64_array(list(strides))
        if ndim is None:
            ndim = 0 if shape is None else len(shape)
        if data == "auto":
            numel = 1
            for n in shape or ():
                numel *= n
            data = ctypes.create_string_buffer(max(8, numel * dtype[1] * dtype[2] // 8))
        self._data = data
        if isinstance(data, ctypes.Array):
            address = ctypes.addressof(data)
        elif isinstance(data, tuple):  # (an address inside a buffer, the buffer)
            address = data[0]
        else:
            address = data
        self.versioned = version is not None
        if self.versioned:
            self.managed = DLManagedTensorVersioned()
            self.managed.version = DLPackVersion(*version)
            self.managed.flags = flags
        else:
            self.managed = DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = address
        t.device = DLDevice(*device)
        t.ndim = ndim
        t.dtype = DLDataType(*dtype)
        t.shape = None if self._shape is None else ctypes.addressof(self._shape)
        t.strides = None if self._strides is None else ctypes.addressof(self._strides)
        t.byte_offset = byte_offset
        self.managed.deleter = None if deleter_null else ctypes.cast(_deleter, ctypes.c_void_p).value
        self.address = ctypes.addressof(self.managed)
        _live[self.address] = self

    def capsule(self):
        name = b"dltensor_versioned" if self.versioned else b"dltensor"
        cap = _capsule_new(self.address, name, None)
        self._capsules.append((cap, name))
        self.capsules_made += 1
        return cap

    def settle(self):
        """Hands back, as their destructor would, the tensors of capsules nobody consumed;
        then drops the capsules and this tensor's entry in the deleter's table."""
        for cap, name in self._capsules:
            if _capsule_is_valid(cap, name):
                self.unconsumed += 1
                if not self.deleter_null:
                    self.deleted += 1
        self._capsules = []
        _live.pop(self.address, None)
        return self


class Producer:
    """An object with __dlpack__ / __dlpack_device__ that hands out a Forged tensor's capsule."""

    def __init__(self, forged: Forged):
        self.forged = forged

    def __dlpack_device__(self):
        t = self.forged.managed.dl_tensor
        return (t.device.device_type, t.device.device_id)

    def __dlpack__(self, **kwargs):
        return self.forged.capsule()
