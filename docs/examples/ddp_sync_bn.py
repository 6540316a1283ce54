"""Data-parallel training with synchronized batch norm on a CPU-only machine.

    torchrun --nproc_per_node 2 docs/examples/ddp_sync_bn.py

Each process trains on its own slice of every batch; bncore.torch.SyncBatchNorm gives every
batch norm layer the statistics of the whole batch (one all-reduce forward, one backward,
over gloo), so the model trains as one process would on the concatenated batch.
torch.nn.SyncBatchNorm refuses CPU tensors; this one does not.
"""
import os

import torch
import torch.distributed as dist

from bncore.torch import SyncBatchNorm

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo on loopback
dist.init_process_group("gloo")  # torchrun's environment gives rank, world size and address
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # the same initial model on every rank
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
    torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
model = SyncBatchNorm.convert_sync_batchnorm(model)  # every BatchNorm2d, parameters kept
model = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

data = torch.Generator().manual_seed(1)  # the same global batches everywhere; each rank takes its rows
for step in range(5):
    x = torch.randn(8 * world, 3, 16, 16, generator=data).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (8 * world,), generator=data)
    rows = slice(8 * rank, 8 * (rank + 1))
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[rows]), target[rows])
    loss.backward()  # DDP averages the parameter gradients; SyncBatchNorm synchronized the statistics
    optimizer.step()
    if rank == 0:
        print(f"step {step}: loss on rank 0's rows {loss.item():.4f}")

# the running statistics were updated from the global batch: bitwise the same on every rank
bn = model.module[1]
gathered = [torch.empty_like(bn.running_mean) for _ in range(world)]
dist.all_gather(gathered, bn.running_mean)
assert all(torch.equal(g, gathered[0]) for g in gathered)
if rank == 0:
    print(f"running statistics identical on all {world} ranks; num_batches_tracked = {int(bn.num_batches_tracked)}")
dist.destroy_process_group()
