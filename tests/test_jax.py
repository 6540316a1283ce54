"""bncore.jax against plain jax.numpy references: values and gradients under jit, grad and vmap,
for every variant and dtype; the running statistics; the custom call in the compiled program;
errors; and the XLA FFI structs of src/bncore/xla_ffi.h against the header jaxlib ships."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed: the JAX adapter is not tested")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import bncore  # noqa: E402
import bncore.jax as bnj  # noqa: E402

from tolerances import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ["float32", "float64", "bfloat16", "float16"]


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 arrays need jax_enable_x64; restored for the other test modules."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# ---------------------------------------------------------------- the jax.numpy references (float64)


def _stats(x, axes, rms):
    if rms:
        return 0.0, jnp.mean(x * x, axis=axes, keepdims=True)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    return mean, jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)


def _affine(y, w, b, param_axes):
    shape = [y.shape[d] if d in param_axes else 1 for d in range(y.ndim)]
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


def normalize_ref(x, axes, w=None, b=None, *, affine_axes=None, eps=1e-5, rms=False):
    """The one reference: statistics over `axes`, parameters indexed by `affine_axes`."""
    axes = tuple(a % x.ndim for a in axes)
    mean, var = _stats(x, axes, rms)
    return _affine((x - mean) / jnp.sqrt(var + eps), w, b, affine_axes or axes)


def layer_ref(x, k, w=None, b=None, eps=1e-5):
    return normalize_ref(x, tuple(range(x.ndim - k, x.ndim)), w, b, eps=eps)


def rms_ref(x, k, w=None, eps=1e-6):
    return normalize_ref(x, tuple(range(x.ndim - k, x.ndim)), w, eps=eps, rms=True)


def batch_ref(x, w=None, b=None, eps=1e-5, axis=1, mean=None, var=None):
    axis %= x.ndim
    axes = tuple(d for d in range(x.ndim) if d != axis)
    if mean is None:
        return normalize_ref(x, axes, w, b, affine_axes=(axis,), eps=eps)
    shape = [x.shape[d] if d == axis else 1 for d in range(x.ndim)]
    return _affine((x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps), w, b, (axis,))


def instance_ref(x, w=None, b=None, eps=1e-5):
    return normalize_ref(x, tuple(range(2, x.ndim)), w, b, affine_axes=(1,), eps=eps)


def group_ref(x, g, w=None, b=None, eps=1e-5):
    n, c = x.shape[:2]
    xg = x.reshape((n, g, c // g) + x.shape[2:])
    mean, var = _stats(xg, tuple(range(2, xg.ndim)), False)
    return _affine(((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape), w, b, (1,))


# ---------------------------------------------------------------- cases: (bncore call, reference, shapes)

# each case: name, x shape, parameter shape, has bias, f(x, w, b) with bncore.jax, the same with the reference
CASES = {
    "batch": ((6, 3, 5), (3,), True, lambda x, w, b: bnj.batch_norm(x, None, None, w, b, training=True)[0],
              lambda x, w, b: batch_ref(x, w, b)),
    "batch_last": ((4, 5, 3), (3,), True,
                   lambda x, w, b: bnj.batch_norm(x, None, None, w, b, training=True, axis=-1)[0],
                   lambda x, w, b: batch_ref(x, w, b, axis=-1)),
    "layer": ((4, 3, 8), (8,), True, lambda x, w, b: bnj.layer_norm(x, 8, w, b), lambda x, w, b: layer_ref(x, 1, w, b)),
    "layer2": ((4, 3, 8), (3, 8), True, lambda x, w, b: bnj.layer_norm(x, (3, 8), w, b),
               lambda x, w, b: layer_ref(x, 2, w, b)),
    "rms": ((4, 16), (16,), False, lambda x, w, b: bnj.rms_norm(x, 16, w, eps=1e-6),
            lambda x, w, b: rms_ref(x, 1, w)),
    "group": ((3, 6, 4), (6,), True, lambda x, w, b: bnj.group_norm(x, 3, w, b),
              lambda x, w, b: group_ref(x, 3, w, b)),
    "instance": ((3, 4, 7), (4,), True, lambda x, w, b: bnj.instance_norm(x, None, None, w, b)[0],
                 lambda x, w, b: instance_ref(x, w, b)),
    "normalize": ((3, 4, 5), (4,), True, lambda x, w, b: bnj.normalize(x, (0, 2), w, b, affine_axes=1),
                  lambda x, w, b: normalize_ref(x, (0, 2), w, b, affine_axes=(1,))),
    "normalize_rms": ((3, 4, 5), (4, 5), False, lambda x, w, b: bnj.normalize(x, (1, 2), w, rms=True),
                      lambda x, w, b: normalize_ref(x, (1, 2), w, rms=True)),
}


def _inputs(name, dtype, seed=0):
    shape, pshape, has_bias = CASES[name][:3]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=shape), dtype=dtype)
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=pshape), dtype=dtype)
    b = jnp.asarray(rng.normal(size=pshape), dtype=dtype) if has_bias else None
    # a cotangent exactly representable in every dtype, so that only bncore's rounding differs
    ct = jnp.asarray(rng.integers(-8, 9, size=shape) / 4.0)
    return x, w, b, ct


def _f64(*arrays):
    return tuple(None if a is None else a.astype(jnp.float64) for a in arrays)


def _loss(f, ct):
    return lambda x, w, b: jnp.sum(f(x, w, b).astype(jnp.float64) * ct)


def _close(actual, expected, dtype, kind, what):
    scale = max(1.0, float(jnp.max(jnp.abs(expected))))  # gradients are sums: tolerance relative to their size
    assert_close(actual, expected, dtype, kind, scale=scale if kind == "grad" else 1.0, err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_under_jit(name, dtype):
    f, ref = CASES[name][3:]
    x, w, b, ct = _inputs(name, dtype)
    y = jax.jit(f)(x, w, b)
    assert y.dtype == x.dtype and y.shape == x.shape
    _close(y, ref(*_f64(x, w, b)), dtype, "value", "y")
    argnums = (0, 1, 2) if b is not None else (0, 1)
    grads = jax.jit(jax.grad(_loss(f, ct), argnums=argnums))(x, w, b)
    expected = jax.grad(_loss(ref, ct), argnums=argnums)(*_f64(x, w, b))
    for g, e, a, what in zip(grads, expected, (x, w, b), ("dx", "dweight", "dbias")):
        assert g.dtype == a.dtype
        _close(g, e, dtype, "grad", what)


def test_jit_grad_of_layer_norm_matches_jax_numpy():
    """The issue's done-when: jax.jit(jax.grad(...)) over bncore.jax.layer_norm matches jax.numpy (float32)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=64), jnp.float32)
    b = jnp.asarray(rng.normal(size=64), jnp.float32)

    def loss(norm):
        return lambda x, w, b: jnp.sum(jnp.tanh(norm(x, w, b)) ** 2)

    def jnp_layer_norm(x, w, b):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b

    got = jax.jit(jax.grad(loss(lambda x, w, b: bnj.layer_norm(x, 64, w, b)), argnums=(0, 1, 2)))(x, w, b)
    want = jax.jit(jax.grad(loss(jnp_layer_norm), argnums=(0, 1, 2)))(x, w, b)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_dot_product(name):
    """<J^T u, v> from bncore's backward equals <u, J v> from finite differences (float64)."""
    f = CASES[name][3]
    x, w, b, _ = _inputs(name, "float64")
    check_grads(lambda x, w, b: f(x, w, b), (x, w, b) if b is not None else (x, w, None), order=1, modes=["rev"],
                atol=1e-6, rtol=1e-6)


