"""What the bench prints and writes: the machine it ran on, the table (at most 100 columns), the
overhead line, the JSON report and the optional PNG chart.

Every ratio the bench prints is a speed-up of bncore: the other's time divided by bncore's,
so that above 1 bncore is faster. The table's two speed-up columns and the overhead line say
it the same way.
"""
from __future__ import annotations

import json
import os
import platform

import numpy as np

import bncore

from .cases import MIB

WIDTH = 100  # the most columns any line of the table takes

# (header, width, alignment): 89 columns of cells and 11 gaps of one space
COLUMNS = [("op", 20, "<"), ("shape", 13, "<"), ("dtype", 8, "<"), ("layout", 6, "<"),
           ("bncore", 6, ">"), ("alloc", 5, ">"), ("torch", 5, ">"), ("numpy", 5, ">"),
           ("a/out", 5, ">"), ("out=", 5, ">"), ("GB/s", 5, ">"), ("% copy", 6, "<")]
GROUPS = [(4, 8, "ms per call"), (8, 10, "speed-up")]  # titles over columns [first, end)
GAP = " "

EXPLANATION = [
    "Times: median ms per call. bncore: y (forward) or dx (backward) into a preallocated out=. alloc:",
    "the same bncore call allocating it (as PyTorch does). numpy: bncore.reference at float32. speed-up",
    "a/out: alloc ms / bncore ms, of out= over allocating (1: allocating costs nothing); out=: bncore's",
    "over PyTorch, torch ms / bncore ms (above 1: bncore is faster; torch / alloc = out= / a/out).",
    "GB/s: bncore's, under the minimal byte model (forward: read x, write y; backward: read x and dy,",
    "write dx); % copy: of the DRAM copy bandwidth.",
]


def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 10 else f"{v:.3f}"


def _fmt_rate(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def _fmt_speedup(v):
    return "-" if v is None else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def _row(cells):
    return GAP.join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS)).rstrip()


def _start(i):
    return sum(w + len(GAP) for _, w, _ in COLUMNS[:i])


def header() -> str:
    """The group titles (centred over their columns, between dashes), the column names and a rule."""
    groups = ""
    for first, end, title in GROUPS:
        width = _start(end) - len(GAP) - _start(first)
        title = f" {title} " if len(title) + 4 <= width else title
        left = (width - len(title)) // 2
        groups = groups.ljust(_start(first)) + "-" * left + title + "-" * (width - left - len(title))
    line = _row([name for name, _, _ in COLUMNS])
    return groups + "\n" + line + "\n" + "-" * len(line)


def format_row(r: dict) -> str:
    """One case's line of the table. The last cell flags the case: '*' when its bytes fit in the
    last-level cache, '!' when a contender's outputs disagree with the reference."""
    ms = r["ms"]
    pct = r["pct_of_dram_copy"]["bncore"]
    flags = ("*" if r["fits_llc"] else " ") + ("" if r["agrees"] else "!")
    return _row([r["name"], "x".join(str(s) for s in r["shape"]), r["dtype"], r["layout"],
                 _fmt_ms(ms["bncore"]), _fmt_ms(ms["bncore_alloc"]), _fmt_ms(ms["torch"]), _fmt_ms(ms["numpy"]),
                 "-" if r["alloc_over_out"] is None else f"{r['alloc_over_out']:.2f}",
                 _fmt_speedup(r["speedup_vs_torch"]),
                 _fmt_rate(r["gbps"]["bncore"]), f"{pct:.0f}%".rjust(4) + flags])


def overhead_lines(overhead: dict) -> list:
    """The small-call overhead, its speed-up stated as in the table (torch / bncore)."""
    us = overhead["us"]
    lines = [(f"Python overhead, batch norm of a {tuple(overhead['shape'])} {overhead['input']} tensor "
              f"(training, median of {overhead['calls']} calls):"),
             f"  bncore.batch_norm {us['bncore']:.1f} us"]
    if us["torch"] is not None:
        lines[1] += (f", torch.nn.functional.batch_norm {us['torch']:.1f} us: "
                     f"speed-up {us['torch'] / us['bncore']:.2f}x (torch / bncore)")
    return lines


# ----------------------------------------------------------------------------- the machine

def llc_bytes():
    """The size of the largest (last-level) CPU cache from Linux's sysfs, or None."""
    best: tuple[int, int | None] = (0, None)  # (cache level, its size)
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/level") as f:
                    level = int(f.read())
                with open(f"{base}/{entry}/size") as f:
                    text = f.read().strip()
            except (OSError, ValueError):
                continue
            scale = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
            if level > best[0]:
                best = (level, size)
    except (OSError, ValueError):
        pass
    return best[1]


def loadavg():
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM


def openmp_runtimes() -> list:
    """The OpenMP runtime libraries mapped into this process (Linux /proc/self/maps; [] elsewhere).
    One is what bncore wants: libraries linked against the same soname (libgomp.so.1: bncore,
    PyTorch's bundled copy) share the first one loaded, and with it one pool of threads. Two pools
    on the same cores spin against each other after every parallel region (docs/performance.md)."""
    found: list = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                path = fields[5] if len(fields) >= 6 else ""
                if os.path.basename(path).startswith(OPENMP_RUNTIMES) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def machine_info(threads: int, torch) -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"bncore": bncore.__version__, "numpy": np.__version__, "python": platform.python_version()}
    if torch is not None:
        versions["torch"] = torch.__version__
    try:
        import matplotlib

        versions["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "usable_cpus": usable, "threads": threads,
            "llc_bytes": llc_bytes(), "loadavg_start": loadavg(), "openmp_runtimes": openmp_runtimes(),
            "platform": platform.platform(), "machine": platform.machine(), "versions": versions,
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "OMP_WAIT_POLICY",
                                               "GOMP_SPINCOUNT", "BNCORE_POOL", "BNCORE_POOL_MAX_BYTES")
                    if k in os.environ}}


# ----------------------------------------------------------------------------- files

def write_json(path: str, report: dict) -> str:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return f"wrote {path}"


def write_plot(path: str, results: list) -> str:
    """A horizontal bar chart of bncore's speed-up over PyTorch per case; returns a message."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return f"--plot {path}: not written, matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in results if r["speedup_vs_torch"] is not None]
    if not rows:
        return f"--plot {path}: not written, there are no speed-ups over PyTorch to plot (PyTorch not installed)"
    labels = [f"{r['name']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}" for r in rows]
    values = [r["speedup_vs_torch"] for r in rows]
    fig = Figure(figsize=(10, 0.32 * len(rows) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ypos = list(range(len(rows)))[::-1]
    # bars grow from 1 (parity) to the speed-up, on a log scale: 2x faster and 2x slower look alike
    ax.barh(ypos, [v - 1 for v in values], left=1, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    lo, hi = min(min(values), 1) / 1.5, max(max(values), 1) * 1.5
    ax.set_xlim(lo, hi)
    ax.set_xticks([2.0 ** k for k in range(-12, 13) if lo <= 2.0 ** k <= hi])  # ..., 0.5x, 1x, 2x, 4x, ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:.2f}x ", va="center", ha="left" if v >= 1 else "right", fontsize=7)
    ax.set_xlabel("speed-up of bncore over PyTorch (PyTorch time / bncore time, log scale; > 1: bncore faster)")
    ax.set_title("bncore vs PyTorch, median times (bncore writes into out=; PyTorch allocates)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"
