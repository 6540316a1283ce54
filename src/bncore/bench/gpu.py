"""`python -m bncore.bench.gpu`: bncore against torch.cuda on one GPU, and against its copy bandwidth.

First the device-to-device copy bandwidth (a large ``copy_``, timed with CUDA events); then, for
batch norm (NCHW and channels-last), layer norm, group norm and RMS norm, forward and backward, in
float32 and bfloat16: bncore and torch alternate within every repeat, each time is a median over
repeats, and each bncore and torch time is reported as GB/s under the minimal byte model (forward
reads x and writes y; backward reads x and dy and writes dx) and as % of the copy bandwidth.

Needs a CUDA build of bncore, torch with CUDA and a device; without one it exits with status 2
and says what is missing. Every bncore result is checked against torch.cuda before it is timed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import bncore

CASES = [  # (name, shape, layout)
    ("batch_norm NCHW", (32, 256, 56, 56), "nchw"),
    ("batch_norm channels-last", (32, 256, 56, 56), "channels_last"),
    ("layer_norm", (16384, 4096), "rows"),
    ("group_norm", (32, 256, 56, 56), "nchw"),
    ("rms_norm", (16384, 4096), "rows"),
]


def _missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not bncore.build_info()["cuda"]:
        return "this bncore was built without CUDA (reinstall with nvcc on PATH, or -Ccmake.define.BNCORE_CUDA=ON)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not bncore.cuda_available():
        return "bncore sees no CUDA device (no driver?)"
    return None


def _time(torch: Any, fn: Callable[[], Any], warmup: int = 2) -> float:
    """Seconds of one call of fn on the current stream, by CUDA events (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_bandwidth(torch: Any, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    times = [_time(torch, lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * nbytes / statistics.median(times) / 1e9


def _ops(torch: Any, name: str, x: Any, w: Any, b: Any) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """{contender: (forward, backward)} for one case."""
    F = torch.nn.functional
    dy = torch.randn_like(x)
    if name.startswith("batch_norm"):
        fwd_t = lambda: F.batch_norm(x, None, None, w, b, True)  # noqa: E731
        fwd_b = lambda: bncore.batch_norm(x, None, None, w, b, True)  # noqa: E731
        _, m, r = bncore.batch_norm_forward(x, None, None, w, b, True)
        bwd_b = lambda: bncore.batch_norm_backward(dy, x, w, m, r)  # noqa: E731
    elif name == "layer_norm":
        n = (x.shape[-1],)
        fwd_t = lambda: F.layer_norm(x, n, w, b)  # noqa: E731
        fwd_b = lambda: bncore.layer_norm(x, n, w, b)  # noqa: E731
        _, m, r = bncore.layer_norm_forward(x, n, w, b)
        bwd_b = lambda: bncore.layer_norm_backward(dy, x, n, w, m, r)  # noqa: E731
    elif name == "group_norm":
        fwd_t = lambda: F.group_norm(x, 32, w, b)  # noqa: E731
        fwd_b = lambda: bncore.group_norm(x, 32, w, b)  # noqa: E731
        _, m, r = bncore.group_norm_forward(x, 32, w, b)
        bwd_b = lambda: bncore.group_norm_backward(dy, x, 32, w, m, r)  # noqa: E731
    else:
        n = (x.shape[-1],)
        fwd_t = lambda: F.rms_norm(x, n, w, 1e-6)  # noqa: E731
        fwd_b = lambda: bncore.rms_norm(x, n, w, 1e-6)  # noqa: E731
        _, r = bncore.rms_norm_forward(x, n, w, 1e-6)
        bwd_b = lambda: bncore.rms_norm_backward(dy, x, n, w, r)  # noqa: E731
    xg = x.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    args = [t for t in (xg, wg, None if b is None else b.detach().requires_grad_()) if t is not None]
    with torch.enable_grad():
        if name.startswith("batch_norm"):
            yg = F.batch_norm(xg, None, None, wg, args[2], True)
        elif name == "group_norm":
            yg = F.group_norm(xg, 32, wg, args[2])
        elif name == "layer_norm":
            yg = F.layer_norm(xg, (x.shape[-1],), wg, args[2])
        else:
            yg = F.rms_norm(xg, (x.shape[-1],), wg, 1e-6)
    bwd_t = lambda: torch.autograd.grad(yg, args, dy, retain_graph=True)  # noqa: E731
    return {"bncore": (fwd_b, bwd_b), "torch": (fwd_t, bwd_t)}


def run(repeats: int = 15, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict[str, Any]]:
    import torch

    copy = copy_bandwidth(torch)
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy:.0f} GB/s; bncore {bncore.__version__}, "
          f"torch {torch.__version__}, {bncore.build_info()['cuda_architectures']}")
    rows = []
    for name, shape, layout in CASES:
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            g = torch.Generator(device="cuda").manual_seed(0)
            x = (torch.randn(shape, generator=g, device="cuda") * 2 + 1).to(dt)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            c = shape[1] if layout != "rows" else shape[-1]
            w = (torch.rand(c, generator=g, device="cuda") + 0.5).to(dt)
            b = None if name == "rms_norm" else torch.rand(c, generator=g, device="cuda").to(dt)
            ops = _ops(torch, name, x, w, b)
            y_b, y_t = ops["bncore"][0](), ops["torch"][0]()
            tol = 1e-4 if dtype == "float32" else 5e-2
            if not torch.allclose(y_b.float(), y_t.float(), rtol=tol, atol=tol):
                err = (y_b.float() - y_t.float()).abs().max().item()
                print(f"{name} {dtype}: bncore differs from torch by {err:.3g}: not timed")
                continue
            for pass_, k, nbytes in (("forward", 0, 2), ("backward", 1, 3)):
                times: dict[str, list[float]] = {"bncore": [], "torch": []}
                for _ in range(repeats):  # contenders alternate within each repeat
                    for who in ("bncore", "torch"):
                        times[who].append(_time(torch, ops[who][k], warmup=1))
                moved = nbytes * x.numel() * x.element_size()
                row: dict[str, Any] = {"case": name, "dtype": dtype, "pass": pass_, "shape": shape}
                for who, ts in times.items():
                    med = statistics.median(ts)
                    row[who + "_ms"] = med * 1e3
                    row[who + "_gbs"] = moved / med / 1e9
                    row[who + "_pct_copy"] = 100 * row[who + "_gbs"] / copy
                rows.append(row)
                cells = [f"{who} {row[who + '_ms']:8.3f} ms {row[who + '_gbs']:7.0f} GB/s "
                         f"{row[who + '_pct_copy']:5.1f}%" for who in ("bncore", "torch")]
                print(f"{name:26s} {dtype:9s} {pass_:8s}  " + "   ".join(cells), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bncore.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    missing = _missing()
    if missing:
        print(f"bncore GPU bench: cannot run: {missing}", file=sys.stderr)
        return 2
    rows = run(args.repeats)
    if rows:
        ratio = statistics.median(r["bncore_ms"] / r["torch_ms"] for r in rows)
        print(f"summary: {len(rows)} timings; median bncore time / torch time = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
