"""Ghost batch norm (virtual batches along axis 0): one C call equals batch norm of each chunk, in the
forward, the running statistics and the backward."""
from __future__ import annotations

import numpy as np
import pytest

import bncore
from bncore.reference import (batch_norm_ref, ghost_batch_norm_backward_ref, ghost_batch_norm_ref,
                              ghost_running_ref)
from layouts import LAYOUTS, nonzero_data, with_layout
from tolerances import assert_close

# (shape, channel axis, virtual batch size)
SHAPES = [((8, 3), 1, 2), ((12, 4, 6), 1, 4), ((6, 4, 5, 2), -1, 3), ((4, 3, 2, 3, 4), 1, 2), ((9, 5, 3), 2, 3),
          ((16, 2, 33, 17), 1, 8), ((6, 3, 5), 1, 6), ((6, 3, 5), 1, 1)]


def _setup(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = nonzero_data(rng, shape, np.float64, axis)
    # each virtual batch its own offset: chunks with different statistics
    x = x + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)) * 2.0
    w, b = rng.uniform(0.5, 1.5, size=c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    return tuple(a.astype(dtype) for a in (x, w, b, rm, rv))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis,v", SHAPES)
def test_forward_and_running_stats_match_per_chunk_reference(shape, axis, v, dtype, layout):
    x, w, b, rm, rv = _setup(shape, axis, dtype, seed=1)
    rm1, rv1 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_forward(with_layout(x, layout), rm1, rv1, w, b, training=True,
                                                momentum=0.3, axis=axis, virtual_batch_size=v)
    y_ref, m_ref, s_ref = ghost_batch_norm_ref(x, v, w, b, axis=axis)
    assert mean.shape == invstd.shape == (shape[0] // v, shape[axis])
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(mean, m_ref, dtype, err_msg="save_mean")
    assert_close(invstd, s_ref, dtype, err_msg="save_invstd")
    rm_ref, rv_ref = ghost_running_ref(x, v, rm, rv, 0.3, axis)
    assert_close(rm1, rm_ref, dtype, err_msg="running_mean")
    assert_close(rv1, rv_ref, dtype, err_msg="running_var")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis,v", SHAPES)
def test_backward_equals_per_chunk_batch_norm(shape, axis, v, dtype):
    x, w, b, rm, rv = _setup(shape, axis, dtype, seed=2)
    dy = np.random.default_rng(3).normal(size=shape).astype(dtype)
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, b, training=True, axis=axis, virtual_batch_size=v)
    dx, dw, db = bncore.batch_norm_backward(dy, x, w, mean, invstd, axis=axis, virtual_batch_size=v)
    dx_ref, dw_ref, db_ref = ghost_batch_norm_backward_ref(dy, x, v, w, axis=axis)
    assert_close(dx, dx_ref, dtype, "grad", err_msg="dx")
    assert_close(dw, dw_ref, dtype, "grad", scale=4, err_msg="dw")
    assert_close(db, db_ref, dtype, "grad", scale=4, err_msg="db")
    # and bncore's own batch norm of each chunk (the same numbers chunk by chunk)
    chunks = [bncore.batch_norm_forward(x[i:i + v], None, None, w, b, training=True, axis=axis)
              for i in range(0, shape[0], v)]
    grads = [bncore.batch_norm_backward(dy[i:i + v], x[i:i + v], w, m, s, axis=axis)
             for (_, m, s), i in zip(chunks, range(0, shape[0], v))]
    assert_close(dx, np.concatenate([g[0] for g in grads]), dtype, "grad")
    assert_close(dw, sum(g[1].astype(np.float64) for g in grads), dtype, "grad", scale=4)


@pytest.mark.parametrize("shape,axis,v", SHAPES[:5])
def test_backward_dot_product(shape, axis, v):
    rng = np.random.default_rng(4)
    x, w, b, _, _ = _setup(shape, axis, np.float64, seed=5)
    c = shape[axis]
    vx, vw, vb, u = rng.normal(size=shape), rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)

    def f(t):
        return bncore.batch_norm(x + t * vx, None, None, w + t * vw, b + t * vb, training=True, axis=axis,
                                 virtual_batch_size=v)

    h = 1e-5
    lhs = float(np.sum(u * (f(h) - f(-h)) / (2 * h)))
    _, mean, invstd = bncore.batch_norm_forward(x, None, None, w, b, training=True, axis=axis, virtual_batch_size=v)
    dx, dw, db = bncore.batch_norm_backward(u, x, w, mean, invstd, axis=axis, virtual_batch_size=v)
    rhs = float(np.sum(dx * vx) + np.sum(dw * vw) + np.sum(db * vb))
    scale = np.sqrt(np.sum(u * u) * (np.sum(vx * vx) + np.sum(vw * vw) + np.sum(vb * vb)))
    assert abs(lhs - rhs) <= 1e-7 * scale, (lhs, rhs)


