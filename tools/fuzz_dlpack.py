#!/usr/bin/env python3
"""Fuzz bncore's DLPack import path with forged capsules.

From the fuzzer's bytes it builds DLManagedTensor(Versioned) structs (tests/forged_dlpack.py):
random ndim, sizes (0, negative, huge), NULL or real shape/strides pointers, strides (0,
negative, INT64_MIN, huge), dtype code/bits/lanes, device, byte_offset, version and flags,
and data that is either a real buffer at least as large as the declared extent, or (only
when the tensor's own fields say the library must refuse it) NULL or a small buffer. They
go to the public API as input, weight, bias, out, running statistics, saved statistics,
grad_output and RunningStats.update's batch statistics, next to valid NumPy (and PyTorch)
arrays.

An execution passes when the call returns, or raises one of bncore's exceptions, TypeError,
ValueError or BufferError, and every forged tensor's deleter has then run exactly once.
Anything else (another exception type, a deleter run twice or never, a crash or a sanitizer
report) is a finding: the harness prints the input's hex and stops.

    python tools/fuzz_dlpack.py --seconds 110          # CI: about two minutes
    python tools/fuzz_dlpack.py --runs 1000000         # by hand
    python tools/fuzz_dlpack.py --random --runs 20000  # without atheris (e.g. under ASan)

With atheris installed (pip install atheris) libFuzzer drives the bytes, guided by the
coverage of bncore's Python modules; --random feeds os.urandom bytes instead.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import numpy as np  # noqa: E402

import forged_dlpack as fd  # noqa: E402

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NUMEL = 2**56  # the C core's bound (BN_MAX_NUMEL)
BUFFER_CAP = 1 << 20  # the largest buffer the harness allocates for a declared extent
ELEMENT_CAP = 1 << 20  # the most elements a tensor the library may accept has (zero strides reach far)

SIZES = (0, 1, 2, 3, 4, 5, -1, -2, 2**31, 2**32 + 1, 2**55, 2**56, 2**57, 2**62, INT64_MAX, INT64_MIN)
STRIDES = (0, 1, 2, -1, -2, 3, 7, -5, 2**31, 2**55, 2**56, -(2**56), 2**62, INT64_MAX, INT64_MIN, -(2**62))
OFFSETS = (0, 0, 4, 8, 64, 1, 2, 3, 2**32, 2**63, 2**64 - 1, 2**64 - 8, 2**64 - 4096)
FLOATS = ((fd.KDL_FLOAT, 32, 1), (fd.KDL_FLOAT, 64, 1), (fd.KDL_FLOAT, 16, 1), (fd.KDL_BFLOAT, 16, 1))
DEVICES = ((fd.KDL_CPU, 0), (fd.KDL_CUDA_HOST, 0), (fd.KDL_CUDA, 0), (fd.KDL_CUDA_MANAGED, 0), (fd.KDL_CPU, 3),
           (10, 0), (0, 0), (-1, -1), (2**31 - 1, 7))
VERSIONS = ((1, 1), (1, 0), None, (1, 2), (1, 255), (0, 9), (2, 0))
FILLS = (0x00, 0x3F, 0xFF, 0x7F, 0x80)


class Bytes:
    """Draws decisions from the fuzzer's bytes (zeros once they run out)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self, nbytes=1) -> int:
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "little")

    def below(self, n: int) -> int:
        return self.int(1 if n <= 256 else 8) % n

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, in_256: int) -> bool:
        return self.int() < in_256

    def int64(self) -> int:
        v = self.int(8)
        return v - 2**64 if v >= 2**63 else v


def _compact(shape):
    out, s = [], 1
    for n in reversed(shape):
        out.append(s)
        s *= n
    return tuple(reversed(out))


def refusal_reason(ndim, shape, strides, dtype):
    """Why the library must refuse these fields whatever the data (None: it may accept them).
    The same rules as bncore's import (and the C core's bn_check_tensor)."""
    if not 0 <= ndim <= 16:
        return "ndim"
    if ndim > 0 and shape is None:
        return "NULL shape"
    code, bits, lanes = dtype
    if bits == 0 or bits % 8 or lanes == 0:
        return "dtype"
    sizes = tuple(shape[:ndim]) if ndim else ()
    if any(n < 0 for n in sizes):
        return "negative size"
    count = 1
    for n in sizes:
        if n:
            count *= n
    if count > MAX_NUMEL:
        return "count"
    if strides is not None:
        if any(abs(s) > MAX_NUMEL for s in strides[:ndim]):
            return "stride"
        reach = sum(abs(s) * (n - 1) for n, s in zip(sizes, strides) if n > 1)
        if reach > MAX_NUMEL:
            return "reach"
    return None


