"""Results are bitwise identical for any thread count, every variant, and concurrent calls are safe.

Tensors of >= 200,000 elements so that the kernels split the work; the shapes cover the fused path
(a group whose operands fit in 1 MiB), the two-phase path (one group larger: layer norm of a
(2, 400000) float32 tensor, a batch-norm channel or an instance of 262,144 values), channels-last
data (rows of groups), column reductions (`normalize(x, axes=(0,))` of a (5000, 64) array, batch
norm with axis=-1) and half dtypes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import bncore


def _bytes(a):
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.view(dtype=__import__("torch").int16)
        a = a.numpy()
    return np.ascontiguousarray(a).tobytes()


def _arrays(shape, dtype, param_shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3 + 1
    dy = rng.normal(size=shape)
    w = rng.uniform(0.5, 1.5, size=param_shape)
    b = rng.normal(size=param_shape)
    return x.astype(dtype), dy.astype(dtype), w.astype(dtype), b.astype(dtype)


def _torch_layout(arrays, fmt):
    torch = pytest.importorskip("torch", reason="torch is needed for channels-last tensors")
    x, dy, w, b = (a if isinstance(a, torch.Tensor) else torch.from_numpy(a) for a in arrays)
    mf = getattr(torch, fmt)
    return x.contiguous(memory_format=mf), dy.contiguous(memory_format=mf), w, b


def _half(arrays, dtype):
    torch = pytest.importorskip("torch", reason="torch is needed for bfloat16 tensors")
    x, dy, w, b = (torch.from_numpy(a) for a in arrays)
    return x.to(getattr(torch, dtype)), dy.to(getattr(torch, dtype)), w.float(), b.float()


def _layer(shape, k, dtype="float32", seed=0):
    arrays = _arrays(shape, dtype, shape[len(shape) - k:], seed)
    ns = shape[len(shape) - k:]

    def run(a):
        x, dy, w, b = a
        y, m, r = bncore.layer_norm_forward(x, ns, w, b)
        dx, dw, db = bncore.layer_norm_backward(dy, x, ns, w, m, r)
        return dict(y=y, mean=m, rstd=r, dx=dx, dw=dw, db=db)
    return run, arrays


def _rms(shape, k, dtype="float32", seed=1):
    arrays = _arrays(shape, dtype, shape[len(shape) - k:], seed)
    ns = shape[len(shape) - k:]

    def run(a):
        x, dy, w, _ = a
        y, r = bncore.rms_norm_forward(x, ns, w)
        dx, dw, _ = bncore.rms_norm_backward(dy, x, ns, w, r)
        return dict(y=y, rstd=r, dx=dx, dw=dw)
    return run, arrays


def _group(shape, groups, dtype="float32", seed=2):
    arrays = _arrays(shape, dtype, (shape[1],), seed)

    def run(a):
        x, dy, w, b = a
        y, m, r = bncore.group_norm_forward(x, groups, w, b)
        dx, dw, db = bncore.group_norm_backward(dy, x, groups, w, m, r)
        return dict(y=y, mean=m, rstd=r, dx=dx, dw=dw, db=db)
    return run, arrays


def _running_stats(x, w, c):
    """Fresh running statistics of `c` channels in x's library and w's dtype."""
    if hasattr(x, "detach"):
        import torch

        return torch.linspace(-1, 1, c, dtype=w.dtype), torch.linspace(0.5, 2, c, dtype=w.dtype)
    return np.linspace(-1, 1, c).astype(w.dtype), np.linspace(0.5, 2, c).astype(w.dtype)


def _instance(shape, use_input_stats, dtype="float32", seed=3):
    arrays = _arrays(shape, dtype, (shape[1],), seed)
    c = shape[1]

    def run(a):
        x, dy, w, b = a
        rm, rv = _running_stats(x, w, c)
        y, m, r = bncore.instance_norm_forward(x, rm, rv, w, b, use_input_stats, 0.1)
        dx, dw, db = bncore.instance_norm_backward(dy, x, w, m, r, use_input_stats=use_input_stats)
        return dict(y=y, mean=m, rstd=r, running_mean=rm, running_var=rv, dx=dx, dw=dw, db=db)
    return run, arrays


def _normalize(shape, axes, affine_axes=None, rms=False, dtype="float32", seed=4):
    aff = axes if affine_axes is None else affine_axes
    arrays = _arrays(shape, dtype, tuple(shape[a] for a in aff), seed)

    def run(a):
        x, dy, w, b = a
        y, m, r = bncore.normalize_forward(x, axes, w, b, affine_axes=affine_axes, rms=rms)
        dx, dw, db = bncore.normalize_backward(dy, x, axes, w, m, r, affine_axes=affine_axes, rms=rms)
        out = dict(y=y, mean=m, rstd=r, dx=dx, dw=dw, db=db)
        if rms:
            assert db is None
            del out["db"]
        return out
    return run, arrays


def _transform(problem, f):
    run, arrays = problem
    return run, f(arrays)


def _batch(layout, dtype, mode, seed=9, half=None):
    shapes = {"nchw": ((64, 16, 16, 16), 1), "channels-last": ((64, 16, 16, 16), 1),
              "nhwc-axis-1": ((64, 16, 16, 16), -1), "2d": ((16384, 16), 1), "two-phase": ((16, 2, 128, 128), 1)}
    shape, axis = shapes[layout]
    c = shape[axis]
    arrays = _arrays(shape, dtype, (c,), seed)
    if half is not None:
        arrays = _half(arrays, half)
    if layout == "channels-last":
        arrays = _torch_layout(arrays, "channels_last")
    training = mode == "train"

    def run(a):
        x, dy, w, b = a
        rm, rv = _running_stats(x, w, c)
        y, m, r = bncore.batch_norm_forward(x, rm, rv, w, b, training=training, momentum=0.1, axis=axis)
        dx, dw, db = bncore.batch_norm_backward(dy, x, w, m, r, training=training, axis=axis)
        return dict(y=y, mean=m, rstd=r, running_mean=rm, running_var=rv, dx=dx, dw=dw, db=db)
    return run, arrays


def _batch_extension(layout, kind, seed=10):
    """Batch renormalization, ghost batch norm and the fused BN + add + ReLU, forward and backward."""
    shape, axis = ((64, 16, 16, 16), -1 if layout == "nhwc-axis-1" else 1)
    c = shape[axis]
    arrays = _arrays(shape, "float32", (c,), seed)
    res = np.random.default_rng(seed + 1).normal(size=shape).astype(np.float32)
    if layout == "channels-last":
        arrays = _torch_layout(arrays, "channels_last")
        res = _torch_layout((res, res, arrays[2], arrays[3]), "channels_last")[0]

    def run(a):
        x, dy, w, b = a
        rm, rv = _running_stats(x, w, c)
        if kind == "renorm":
            y, m, r, rr, dd = bncore.batch_renorm_forward(x, rm, rv, w, b, training=True, rmax=1.5, dmax=0.5,
                                                          axis=axis)
            dx, dw, db = bncore.batch_renorm_backward(dy, x, w, m, r, rr, dd, axis=axis)
            return dict(y=y, mean=m, rstd=r, r=rr, d=dd, running_mean=rm, running_var=rv, dx=dx, dw=dw, db=db)
        if kind == "ghost":
            y, m, r = bncore.batch_norm_forward(x, rm, rv, w, b, training=True, axis=axis, virtual_batch_size=16)
            dx, dw, db = bncore.batch_norm_backward(dy, x, w, m, r, axis=axis, virtual_batch_size=16)
            return dict(y=y, mean=m, rstd=r, running_mean=rm, running_var=rv, dx=dx, dw=dw, db=db)
        y, m, r = bncore.batch_norm_forward(x, rm, rv, w, b, training=True, axis=axis, activation="relu",
                                            residual=res)
        dx, dw, db, dres = bncore.batch_norm_backward(dy, x, w, m, r, axis=axis, activation="relu", output=y,
                                                      residual=True)
        return dict(y=y, mean=m, rstd=r, running_mean=rm, running_var=rv, dx=dx, dw=dw, db=db, dres=dres)
    return run, arrays


# name -> () -> (run, inputs): run(inputs) returns {result name: value}
PROBLEMS = {
    # layer norm: one group larger than 1 MiB (two-phase), many small rows (fused), two trailing dims
    "layer-2x400000-float32": lambda: _layer((2, 400000), 1),
    "layer-512x512-float64": lambda: _layer((512, 512), 1, "float64"),
    "layer-16x128x128-two-dims": lambda: _layer((16, 128, 128), 2),
    "layer-2x400000-bfloat16": lambda: _transform(_layer((2, 400000), 1), lambda a: _half(a, "bfloat16")),
    "rms-2x400000-float32": lambda: _rms((2, 400000), 1),
    "rms-300x1024-float64": lambda: _rms((300, 1024), 1, "float64"),
    "rms-300x1024-float16": lambda: _transform(_rms((300, 1024), 1), lambda a: _half(a, "float16")),
    # group norm: groups of 131072 values (fused forward, two-phase backward), 1 group (two-phase)
    "group-2x4x256x256-2groups": lambda: _group((2, 4, 256, 256), 2),
    "group-2x4x256x256-1group": lambda: _group((2, 4, 256, 256), 1),
    "group-8x32x32x32-channels-last": lambda: _transform(_group((8, 32, 32, 32), 8),
                                                         lambda a: _torch_layout(a, "channels_last")),
    "group-4x16x8x32x32-float64": lambda: _group((4, 16, 8, 32, 32), 4, "float64"),
    # instance norm: training (running statistics updated) and eval, channels-last too
    "instance-8x16x64x64-train": lambda: _instance((8, 16, 64, 64), True),
    "instance-8x16x64x64-eval": lambda: _instance((8, 16, 64, 64), False),
    "instance-8x16x64x64-channels-last": lambda: _transform(_instance((8, 16, 64, 64), True),
                                                            lambda a: _torch_layout(a, "channels_last")),
    "instance-2x2x1x300x400-big-instances": lambda: _instance((2, 2, 1, 300, 400), True, seed=5),
    # normalize: columns, ConvNeXt channels, a middle axis, affine on other axes, RMS
    "normalize-5000x64-axis0": lambda: _normalize((5000, 64), (0,)),
    "normalize-5000x64-axis0-fortran": lambda: _transform(_normalize((5000, 64), (0,), seed=6),
                                                          lambda a: tuple(np.asfortranarray(v) for v in a)),
    "normalize-200000x2-axis0": lambda: _normalize((200000, 2), (0,), dtype="float64"),
    "normalize-nchw-channels": lambda: _normalize((16, 64, 16, 16), (1,)),
    "normalize-nchw-channels-last": lambda: _transform(_normalize((16, 64, 16, 16), (1,), seed=7),
                                                       lambda a: _torch_layout(a, "channels_last")),
    "normalize-middle-affine-other": lambda: _normalize((64, 50, 80), (1,), affine_axes=(0, 2)),
    "normalize-0-2-rms": lambda: _normalize((300, 8, 100), (0, 2), rms=True, dtype="float64"),
    # the two-phase path for instance norm too: one instance of 262144 values (1 MiB of float32 x)
    "instance-2x2x512x512-two-phase": lambda: _instance((2, 2, 512, 512), True, seed=8),
    # batch norm: NCHW channels of 4096 values (fused) and of 262144 (two-phase), channels-last
    # (rows of groups), NHWC with axis=-1 (columns), 2-D; training (running statistics updated) and eval
    **{f"batch-{layout}-{dtype}-{mode}": (lambda layout=layout, dtype=dtype, mode=mode: _batch(layout, dtype, mode))
       for layout in ("nchw", "channels-last", "nhwc-axis-1", "2d") for dtype in ("float32", "float64")
       for mode in ("train", "eval")},
    "batch-nchw-two-phase-train": lambda: _batch("two-phase", "float32", "train"),
    "batch-nchw-two-phase-eval": lambda: _batch("two-phase", "float32", "eval"),
    "batch-channels-last-bfloat16": lambda: _batch("channels-last", "float32", "train", half="bfloat16"),
    **{f"batch-{kind}-{layout}": (lambda layout=layout, kind=kind: _batch_extension(layout, kind))
       for kind in ("renorm", "ghost", "relu-residual") for layout in ("nchw", "channels-last", "nhwc-axis-1")},
}



def _numel(x):
    return x.numel() if hasattr(x, "numel") else x.size


THREAD_COUNTS = (1, 2, 3, 7)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_bitwise_identical_at_1_2_3_and_7_threads(name, restore_threads):
    """Forward, backward and running statistics: the same bits at 1, 2, 3 and 7 threads (3 and 7 do
    not divide the blocks evenly; 7 is more threads than this machine may have), repeatable, and the
    default thread count gives them too."""
    run, arrays = PROBLEMS[name]()
    assert _numel(arrays[0]) >= 200_000  # past the parallel threshold (32,768 elements), several blocks
    results = {}
    for n in THREAD_COUNTS:
        restore_threads(n)
        assert bncore.get_num_threads() == n
        results[n] = {k: _bytes(v) for k, v in run(arrays).items()}
    one = results[1]
    for k in one:
        assert one[k] is not None, k
    for n in THREAD_COUNTS[1:]:
        for k in one:
            assert results[n][k] == one[k], f"{name}: {k} differs between 1 and {n} threads"
    again = {k: _bytes(v) for k, v in run(arrays).items()}
    assert again == results[THREAD_COUNTS[-1]], f"{name}: not repeatable with {THREAD_COUNTS[-1]} threads"
    restore_threads(0)
    assert {k: _bytes(v) for k, v in run(arrays).items()} == one, f"{name}: the default thread count differs"


def test_set_num_threads_zero_restores_the_default(restore_threads):
    bncore.set_num_threads(0)
    default = bncore.get_num_threads()
    assert default >= 1
    bncore.set_num_threads(1)
    assert bncore.get_num_threads() == 1
    bncore.set_num_threads(-3)
    assert bncore.get_num_threads() == default



def test_concurrent_calls_from_python_threads(restore_threads):
    """Calls release the GIL and may run at once on different tensors: each gives what it gives alone."""
    restore_threads(1)
    problems = [_batch("nchw", "float32", "train", seed) for seed in range(4)]
    alone = [{k: _bytes(v) for k, v in run(a).items()} for run, a in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda p: {k: _bytes(v) for k, v in p[0](p[1]).items()}, problems * 2))
    assert together == alone * 2
