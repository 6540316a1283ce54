"""Helpers of the synchronized batch norm tests: an in-process communicator (threads),
the cases every multi-process run computes, and the worker entry points that
tests/test_sync_torch.py and tests/test_sync_mpi.py start as real processes.

    python tests/sync_workers.py torch RANK WORLD PORT OUT_DIR    one gloo rank
    python tests/sync_workers.py ddp RANK WORLD PORT OUT_DIR      one DDP rank
    mpiexec -n 3 python tests/sync_workers.py mpi OUT_DIR         every MPI rank

Each worker writes OUT_DIR/<kind>-<rank>.npz with its results; the test process
recomputes every case in one process on the concatenated batch and compares.
Inputs are made from seeds, so every process builds the same global batch and
takes its own slice.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 90  # a hang in a collective fails the test after this long


# ---------------------------------------------------------------- the in-process communicator


class ThreadGroup:
    """world_size ranks as threads of one process: allreduce sums every rank's buffer
    (in rank order) once all have arrived. A rank that never arrives breaks the barrier
    after `timeout` seconds, so a hang fails instead of blocking the test."""

    def __init__(self, world_size, timeout=60.0):
        self.world_size = world_size
        self.timeout = timeout
        self._buffers = [None] * world_size
        self._arrive = threading.Barrier(world_size, action=self._sum, timeout=timeout)
        self._leave = threading.Barrier(world_size, timeout=timeout)
        self._result = None
        self.calls = 0

    def _sum(self):
        shapes = {b.shape for b in self._buffers}
        if len(shapes) != 1:
            raise AssertionError(f"ranks passed buffers of different shapes: {shapes}")
        total = np.zeros_like(self._buffers[0])
        for b in self._buffers:
            total += b
        self._result = total
        self.calls += 1

    def collective(self, rank):
        from bncore.sync import Collective

        def allreduce(buffer):
            assert buffer.dtype == np.float64 and buffer.flags.c_contiguous
            self._buffers[rank] = buffer.copy()
            self._arrive.wait()  # the last to arrive sums
            np.copyto(buffer, self._result)
            self._leave.wait()  # nobody overwrites _result before everyone has read it

        return Collective(allreduce, rank, self.world_size)

    def run(self, fn):
        """Runs fn(rank, collective) on every rank, each in its own thread; returns the
        per-rank results (an exception raised by a rank is its result)."""
        results = [None] * self.world_size

        def body(rank):
            try:
                results[rank] = fn(rank, self.collective(rank))
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                results[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 4)
            if t.is_alive():
                raise AssertionError("a rank is still running: a collective hangs")
        return results


# ---------------------------------------------------------------- cases shared by workers and tests


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split(sizes):
    """Start offsets of each rank's rows."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def make_batch(seed, total, channels, spatial, dtype, steps=1):
    """steps pairs (x, dy) of the whole batch, float64 made then cast (exact in the cast dtype)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        shape = (total, channels, *spatial)
        x = (rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=(1, channels) + (1,) * len(spatial))
             + rng.uniform(-3, 3, size=(1, channels) + (1,) * len(spatial)))
        dy = rng.normal(size=shape)
        out.append((x.astype(dtype), dy.astype(dtype)))
    return out


# name: (world, per-rank sizes, channels, spatial, dtype, channels_last, momentum, steps)
TORCH_CASES = {
    "uneven_4d": (2, (5, 3), 3, (4, 5), "float64", False, 0.1, 3),
    "empty_rank_4d": (2, (0, 6), 3, (3, 3), "float64", False, 0.1, 2),
    "one_row_2d": (2, (1, 4), 5, (), "float64", False, 0.1, 2),
    "uneven_3d": (2, (2, 7), 4, (6,), "float64", False, 0.1, 2),
    "channels_last_4d": (2, (3, 2), 4, (3, 5), "float64", True, 0.1, 2),
    "channels_last_5d": (2, (2, 3), 3, (2, 3, 2), "float64", True, 0.1, 2),
    "cumulative_5d": (2, (2, 1), 3, (2, 2, 3), "float64", False, None, 3),
    "float32_4d": (2, (4, 4), 6, (5, 5), "float32", False, 0.1, 2),
    "three_uneven_4d": (3, (4, 0, 1), 3, (3, 4), "float64", False, 0.1, 3),
    "three_channels_last": (3, (2, 3, 1), 4, (3, 3), "float32", True, None, 2),
    "three_2d": (3, (3, 1, 5), 6, (), "float64", False, 0.1, 2),
}


def cases(table):
    """The case names of a table, in order (pytest parameters)."""
    return sorted(table)


def case_seed(name):
    return sum(ord(c) * (i + 1) for i, c in enumerate(name))


def single_process(name, sizes, channels, spatial, dtype, momentum, nsteps, axis=1):
    """The case run by one process on the concatenated batch with bncore's plain batch norm
    (bncore.batch_norm_forward / _backward), and the float64 reference of each step: a list of
    (x, dy, bncore's results, the reference's results), results keyed like the workers'."""
    import bncore
    from bncore import reference

    weight = np.linspace(0.5, 1.5, channels).astype(dtype)
    bias = np.linspace(-1.0, 1.0, channels).astype(dtype)
    rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
    ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)
    out = []
    for step, (x, dy) in enumerate(make_batch(case_seed(name), sum(sizes), channels, spatial, dtype, nsteps)):
        if axis == -1:
            x, dy = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
        factor = 1.0 / (step + 1) if momentum is None else momentum
        y, sm, sr = bncore.batch_norm_forward(x, rm, rv, weight, bias, training=True, momentum=factor, axis=axis)
        dx, dw, db = bncore.batch_norm_backward(dy, x, weight, sm, sr, axis=axis)
        mine = {"y": y, "dx": dx, "dw": dw, "db": db, "running_mean": rm.copy(), "running_var": rv.copy()}
        ry, _, _ = reference.batch_norm_ref(x, weight, bias, axis=axis)
        rdx, rdw, rdb = reference.batch_norm_backward_ref(dy, x, weight, axis=axis)
        ref_rm, ref_rv = reference.batch_norm_running_ref(x, ref_rm, ref_rv, factor, axis=axis)
        ref = {"y": ry, "dx": rdx, "dw": rdw, "db": rdb, "running_mean": ref_rm, "running_var": ref_rv}
        out.append((x, dy, mine, ref))
    return out


