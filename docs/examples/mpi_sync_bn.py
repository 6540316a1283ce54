"""Synchronized batch norm over MPI, with no framework: NumPy arrays and mpi4py.

    mpiexec -n 3 python docs/examples/mpi_sync_bn.py
    (as root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;
     with more ranks than cores add --oversubscribe)

Every rank holds a different number of rows (rank 1 none at all); bncore.SyncBatchNorm
normalizes each with the statistics of all of them, and the result equals bncore.BatchNorm
on the concatenated batch.
"""
import numpy as np
from mpi4py import MPI

import bncore

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
sizes = [5 if r != 1 else 0 for r in range(world)]  # uneven: one rank has an empty batch
start = sum(sizes[:rank])

rng = np.random.default_rng(0)  # the same global batch on every rank
x = (rng.normal(size=(sum(sizes), 4, 8, 8)) * 3 + 1e3).astype(np.float32)
dy = rng.normal(size=x.shape).astype(np.float32)

layer = bncore.SyncBatchNorm(4, comm=comm)
y = layer(x[start:start + sizes[rank]])  # one all-reduce of world x (2C+1) float64 values
dx = layer.backward(dy[start:start + sizes[rank]])  # one all-reduce of 2C+2 values

# compare with one process on the whole batch
whole = bncore.BatchNorm(4)
y_all, dx_all = whole(x), whole.backward(dy)
rows = slice(start, start + sizes[rank])
err = max(float(np.abs(y - y_all[rows]).max(initial=0)), float(np.abs(dx - dx_all[rows]).max(initial=0)))
weight_grad = comm.allreduce(layer.weight_grad)  # each rank holds its own contribution: sum them
assert np.allclose(weight_grad, whole.weight_grad, rtol=1e-4, atol=1e-4)
assert np.array_equal(layer.running_var, comm.bcast(layer.running_var))  # the same state everywhere
print(f"rank {rank}: {sizes[rank]} rows, largest difference from one process {err:.1e}")
