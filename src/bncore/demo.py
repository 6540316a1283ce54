"""`python -m bncore demo`: the classic batch norm result, on a small NumPy MLP.

The same 64-64-64-10 ReLU network is trained on scikit-learn's bundled digits
(8x8 images, no download) twice per learning rate: plain, and with
`bncore.BatchNorm` between each hidden linear layer and its ReLU. Both nets of a
learning rate start from identical weights and see identical minibatches, so
batch norm is the only difference between the two columns of the table.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .layers import BatchNorm

LAYER_SIZES = (64, 64, 64, 10)  # 8x8 pixels in, ten digits out
# a usual learning rate, and one 20 times larger at which the plain net trains
# erratically or collapses to chance (most seeds) while the batch norm one does not
LEARNING_RATES = (0.05, 1.0)
BATCH_SIZE = 64
EPOCHS = 20
QUICK_EPOCHS = 3
TEST_FRACTION = 0.25
TARGET_ACCURACY = 0.95          # the summary's measure of training speed: first epoch at or above it
DTYPE = np.float32              # BatchNorm's parameters are float32; keep the whole net in it


# ----------------------------------------------------------------------------- data

def load_digits_split(seed):
    """(x_train, x_test, y_train, y_test): pixels scaled to [0, 1], a stratified split fixed by `seed`."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit('bncore demo: needs scikit-learn (for its bundled digits data); '
                         'pip install "bncore[demo]"') from None
    digits = load_digits()
    pixels = (digits.data / 16.0).astype(DTYPE)  # the digits' pixels are 0..16
    return train_test_split(pixels, digits.target, test_size=TEST_FRACTION, random_state=seed,
                            stratify=digits.target)


# ----------------------------------------------------------------------------- model

def init_weights(rng):
    """He-initialized (weight, bias) per linear layer, for ReLU nets."""
    return [(rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(DTYPE), np.zeros(fan_out, DTYPE))
            for fan_in, fan_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])]


class MLP:
    """Hidden layers linear -> [batch norm] -> ReLU, then a linear layer giving the logits.

    With batch norm the hidden linear biases are redundant (the batch mean is
    subtracted right after them, so their gradient is zero); they are kept so
    both nets share one set of initial weights.
    """

    def __init__(self, weights, batch_norm: bool):
        self.weights = [w.copy() for w, _ in weights]
        self.biases = [b.copy() for _, b in weights]
        hidden_sizes = LAYER_SIZES[1:-1]
        self.norms = [BatchNorm(size) for size in hidden_sizes] if batch_norm else []

    def train(self):
        for norm in self.norms:
            norm.train()

    def eval(self):
        for norm in self.norms:
            norm.eval()

    def forward(self, x):
        """Logits for x (N, 64); keeps what the backward pass needs."""
        n_hidden = len(self.weights) - 1
        self.layer_inputs = []  # the input of each linear layer, for its weight gradient
        self.relu_inputs = []   # the input of each ReLU, for its mask
        h = x
        for i in range(n_hidden):
            # forward linear
            self.layer_inputs.append(h)
            h = h @ self.weights[i] + self.biases[i]
            # forward batch norm (batch statistics in train mode, running statistics in eval mode)
            if self.norms:
                h = self.norms[i](h)
            # forward ReLU
            self.relu_inputs.append(h)
            h = np.maximum(h, 0)
        # forward output linear
        self.layer_inputs.append(h)
        return h @ self.weights[-1] + self.biases[-1]

    def backward(self, grad_logits):
        """Gradients of every parameter from d(loss)/d(logits) of the last forward."""
        n_hidden = len(self.weights) - 1
        self.weight_grads = [None] * len(self.weights)
        self.bias_grads = [None] * len(self.weights)
        # backward output linear
        grad = grad_logits
        self.weight_grads[-1] = self.layer_inputs[-1].T @ grad
        self.bias_grads[-1] = grad.sum(axis=0)
        grad = grad @ self.weights[-1].T
        for i in reversed(range(n_hidden)):
            # backward ReLU
            grad = grad * (self.relu_inputs[i] > 0)
            # backward batch norm (also sets the layer's weight_grad and bias_grad)
            if self.norms:
                grad = self.norms[i].backward(grad)
            # backward linear; the network's input needs no gradient
            self.weight_grads[i] = self.layer_inputs[i].T @ grad
            self.bias_grads[i] = grad.sum(axis=0)
            if i > 0:
                grad = grad @ self.weights[i].T

    def sgd_step(self, lr):
        for w, b, w_grad, b_grad in zip(self.weights, self.biases, self.weight_grads, self.bias_grads):
            w -= lr * w_grad
            b -= lr * b_grad
        for norm in self.norms:
            norm.weight -= lr * norm.weight_grad
            norm.bias -= lr * norm.bias_grad