# ---------------------------------------------------------------- workers


def _torch_case(rank, name, case):
    """Runs one case through bncore.torch.SyncBatchNorm on this rank; returns its arrays."""
    import torch

    from bncore.torch import SyncBatchNorm

    _, sizes, channels, spatial, dtype, channels_last, momentum, nsteps = case
    lo, hi = split(sizes)[rank], split(sizes)[rank + 1]
    layer = SyncBatchNorm(channels, momentum=momentum).to(getattr(torch, dtype))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.linspace(0.5, 1.5, channels)))
        layer.bias.copy_(torch.from_numpy(np.linspace(-1.0, 1.0, channels)))
    out = {}
    for step, (x, dy) in enumerate(make_batch(case_seed(name), sum(sizes), channels, spatial, dtype, nsteps)):
        xt = torch.from_numpy(x[lo:hi].copy())
        dyt = torch.from_numpy(dy[lo:hi].copy())
        if channels_last:
            fmt = torch.channels_last if xt.dim() == 4 else torch.channels_last_3d
            xt, dyt = xt.contiguous(memory_format=fmt), dyt.contiguous(memory_format=fmt)
        xt.requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(xt)
        y.backward(dyt)
        out[f"{step}/y"] = y.detach().numpy()
        out[f"{step}/dx"] = xt.grad.numpy()
        out[f"{step}/dw"] = layer.weight.grad.numpy()
        out[f"{step}/db"] = layer.bias.grad.numpy()
        out[f"{step}/running_mean"] = layer.running_mean.numpy().copy()
        out[f"{step}/running_var"] = layer.running_var.numpy().copy()
        out[f"{step}/num_batches_tracked"] = layer.num_batches_tracked.numpy().copy()
        if channels_last:
            out[f"{step}/y_channels_last"] = np.array(y.is_contiguous(memory_format=fmt))
            out[f"{step}/dx_channels_last"] = np.array(xt.grad.is_contiguous(memory_format=fmt))
    layer.eval()
    out["eval/y"] = layer(torch.from_numpy(x[lo:hi].copy())).detach().numpy()
    return {f"{name}/{k}": v for k, v in out.items()}


