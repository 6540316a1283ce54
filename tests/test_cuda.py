"""The CUDA backend: what runs everywhere (build queries, clean refusals with no device) and,
marked `cuda`, what needs a GPU: every variant, mode and dtype against bncore's CPU path and
torch.cuda, determinism, streams, CuPy and torch round trips, mixed-device errors.

No test marked `cuda` has run yet: this project had no GPU when they were written (docs/cuda.md).
"""
from __future__ import annotations

import gc
import os
import shutil

import numpy as np
import pytest

import bncore
from bncore import _core
from cases import CASES, bncore_backward, bncore_forward, data, params, torch_forward
from forged_dlpack import KDL_CUDA, Forged
from tolerances import TOLERANCES

try:
    import torch
except ImportError:  # pragma: no cover - torch is in the test extras
    torch = None

HAVE_GPU = bncore.cuda_available() and torch is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device is present (or bncore was built without CUDA)")
DTYPES = ["float32", "float64", "float16", "bfloat16"]


# ---------------------------------------------------------------- everywhere


def test_build_info_says_what_was_compiled_in():
    info = bncore.build_info()
    assert set(info) >= {"version", "cuda", "cuda_architectures", "openmp", "cpu_kernel_level"}
    assert info["cpu_kernel_level"].split(" (")[0] in ("baseline", "x86-64-v3", "x86-64-v4")
    assert info["version"] == bncore.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert (info["cuda_architectures"] != "") == info["cuda"]
    if info["cuda"]:
        assert all(a.split("-")[0].isdigit() for a in info["cuda_architectures"].split(";")), info


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("BNCORE_EXPECT_CUDA") == "0",
                    reason="no nvcc on PATH: an AUTO build has no CUDA backend")
def test_auto_build_with_nvcc_has_cuda():
    assert bncore.build_info()["cuda"], "nvcc is on PATH, but this bncore was built without CUDA (BNCORE_CUDA=OFF?)"


def test_cuda_available_is_false_without_a_device_and_never_raises():
    count = bncore.cuda.device_count()
    assert count >= 0
    assert bncore.cuda_available() == (bncore.build_info()["cuda"] and count > 0)


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA device is present: the refusal path does not apply")
def test_forged_cuda_capsule_is_refused_cleanly_without_a_device():
    shape = (4, 3, 8)
    forged_x = Forged(shape=shape, device=(KDL_CUDA, 0))
    forged_y = Forged(shape=shape, device=(KDL_CUDA, 0))
    with pytest.raises(_core.UnsupportedDeviceError) as info:
        bncore.layer_norm(forged_x.capsule(), 8, out=forged_y.capsule())
    gc.collect()
    assert forged_x.settle().deleted == 1 and forged_y.settle().deleted == 1
    message = str(info.value)
    assert message.split(":")[0] in ("x", "input") and "cuda:0" in message, message
    if bncore.build_info()["cuda"]:  # the reason: no driver, no device
        assert "no CUDA device is usable" in message or "CUDA device 0 does not exist" in message, message


def test_stream_choice_is_per_block_and_restored():
    assert _core.set_stream(None) is None
    with bncore.cuda.stream(1234):
        assert _core.set_stream(1234) == 1234  # the block's choice, as an int cudaStream_t
        with bncore.cuda.stream(type("S", (), {"cuda_stream": 99})()):
            assert _core.set_stream(99) == 99
        assert _core.set_stream(1234) == 1234
    assert _core.set_stream(None) is None


def test_cpu_results_unchanged_in_a_cuda_build():
    rng = np.random.default_rng(0)
    x = data(rng, (8, 3, 5)).astype(np.float32)
    y, m, r = bncore.batch_norm_forward(x, training=True)
    xm = x.astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_allclose(m, xm, rtol=1e-6)
    assert y.dtype == np.float32 and type(y) is np.ndarray


# ---------------------------------------------------------------- on a GPU (marked cuda)

def _torch_dtype(name):
    return getattr(torch, name)


