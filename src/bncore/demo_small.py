"""`python -m bncore demo --small-batch`: batch norm at tiny batches, and what each remedy recovers.

The digits MLP of `bncore demo` (64-64-64-10, ReLU, plain minibatch SGD) is trained at batch sizes
2, 4, 8 and 32 with each normalization between its hidden linear layers and their ReLUs:

- batchnorm: `bncore.BatchNorm`, batch statistics in training, running statistics at test time;
- renorm: `BatchNorm(renorm=True)`, batch renormalization (Ioffe 2017) with the paper's warm-up of
  rmax and dmax (`bncore.renorm_schedule`), scaled to this run's length;
- ghost: `BatchNorm(virtual_batch_size=8)`, ghost batch norm, at batch 32 (four virtual batches);
  at batches of 8 and fewer it is plain batch norm, so its cells there repeat that row's. Ghost
  batch norm is no remedy for a small batch (its statistics come from fewer samples still): it is
  a regularizer for large ones, shown here beside the others for completeness;
- groupnorm: `bncore.GroupNorm` with 8 groups of 8 features, per sample;
- layernorm: `bncore.LayerNorm` over the 64 features, per sample;
- none: no normalization, the baseline.

Every net of a seed starts from the same weights and sees the same minibatches. A batch size gets
the same number of samples seen (epochs), not the same number of steps, and a learning rate scaled
linearly with the batch size (`BASE_LR` at batch 32). The table reports the final test accuracy,
mean and spread over seeds, and the training time.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .demo import LAYER_SIZES, cross_entropy, init_weights, load_digits_split
from .functional import renorm_schedule
from .layers import BatchNorm, GroupNorm, LayerNorm

BATCH_SIZES = (2, 4, 8, 32)
NORMS = ("none", "batchnorm", "renorm", "ghost", "groupnorm", "layernorm")
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
EPOCHS = 6
QUICK_EPOCHS = 1
BASE_LR = 0.2          # at batch 32; linear scaling with the batch size below it
GHOST_BATCH = 8
GROUPS = 8
RMAX, DMAX = 3.0, 5.0


def make_norm(kind: str, features: int, batch: int, steps: int):
    if kind == "batchnorm":
        return BatchNorm(features)
    if kind == "renorm":
        return BatchNorm(features, renorm=True, rmax=1.0, dmax=0.0)  # warmed up by `schedule`
    if kind == "ghost":
        return BatchNorm(features, virtual_batch_size=GHOST_BATCH if batch > GHOST_BATCH else None)
    if kind == "groupnorm":
        return GroupNorm(GROUPS, features)
    if kind == "layernorm":
        return LayerNorm(features)
    raise ValueError(kind)


def schedule(step: int, steps: int) -> tuple[float, float]:
    """The paper's warm-up (batch norm first, then rmax and dmax rising), over this run's steps:
    plain batch norm for the first 5%, rmax at its final value by 40% and dmax by 25%."""
    return renorm_schedule(step, rmax=RMAX, dmax=DMAX, start=steps // 20, rmax_steps=max(1, 2 * steps // 5),
                           dmax_steps=max(1, steps // 4))


class Net:
    """Hidden layers linear -> norm -> ReLU, then the logits; NumPy, float32, plain SGD."""

    def __init__(self, weights, kind: str, batch: int, steps: int):
        self.kind = kind
        self.steps = steps
        self.step = 0
        self.weights = [w.copy() for w, _ in weights]
        self.biases = [b.copy() for _, b in weights]
        self.norms = [] if kind == "none" else [make_norm(kind, n, batch, steps) for n in LAYER_SIZES[1:-1]]

    def mode(self, training: bool):
        for norm in self.norms:
            norm.train(training)

    def forward(self, x):
        self.inputs, self.pre_relu = [], []
        h = x
        for i in range(len(self.weights) - 1):
            self.inputs.append(h)
            h = h @ self.weights[i] + self.biases[i]
            if self.norms:
                h = self.norms[i](h)
            self.pre_relu.append(h)
            h = np.maximum(h, 0)
        self.inputs.append(h)
        return h @ self.weights[-1] + self.biases[-1]

    def train_step(self, x, labels, lr):
        if self.kind == "renorm":
            rmax, dmax = schedule(self.step, self.steps)
            for norm in self.norms:
                norm.rmax, norm.dmax = rmax, dmax
        loss, grad = cross_entropy(self.forward(x), labels)
        grads = []
        for i in reversed(range(len(self.weights))):
            if i < len(self.weights) - 1:
                grad = grad * (self.pre_relu[i] > 0)
                if self.norms:
                    grad = self.norms[i].backward(grad)
            grads.append((i, self.inputs[i].T @ grad, grad.sum(axis=0)))
            if i > 0:
                grad = grad @ self.weights[i].T
        for i, gw, gb in grads:
            self.weights[i] -= lr * gw
            self.biases[i] -= lr * gb
        for norm in self.norms:
            if norm.weight is not None:
                norm.weight -= lr * norm.weight_grad
                norm.bias -= lr * norm.bias_grad
        self.step += 1
        return loss


def run(kind: str, batch: int, seed: int, epochs: int, data) -> tuple[float, float]:
    """(final test accuracy, seconds) of one net."""
    x_train, x_test, y_train, y_test = data
    rng = np.random.default_rng(1000 + seed)
    weights = init_weights(rng)
    orders = [rng.permutation(len(x_train)) for _ in range(epochs)]
    steps_per_epoch = len(x_train) // batch
    net = Net(weights, kind, batch, steps_per_epoch * epochs)
    lr = BASE_LR * batch / 32
    started = time.perf_counter()
    net.mode(True)
    for order in orders:
        for start in range(0, steps_per_epoch * batch, batch):
            idx = order[start:start + batch]
            net.train_step(x_train[idx], y_train[idx], lr)
    net.mode(False)
    accuracy = float((net.forward(x_test).argmax(axis=1) == y_test).mean())
    return accuracy, time.perf_counter() - started


def write_plot(path, table):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for kind in NORMS:
        means = [100 * np.mean(table[kind, b]) for b in BATCH_SIZES]
        spreads = [100 * np.std(table[kind, b]) for b in BATCH_SIZES]
        ax.errorbar(BATCH_SIZES, means, yerr=spreads, marker="o", capsize=3, label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    ax.set_xlabel("batch size")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("digits MLP: normalization at small batches")
    ax.legend()
    fig.savefig(path, dpi=100)
    return True


def main(args) -> int:
    epochs = args.epochs if args.epochs is not None else QUICK_EPOCHS if args.quick else EPOCHS
    if epochs < 1:
        raise SystemExit(f"bncore demo: --epochs: expected at least 1, got {epochs}")
    seeds = tuple(args.seed + s for s in (QUICK_SEEDS if args.quick else SEEDS))
    data = load_digits_split(args.seed)
    print(f"bncore demo --small-batch: the {'-'.join(map(str, LAYER_SIZES))} ReLU MLP on digits "
          f"({len(data[0])} train / {len(data[1])} test), {epochs} epochs at every batch size, "
          f"SGD with lr {BASE_LR} x batch/32, seeds {', '.join(map(str, seeds))}")
    print(f"  renorm: rmax {RMAX}, dmax {DMAX}, warmed up over the run; ghost: virtual batches of "
          f"{GHOST_BATCH} (at larger batches; batch norm at the others); groupnorm: {GROUPS} groups")
    print("  cells: final test accuracy (eval mode), mean ± spread (std) over seeds; time: seconds per net",
          flush=True)
    table: dict[tuple[str, int], list[float]] = {}
    times: dict[tuple[str, int], list[float]] = {}
    started = time.perf_counter()
    for batch in BATCH_SIZES:
        for kind in NORMS:
            for seed in seeds:
                acc, sec = run(kind, batch, seed, epochs, data)
                table.setdefault((kind, batch), []).append(acc)
                times.setdefault((kind, batch), []).append(sec)
    header = "norm      | " + " | ".join(f"batch {b:<2}        " for b in BATCH_SIZES) + " | time"
    print("\n" + header)
    print("-" * len(header))
    for kind in NORMS:
        cells = [f"{100 * np.mean(table[kind, b]):5.1f} ± {100 * np.std(table[kind, b]):4.1f}%   "
                 for b in BATCH_SIZES]
        total = sum(np.mean(times[kind, b]) for b in BATCH_SIZES)
        print(f"{kind:<9} | " + " | ".join(cells) + f" | {total:5.1f} s")
    print(f"\n{len(BATCH_SIZES) * len(NORMS) * len(seeds)} nets in {time.perf_counter() - started:.1f} s")
    bn2, bn32 = np.mean(table["batchnorm", 2]), np.mean(table["batchnorm", 32])
    best2 = max(NORMS, key=lambda k: np.mean(table[k, 2]))
    print(f"batch norm: {100 * bn32:.1f}% at batch 32, {100 * bn2:.1f}% at batch 2; best at batch 2: {best2} "
          f"({100 * np.mean(table[best2, 2]):.1f}%)")
    if args.plot and write_plot(args.plot, table):
        print(f"accuracy plot written to {os.path.abspath(args.plot)}")
    return 0
