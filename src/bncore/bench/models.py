"""`python -m bncore.bench.models`: training steps of real models, stock PyTorch against the same
model converted to bncore's layers (`bncore.torch.convert`).

Two models, built here from small configurations (nothing is downloaded):

* bert: transformers' BertModel (embeddings, encoder layers with LayerNorm after attention and after
  the feed-forward block), a masked-language-model style loss on the last hidden state. Skipped,
  with the reason printed, when transformers is not installed.
* resnet: a ResNet-style CNN written here (a stem, basic residual blocks with BatchNorm2d, global
  pooling, a linear head), on channels-last images, with a cross-entropy loss.

A step is forward, loss, backward and an SGD update. Both contenders start from the same weights
(one model, deep-copied, then converted) and get the same batches; every repeat runs one step of
each, the order alternating, and the report gives the median step time with its quartiles (how
noisy it was) for each thread count. The first step's losses of the two are compared: they agree
to float32 rounding, or the row is flagged.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a configuration, never a download


@dataclass(frozen=True)
class Size:
    """What a run builds: BERT's width, depth, batch and sequence; the CNN's width, batch and image."""
    bert_hidden: int
    bert_layers: int
    bert_batch: int
    bert_seq: int
    cnn_width: int
    cnn_batch: int
    cnn_image: int


SIZES = {"small": Size(bert_hidden=256, bert_layers=4, bert_batch=8, bert_seq=128, cnn_width=32, cnn_batch=16,
                       cnn_image=64),
         "tiny": Size(bert_hidden=32, bert_layers=1, bert_batch=2, bert_seq=8, cnn_width=8, cnn_batch=2,
                      cnn_image=16)}


def _resnet(torch: Any, width: int, classes: int = 10) -> Any:
    nn = torch.nn
    module: Any = nn.Module

    class Block(module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        Block(w, w, 1), Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 2 * w, 1), Block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))


@dataclass
class Workload:
    name: str
    model: Any
    batches: list  # inputs (and targets) of the steps, cycled
    loss: Callable[[Any, Any], Any]  # (model, batch) -> scalar loss
    norm_type: Any  # the torch.nn class of its normalization layers

    @property
    def norm_layers(self) -> int:
        return self.count(self.model)

    def count(self, model: Any) -> int:
        return sum(type(m) is self.norm_type for m in model.modules())


def bert_workload(torch: Any, size: Size) -> Workload:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=4096, hidden_size=size.bert_hidden, num_hidden_layers=size.bert_layers,
                     num_attention_heads=max(1, size.bert_hidden // 64), intermediate_size=4 * size.bert_hidden,
                     max_position_embeddings=max(128, size.bert_seq), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer=False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, cfg.vocab_size, (size.bert_batch, size.bert_seq), generator=g),
                torch.randn(size.bert_batch, size.bert_seq, size.bert_hidden, generator=g)) for _ in range(2)]

    def loss(m: Any, batch: Any) -> Any:
        ids, target = batch
        return torch.nn.functional.mse_loss(m(input_ids=ids).last_hidden_state, target)

    return Workload(f"bert {size.bert_layers}x{size.bert_hidden} ({size.bert_batch}, {size.bert_seq})", model,
                    batches, loss, torch.nn.LayerNorm)


def resnet_workload(torch: Any, size: Size) -> Workload:
    model = _resnet(torch, size.cnn_width).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    shape = (size.cnn_batch, 3, size.cnn_image, size.cnn_image)
    batches = [(torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (size.cnn_batch,), generator=g)) for _ in range(2)]

    def loss(m: Any, batch: Any) -> Any:
        x, target = batch
        return torch.nn.functional.cross_entropy(m(x), target)

    return Workload(f"resnet w{size.cnn_width} NHWC {shape}", model, batches, loss, torch.nn.BatchNorm2d)


def _stepper(torch: Any, work: Workload, model: Any) -> Callable[[int], float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step(i: int) -> float:
        opt.zero_grad(set_to_none=True)
        loss = work.loss(model, work.batches[i % len(work.batches)])
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def time_workload(torch: Any, work: Workload, threads: int, steps: int, warmup: int) -> dict:
    """Steps of the stock and the converted model alternating; medians and quartiles in ms."""
    import bncore
    import bncore.torch as bt

    torch.set_num_threads(threads)
    bncore.set_num_threads(threads)
    stock = copy.deepcopy(work.model)
    converted = bt.convert(copy.deepcopy(work.model))
    replaced = work.norm_layers - work.count(converted)  # the stock layers convert left: none
    steppers = {"torch": _stepper(torch, work, stock), "bncore": _stepper(torch, work, converted)}
    first = {name: fn(0) for name, fn in steppers.items()}  # the same weights and batch: the same loss
    for i in range(1, warmup):
        for fn in steppers.values():
            fn(i)
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for k in range(steps):
        for name in (names if k % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steppers[name](warmup + k)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    med = {n: statistics.median(v) for n, v in samples.items()}
    quart = {n: (statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3) for n, v in samples.items()}
    agree = abs(first["torch"] - first["bncore"]) <= 1e-4 * max(1.0, abs(first["torch"]))
    return {"model": work.name, "threads": threads, "steps": steps, "norm_layers": work.norm_layers,
            "replaced_layers": replaced, "ms": med,
            "quartiles_ms": {n: [q[0], q[2]] for n, q in quart.items()},
            "samples_ms": {n: [round(t, 4) for t in v] for n, v in samples.items()},
            "speedup": med["torch"] / med["bncore"], "first_loss": first, "losses_agree": agree}


def format_result(r: dict) -> str:
    q = r["quartiles_ms"]
    flag = "" if r["losses_agree"] else f"  ! first losses differ: {r['first_loss']}"
    return (f"{r['model']:38s} {r['threads']:>2}  torch {r['ms']['torch']:8.2f} [{q['torch'][0]:.1f}-"
            f"{q['torch'][1]:.1f}]  bncore {r['ms']['bncore']:8.2f} [{q['bncore'][0]:.1f}-{q['bncore'][1]:.1f}]"
            f"  {r['speedup']:.2f}x  ({r['replaced_layers']}/{r['norm_layers']} layers){flag}")


def run(size: Size, threads: list[int], steps: int, warmup: int, models: list[str], echo=print) -> dict:
    import torch

    torch.manual_seed(0)
    builders = {"bert": lambda t, s: bert_workload(t, s), "resnet": lambda t, s: resnet_workload(t, s)}
    results, skipped = [], {}
    echo("training step (forward, loss, backward, SGD): median ms [quartiles], torch / bncore")
    for name in models:
        try:
            work = builders[name](torch, size)
        except ImportError as exc:
            skipped[name] = f"{exc}"
            echo(f"{name}: skipped ({exc})")
            continue
        for n in threads:
            r = time_workload(torch, work, n, steps, warmup)
            results.append(r)
            echo(format_result(r))
    return {"results": results, "skipped": skipped, "size": size.__dict__, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bncore.bench.models", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--models", nargs="+", choices=("bert", "resnet"), default=["bert", "resnet"])
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.threads) or args.steps < 1 or args.warmup < 1:
        print("bncore.bench.models: --threads, --steps and --warmup must be positive", file=sys.stderr)
        return 2
    result = run(SIZES[args.size], args.threads, args.steps, args.warmup, args.models,
                 echo=lambda s: print(s, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