def test_without_weight_and_bias():
    x, _, _, ct = _inputs("layer", "float32")
    np.testing.assert_allclose(bnj.layer_norm(x, 8), layer_ref(x, 1), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(bnj.layer_norm(x, 8) * ct))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(layer_ref(x, 1) * ct))(x), rtol=1e-4, atol=1e-5)


def test_bias_without_weight_gets_its_gradient():
    x, _, b, ct = _inputs("group", "float64")
    got = jax.grad(lambda b: jnp.sum(bnj.group_norm(x, 3, None, b) * ct))(b)
    want = jax.grad(lambda b: jnp.sum(group_ref(x, 3, None, b) * ct))(b)
    np.testing.assert_allclose(got, want, rtol=1e-10)


# ---------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_normalizes_each_instance_separately(name):
    """vmap over x (parameters shared), over the parameters (x shared), over both, and nested: each equals
    jax.vmap of the reference, so each instance has its own statistics (batch norm's included)."""
    f, ref = CASES[name][3:]
    xs = jnp.stack([_inputs(name, "float64", seed)[0] * (seed + 1) + seed for seed in range(3)])
    ws = jnp.stack([_inputs(name, "float64", seed)[1] for seed in range(3)])
    b = _inputs(name, "float64")[2]
    for in_axes, args in (((0, None, None), (xs, ws[0], b)), ((None, 0, None), (xs[0], ws, b)),
                          ((0, 0, None), (xs, ws, b)), ((1, None, None), (jnp.moveaxis(xs, 0, 1), ws[0], b))):
        got = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
        np.testing.assert_allclose(got, jax.vmap(ref, in_axes=in_axes)(*args), rtol=1e-10, atol=1e-10,
                                   err_msg=str(in_axes))
    nested = jnp.stack([xs, xs[::-1] * 2])
    got = jax.vmap(jax.vmap(f, in_axes=(0, None, None)), in_axes=(0, None, None))(nested, ws[0], b)
    want = jax.vmap(jax.vmap(ref, in_axes=(0, None, None)), in_axes=(0, None, None))(nested, ws[0], b)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_vmapped_batch_norm_is_not_batch_norm_of_the_stack():
    """The shortcut of normalizing the whole stack at once would be wrong; the vmapped call is not that."""
    xs = jnp.stack([_inputs("batch", "float64", seed)[0] * (seed + 1) for seed in range(3)])
    got = jax.vmap(lambda x: bnj.batch_norm(x, training=True)[0])(xs)
    whole = batch_ref(xs.reshape((-1,) + xs.shape[2:])).reshape(xs.shape)
    assert float(jnp.max(jnp.abs(got - whole))) > 0.1
    np.testing.assert_allclose(got, jax.vmap(batch_ref)(xs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["batch", "layer", "rms", "group"])
def test_per_example_gradients(name):
    """vmap(grad) (per-example weight gradients) and grad(vmap) both match the reference."""
    f, ref = CASES[name][3:]
    x, w, b, ct = _inputs(name, "float64")
    xs = jnp.stack([x, 2 * x + 1, -x])
    argnums = (0, 1, 2) if b is not None else (0, 1)
    per_example = jax.jit(jax.vmap(jax.grad(_loss(f, ct), argnums=argnums), in_axes=(0, None, None)))(xs, w, b)
    want = jax.vmap(jax.grad(_loss(ref, ct), argnums=argnums), in_axes=(0, None, None))(xs, w, b)
    for g, e in zip(per_example, want):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)

    def total(norm):
        return lambda xs, w, b: jnp.sum(jax.vmap(norm, in_axes=(0, None, None))(xs, w, b) * ct)

    got = jax.jit(jax.grad(total(f), argnums=argnums))(xs, w, b)
    for g, e in zip(got, jax.grad(total(ref), argnums=argnums)(xs, w, b)):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- running statistics