def extent(ndim, shape, strides, dtype):
    """(bytes below the first element, bytes from it to the end) that the elements span."""
    sizes = tuple(shape[:ndim]) if ndim else ()
    strides = _compact(sizes) if strides is None else tuple(strides[:ndim])
    esize = dtype[1] // 8 * dtype[2]
    low = sum(-s * (n - 1) for n, s in zip(sizes, strides) if n > 1 and s < 0)
    high = sum(s * (n - 1) for n, s in zip(sizes, strides) if n > 1 and s > 0)
    return low * esize, high * esize + esize


def _deferred(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


class Harness:
    def __init__(self, use_torch: bool):
        import bncore
        from bncore import _core

        self.bncore, self.core = bncore, _core
        self.allowed = (_core.BncoreError, TypeError, ValueError, BufferError)
        self.torch = None
        if use_torch:
            try:
                import torch

                self.torch = torch
            except ImportError:
                pass
        self.forged = []
        self.executions = 0

    # ------------------------------------------------------------- tensors

    def forged_tensor(self, b: Bytes, ref_shape, ref_dtype):
        """A forged capsule (or a producer of one) described like ref_shape / ref_dtype:
        half of them honest (real strides, offsets and devices a producer may give), the
        other half with fields drawn from the edges (sizes, strides, ndim, dtype, flags)."""
        wild = b.chance(128)
        ndim = len(ref_shape)
        if wild and b.chance(60):
            ndim = b.pick((0, 1, 2, 3, 5, 16, 17, 33, -1, 2**31 - 1, -(2**31)))
        n_entries = min(max(ndim, 0), 17)
        shape = [ref_shape[d] if d < len(ref_shape) else 2 for d in range(n_entries)]
        for d in range(n_entries):
            if wild and b.chance(40):
                shape[d] = b.pick(SIZES) if b.chance(220) else b.int64()
        if wild and ndim > 0 and b.chance(20):
            shape = None
        strides = None
        if shape is not None and b.chance(120):
            strides = [1] * n_entries
            if all(n >= 0 for n in shape) and n_entries <= 16:
                strides = list(_compact(shape))
            for d in range(n_entries):
                if b.chance(80):
                    strides[d] = b.pick(STRIDES[:8]) if not wild or b.chance(128) else (
                        b.pick(STRIDES) if b.chance(200) else b.int64())
        dtype = ref_dtype
        if wild and b.chance(60):
            dtype = b.pick(FLOATS) if b.chance(128) else (b.int(), b.int(), b.int(2))
        device = (fd.KDL_CPU, 0)
        if b.chance(40):
            device = b.pick(DEVICES) if wild else b.pick(((fd.KDL_CUDA_HOST, 0), (fd.KDL_CUDA_MANAGED, 0)))
        esize = max(1, dtype[1] // 8 * dtype[2])
        byte_offset = 0
        if b.chance(50):
            byte_offset = b.pick(OFFSETS) if wild else esize * b.below(8)
        version = (1, 1)
        if b.chance(60):
            version = b.pick(VERSIONS) if wild else b.pick(((1, 0), None))
        flags = 0
        if b.chance(40):
            flags = b.pick((fd.FLAG_READ_ONLY, fd.FLAG_IS_COPIED, fd.FLAG_SUBBYTE_PADDED))
            if wild:
                flags = b.pick((flags, 1 << 3, 1 << 63, b.int(8)))
        data = self.data_for(b, ndim, shape, strides, dtype, byte_offset)
        forged = fd.Forged(shape=shape, strides=strides, ndim=ndim, dtype=dtype, device=device, data=data,
                           byte_offset=byte_offset, version=version, flags=flags,
                           deleter_null=wild and b.chance(16))
        self.forged.append(forged)
        if b.chance(64):
            return fd.Producer(forged)  # through __dlpack__ (a fresh capsule per call)
        return forged.capsule()

    def data_for(self, b, ndim, shape, strides, dtype, byte_offset):
        """A buffer that holds every declared element, or, only where the library must
        refuse the tensor, NULL or a small buffer."""
        small = ctypes.create_string_buffer(64)
        if refusal_reason(ndim, shape, strides, dtype) is not None:
            return b.pick((None, small))
        sizes = tuple(shape[:ndim]) if ndim else ()
        if math.prod(max(n, 1) for n in sizes) > ELEMENT_CAP:
            # valid, but its outputs (statistics of an empty one too) may not fit in memory:
            # NULL data makes a non-empty one refused; an empty one gets small sizes instead
            if any(n == 0 for n in sizes):
                for d in range(ndim):
                    shape[d] = min(shape[d], 4)
            return None
        if any(n == 0 for n in sizes):
            return b.pick((None, small))  # no element: never read
        low, high = extent(ndim, shape, strides, dtype)
        size = max(byte_offset, low) + high
        if size <= BUFFER_CAP:
            buf = ctypes.create_string_buffer(size)
            ctypes.memset(buf, b.pick(FILLS), size)
            start = ctypes.addressof(buf) + max(0, low - byte_offset)
            return (start, buf)
        address = ctypes.addressof(small)
        if address + byte_offset + high > 2**63 - 1 or address + byte_offset < low:
            return small  # the elements would pass the highest pointer (or address 0)
        return None  # too large to allocate: NULL data, which a non-empty tensor may not have

    def tensor(self, b: Bytes, shape, dtype="float32", optional=False):
        """One argument: None, a NumPy (or PyTorch) array, or a forged capsule."""
        kind = b.below(8)
        if optional and kind == 0:
            return None
        if kind <= 3:
            fill = b.pick((0.0, 1.0, -2.5, 1e4, np.nan))
            ramp = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
            a = np.asarray(np.full(shape, fill, dtype=dtype) + ramp)
            if self.torch is not None and kind == 3:
                return self.torch.from_numpy(a)
            return a
        fdt = {"float32": FLOATS[0], "float64": FLOATS[1], "float16": FLOATS[2]}[dtype]
        return self.forged_tensor(b, shape, fdt)

    # ------------------------------------------------------------- calls

    def call(self, b: Bytes):
        """The call to make, with every argument built (so that an error while building is the
        harness's own and is never mistaken for an answer of bncore)."""
        bn = self.bncore
        ndim = 2 + b.below(3)
        shape = tuple(b.below(5) for _ in range(ndim))
        if b.chance(200):
            shape = tuple(max(1, n) for n in shape)
        dtype = b.pick(("float32", "float64", "float16"))
        C = shape[1]
        t = lambda s, optional=False: self.tensor(b, s, dtype, optional)  # noqa: E731
        op = b.below(14)
        training = b.chance(160)
        if op == 0:
            return _deferred(bn.batch_norm, t(shape), t((C,), True), t((C,), True), t((C,), True), t((C,), True),
                                 training=training, momentum=b.pick((0.1, 0.0, 1.0)),
                                 out=t(shape, True))
        if op == 1:
            return _deferred(bn.batch_norm_forward, t(shape), t((C,), True), t((C,), True), t((C,), True),
                             t((C,), True),
                                         training=training, axis=b.pick((1, -1, 0)))
        if op == 2:
            return _deferred(bn.batch_norm_backward, t(shape), t(shape), t((C,), True), t((C,)), t((C,)),
                                          training=training, out=t(shape, True))
        k = 1 + b.below(ndim - 1)
        norm = shape[ndim - k:]
        lead = shape[:ndim - k]
        if op == 3:
            return _deferred(bn.layer_norm, t(shape), norm, t(norm, True), t(norm, True), out=t(shape, True))
        if op == 4:
            return _deferred(bn.layer_norm_backward, t(shape), t(shape), norm, t(norm, True), t(lead), t(lead),
                                          out=t(shape, True))
        if op == 5:
            return _deferred(bn.rms_norm, t(shape), norm, t(norm, True), out=t(shape, True))
        groups = b.pick((1, 2, 3, max(C, 1)))
        if op == 6:
            return _deferred(bn.group_norm, t(shape), groups, t((C,), True), t((C,), True), out=t(shape, True))
        if op == 7:
            gshape = (shape[0], groups)
            return _deferred(bn.group_norm_backward, t(shape), t(shape), groups, t((C,), True), t(gshape), t(gshape),
                                          out=t(shape, True))
        axes = tuple(sorted({b.below(ndim) for _ in range(1 + b.below(ndim))}))
        pshape = tuple(shape[a] for a in axes)
        gshape = tuple(shape[a] for a in range(ndim) if a not in axes)
        rms = b.chance(64)
        if op == 8:
            return _deferred(bn.normalize, t(shape), axes, t(pshape, True), t(pshape, True), rms=rms,
                             out=t(shape, True))
        if op == 9:
            return _deferred(bn.normalize_backward, t(shape), t(shape), axes, t(pshape, True), t(gshape, True),
                             t(gshape),
                                         rms=rms, out=t(shape, True))
        if op == 10 and ndim >= 3:
            return _deferred(bn.instance_norm, t(shape), t((C,), True), t((C,), True), t((C,), True), t((C,), True),
                                    use_input_stats=training, out=t(shape, True))
        if op == 11:
            stats = bn.RunningStats(max(C, 1), dtype=b.pick(("float32", "float64")))
            return _deferred(stats.update, t((max(C, 1),)), t((max(C, 1),)), b.pick((0, 1, 2, 16, -1, 2**62)))
        if op == 12:
            x = t(shape)
            # one capsule, twice
            return _deferred(bn.batch_norm, x, t((C,), True), t((C,), True), training=training, out=x)
        return _deferred(self.core.import_tensor, t(shape), "input", b.chance(128))

    # ------------------------------------------------------------- one execution

    def one(self, data: bytes):
        self.executions += 1
        b = Bytes(data)
        thunk = self.call(b)
        with contextlib.suppress(self.allowed):
            thunk()
        self.check_deleters(data)

    def check_deleters(self, data):
        forged, self.forged = self.forged, []
        for f in forged:
            f.settle()

        def wrong():
            return [(f.deleted, f.capsules_made) for f in forged
                    if f.deleted != (0 if f.deleter_null else f.capsules_made)]

        if wrong():
            gc.collect()  # a reference cycle may hold the last Tensor a little longer
        if wrong():
            raise AssertionError(f"deleters ran (times, capsules) {wrong()}: expected once per capsule")


def _instrument_bncore(atheris):
    """Coverage for bncore's Python code only. (atheris.instrument_imports misses modules that
    an editable install's finder loads; instrument_all would take numpy and torch along.)"""
    import inspect

    for name, module in list(sys.modules.items()):
        ours = name == "bncore" or name.startswith("bncore.")
        if not ours or not str(getattr(module, "__file__", "")).endswith(".py"):
            continue
        for obj in list(vars(module).values()):
            if inspect.isfunction(obj) and obj.__module__ == name:
                atheris.instrument_func(obj)
            elif inspect.isclass(obj) and obj.__module__ == name:
                for attr in vars(obj).values():
                    attr = getattr(attr, "__func__", attr)
                    for fn in (attr, getattr(attr, "fget", None), getattr(attr, "fset", None)):
                        if inspect.isfunction(fn):
                            atheris.instrument_func(fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=0, help="stop after this many executions")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this many seconds")
    parser.add_argument("--random", action="store_true", help="os.urandom bytes instead of atheris")
    parser.add_argument("--no-torch", action="store_true", help="NumPy arrays only beside the forged capsules")
    parser.add_argument("--max-len", type=int, default=512, help="bytes per input")
    parser.add_argument("--replay", metavar="HEX", help="run one input (as a finding prints it) and show the outcome")
    args, rest = parser.parse_known_args(argv)
    if args.replay:
        harness = Harness(not args.no_torch)
        b = Bytes(bytes.fromhex(args.replay))
        thunk = harness.call(b)
        try:
            print("returned", type(thunk()).__name__)
        except harness.allowed as exc:
            print("raised", type(exc).__name__, exc)
        harness.check_deleters(b"")
        print("deleters: ok")
        return
    if not args.runs and not args.seconds:
        parser.error("give --runs N and/or --seconds S")

    start = time.monotonic()
    report_every = 100_000

    def finish():
        elapsed = time.monotonic() - start
        print(f"fuzz_dlpack: {harness.executions} executions in {elapsed:.1f} s "
              f"({harness.executions / max(elapsed, 1e-9):.0f} exec/s), 0 findings", flush=True)
        sys.stdout.flush()
        os._exit(0)

    def one(data: bytes):
        try:
            harness.one(data)
        except BaseException:
            print(f"fuzz_dlpack: FINDING after {harness.executions} executions; input {data.hex()}",
                  file=sys.stderr, flush=True)
            raise
        n = harness.executions
        if n % report_every == 0:
            elapsed = time.monotonic() - start
            print(f"fuzz_dlpack: {n} executions, {n / elapsed:.0f} exec/s", flush=True)
        if (args.runs and n >= args.runs) or (args.seconds and time.monotonic() - start >= args.seconds):
            finish()

    if args.random:
        harness = Harness(not args.no_torch)
        start = time.monotonic()
        while True:
            one(os.urandom(args.max_len))
    import atheris

    harness = Harness(not args.no_torch)
    _instrument_bncore(atheris)
    start = time.monotonic()
    if not any(r.startswith("-artifact_prefix=") for r in rest):
        rest.append(f"-artifact_prefix={os.path.join(tempfile.gettempdir(), 'fuzz_dlpack-')}")
    atheris.Setup([sys.argv[0], f"-max_len={args.max_len}", *rest], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
