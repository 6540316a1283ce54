"""Forged DLPack capsules: every field is checked on import, before anything reads through it.

Each case builds a DLManagedTensor(Versioned) by hand (tests/forged_dlpack.py), passes its
capsule as one argument of a real call, and checks the exception type, that the message
names that argument, and that the producer's deleter ran exactly once.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

import bncore
from bncore import _core
from forged_dlpack import KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED, KDL_FLOAT, Forged, Producer

N, C, L = 4, 3, 5


def data(shape=(N, C, L), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _backward_with_grad_output(grad_output):
    x, w = data(), np.ones(C, np.float32)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, None, training=True)
    return bncore.batch_norm_backward(grad_output, x, w, mean, invstd)


# argument -> a call with the capsule in that place and valid NumPy arrays everywhere else
CALLS = {
    "input": lambda cap: bncore.batch_norm(cap, training=True),
    "weight": lambda cap: bncore.batch_norm(data(), None, None, cap, training=True),
    "bias": lambda cap: bncore.layer_norm(data(), L, np.ones(L, np.float32), cap),
    "running_mean": lambda cap: bncore.batch_norm(data(), cap, np.ones(C, np.float32), training=True),
    "running_var": lambda cap: bncore.instance_norm(data(), np.zeros(C, np.float32), cap),
    "out": lambda cap: bncore.group_norm(data(), 1, out=cap),
    "grad_output": lambda cap: _backward_with_grad_output(cap),
    "batch_mean": lambda cap: bncore.RunningStats(C).update(cap, np.ones(C, np.float32), 4),
}


def _refused(forged, arg, exc_type, *needles):
    with pytest.raises(exc_type) as info:
        CALLS[arg](forged.capsule())
    gc.collect()
    forged.settle()
    message = str(info.value)
    assert message.startswith(f"{arg}:") or f"{arg}:" in message, message
    for needle in needles:
        assert needle in message, message
    assert forged.deleted == 1, f"deleter ran {forged.deleted} times"
    return message


# ---------------------------------------------------------------- shape and ndim


@pytest.mark.parametrize("arg", list(CALLS))
def test_null_shape_with_ndim_2_is_refused(arg):
    # on main this crashed the process (the Python layer read shape[0] of NULL)
    _refused(Forged(shape=None, ndim=2, data=None), arg, _core.InvalidArgumentError, "NULL shape", "ndim 2")


@pytest.mark.parametrize("arg", ["input", "weight", "out", "batch_mean"])
def test_negative_size_is_refused_naming_the_argument(arg):
    # on main: OverflowError "can't convert negative value to size_t", or a message about another argument
    _refused(Forged(shape=(N, -3, L), data=None), arg, _core.InvalidArgumentError, "sizes >= 0", "-3")


@pytest.mark.parametrize("ndim", [17, 40, -1])
def test_ndim_outside_0_to_16_is_refused(ndim):
    forged = Forged(shape=[2] * max(ndim, 0), ndim=ndim, data=None)
    _refused(forged, "input", _core.InvalidArgumentError, "0 to 16 dimensions", f"ndim {ndim}")


@pytest.mark.parametrize("shape", [(2**40, 2**40, 1), (2**31, 2**31, 2), (2**57, 1, 1), (3, 2**62, 2**62)])
def test_element_count_beyond_2_56_is_refused(shape):
    # on main the output Buffer wrapped its byte count; the C error then named "x"
    _refused(Forged(shape=shape, data=None), "input", _core.InvalidArgumentError, "2**56 elements")


# ---------------------------------------------------------------- strides, offsets, data


@pytest.mark.parametrize("strides", [(2**62, 1, 1), (-2**63, 5, 1), (1, 2**55, 2**55), (15, 5, 2**60)])
def test_strides_reaching_beyond_2_56_elements_are_refused(strides):
    _refused(Forged(shape=(N, C, L), strides=strides), "input", _core.InvalidArgumentError, "strides")


@pytest.mark.parametrize("shape", [(0, C, L), (1, C, L)])
def test_huge_stride_of_a_size_0_or_1_axis_is_refused(shape):
    # on main the C plan multiplied it by the element size (signed overflow; UBSan: plan.c:107)
    forged = Forged(shape=shape, strides=(-(2**62), L, 1), data=None if shape[0] == 0 else "auto")
    _refused(forged, "input", _core.InvalidArgumentError, "strides", str(-(2**62)))


@pytest.mark.parametrize("arg", ["input", "weight", "out"])
def test_byte_offset_past_the_address_space_is_refused(arg):
    # on main: the kernels read (or wrote) at data + 2**64 - 8, a wild address
    shape = (N, C, L) if arg in ("input", "out") else (C,)
    _refused(Forged(shape=shape, byte_offset=2**64 - 8), arg, _core.InvalidArgumentError, "byte_offset")


def test_data_pointer_past_the_highest_pointer_is_refused():
    _refused(Forged(shape=(N, C, L), data=2**64 - 4096), "input", _core.InvalidArgumentError, "byte_offset")


@pytest.mark.parametrize("byte_offset", [2**63, 2**63 - 2**40])
def test_byte_offset_past_the_highest_pointer_is_refused(byte_offset):
    # on main C formed data + 2**63 (a pointer index overflow; UBSan: tensor.c:43)
    _refused(Forged(shape=(N, C, L), byte_offset=byte_offset), "input", _core.InvalidArgumentError, "byte_offset")


@pytest.mark.parametrize("data", [None, 4096])
def test_empty_tensor_whose_data_plus_byte_offset_is_no_address_is_refused(data):
    # on main the C core formed NULL + 2**63 (undefined behaviour; UBSan reports it)
    forged = Forged(shape=(0, C, L), data=data, byte_offset=2**63 if data is None else 2**64 - 1024)
    _refused(forged, "input", _core.InvalidArgumentError, "byte_offset")


def test_negative_strides_below_address_zero_are_refused():
    forged = Forged(shape=(N, C, L), strides=(-15, 5, 1), data=64)
    _refused(forged, "input", _core.InvalidArgumentError, "address space")


@pytest.mark.parametrize("arg", ["input", "weight", "out", "grad_output"])
def test_data_not_aligned_to_its_elements_is_refused(arg):
    # on main the kernels loaded floats from odd addresses (undefined behaviour; UBSan reports it)
    shape = (C,) if arg == "weight" else (N, C, L)
    _refused(Forged(shape=shape, byte_offset=1), arg, _core.InvalidArgumentError, "aligned", "byte_offset 1")


def test_unaligned_numpy_array_is_refused_naming_the_argument():
    raw = np.zeros(N * C * L * 4 + 1, np.uint8)
    x = np.frombuffer(raw.data, np.float32, N * C * L, offset=1).reshape(N, C, L)
    assert not x.flags.aligned
    with pytest.raises(_core.InvalidArgumentError, match=r"^input: expected data aligned to its 4-byte elements"):
        bncore.batch_norm(x, training=True)
    y = bncore.batch_norm(np.require(x, requirements="A"), training=True)
    assert y.shape == x.shape


@pytest.mark.parametrize("dtype", [(KDL_FLOAT, 0, 1), (KDL_FLOAT, 32, 0), (KDL_FLOAT, 12, 1)])
def test_dtype_of_no_whole_bytes_or_no_lanes_is_refused(dtype):
    # on main: a plain TypeError, and bits 12 went on to the byte arithmetic
    forged = Forged(shape=(N, C, L), dtype=dtype, data=None)
    _refused(forged, "input", _core.UnsupportedDtypeError, f"bits {dtype[1]}", f"lanes {dtype[2]}")


# ---------------------------------------------------------------- versioned capsules


def test_unknown_flag_bits_of_a_known_version_are_refused():
    forged = Forged(shape=(N, C, L), version=(1, 1), flags=1 << 9)
    _refused(forged, "input", _core.InvalidArgumentError, "flags", "0x200")


def test_versioned_capsule_of_major_0_is_not_consumed():
    forged = Forged(shape=(N, C, L), version=(0, 9))
    cap = forged.capsule()
    with pytest.raises(BufferError, match="input: expected a DLPack 1.x tensor, got version 0.9"):
        bncore.batch_norm(cap, training=True)
    assert forged.deleted == 0  # not consumed: the capsule still owns it
    forged.settle()
    assert forged.deleted == 1 and forged.unconsumed == 1


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device_type", [KDL_CUDA_HOST, KDL_CUDA_MANAGED])
def test_host_memory_of_cuda_is_read_like_cpu_memory(device_type):
    if device_type == KDL_CUDA_MANAGED and bncore.cuda_available():
        pytest.skip("with a CUDA device, managed memory is computed on it (docs/cuda.md): host memory labelled "
                    "managed would reach the GPU")
    # on main: "out: expected a tensor on the device of input cuda_host:0, got one on cpu:0"
    x = data()
    forged = Forged(shape=x.shape, strides=None, data=x.ctypes.data, device=(device_type, 0))
    y = bncore.batch_norm(forged.capsule(), training=True)
    np.testing.assert_array_equal(y, bncore.batch_norm(x, training=True))
    gc.collect()
    assert forged.settle().deleted == 1
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    pinned_w = Forged(shape=(C,), data=w.ctypes.data, device=(device_type, 0))
    y = bncore.batch_norm(x, None, None, Producer(pinned_w), training=True)
    np.testing.assert_array_equal(y, bncore.batch_norm(x, None, None, w, training=True))
    gc.collect()
    assert pinned_w.settle().deleted == 1


def test_cuda_capsule_without_out_names_the_input():
    # on main the message named `out`, which the caller never passed
    forged = Forged(shape=(N, C, L), device=(KDL_CUDA, 0))
    with pytest.raises(_core.UnsupportedDeviceError) as info:
        bncore.layer_norm(forged.capsule(), L)
    gc.collect()
    forged.settle()
    assert str(info.value).startswith("input:") and "cuda:0" in str(info.value), info.value
    assert "out:" not in str(info.value), info.value
    assert forged.deleted == 1


@pytest.mark.parametrize("arg", ["input", "weight"])
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_meta_and_sparse_torch_tensors_get_a_bncore_error_naming_the_argument(kind, arg):
    # on main: torch's own BufferError, naming no argument
    torch = pytest.importorskip("torch", reason="torch is needed for meta and sparse tensors")
    make = {"meta": lambda *s: torch.empty(*s, device="meta"), "sparse": lambda *s: torch.ones(*s).to_sparse()}[kind]
    x = make(N, C, L) if arg == "input" else torch.ones(N, C, L)
    w = make(C) if arg == "weight" else None
    expected = _core.UnsupportedDeviceError if kind == "meta" else _core.InvalidArgumentError
    with pytest.raises(expected) as info:
        bncore.batch_norm_forward(x, None, None, w, None, training=True)
    assert str(info.value).startswith(f"{arg}:"), info.value
    assert ("meta" if kind == "meta" else "sparse") in str(info.value)


# ---------------------------------------------------------------- bncore's own objects


@pytest.mark.parametrize("shape", [(2**31, 2**31), (2**40, 2**20, 2**4), (-1, 3)])
def test_buffer_checks_its_size(shape):
    # on main (2**31, 2**31) wrapped to a 64-byte allocation, and -1 gave OverflowError
    with pytest.raises((ValueError, MemoryError)) as info:
        _core.Buffer(shape, "float32")
    assert str(shape) in str(info.value), info.value


def test_buffer_of_17_dimensions_is_refused_as_a_bncore_error():
    with pytest.raises(_core.InvalidArgumentError, match=r"Buffer: expected at most 16 dimensions"):
        _core.Buffer((1,) * 17, "float32")


def test_a_released_tensor_refuses_to_be_read():
    # on main: a NULL dereference (the process died)
    t = _core.import_tensor(data(), "input")
    t.release()
    for field in ("shape", "strides", "ndim", "dtype", "device", "data_ptr"):
        with pytest.raises(ValueError, match="released"):
            getattr(t, field)
