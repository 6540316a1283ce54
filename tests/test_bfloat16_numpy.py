"""NumPy arrays of ml_dtypes' bfloat16 (JAX's bfloat16 as NumPy sees it): NumPy cannot export them
through DLPack, so bncore reads their buffer as uint16 and reinterprets it. They are accepted without
a copy, in any layout, and bfloat16 NumPy arrays come back."""
import numpy as np
import pytest

import bncore
from bncore.reference import batch_norm_backward_ref, batch_norm_ref, batch_norm_running_ref, layer_norm_ref
from tolerances import TOLERANCES

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes makes NumPy bfloat16 arrays")
BF16 = ml_dtypes.bfloat16
TOL = TOLERANCES["bfloat16"]


def bf16(shape, seed=0, scale=2.0, shift=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + shift).astype(BF16)


def close(actual, expected, tol):
    assert actual.dtype == BF16, actual.dtype
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_batch_norm_training_against_the_reference(layout):
    x = bf16((6, 3, 5, 4))
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "strided":
        x = bf16((6, 3, 10, 4))[:, :, ::2]
    w, b = bf16((3,), 1), bf16((3,), 2)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = bncore.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)
    x64 = x.astype(np.float64)
    close(y, batch_norm_ref(x64, w.astype(np.float64), b.astype(np.float64))[0], TOL.value)
    ref_m, ref_v = batch_norm_running_ref(x64, np.zeros(3), np.ones(3), 0.1)
    np.testing.assert_allclose(rm, ref_m, rtol=1e-5, atol=1e-6)  # statistics in float32 from the exact inputs
    np.testing.assert_allclose(rv, ref_v, rtol=1e-5, atol=1e-6)


def test_outputs_and_running_statistics_in_bfloat16():
    x = bf16((16, 4))
    rm, rv = np.zeros(4, BF16), np.ones(4, BF16)
    y, mean, invstd = bncore.batch_norm_forward(x, rm, rv, training=True)
    assert y.dtype == BF16 and mean.dtype == np.float32 and invstd.dtype == np.float32
    ref_m, _ = batch_norm_running_ref(x.astype(np.float64), np.zeros(4), np.ones(4), 0.1)
    close(rm, ref_m, TOL.value)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)


def test_backward_against_the_reference_and_a_dot_product():
    x, dy, w = bf16((12, 5, 3)), bf16((12, 5, 3), 7, 1.0, 0.0), bf16((5,), 3)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, training=True)
    gx, gw, gb = bncore.batch_norm_backward(dy, x, w, mean, invstd, training=True)
    ref = batch_norm_backward_ref(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64))
    for got, want in zip((gx, gw, gb), ref):
        close(got, want, TOL.grad)
    # <dy, J v> = <J^T dy, v> for the input: J v by central differences of the float64 reference
    v = np.random.default_rng(9).standard_normal(x.shape)
    h = 1e-4
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    jv = (batch_norm_ref(x64 + h * v, w64)[0] - batch_norm_ref(x64 - h * v, w64)[0]) / (2 * h)
    lhs = float((dy.astype(np.float64) * jv).sum())
    rhs = float((gx.astype(np.float64) * v).sum())
    assert abs(lhs - rhs) <= 5e-2 * max(1.0, abs(lhs)), (lhs, rhs)


def test_out_is_written_in_place_without_a_copy():
    x = bf16((8, 6))
    out = np.zeros((8, 6), BF16)
    y = bncore.batch_norm(x, training=True, out=out)
    assert np.shares_memory(y, out) and y.ctypes.data == out.ctypes.data
    close(out, batch_norm_ref(x.astype(np.float64))[0], TOL.value)


def test_a_view_of_a_larger_buffer_is_read_in_place():
    """The input is not copied: bncore reads the uint16 view of the same memory (an offset view here)."""
    big = bf16((10, 6))
    x = big[2:]
    y = bncore.layer_norm(x, (6,))
    close(y, layer_norm_ref(x.astype(np.float64), 1)[0], TOL.value)


def test_a_read_only_bfloat16_out_is_refused_and_left_alone():
    x = bf16((4, 3))
    out = np.zeros((4, 3), BF16)
    out.flags.writeable = False
    before = out.tobytes()
    with pytest.raises(ValueError, match=r"^out: the tensor is read-only"):
        bncore.batch_norm(x, training=True, out=out)
    assert out.tobytes() == before


def test_the_layer_takes_bfloat16_arrays():
    layer = bncore.BatchNorm(3)
    x = bf16((10, 3, 4))
    y = layer(x)
    close(y, batch_norm_ref(x.astype(np.float64))[0], TOL.value)
    layer.eval()
    assert layer(x).dtype == BF16


def test_other_two_byte_numpy_dtypes_are_not_taken_for_bfloat16():
    """float16 stays float16 (its own DLPack code); the reinterpretation is for ml_dtypes' bfloat16 only."""
    x = np.random.default_rng(1).standard_normal((6, 2)).astype(np.float16)
    y = bncore.batch_norm(x, training=True)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), batch_norm_ref(x.astype(np.float64))[0],
                               rtol=TOLERANCES["float16"].value.rtol, atol=TOLERANCES["float16"].value.atol)
    with pytest.raises(TypeError, match=r"^input: "):
        bncore.batch_norm(np.zeros((4, 2), ml_dtypes.float8_e4m3fn), training=True)