def test_the_whole_batch_as_one_virtual_batch_is_batch_norm_bit_for_bit():
    x, w, b, rm, rv = _setup((8, 3, 5, 5), 1, np.float32, seed=6)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    got = bncore.batch_norm_forward(x, rm1, rv1, w, b, training=True, virtual_batch_size=8)
    want = bncore.batch_norm_forward(x, rm2, rv2, w, b, training=True)
    for g, e in zip(got + (rm1, rv1), want + (rm2, rv2)):
        np.testing.assert_array_equal(np.reshape(g, -1), np.reshape(e, -1))


def test_virtual_batches_differ_from_the_whole_batch():
    """The chunks have different statistics, so a call that ignored virtual_batch_size would fail here."""
    x, w, b, _, _ = _setup((8, 3, 5), 1, np.float64, seed=7)
    ghost = bncore.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=2)
    assert np.max(np.abs(ghost - batch_norm_ref(x, w, b)[0])) > 0.1


def test_eval_ignores_virtual_batches():
    x, w, b, rm, rv = _setup((6, 3, 5), 1, np.float32, seed=8)
    np.testing.assert_array_equal(bncore.batch_norm(x, rm, rv, w, b, training=False, virtual_batch_size=4),
                                  bncore.batch_norm(x, rm, rv, w, b, training=False))


def test_non_multiple_batch_names_both_numbers():
    x, w, b, rm, rv = _setup((10, 3, 5), 1, np.float32, seed=9)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match=r"virtual_batch_size.*10.*4"):
        bncore.batch_norm(x, rm, rv, w, b, training=True, virtual_batch_size=4)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def test_layer_ghost_batch_norm():
    x, w, b, _, _ = _setup((8, 3, 4), 1, np.float64, seed=10)
    layer = bncore.BatchNorm(3, virtual_batch_size=4, dtype="float64")
    y = layer(x)
    assert_close(y, ghost_batch_norm_ref(x, 4)[0], np.float64)
    assert_close(layer.running_mean, ghost_running_ref(x, 4, np.zeros(3), np.ones(3), 0.1)[0], np.float64)
    dy = np.random.default_rng(11).normal(size=x.shape)
    dx = layer.backward(dy)
    dx_ref, dw_ref, db_ref = ghost_batch_norm_backward_ref(dy, x, 4, np.ones(3))
    assert_close(dx, dx_ref, np.float64, "grad")
    assert_close(layer.weight_grad, dw_ref, np.float64, "grad")
    layer.eval()
    assert_close(layer(x[:3]), batch_norm_ref(x[:3], running_mean=layer.running_mean,
                                              running_var=layer.running_var)[0], np.float64)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_inputs_channels_last(half):
    torch = pytest.importorskip("torch")
    x, w, b, rm, rv = _setup((8, 3, 6, 6), 1, np.float32, seed=12)
    tx = torch.from_numpy(x).to(getattr(torch, half)).contiguous(memory_format=torch.channels_last)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y, mean, invstd = bncore.batch_norm_forward(tx, trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                                                training=True, virtual_batch_size=4)
    x64 = tx.double().numpy()
    assert_close(y, ghost_batch_norm_ref(x64, 4, w, b)[0], half)
    rm_ref, rv_ref = ghost_running_ref(x64, 4, rm, rv, 0.1)
    assert_close(trm, rm_ref, "float32", scale=10)
    assert_close(trv, rv_ref, "float32", scale=10)
    dy = torch.from_numpy(np.random.default_rng(13).normal(size=x.shape)).to(tx.dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, tx, torch.from_numpy(w), mean, invstd, virtual_batch_size=4)
    dx_ref, dw_ref, _ = ghost_batch_norm_backward_ref(dy.double().numpy(), x64, 4, w)
    assert_close(dx, dx_ref, half, "grad", scale=2)
    assert_close(dw, dw_ref, "float32", "grad", scale=100)