def _torch_rule(old, batch, momentum):
    return (1 - momentum) * old + momentum * batch


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_running_statistics(dtype):
    x, w, b, _ = _inputs("batch", dtype)
    mean, var = jnp.linspace(-1, 1, 3).astype(dtype), jnp.linspace(0.5, 2, 3).astype(dtype)
    y, new_mean, new_var = jax.jit(lambda x, m, v: bnj.batch_norm(x, m, v, w, b, training=True, momentum=0.25))(
        x, mean, var)
    x64, m64, v64 = _f64(x, mean, var)
    assert new_mean.dtype == mean.dtype and new_var.dtype == var.dtype
    assert_close(new_mean, _torch_rule(m64, x64.mean((0, 2)), 0.25), dtype)
    assert_close(new_var, _torch_rule(v64, x64.var((0, 2), ddof=1), 0.25), dtype)
    assert_close(y, batch_ref(*_f64(x, w, b)), dtype)
    # the inputs are untouched (functional), and eval mode normalizes with the statistics given
    assert_close(mean, jnp.linspace(-1, 1, 3).astype(dtype), dtype)
    y_eval, same_mean, same_var = jax.jit(lambda x, m, v: bnj.batch_norm(x, m, v, w, b))(x, new_mean, new_var)
    assert same_mean is new_mean or bool(jnp.all(same_mean == new_mean))
    assert_close(y_eval, batch_ref(*_f64(x, w, b), mean=new_mean.astype(jnp.float64),
                                   var=new_var.astype(jnp.float64)), dtype)


