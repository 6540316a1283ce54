#!/usr/bin/env python3
"""Allocating outputs with bncore's buffer cache on and off, against writing into out=, in one run.

    python tools/bench_pool.py --threads 2 --repeats 30

For each row (layer norm (8192, 1024) and batch norm (32, 64, 56, 56) float32, PyTorch tensors in
and out), every repeat times four calls in a rotated order: into out=, allocating with the cache
on, allocating with it off (the library's own empty_like, as before the cache: set_pool(min_bytes=...)
above the output's size, which keeps the held buffers, where enabled=False would empty the cache),
and PyTorch's own op (allocating). Results are freed outside the clock, as in the bench.
Prints medians and the alloc / out= ratios, with the spread (quartiles) that says how noisy it was.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import bncore

F = torch.nn.functional


def rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 1024, generator=g)
    w, b = torch.rand(1024, generator=g) + 0.5, torch.randn(1024, generator=g)
    out = torch.empty_like(x)
    yield ("layer_norm fwd (8192, 1024)", lambda o: bncore.layer_norm(x, (1024,), w, b, out=o),
           lambda: F.layer_norm(x, (1024,), w, b), out)
    xb = torch.randn(32, 64, 56, 56, generator=g)
    wb, bb = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    rm, rv = torch.zeros(64), torch.ones(64)
    outb = torch.empty_like(xb)
    yield ("batch_norm fwd-train (32, 64, 56, 56)", lambda o: bncore.batch_norm(xb, rm, rv, wb, bb, True, out=o),
           lambda: F.batch_norm(xb, rm.clone(), rv.clone(), wb, bb, True), outb)
    _, sm, sr = bncore.batch_norm_forward(xb, None, None, wb, bb, True)
    dy = torch.randn(32, 64, 56, 56, generator=g)
    yield ("batch_norm bwd (32, 64, 56, 56)", lambda o: bncore.batch_norm_backward(dy, xb, wb, sm, sr, out=o),
           lambda: torch.ops.aten.native_batch_norm_backward(dy, xb, wb, None, None, sm, sr, True, 1e-5,
                                                             [True, True, True]), outb)


def time_row(call, torch_call, out, repeats):
    def pooled(on):
        def run():
            bncore.set_pool(min_bytes=bncore.pool.DEFAULT_MIN_BYTES if on else 2 ** 62)
            t0 = time.perf_counter()
            r = call(None)
            t = time.perf_counter() - t0
            del r
            return t
        return run

    def into_out():
        t0 = time.perf_counter()
        call(out)
        return time.perf_counter() - t0

    def torch_own():
        t0 = time.perf_counter()
        r = torch_call()
        t = time.perf_counter() - t0
        del r
        return t

    fns = {"out=": into_out, "alloc, cache on": pooled(True), "alloc, cache off": pooled(False), "torch": torch_own}
    names = list(fns)
    for name in names:
        fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.disable()
    try:
        for k in range(repeats):
            j = k % len(names)
            for name in names[j:] + names[:j]:
                samples[name].append(fns[name]() * 1e3)
    finally:
        gc.enable()
        bncore.set_pool(min_bytes=bncore.pool.DEFAULT_MIN_BYTES)
    return samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    bncore.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {args.repeats} repeats; median ms [quartiles]")
    for name, call, torch_call, out in rows():
        s = time_row(call, torch_call, out, args.repeats)
        med = {n: statistics.median(v) for n, v in s.items()}
        cells = []
        for n, v in s.items():
            q = statistics.quantiles(v, n=4)
            cells.append(f"{n} {med[n]:.2f} [{q[0]:.2f}-{q[2]:.2f}]")
        print(f"{name}: " + ", ".join(cells))
        print(f"  alloc / out=: cache on {med['alloc, cache on'] / med['out=']:.2f}, "
              f"cache off {med['alloc, cache off'] / med['out=']:.2f}")


if __name__ == "__main__":
    main()