def cross_entropy(logits, labels):
    """(mean softmax cross-entropy, its gradient with respect to the logits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)  # exp cannot overflow
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_probs[rows, labels].mean()
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    return float(loss), grad / len(labels)


# ----------------------------------------------------------------------------- training

def train_epoch(net, x, y, order, lr):
    """One epoch of minibatch SGD in `order`; returns the mean training loss."""
    net.train()
    losses = []
    # the last, partial batch is dropped: batch norm needs more than one sample,
    # and a few samples give noisy statistics (it is shuffled in next epoch)
    for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
        batch = order[start:start + BATCH_SIZE]
        logits = net.forward(x[batch])
        loss, grad_logits = cross_entropy(logits, y[batch])
        net.backward(grad_logits)
        net.sgd_step(lr)
        losses.append(loss)
    return float(np.mean(losses))


def test_accuracy(net, x, y):
    net.eval()  # batch norm normalizes with its running statistics, as at inference
    return float((net.forward(x).argmax(axis=1) == y).mean())


class Run:
    """One net's training history at one learning rate."""

    def __init__(self, net):
        self.net = net
        self.losses = []
        self.accuracies = []

    def epoch(self, x_train, y_train, order, lr, x_test, y_test):
        self.losses.append(train_epoch(self.net, x_train, y_train, order, lr))
        self.accuracies.append(test_accuracy(self.net, x_test, y_test))

    def cell(self):
        return f"{self.losses[-1]:8.4f} {100 * self.accuracies[-1]:6.1f}%"


def epochs_to_reach(run, accuracy):
    """The first epoch whose test accuracy is at least `accuracy`, or None."""
    for epoch, acc in enumerate(run.accuracies, start=1):
        if acc >= accuracy:
            return epoch
    return None


# ----------------------------------------------------------------------------- report

def write_plot(path, learning_rates, runs, epochs):
    """The loss curves, one panel per learning rate; returns False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(5 * len(learning_rates), 4), layout="constrained")
    axes = fig.subplots(1, len(learning_rates), squeeze=False)[0]
    x = np.arange(1, epochs + 1)
    for ax, lr, (plain, normed) in zip(axes, learning_rates, runs):
        ax.plot(x, plain.losses, "o-", label="plain")
        ax.plot(x, normed.losses, "o-", label="bncore.BatchNorm")
        ax.set_yscale("log")
        ax.set_title(f"learning rate {lr}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss")
        ax.legend()
    fig.savefig(path, dpi=100)
    return True


def main(args):
    """Runs the demo for the parsed `bncore demo` arguments (epochs, quick, seed, plot)."""
    epochs = args.epochs if args.epochs is not None else QUICK_EPOCHS if args.quick else EPOCHS
    if epochs < 1:
        raise SystemExit(f"bncore demo: --epochs: expected at least 1, got {epochs}")
    x_train, x_test, y_train, y_test = load_digits_split(args.seed)
    rng = np.random.default_rng(args.seed)
    initial_weights = init_weights(rng)
    # every net sees the same minibatches, epoch by epoch
    orders = [rng.permutation(len(x_train)) for _ in range(epochs)]

    sizes = "-".join(str(s) for s in LAYER_SIZES)
    print(f"bncore demo: a {sizes} ReLU MLP on scikit-learn's digits ({len(x_train)} train / {len(x_test)} test "
          f"images), minibatch SGD, batch {BATCH_SIZE}, {epochs} epochs, seed {args.seed}")
    print("  plain: no normalization; batchnorm: bncore.BatchNorm after each hidden linear layer;")
    print("  both start from the same weights and see the same batches")
    print("  loss: mean training loss of the epoch; acc: test accuracy in eval mode (running statistics); "
          "chance is 10%", flush=True)

    started = time.perf_counter()
    runs = []
    for lr in LEARNING_RATES:
        plain, normed = Run(MLP(initial_weights, batch_norm=False)), Run(MLP(initial_weights, batch_norm=True))
        runs.append((plain, normed))
        print(f"\nlearning rate {lr}")
        print(f"      | {'plain':^16} | {'batchnorm':^16}".rstrip())
        print(f"epoch | {'loss':>8} {'acc':>7} | {'loss':>8} {'acc':>7}")
        for epoch, order in enumerate(orders, start=1):
            for run in (plain, normed):
                run.epoch(x_train, y_train, order, lr, x_test, y_test)
            print(f"{epoch:5d} | {plain.cell()} | {normed.cell()}", flush=True)
    elapsed = time.perf_counter() - started

    print(f"\nsummary: {2 * len(LEARNING_RATES)} nets trained in {elapsed:.1f} s")
    for lr, (plain, normed) in zip(LEARNING_RATES, runs):
        for name, run in (("plain", plain), ("batchnorm", normed)):
            reached = epochs_to_reach(run, TARGET_ACCURACY)
            when = f"first reached at epoch {reached}" if reached else "never reached"
            print(f"  lr {lr:<4}  {name:<9}  final test accuracy {100 * run.accuracies[-1]:5.1f}%, "
                  f"{TARGET_ACCURACY:.0%} {when}")

    if write_plot(args.plot, LEARNING_RATES, runs, epochs):
        print(f"\nloss curves written to {os.path.abspath(args.plot)}")
    else:
        print('\nloss curves skipped: matplotlib is not installed (pip install "bncore[demo]")')
    return 0
