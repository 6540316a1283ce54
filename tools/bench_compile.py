"""Steady-state training step time of converted models, eager against torch.compile.

    python tools/bench_compile.py [--steps 20] [--threads 1] [--backend inductor] [--models cnn,hf-resnet,bert]

Three models: a small ResNet-style CNN (batch norm), and transformers' ResNetModel (batch norm) and
BertModel (layer norm) built from small configs (skipped without transformers; nothing is
downloaded). Each runs forward + backward + SGD step on fixed inputs; the first steps (compilation,
warm-up) are not timed and the median of the timed steps is reported, for torch.nn's own layers and
for bncore's, eager and compiled (fullgraph=True). The four variants take turns step by step, so
that a shared machine's changing load slows them alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import bncore
import bncore.torch as bt


class Block(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def small_resnet(channels: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
        Block(channels), Block(channels), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(channels, 10))


def cnn_case() -> tuple[torch.nn.Module, tuple, object]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    target = torch.randint(0, 10, (16,), generator=gen)
    return small_resnet(), (x,), lambda out: torch.nn.functional.cross_entropy(out, target)


def hf_resnet_case() -> tuple[torch.nn.Module, tuple, object] | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import ResNetConfig, ResNetModel
    except ImportError:
        return None
    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    model = ResNetModel(config)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, (x,), lambda out: out.pooler_output.pow(2).mean()


def bert_case() -> tuple[torch.nn.Module, tuple, object] | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return None
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertModel(config)
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, (ids,), lambda out: out.last_hidden_state.pow(2).mean()


CASES = {"cnn": cnn_case, "hf-resnet": hf_resnet_case, "bert": bert_case}


def make_step(model: torch.nn.Module, inputs: tuple, loss_of):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(model(*inputs)).backward()
        opt.step()
        return time.perf_counter() - start
    return step


def interleaved_medians(steps: dict[str, object], rounds: int, warmup: int) -> dict[str, float]:
    """Median step time of each variant, the variants taking turns step by step, so that a machine
    whose load changes (shared cores) slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            t = step()
            if r >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bncore.set_num_threads(args.threads)
    cases = {name: CASES[name]() for name in args.models.split(",")}
    print(f"torch {torch.__version__}, {args.threads} thread(s), backend {args.backend}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    for name, case in cases.items():
        if case is None:
            print(f"{name}: skipped (transformers is not installed)")
            continue
        original, inputs, loss_of = case
        steps = {}
        for label, convert in (("torch", False), ("bncore", True)):
            for compiled in (False, True):
                model = copy.deepcopy(original)
                if convert:
                    model = bt.convert(model)
                if compiled:
                    model = torch.compile(model, fullgraph=True, backend=args.backend)
                steps[(label, compiled)] = make_step(model, inputs, loss_of)
        rows = interleaved_medians(steps, args.steps, args.warmup)
        for label in ("torch", "bncore"):
            eager, comp = rows[(label, False)], rows[(label, True)]
            print(f"{name:9s} {label:6s} eager {eager * 1e3:8.2f} ms   compiled {comp * 1e3:8.2f} ms   "
                  f"compiled/eager {comp / eager:5.3f}")


if __name__ == "__main__":
    main()