def test_instance_norm_running_statistics():
    x, w, b, _ = _inputs("instance", "float64")
    mean, var = jnp.zeros(4), jnp.ones(4)
    _, new_mean, new_var = bnj.instance_norm(x, mean, var, w, b, momentum=0.5)
    np.testing.assert_allclose(new_mean, _torch_rule(mean, x.mean(2).mean(0), 0.5), rtol=1e-12)
    np.testing.assert_allclose(new_var, _torch_rule(var, x.var(2, ddof=1).mean(0), 0.5), rtol=1e-12)
    y, m2, v2 = bnj.instance_norm(x, new_mean, new_var, w, b, use_input_stats=False)
    shape = (1, 4, 1)
    want = (x - new_mean.reshape(shape)) / jnp.sqrt(new_var.reshape(shape) + 1e-5) * w.reshape(shape) + b.reshape(shape)
    np.testing.assert_allclose(y, want, rtol=1e-12)


def test_vmapped_running_statistics_are_per_instance():
    xs = jnp.stack([_inputs("batch", "float64", seed)[0] * (seed + 1) for seed in range(3)])
    mean, var = jnp.zeros(3), jnp.ones(3)
    _, new_mean, new_var = jax.jit(jax.vmap(lambda x: bnj.batch_norm(x, mean, var, training=True)))(xs)
    assert new_mean.shape == (3, 3)
    np.testing.assert_allclose(new_mean, jax.vmap(lambda x: _torch_rule(mean, x.mean((0, 2)), 0.1))(xs), rtol=1e-12)
    np.testing.assert_allclose(new_var, jax.vmap(lambda x: _torch_rule(var, x.var((0, 2), ddof=1), 0.1))(xs),
                               rtol=1e-12)


def test_eval_mode_gradients_reach_the_statistics():
    """In eval mode y is a function of mean and var too: their gradients are those of the reference."""
    x, w, b, ct = _inputs("batch", "float64")
    mean, var = jnp.linspace(-1, 1, 3), jnp.linspace(0.5, 2, 3)

    def loss(norm):
        return lambda x, m, v, w, b: jnp.sum(norm(x, m, v, w, b) * ct)

    got = jax.grad(loss(lambda x, m, v, w, b: bnj.batch_norm(x, m, v, w, b)[0]), argnums=(0, 1, 2, 3, 4))(
        x, mean, var, w, b)
    want = jax.grad(loss(lambda x, m, v, w, b: batch_ref(x, w, b, mean=m, var=v)), argnums=(0, 1, 2, 3, 4))(
        x, mean, var, w, b)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
    # without weight and bias too
    got = jax.grad(lambda m, v: jnp.sum(bnj.batch_norm(x, m, v)[0] * ct), argnums=(0, 1))(mean, var)
    want = jax.grad(lambda m, v: jnp.sum(batch_ref(x, mean=m, var=v) * ct), argnums=(0, 1))(mean, var)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_training_gradients_do_not_flow_through_the_new_statistics():
    x, w, b, _ = _inputs("batch", "float64")
    g = jax.grad(lambda x: jnp.sum(bnj.batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True)[1]))(x)
    assert not bool(jnp.any(g))


# ---------------------------------------------------------------- the compiled program