def _torch_failure(rank, world):
    """The last rank's input has a wrong channel count: it raises its own error, every other
    rank a SyncError naming it, nobody hangs, no state moves; the next step works everywhere."""
    import torch

    from bncore.torch import SyncBatchNorm

    layer = SyncBatchNorm(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.ones(2, 4 if rank == world - 1 else 3, 2, requires_grad=True)
    try:
        layer(x)
        error, failed = "none", ()
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        error, failed = f"{type(exc).__name__}: {exc}", getattr(exc, "failed_ranks", ()) or ()
    unchanged = all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    y = layer(torch.arange(6.0 * (rank + 1)).reshape(rank + 1, 3, 2))
    return {"failure/error": np.array(error), "failure/failed_ranks": np.array(failed, dtype=int),
            "failure/unchanged": np.array(unchanged), "failure/next_step": y.detach().numpy(),
            "failure/next_running_mean": layer.running_mean.numpy().copy()}


def torch_worker(rank, world, port, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name, case in TORCH_CASES.items():
            if case[0] == world:
                results.update(_torch_case(rank, name, case))
        results.update(_torch_failure(rank, world))
        np.savez(os.path.join(out_dir, f"torch-{rank}.npz"), **results)
    finally:
        dist.destroy_process_group()


def small_cnn(seed, dtype, norm):
    """conv -> norm -> relu -> conv -> norm -> relu -> pool -> linear; norm(channels) builds the norms."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), norm(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return model.to(getattr(torch, dtype))


DDP_STEPS, DDP_BATCH, DDP_LR = 10, 8, 0.1


def ddp_batches(dtype):
    rng = np.random.default_rng(1234)
    return [(rng.normal(size=(DDP_BATCH, 3, 6, 6)).astype(dtype), rng.integers(0, 4, size=DDP_BATCH))
            for _ in range(DDP_STEPS)]


def train(model, batches, rows, dtype):
    """DDP_STEPS of SGD on cross-entropy (mean over the rows this process sees); returns the
    losses and the final state (parameters and buffers) as NumPy arrays."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[rows])), torch.from_numpy(target[rows]))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    module = getattr(model, "module", model)
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return np.array(losses), state


def ddp_worker(rank, world, port, out_dir):
    import torch
    import torch.distributed as dist

    from bncore.torch import SyncBatchNorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for dtype in ("float64", "float32"):
            model = SyncBatchNorm.convert_sync_batchnorm(small_cnn(7, dtype, torch.nn.BatchNorm2d))
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            per = DDP_BATCH // world
            losses, state = train(ddp, ddp_batches(dtype), slice(rank * per, (rank + 1) * per), dtype)
            results[f"{dtype}/losses"] = losses
            results.update({f"{dtype}/state/{k}": v for k, v in state.items()})
        np.savez(os.path.join(out_dir, f"ddp-{rank}.npz"), **results)
    finally:
        dist.destroy_process_group()


# name: (per-rank sizes for 3 ranks, channels, spatial, dtype, axis, momentum, steps)
MPI_CASES = {
    "uneven_4d": ((4, 0, 3), 3, (2, 3), "float64", 1, 0.1, 3),
    "one_row_2d": ((1, 5, 2), 4, (), "float64", 1, None, 2),
    "channels_last_axis": ((2, 3, 1), 5, (3, 2), "float32", -1, 0.1, 2),
}


def mpi_worker(out_dir):
    from mpi4py import MPI

    import bncore

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    results = {}
    for name, (sizes, channels, spatial, dtype, axis, momentum, nsteps) in MPI_CASES.items():
        lo, hi = split(sizes)[rank], split(sizes)[rank + 1]
        layer = bncore.SyncBatchNorm(channels, momentum=momentum, comm=comm, axis=axis, dtype=dtype)
        layer.weight[:] = np.linspace(0.5, 1.5, channels)
        layer.bias[:] = np.linspace(-1.0, 1.0, channels)
        for step, (x, dy) in enumerate(make_batch(case_seed(name), sum(sizes), channels, spatial, dtype, nsteps)):
            if axis == -1:
                x, dy = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
            results[f"{name}/{step}/y"] = layer(x[lo:hi])
            results[f"{name}/{step}/dx"] = layer.backward(dy[lo:hi])
            results[f"{name}/{step}/dw"] = layer.weight_grad
            results[f"{name}/{step}/db"] = layer.bias_grad
            for key, value in layer.state_dict().items():
                results[f"{name}/{step}/{key}"] = value
    # failure agreement: rank 1's input has the wrong number of channels; nobody may hang
    layer = bncore.SyncBatchNorm(3, comm=comm)
    x = np.ones((2, 4 if rank == 1 else 3, 2))
    try:
        layer(x)
        results["failure/error"] = np.array("none")
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        results["failure/error"] = np.array(f"{type(exc).__name__}: {exc}")
        results["failure/failed_ranks"] = np.array(getattr(exc, "failed_ranks", ()) or (), dtype=int)
    results["failure/count"] = layer.state_dict()["num_batches_tracked"]
    np.savez(os.path.join(out_dir, f"mpi-{rank}.npz"), **results)


# ---------------------------------------------------------------- launching real processes


def process_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback only
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_ranks(kind, world, out_dir, timeout=TIMEOUT_S):
    """Starts `world` worker processes of `kind` on 127.0.0.1 and waits for all; a process
    that has not finished within `timeout` seconds is killed and the run fails."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sync_workers.py"), kind, str(r), str(world),
                               str(port), str(out_dir)], env=process_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs, failed = [], False
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(p.communicate()[0])
            failed = True
        failed = failed or p.returncode != 0
    if failed:
        raise AssertionError(f"{kind} ranks failed or hung (timeout {timeout} s):\n" + "\n".join(logs))


def main(argv):
    kind = argv[0]
    if kind == "mpi":
        mpi_worker(argv[1])
        return
    rank, world, port, out_dir = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    {"torch": torch_worker, "ddp": ddp_worker}[kind](rank, world, port, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
