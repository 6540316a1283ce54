#!/usr/bin/env python3
"""PyTorch ops and bncore ops alternating, as in a converted model's step: do OpenMP runtimes fight?

    python tools/bench_openmp.py --threads 2            # this process's bncore, both import orders
    python tools/bench_openmp.py --threads 2 --order bncore-first --blocks 15

Each iteration runs a PyTorch 1x1 conv2d (or an element-wise mul) and then a training-mode batch norm of its output,
either bncore.batch_norm or torch.nn.functional.batch_norm; blocks of iterations alternate between
the two contenders and the medians of the per-iteration times are printed, with the OpenMP runtimes
mapped into the process (from /proc/self/maps) and the environment that steers them. The mean
extra time of a bncore batch norm over PyTorch's in this loop, compared with the same two batch
norms timed alone (no conv between calls), is what a fight between two thread pools would cost:
each pool's threads spin after their region (GOMP_SPINCOUNT) while the other pool's threads wait
for a core.

Without --order the script runs itself twice, once per import order, in fresh processes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

def run(order: str, threads: int, blocks: int, per_block: int, op: str) -> None:
    if order == "torch-first":
        import torch

        import bncore
    else:
        import bncore
        import torch
    F = torch.nn.functional
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    bncore.set_num_threads(threads)
    x = torch.randn(8, 64, 56, 56)  # 6.4 MB: large enough for both libraries to use every thread
    c = x.shape[1]
    conv_w = torch.randn(c, c, 1, 1) * 0.1
    w, b = torch.ones(c), torch.zeros(c)
    rms = {k: (torch.zeros(c), torch.ones(c)) for k in ("bncore", "torch")}
    norms = {"bncore": lambda y: bncore.batch_norm(y, *rms["bncore"], w, b, True, 0.1, 1e-5),
             "torch": lambda y: F.batch_norm(y, *rms["torch"], w, b, True, 0.1, 1e-5)}
    y0 = F.conv2d(x, conv_w)
    if op == "conv":
        def other():
            return F.conv2d(x, conv_w)  # a 1x1 convolution: a matrix product over channels
    else:
        def other():
            return torch.mul(x, 1.5)  # element-wise, parallel over the tensor

    def mixed(norm):
        def block():
            for _ in range(per_block):
                other()
                norm(y0)
        return block

    def alone(norm):
        def block():
            for _ in range(per_block):
                norm(y0)
        return block

    def other_alone():
        for _ in range(per_block):
            other()

    fns = {"mixed bncore": mixed(norms["bncore"]), "mixed torch": mixed(norms["torch"]),
           "bn alone bncore": alone(norms["bncore"]), "bn alone torch": alone(norms["torch"]),
           f"{op} alone": other_alone}
    names = list(fns)
    for n in names:
        fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # CPU time of all threads: spinning shows here
    for k in range(blocks):
        j = k % len(names)
        for n in names[j:] + names[:j]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) / per_block * 1e3)
            cpu[n].append((time.process_time() - c0) / per_block * 1e3)
    med = {n: statistics.median(v) for n, v in samples.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    from bncore.bench.report import openmp_runtimes

    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    print(f"{order}, {threads} thread(s), {op} {tuple(x.shape)} + batch norm; env {env or 'default'}; "
          f"OpenMP runtimes: {openmp_runtimes()}")
    for n in names:
        q = statistics.quantiles(samples[n], n=4)
        print(f"  {n:16s} {med[n]:7.3f} ms/iteration [quartiles {q[0]:.3f}-{q[2]:.3f}], CPU {med_cpu[n]:7.3f} ms")
    extra_mixed = med["mixed bncore"] - med["mixed torch"]
    extra_alone = med["bn alone bncore"] - med["bn alone torch"]
    print(f"  bncore - torch batch norm: {extra_mixed:+.3f} ms in the mixed loop, {extra_alone:+.3f} ms alone; "
          f"CPU {med_cpu['mixed bncore'] - med_cpu['mixed torch']:+.3f} ms in the loop, "
          f"{med_cpu['bn alone bncore'] - med_cpu['bn alone torch']:+.3f} ms alone")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", choices=("torch-first", "bncore-first"))
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--per-block", type=int, default=10)
    ap.add_argument("--op", choices=("conv", "mul"), default="conv")
    args = ap.parse_args()
    if args.order:
        run(args.order, args.threads, args.blocks, args.per_block, args.op)
        return 0
    for order in ("torch-first", "bncore-first"):
        cmd = [sys.executable, __file__, "--order", order, "--threads", str(args.threads), "--blocks",
               str(args.blocks), "--per-block", str(args.per_block), "--op", args.op]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
