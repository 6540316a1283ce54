"""Eager per-call overhead of a bncore layer against torch.nn's: forward + backward of a small batch
norm, where the Python around the kernel (dispatch, checks, autograd) is most of the time.

    python tools/bench_dispatch.py [--shape 8,16,4,4] [--calls 2000] [--rounds 15] [--threads 1]
    python tools/bench_dispatch.py --profile      # cProfile of the bncore calls, by own time

"bncore, checked path" is the same layer with the ops' one-call path turned off (every call through
functional's checked `batch_norm_forward` / `batch_norm_backward`, as before that path existed): the
difference between the two bncore rows is what the one-call path saves.

torch.nn.BatchNorm2d and bncore.torch.BatchNorm2d (training mode, running statistics tracked) take
turns in blocks of --calls calls; each block's mean time per call is one sample and the median of
--rounds samples is printed per layer, in microseconds, so that a shared machine's changing load
slows both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import time

import torch

import bncore
import bncore.torch as bt
from bncore import _torch_ops


@contextlib.contextmanager
def checked_path_only(active: bool = True):
    """Within it, the batch norm ops' one-call path declines, so that their kernels take the checked path."""
    fast = _torch_ops._batch_forward_one_call, _torch_ops._batch_backward_one_call
    if active:
        _torch_ops._batch_forward_one_call = _torch_ops._batch_backward_one_call = lambda *args: None
    try:
        yield
    finally:
        _torch_ops._batch_forward_one_call, _torch_ops._batch_backward_one_call = fast


def make_call(layer: torch.nn.Module, x: torch.Tensor):
    def call() -> None:
        layer(x).sum().backward()
    return call


def block_mean(call, calls: int, checked: bool = False) -> float:
    with checked_path_only(checked):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,4,4")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the bncore layer's calls instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bncore.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, requires_grad=True)
    layers = {"torch.nn": torch.nn.BatchNorm2d(shape[1]), "bncore": bt.BatchNorm2d(shape[1])}
    calls = {name: make_call(layer, x) for name, layer in layers.items()}
    calls["bncore, checked path"] = calls["bncore"]
    for call in calls.values():
        block_mean(call, 100)  # warm-up
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(block_mean, calls["bncore"], args.calls)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            samples[name].append(block_mean(call, args.calls, checked=name.endswith("checked path")))
    print(f"torch {torch.__version__}, {args.threads} thread(s), BatchNorm2d {shape} training, forward + backward, "
          f"median of {args.rounds} blocks of {args.calls} calls")
    for name, times in samples.items():
        print(f"{name:21s} {statistics.median(times) * 1e6:8.1f} us per call")


if __name__ == "__main__":
    main()