def test_compiled_program_is_one_custom_call_each_way():
    x, w, b, ct = _inputs("layer", "float32")
    hlo = jax.jit(jax.grad(_loss(CASES["layer"][3], ct), argnums=(0, 1, 2))).lower(x, w, b).compile().as_text()
    assert hlo.count('custom_call_target="bncore_norm_forward"') == 1
    assert hlo.count('custom_call_target="bncore_norm_backward"') == 1
    assert "callback" not in hlo.lower()


def test_import_bncore_does_not_import_jax():
    code = "import sys, bncore; assert 'jax' not in sys.modules, 'bncore imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- errors


def test_bad_arguments_are_refused_when_traced():
    x = jnp.ones((4, 8))
    with pytest.raises(bncore.ShapeMismatchError, match="weight: expected shape"):
        jax.jit(lambda x: bnj.layer_norm(x, 8, jnp.ones(7)))(x)
    with pytest.raises(ValueError, match="normalized_shape"):
        bnj.layer_norm(x, 5)
    with pytest.raises(bncore.InvalidArgumentError, match="evaluation mode"):
        bnj.batch_norm(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnj.batch_norm(jnp.ones((1, 3)), training=True)
    with pytest.raises(ValueError, match="num_groups"):
        bnj.group_norm(jnp.ones((2, 6, 3)), 4)
    with pytest.raises(TypeError, match="floating dtype"):
        bnj.rms_norm(jnp.ones((2, 3), jnp.int32), 3)
    with pytest.raises(TypeError, match="Python bool"):
        jax.jit(lambda x, t: bnj.batch_norm(x, training=t))(x, True)


def test_errors_of_the_c_core_come_back_as_xla_errors():
    """A call the adapter would never make (a negative eps) reaches bncore: its message comes back."""
    x = jnp.ones((2, 3), jnp.float32)
    out = [jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
           jax.ShapeDtypeStruct((2,), jnp.float32)]
    attrs = bnj._Desc(2, 2, -1, 0, -1.0, 0.0, 0).attrs(0)
    with pytest.raises(Exception, match="bncore forward: invalid argument: .*eps"):
        jax.block_until_ready(bnj._ffi.ffi_call("bncore_norm_forward", out)(x, **attrs))


# ---------------------------------------------------------------- the XLA FFI structs


# (ours, jaxlib's, [(our field, jaxlib's field), ...]); sizes are compared up to the last field listed
STRUCTS = [
    ("bn_xla_extension_base", "XLA_FFI_Extension_Base", ["struct_size", "type", "next"]),
    ("bn_xla_api_version", "XLA_FFI_Api_Version", ["struct_size", "extension_start", "major_version",
                                                   "minor_version"]),
    ("bn_xla_error_create_args", "XLA_FFI_Error_Create_Args", ["struct_size", "extension_start", "message", "errc"]),
    ("bn_xla_buffer", "XLA_FFI_Buffer", ["struct_size", "extension_start", "dtype", "data", "rank", "dims"]),
    ("bn_xla_byte_span", "XLA_FFI_ByteSpan", ["ptr", "len"]),
    ("bn_xla_scalar", "XLA_FFI_Scalar", ["dtype", "value"]),
    ("bn_xla_array", "XLA_FFI_Array", ["dtype", "size", "data"]),
    ("bn_xla_args", "XLA_FFI_Args", ["struct_size", "extension_start", "size", "types", "args"]),
    ("bn_xla_rets", "XLA_FFI_Rets", ["struct_size", "extension_start", "size", "types", "rets"]),
    ("bn_xla_attrs", "XLA_FFI_Attrs", ["struct_size", "extension_start", "size", "types", "names", "attrs"]),
    ("bn_xla_api", "XLA_FFI_Api", ["struct_size", "extension_start", "api_version", "internal_api",
                                   ("error_create", "XLA_FFI_Error_Create")]),
    ("bn_xla_call_frame", "XLA_FFI_CallFrame", ["struct_size", "extension_start", "api", "ctx", "stage", "args",
                                                "rets", "attrs"]),
    ("bn_xla_type_id", "XLA_FFI_TypeId", ["type_id"]),
    ("bn_xla_metadata", "XLA_FFI_Metadata", ["struct_size", "api_version", "traits", "state_type_id"]),
    ("bn_xla_metadata_extension", "XLA_FFI_Metadata_Extension", ["extension_base", "metadata"]),
]

CONSTANTS = {
    "BN_XLA_EXTENSION_METADATA": "XLA_FFI_Extension_Metadata",
    **{f"BN_XLA_ERROR_{c}": f"XLA_FFI_Error_Code_{c}" for c in (
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")},
    **{f"BN_XLA_DTYPE_{t}": f"XLA_FFI_DataType_{t}" for t in (
        "INVALID", "PRED", "S8", "S16", "S32", "S64", "U8", "U16", "U32", "U64", "F16", "F32", "F64", "BF16")},
    "BN_XLA_ARG_BUFFER": "XLA_FFI_ArgType_BUFFER",
    "BN_XLA_RET_BUFFER": "XLA_FFI_RetType_BUFFER",
    **{f"BN_XLA_ATTR_{t}": f"XLA_FFI_AttrType_{t}" for t in ("ARRAY", "DICTIONARY", "SCALAR", "STRING")},
    **{f"BN_XLA_STAGE_{s}": f"XLA_FFI_ExecutionStage_{s}" for s in ("INSTANTIATE", "PREPARE", "INITIALIZE",
                                                                   "EXECUTE")},
}


def test_xla_ffi_structs_match_jaxlib_header(tmp_path):
    """Every offset, size and constant of src/bncore/xla_ffi.h equals jaxlib's xla/ffi/api/c_api.h,
    checked by a C compiler seeing both (static assertions: it compiles or says which)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    include = Path(bnj._ffi.include_dir())
    if not (include / "xla/ffi/api/c_api.h").exists():
        pytest.skip("this jaxlib ships no xla/ffi/api/c_api.h")
    checks = []
    for ours, theirs, fields in STRUCTS:
        for f in fields:
            mine, real = f if isinstance(f, tuple) else (f, f)
            checks.append(f"_Static_assert(offsetof({ours}, {mine}) == offsetof({theirs}, {real}) && "
                          f"sizeof(((({ours} *)0)->{mine})) == sizeof(((({theirs} *)0)->{real})), "
                          f"\"{ours}.{mine}\");")
        if theirs not in ("XLA_FFI_Api", "XLA_FFI_CallFrame", "XLA_FFI_Metadata"):  # those have later fields
            checks.append(f"_Static_assert(sizeof({ours}) == sizeof({theirs}), \"sizeof {ours}\");")
    for ours, theirs, last in (("bn_xla_error_create_args", "XLA_FFI_Error_Create_Args", "errc"),
                               ("bn_xla_api_version", "XLA_FFI_Api_Version", "minor_version"),
                               ("bn_xla_metadata", "XLA_FFI_Metadata", "traits"),
                               ("bn_xla_metadata_extension", "XLA_FFI_Metadata_Extension", "metadata")):
        checks.append(f"_Static_assert(BN_XLA_STRUCT_SIZE({ours}, {last}) == {theirs}_STRUCT_SIZE, "
                      f"\"struct_size {ours}\");")
    checks += [f"_Static_assert((int){a} == (int){b}, \"{a}\");" for a, b in CONSTANTS.items()]
    checks.append("_Static_assert(BN_XLA_FFI_API_MAJOR == XLA_FFI_API_MAJOR, \"FFI API major version\");")
    checks.append("_Static_assert(BN_XLA_FFI_API_MINOR <= XLA_FFI_API_MINOR, \"FFI API minor version\");")
    src = tmp_path / "layout.c"
    src.write_text(textwrap.dedent("""\
        #include <stddef.h>
        #include "xla/ffi/api/c_api.h"
        #include "xla_ffi.h"
        """) + "\n".join(checks) + "\nint main(void) { return 0; }\n")
    result = subprocess.run([cc, "-std=c11", "-fsyntax-only", f"-I{include}", f"-I{ROOT / 'src' / 'bncore'}",
                             str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