def _tensors(case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(data(rng, case.shape)).to(_torch_dtype(dtype))
    w, b = params(rng, case.param_shape, "float64", bias=case.has_bias)
    w = torch.from_numpy(w).to(_torch_dtype(dtype))
    b = None if b is None else torch.from_numpy(b).to(_torch_dtype(dtype))
    return x, w, b


def _close(actual, expected, dtype, kind="value"):
    tol = getattr(TOLERANCES[dtype], kind)
    a = actual.detach().cpu().double().numpy()
    e = expected.detach().cpu().double().numpy()
    np.testing.assert_allclose(a, e, rtol=tol.rtol, atol=tol.atol)


def _running(case, dtype, device):
    c = case.shape[case.channel_axis]
    rm = torch.linspace(-1, 1, c, dtype=_torch_dtype(dtype), device=device)
    rv = torch.linspace(0.5, 2, c, dtype=_torch_dtype(dtype), device=device)
    return rm, rv


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_and_backward_match_the_cpu_path(case, dtype, training):
    if not training and not case.has_running_stats:
        pytest.skip("only batch and instance norm have an evaluation mode")
    x, w, b = _tensors(case, dtype)
    xc, wc, bc = x.cuda(), w.cuda(), None if b is None else b.cuda()
    rm = rv = rmc = rvc = None
    if case.has_running_stats:
        if case.kind == "instance":
            rm, rv = torch.zeros(case.shape[1], dtype=x.dtype), torch.ones(case.shape[1], dtype=x.dtype)
        else:
            rm, rv = _running(case, dtype, "cpu")
        rmc, rvc = rm.cuda(), rv.cuda()
    y, saved = bncore_forward(case, x, w, b, rm, rv, use_input_stats=training)
    yc, savedc = bncore_forward(case, xc, wc, bc, rmc, rvc, use_input_stats=training)
    assert yc.is_cuda and yc.dtype == x.dtype and yc.shape == x.shape
    _close(yc, y, dtype)
    for s, sc in zip(saved, savedc):
        if s is not None:
            assert sc.is_cuda
            _close(sc, s, dtype)
    if rm is not None:  # updated in place on the GPU
        _close(rmc, rm, dtype)
        _close(rvc, rv, dtype)
    dy = torch.from_numpy(np.random.default_rng(1).normal(size=case.shape)).to(x.dtype)
    grads = bncore_backward(case, dy, x, w, saved, use_input_stats=training)
    gradsc = bncore_backward(case, dy.cuda(), xc, wc, savedc, use_input_stats=training)
    for g, gc_ in zip(grads, gradsc):
        if g is not None:
            assert gc_.is_cuda
            _close(gc_, g, dtype, "grad")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_matches_torch_cuda(case, dtype):
    if dtype == "float16" and case.kind == "instance":
        pytest.skip("torch.cuda's instance norm of float16 accumulates in float16")
    x, w, b = _tensors(case, dtype)
    x, w, b = x.cuda(), w.cuda(), None if b is None else b.cuda()
    y, _ = bncore_forward(case, x, w, b)
    _close(y, torch_forward(case, x, w, b), dtype)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_strided_layouts_and_runs_repeat_bit_for_bit(layout, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 32, 40, 40, generator=g) * 2 + 1).to(_torch_dtype(dtype)).cuda()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    w = torch.rand(32, generator=g).cuda().to(x.dtype) + 0.5
    b = torch.rand(32, generator=g).cuda().to(x.dtype)
    runs = [bncore.batch_norm_forward(x, None, None, w, b, True) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c), "two runs differ: a reduction order depends on the launch"
    dy = torch.randn(x.shape, generator=g).to(x.dtype).cuda()
    grads = [bncore.batch_norm_backward(dy, x, w, runs[0][1], runs[0][2]) for _ in range(2)]
    for a, c in zip(*grads):
        assert torch.equal(a, c)
    expect = torch.nn.functional.batch_norm(x.float(), None, None, w.float(), b.float(), True)
    _close(runs[0][0], expect.to(x.dtype), dtype)


@pytest.mark.cuda
@needs_gpu
def test_epilogue_renorm_and_ghost_match_the_cpu_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 8, 6, 6, generator=g)
    res = torch.randn(x.shape, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g)
    cpu = bncore.batch_norm(x, None, None, w, b, True, activation="relu", residual=res)
    gpu = bncore.batch_norm(x.cuda(), None, None, w.cuda(), b.cuda(), True, activation="relu", residual=res.cuda())
    _close(gpu, cpu, "float32")
    cpu = bncore.batch_norm(x, None, None, w, b, True, virtual_batch_size=8)
    gpu = bncore.batch_norm(x.cuda(), None, None, w.cuda(), b.cuda(), True, virtual_batch_size=8)
    _close(gpu, cpu, "float32")
    rm, rv = torch.zeros(8), torch.ones(8)
    rmc, rvc = rm.cuda(), rv.cuda()
    cpu = bncore.batch_renorm_forward(x, rm, rv, w, b, True, rmax=1.5, dmax=0.5)
    gpu = bncore.batch_renorm_forward(x.cuda(), rmc, rvc, w.cuda(), b.cuda(), True, rmax=1.5, dmax=0.5)
    for a, c in zip(gpu, cpu):
        _close(a, c, "float32")
    _close(rmc, rm, "float32")
    _close(rvc, rv, "float32")


@pytest.mark.cuda
@needs_gpu
def test_runs_on_a_non_default_stream():
    x = torch.randn(64, 16, 32, 32, device="cuda")
    expect = bncore.batch_norm(x, training=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # torch's current stream: bncore's default
        y = bncore.batch_norm(x, training=True)
    s.synchronize()
    assert torch.equal(y, expect)
    with bncore.cuda.stream(s):  # bncore's own choice
        y2 = bncore.batch_norm(x, training=True)
    s.synchronize()
    assert torch.equal(y2, expect)


@pytest.mark.cuda
@needs_gpu
def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    x = cupy.random.standard_normal((8, 4, 16), dtype=cupy.float32)
    y = bncore.layer_norm(x, 16)
    assert isinstance(y, cupy.ndarray) and y.device.id == x.device.id
    expect = bncore.layer_norm(cupy.asnumpy(x), 16)
    np.testing.assert_allclose(cupy.asnumpy(y), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_gpu
def test_mixed_devices_are_refused_naming_the_argument():
    x = torch.randn(8, 3, 5, device="cuda")
    with pytest.raises(_core.UnsupportedDeviceError) as info:
        bncore.batch_norm(x, None, None, torch.ones(3), None, True)
    message = str(info.value)
    assert "weight" in message and "cuda:0" in message and "cpu:0" in message, message
    if torch.cuda.device_count() > 1:
        with pytest.raises(_core.UnsupportedDeviceError):
            bncore.batch_norm(x, None, None, torch.ones(3, device="cuda:1"), None, True)


@pytest.mark.cuda
@needs_gpu
def test_torch_modules_after_model_cuda():
    import bncore.torch as bt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    converted = bt.convert(model).cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda", requires_grad=True)
    y = converted(x)
    assert y.is_cuda
    y.sum().backward()
    assert x.grad is not None and x.grad.is_cuda
