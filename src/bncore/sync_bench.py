"""The distributed bench case: synchronized batch norm on 2 processes of this machine.

    python -m bncore.sync_bench [--backend gloo|shm] [--repeats N]

Each of `world` processes runs forward + backward of a (16, 64, 56, 56) float32 batch,
first with bncore.BatchNorm (local statistics), then with bncore.SyncBatchNorm (global
ones), both ranks starting every repetition together. Reported: the median time of each,
their ratio (target <= 1.3x), the time of the two all-reduces alone, and the bytes each step
moves: the two all-reduce buffers (world x (2C+1) and 2C+2 float64) and what a ring all-reduce sends of them per rank,
2 (W-1) / W times the buffer. Backends: "gloo" (torch.distributed on 127.0.0.1, needs
torch) and "shm" (a shared-memory all-reduce of the standard library: no framework,
so the ratio is bncore's own cost of splitting each pass into its steps).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import socket
import statistics
import time

import numpy as np

SHAPE = (16, 64, 56, 56)


def _shm_collective(rank, world, rows, barrier, width):
    from .sync import Collective

    shared = np.frombuffer(rows.get_obj(), dtype=np.float64).reshape(world, width)

    def allreduce(buffer):
        flat = buffer.reshape(-1)
        shared[rank, :flat.size] = flat
        barrier.wait()
        total = shared[0, :flat.size].copy()
        for r in range(1, world):
            total += shared[r, :flat.size]
        barrier.wait()  # every rank has read the rows before any writes the next buffer
        flat[:] = total

    return Collective(allreduce, rank, world)


def _gloo_collective(rank, world, port):
    import torch.distributed as dist

    import bncore.torch  # noqa: F401  (bncore._torch_sync is imported through it)

    from ._torch_sync import _collective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return _collective(dist.group.WORLD)


def _rank(rank, world, backend, port, rows, barrier, width, repeats, results):
    import bncore

    bncore.set_num_threads(1)  # one core per process: the processes share the machine
    collective = (_gloo_collective(rank, world, port) if backend == "gloo"
                  else _shm_collective(rank, world, rows, barrier, width))
    rng = np.random.default_rng(rank)
    x = rng.normal(size=SHAPE).astype(np.float32)
    dy = rng.normal(size=SHAPE).astype(np.float32)
    local = bncore.BatchNorm(SHAPE[1])
    synced = bncore.SyncBatchNorm(SHAPE[1], comm=collective)
    channels = SHAPE[1]
    forward_buffer, backward_buffer = np.zeros((world, 2 * channels + 1)), np.zeros(2 * channels + 2)

    def collectives_alone():
        collective.allreduce(forward_buffer)
        collective.allreduce(backward_buffer)

    def step(layer):
        layer(x)
        layer.backward(dy)

    times: dict[str, list[float]] = {"local": [], "sync": [], "collectives": []}
    for i in range(repeats + 2):  # two warm-up rounds
        for name, run_once in (("local", lambda: step(local)), ("sync", lambda: step(synced)),
                               ("collectives", collectives_alone)):
            barrier.wait()
            start = time.perf_counter()
            run_once()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    results.put((rank, times))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world=2, backend=None, repeats=10, timeout=300.0) -> dict:
    """Runs the case on `world` processes; returns the medians (seconds), their ratio and the bytes."""
    if backend is None:
        try:
            import torch.distributed  # noqa: F401
            backend = "gloo"
        except ImportError:
            backend = "shm"
    channels = SHAPE[1]
    forward_values, backward_values = world * (2 * channels + 1), 2 * channels + 2
    ctx = mp.get_context("spawn")
    width = max(forward_values, backward_values)
    rows, barrier, results = ctx.Array("d", world * width), ctx.Barrier(world, timeout=timeout), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, backend, port, rows, barrier, width, repeats, results))
             for r in range(world)]
    for p in procs:
        p.start()
    per_rank: dict[int, dict[str, list[float]]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(per_rank) < world:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"sync bench: a rank failed or hung (exit codes {[p.exitcode for p in procs]})")
            try:
                rank, times = results.get(timeout=1.0)
                per_rank[rank] = times
            except queue.Empty:
                pass
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    # a step takes as long as its slowest rank
    local = statistics.median(max(per_rank[r]["local"][i] for r in per_rank) for i in range(repeats))
    synced = statistics.median(max(per_rank[r]["sync"][i] for r in per_rank) for i in range(repeats))
    alone = statistics.median(max(per_rank[r]["collectives"][i] for r in per_rank) for i in range(repeats))
    buffer_bytes = 8 * (forward_values + backward_values)
    return {"backend": backend, "world": world, "shape": SHAPE, "local_s": local, "sync_s": synced,
            "ratio": synced / local, "collectives_s": alone, "collectives_per_step": 2,
            "buffer_bytes_per_step": buffer_bytes,
            "ring_bytes_sent_per_rank": 2 * (world - 1) / world * buffer_bytes}


def report(result: dict) -> str:
    r = result
    return (f"synchronized batch norm, {r['world']} processes ({r['backend']}), forward + backward of "
            f"{r['shape']} float32 per rank\n"
            f"  local batch norm   {r['local_s'] * 1e3:8.2f} ms\n"
            f"  sync batch norm    {r['sync_s'] * 1e3:8.2f} ms   ({r['ratio']:.2f}x local; target <= 1.3x)\n"
            f"  its 2 all-reduces  {r['collectives_s'] * 1e3:8.2f} ms   (alone, same buffers)\n"
            f"  per step: {r['collectives_per_step']} all-reduces of {r['buffer_bytes_per_step']} bytes together; "
            f"a ring all-reduce sends {r['ring_bytes_sent_per_rank']:.0f} bytes per rank")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bncore.sync_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("gloo", "shm"), default=None, help="default: gloo when torch is there")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args(argv)
    print(report(run(args.world, args.backend, args.repeats)))


if __name__ == "__main__":
    main()
